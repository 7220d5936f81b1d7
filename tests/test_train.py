"""train.py end to end on the tiny preset: files, exact resume, kill -9, non-finite guard, SIGINT, DDP."""
import csv
import functools
import io
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import checkpoint as C
import runtime
import train as T
from config import ConfigError, get_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_args(shared, run_dir_parent, **extra):
    """key=value overrides for the tiny preset, pointing at the shared tmp data and a private runs dir."""
    args = {"data_dir": shared["data_dir"], "cache_dir": shared["cache_dir"], "out_dir": str(run_dir_parent),
            "optimizer": "adamw", "val_fraction": 0.1}
    args.update(extra)
    return args


def run_script(args, timeout=300, **popen):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **popen)


def test_two_steps_write_the_expected_files(tiny_data, tmp_path):
    cfg = get_config("tiny", **tiny_args(tiny_data, tmp_path, max_steps=2, optimizer="adamw8bit"))
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    result = T.train(cfg)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # left as they were
    run = cfg.run_dir
    assert result["step"] == 2 and result["status"] == "done"
    for name in ["config.json", "log.csv", "val.csv", "model/model.safetensors", "model/config.json",
                 "checkpoints/step_0000002.pt", "loss.png"]:
        assert os.path.isfile(os.path.join(run, name)), name
    samples = os.listdir(os.path.join(run, "samples"))
    assert "step_0000002_ema.png" in samples and "step_0000002_raw.png" in samples
    with open(os.path.join(run, "log.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2]
    assert all(float(r["loss"]) > 0 and float(r["lr"]) > 0 for r in rows)
    ckpt = torch.load(os.path.join(run, "checkpoints/step_0000002.pt"), weights_only=False)
    assert {"model", "ema", "optimizer", "step", "epoch", "batch_in_epoch", "rng", "config"} <= set(ckpt)


@pytest.mark.parametrize("optimizer", [{}, {"optimizer": "adamw8bit", "flat_8bit": "on"}, {"mixed_precision": "fp16"}])
def test_resume_equals_uninterrupted(tiny_data, tmp_path, optimizer, monkeypatch):
    """N steps + resume + M steps gives the same weights as N + M steps (CPU, exact); fp16 also the loss scale."""
    # the scale doubles every step (until an overflow halves it): a resume that restarted it would differ
    monkeypatch.setattr(T, "LossScale", functools.partial(T.LossScale, growth_interval=1))
    base = tiny_args(tiny_data, tmp_path, max_steps=6, checkpoint_every=3, keep_checkpoints=5,
                     caption_dropout=0.5, **optimizer)
    full = get_config("tiny", run_name="full", **base)
    T.train(full)
    resumed = get_config("tiny", run_name="resumed",
                         resume=os.path.join(full.run_dir, "checkpoints", "step_0000003.pt"), **base)
    T.train(resumed)
    a = torch.load(os.path.join(full.run_dir, "checkpoints", "step_0000006.pt"), weights_only=False)
    b = torch.load(os.path.join(resumed.run_dir, "checkpoints", "step_0000006.pt"), weights_only=False)
    for key in ("model", "ema"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name} differs after resume"
    assert a["loss_scale"] == b["loss_scale"]
    if optimizer.get("mixed_precision") == "fp16":  # the resumed run went on from a scale that had moved
        at3 = torch.load(os.path.join(full.run_dir, "checkpoints", "step_0000003.pt"), weights_only=False)
        assert at3["loss_scale"]["scale"] != 2.0 ** 16


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
def test_fp16_loss_scale_unscales_exactly_skips_overflows_and_adapts(optimizer):
    """optim.LossScale: a scaled backward + unscale gives the same update as none (a power of 2 is exact in
    fp32); a non-finite gradient skips the step and halves the scale, counted as an overflow only while the
    scale is >= 1; growth_interval finite steps double it."""
    from model import DiTConfig, SingleStreamDiT
    from optim import LossScale, make_optimizer, optimizer_update
    cfg = get_config("tiny", optimizer=optimizer, flat_8bit="off")
    torch.manual_seed(0)
    models = [SingleStreamDiT(DiTConfig.from_config(cfg)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    emas = [SingleStreamDiT(DiTConfig.from_config(cfg)).requires_grad_(False) for _ in range(2)]
    for e in emas:
        e.load_state_dict(models[0].state_dict())
    opts = [make_optimizer(m, cfg) for m in models]
    scale = LossScale("cpu", enabled=True, init=2.0 ** 12, growth_interval=2)
    x, text = torch.randn(2, 3, 16, 16), torch.randn(2, 5, cfg.text_dim)
    mask = torch.ones(2, 5, dtype=torch.bool)

    def step(i, poison=1.0):
        for j, (m, e, o) in enumerate(zip(models, emas, opts)):
            o.zero_grad(set_to_none=True)
            loss = m(x, torch.full((2,), 0.3 + 0.1 * i), text, mask).pow(2).mean() + models[j].null_caption.sum()
            loss = loss * poison
            if j == 0:
                loss.backward()
                optimizer_update(m, e, o, cfg, i)
            else:
                scale.backward(loss)
                optimizer_update(m, e, o, cfg, i, scale)

    for i in range(3):
        step(i)
    assert scale.scale.item() == 2.0 ** 13 and not scale.overflow  # doubled after 2 finite steps
    for a, b in zip([*models[0].parameters(), *emas[0].parameters()], [*models[1].parameters(), *emas[1].parameters()]):
        assert torch.equal(a, b)
    before = [p.detach().clone() for p in models[1].parameters()]
    step(3, poison=float("inf"))  # an overflow: skipped, halved, explained by the scale
    assert scale.scale.item() == 2.0 ** 12 and scale.overflow
    assert all(torch.equal(a, b) for a, b in zip(before, models[1].parameters()))
    scale.scale.fill_(0.5)
    step(4, poison=float("nan"))  # below a scale of 1 the gradient itself is not finite: not an overflow
    assert scale.scale.item() == 0.25 and not scale.overflow
    for param in models[1].parameters():  # a NaN loss (a damaged sample): skipped, but the scale stays
        param.grad = torch.full_like(param, float("nan"))
    optimizer_update(models[1], emas[1], opts[1], cfg, 5, scale, loss_finite=torch.tensor(False))
    assert scale.scale.item() == 0.25 and not scale.overflow
    state = scale.state_dict()
    again = LossScale("cpu", enabled=True)
    again.load_state_dict(state)
    assert again.state_dict() == state == {"scale": 0.25, "growth_tracker": 0}
    off = LossScale("cpu", enabled=False)
    off.update(torch.tensor(False))
    assert off.scale.item() == 1.0 and not off.overflow


def test_fp16_nan_losses_are_non_finite_steps_and_leave_the_scale_alone(tiny_data, tmp_path, monkeypatch):
    """A NaN loss says nothing about the loss scale: counted like in bf16/fp32, the scale not lowered (else a
    damaged cache file, met once an epoch, would drive the scale to 0 and the gradients with it)."""
    real, calls = T.flow_matching_loss, {"n": 0}

    def every_third_nan(*args, **kwargs):
        loss, per_sample, t = real(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] % 3 == 0 else loss), per_sample, t

    monkeypatch.setattr(T, "flow_matching_loss", every_third_nan)
    monkeypatch.setattr(T, "LossScale", functools.partial(T.LossScale, init=2.0 ** 8))  # no overflow at 256
    cfg = get_config("tiny", **tiny_args(tiny_data, tmp_path, max_steps=12, mixed_precision="fp16", log_every=1,
                                           val_fraction=0.0))
    assert T.train(cfg)["status"] == "done"
    with open(os.path.join(cfg.run_dir, "log.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [float(r["loss_scale"]) for r in rows] == [256.0] * 12
    assert [int(r["nonfinite"]) for r in rows] == [0, 0, 1] * 4


def test_precision_auto_is_bf16_from_ampere_fp16_on_volta_turing_else_fp32(monkeypatch):
    cfg = get_config("tiny")
    assert T.precision_for(cfg, torch.device("cpu")) is None
    for capability, dtype in (((9, 0), torch.bfloat16), ((8, 6), torch.bfloat16), ((7, 5), torch.float16),
                              ((7, 0), torch.float16), ((6, 1), None)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        assert T.precision_for(cfg, torch.device("cuda")) == dtype, capability
    for setting, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", None)):
        assert T.precision_for(get_config("tiny", mixed_precision=setting), torch.device("cuda")) == dtype


def test_fp16_training_lowers_a_scale_that_overflows_without_stopping_the_run(tiny_data, tmp_path, monkeypatch):
    """An fp16 run whose loss scale starts far too high skips steps until the scale fits; those overflows
    are not non-finite steps (max_nonfinite=3 would stop the run) and the weights stay finite."""
    monkeypatch.setattr(T, "LossScale", functools.partial(T.LossScale, init=2.0 ** 40))
    cfg = get_config("tiny", **tiny_args(tiny_data, tmp_path, max_steps=40, max_nonfinite=3, mixed_precision="fp16",
                                           log_every=1, checkpoint_every=40))
    result = T.train(cfg)
    assert result["status"] == "done" and result["step"] == 40 and not result["diverged"]
    with open(os.path.join(cfg.run_dir, "log.csv")) as f:
        rows = list(csv.DictReader(f))
    scales = [float(r["loss_scale"]) for r in rows]
    assert scales[0] <= 2.0 ** 39 and scales[-1] < 2.0 ** 30 and scales == sorted(scales, reverse=True)
    assert all(int(r["nonfinite"]) == 0 for r in rows)
    assert all(math.isfinite(float(r["grad_norm"])) for r in rows[-5:])  # it found a scale that fits
    ckpt = torch.load(C.list_checkpoints(cfg)[-1], weights_only=False)
    assert ckpt["loss_scale"]["scale"] == scales[-1]
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_non_finite_losses_skip_then_stop(tiny_data, tmp_path, monkeypatch):
    real = T.flow_matching_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        loss, per_sample, t = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2 or calls["n"] >= 4:  # one isolated NaN, then NaN forever
            loss = loss * float("nan")
        return loss, per_sample, t

    monkeypatch.setattr(T, "flow_matching_loss", poisoned)
    cfg = get_config("tiny", **tiny_args(tiny_data, tmp_path, max_steps=20, max_nonfinite=3,
                                           checkpoint_every=1, keep_checkpoints=1))
    result = T.train(cfg)
    assert result["status"] == "stopped: 3 non-finite steps in a row (last good checkpoint kept)"
    assert result["diverged"]  # (train.py exits with 1)
    # steps 1 and 3 were good, step 2 was skipped; 4, 5, 6 non-finite -> stop after counting step 6
    ckpts = C.list_checkpoints(cfg)
    ckpt = torch.load(ckpts[-1], weights_only=False)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    with open(os.path.join(cfg.run_dir, "log.csv")) as f:
        nonfinite = [int(r["nonfinite"]) for r in csv.DictReader(f)]
    assert 1 in nonfinite
    # the counts are read on logging steps: a run of bad steps 3-6 spans two log lines and is counted whole
    calls["n"] = 0

    def bad_in_steps_3_to_6(*args, **kwargs):
        loss, per_sample, t = real(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan") if 3 <= calls["n"] <= 6 else loss), per_sample, t

    monkeypatch.setattr(T, "flow_matching_loss", bad_in_steps_3_to_6)
    cfg = get_config("tiny", **tiny_args(tiny_data, tmp_path, max_steps=20, max_nonfinite=4, log_every=4,
                                           run_name="late", checkpoint_every=100))
    result = T.train(cfg)
    assert result["status"].startswith("stopped: 4 non-finite") and result["step"] == 8
    assert result["status"].endswith("(no checkpoint written yet)")  # none by step 8
    with open(os.path.join(cfg.run_dir, "log.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [(int(r["step"]), int(r["nonfinite"])) for r in rows] == [(4, 2), (8, 2)]
    for r in rows:  # the logged losses are the mean of the good steps: the skipped steps' NaN left out
        assert 0 < float(r["loss"]) < 10


def wait_for(predicate, proc, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.2)
    return False


def test_running_stats_average_the_finite_losses_and_count_runs_of_skipped_steps():
    """The numbers a log line shows: the mean of the finite micro-batch losses, overall and per quarter of t,
    summed over ranks through one packed all-reduce; the skipped steps and the longest run, which goes on
    across a log line."""
    from metrics import RunningStats
    stats = RunningStats(torch.device("cpu"))
    t = torch.tensor([0.1, 0.3, 0.6, 0.9])  # one sample per quarter
    assert stats.add_micro_batch(torch.tensor(2.0), torch.tensor([1.0, 2.0, 3.0, 4.0]), t)
    assert not stats.add_micro_batch(torch.tensor(float("nan")), torch.tensor([5.0, float("nan"), 7.0, 8.0]), t)
    assert stats.add_micro_batch(torch.tensor(4.0), torch.tensor([3.0, 4.0, 5.0, 6.0]), t)
    assert stats.loss_columns() == {"loss": 3.0, "loss_t0": 3.0, "loss_t1": 3.0, "loss_t2": 5.0, "loss_t3": 6.0}
    other = RunningStats(torch.device("cpu"))  # a second rank: one loss of 9, all its samples at t = 0.05
    other.add_micro_batch(torch.tensor(9.0), torch.tensor([9.0, 9.0, 9.0, 9.0]), torch.full((4,), 0.05))
    stats.unpack_losses(stats.packed_losses() + other.packed_losses())  # what the all-reduce sums
    assert stats.loss_columns() == {"loss": 5.0, "loss_t0": 45 / 7, "loss_t1": 3.0, "loss_t2": 5.0, "loss_t3": 6.0}
    stats.new_window()
    assert math.isnan(stats.loss_columns()["loss"]) and stats.loss_columns()["loss_t0"] == ""
    yes, no = torch.tensor(True), torch.tensor(False)
    for failed in (yes, no, yes, yes):  # skipped, updated, then a run of two still going at the log line
        stats.add_step(failed=failed, finite=~failed)
    assert stats.take_skips() == (3, 2)
    stats.add_step(failed=yes, finite=no)  # the run goes on: 3 in a row, 1 skipped in this window
    assert stats.take_skips() == (1, 3)
    stats.add_step(failed=no, finite=no)  # an fp16 overflow: neither skipped nor the end of the run
    stats.add_step(failed=yes, finite=no)
    assert stats.take_skips() == (1, 4)
    stats.add_step(failed=no, finite=yes)
    stats.add_step(failed=yes, finite=no)
    assert stats.take_skips() == (1, 4)  # (the run that reached 4 at the last line still shows; then 1)
    assert stats.take_skips() == (0, 1)


def test_sigkill_leaves_a_loadable_checkpoint_and_resumes(tiny_data, tmp_path):
    args = tiny_args(tiny_data, tmp_path, max_steps=400, checkpoint_every=2, keep_checkpoints=2,
                     run_name="killed")
    cfg = get_config("tiny", **args)
    proc = run_script(["train.py", "tiny"] + [f"{k}={v}" for k, v in args.items()])
    ok = wait_for(lambda: len(C.list_checkpoints(cfg)) >= 2, proc)
    proc.kill()  # SIGKILL at an arbitrary moment
    proc.wait()
    assert ok, proc.stdout.read()
    last = C.list_checkpoints(cfg)[-1]
    state = torch.load(last, weights_only=False)
    assert state["step"] >= 2
    resumed = get_config("tiny", **dict(args, resume="auto", max_steps=state["step"] + 2))
    result = T.train(resumed)
    assert result["step"] == state["step"] + 2


def test_sigint_saves_a_checkpoint_and_exits_cleanly(tiny_data, tmp_path):
    args = tiny_args(tiny_data, tmp_path, max_steps=100000, checkpoint_every=100000, log_every=1,
                     run_name="interrupted")
    cfg = get_config("tiny", **args)
    proc = run_script(["train.py", "tiny"] + [f"{k}={v}" for k, v in args.items()])
    log = os.path.join(cfg.run_dir, "log.csv")
    ok = wait_for(lambda: os.path.exists(log) and sum(1 for _ in open(log)) >= 4, proc)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert ok, out
    assert proc.returncode == 0, out
    assert "stopped by signal" in out and "Traceback" not in out
    ckpts = C.list_checkpoints(cfg)
    assert len(ckpts) == 1 and torch.load(ckpts[0], weights_only=False)["step"] >= 3


def test_a_full_disk_costs_checkpoints_not_the_run(tiny_data, tmp_path, monkeypatch, capsys):
    """torch.save on a full disk leaves a partial file and raises RuntimeError: the temp file goes, training
    goes on, the checkpoints already written stay; a failed final checkpoint still exports the model."""
    real_save = torch.save
    full_disk = {"on": False}

    def save(obj, f, *a, **k):
        if full_disk["on"] and str(f).endswith(".pt.tmp"):
            with open(f, "wb") as out:
                out.write(b"partial")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 3082048 vs 3081940")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    cfg = get_config("tiny", **tiny_args(tiny_data, tmp_path, max_steps=6, checkpoint_every=2, keep_checkpoints=5))
    real_lr_at = T.lr_at

    def lr_at_then_fill_disk(step, cfg, time_frac=0.0):  # the disk is full from the third step on
        full_disk["on"] = step >= 2
        return real_lr_at(step, cfg, time_frac)

    monkeypatch.setattr(T, "lr_at", lr_at_then_fill_disk)
    with pytest.raises(OSError, match=r"step_0000006\.pt: checkpoint not written .*is the disk full"):
        T.train(cfg)
    out = capsys.readouterr().out
    assert "step_0000004.pt: checkpoint not written" in out and "training goes on" in out
    assert os.listdir(os.path.join(cfg.run_dir, "checkpoints")) == ["step_0000002.pt"]  # kept, no temp files
    assert SingleStreamDiT_from(cfg.run_dir).dc.hidden_size == cfg.hidden_size  # the model was exported
    with open(os.path.join(cfg.run_dir, "log.csv")) as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2, 3, 4, 5, 6]  # all six steps trained


def SingleStreamDiT_from(run_dir):
    from model import SingleStreamDiT
    return SingleStreamDiT.from_pretrained(os.path.join(run_dir, "model"))


@pytest.mark.parametrize("optimizer", [{}, {"optimizer": "adamw8bit", "flat_8bit": "on"}])
def test_torchrun_two_processes_train_and_write_once(tiny_data, tmp_path, optimizer):
    from conftest import on_a_free_port
    args = tiny_args(tiny_data, tmp_path, max_steps=2, run_name="ddp", **optimizer)
    codes = []

    def run(port):
        proc = run_script(["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                           "train.py", "tiny"] + [f"{k}={v}" for k, v in args.items()])
        out, _ = proc.communicate(timeout=300)
        codes[:] = [proc.returncode]
        return out

    out = on_a_free_port(run)
    assert codes == [0], out
    run = os.path.join(str(tmp_path), "ddp")
    with open(os.path.join(run, "log.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2]  # one writer: no duplicated rows
    assert out.count("steps in") == 1  # one summary line
    assert os.path.isfile(os.path.join(run, "model", "model.safetensors"))


def test_torchrun_ranks_wait_for_each_other_longer_than_nccls_ten_minutes():
    """The process group (and train.py's host group) wait PROCESS_GROUP_TIMEOUT in a collective: with NCCL's
    default of 10 minutes, ranks that finish their shares of a long preprocessing that far apart ended the job."""
    from conftest import on_a_free_port
    code = ("import torch, torch.distributed as dist, runtime; runtime.setup_distributed(); "
            "print('timeout', dist.distributed_c10d._get_default_group()._get_backend(torch.device('cpu'))"
            ".options._timeout.total_seconds(), flush=True); dist.destroy_process_group()")

    def run(port):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
                   LOCAL_RANK="0")
        r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=120)
        return r.stdout + r.stderr

    out = on_a_free_port(run)
    assert f"timeout {runtime.PROCESS_GROUP_TIMEOUT.total_seconds()}" in out, out
    assert runtime.PROCESS_GROUP_TIMEOUT.total_seconds() >= 3600


def torchrun_with_hooks(hooks, args, ok=True):
    """train.py tiny under torchrun (2 processes) with `hooks` (a folder with a sitecustomize.py) on the path;
    its output (ok: asserted to have ended well)."""
    from conftest import on_a_free_port

    def run(port):
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join([str(hooks), ROOT]))
        proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                                 f"--master_port={port}", "train.py", "tiny"] + [f"{k}={v}" for k, v in args.items()],
                                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0 or not ok, out
        return out
    return on_a_free_port(run)


def test_torchrun_ranks_share_the_encoding_and_the_logged_loss(tiny_data, tmp_path):
    """Each rank encodes a share of a fresh cache, and log.csv's loss is the mean over both ranks' samples:
    a sitecustomize in the workers records what each rank encodes and adds 1000 x rank to its loss. The workers
    end without the interpreter's teardown."""
    from conftest import probe_marks, teardown_probe
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(f"""
import os
if os.environ.get("RANK") is not None and os.environ.get("TORCHELASTIC_RUN_ID"):
    import objective, preprocess
    rank, real_loss, real_encode = int(os.environ["RANK"]), objective.flow_matching_loss, preprocess.encode_files
    def loss(*a, **k):
        value, per_sample, t = real_loss(*a, **k)
        return value + 1000 * rank, per_sample, t
    def encode(cfg, todo, *a, **k):
        with open(os.path.join({str(tmp_path)!r}, f"encoded{{rank}}.txt"), "a") as f:
            f.write(f"{{len(todo)}}\\n")
        return real_encode(cfg, todo, *a, **k)
    objective.flow_matching_loss, preprocess.encode_files = loss, encode
""" + teardown_probe(tmp_path))
    torchrun_with_hooks(hooks, tiny_args(tiny_data, tmp_path, max_steps=2, log_every=1, run_name="shared",
                                         cache_dir=str(tmp_path / "cache")))
    # the workers end with os._exit, not through the interpreter's teardown, where gloo's threads (kept alive
    # by DDP and transformers) now and then abort a process that finished and saved everything
    assert probe_marks(tmp_path) == ["started0", "started1"]
    shares = [int((tmp_path / f"encoded{r}.txt").read_text().split()[0]) for r in range(2)]
    assert shares == [24, 24]  # the 48 images, half each
    with open(os.path.join(tmp_path, "shared", "log.csv")) as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f)]
    assert all(500 < x < 510 for x in losses), losses  # (rank 0's ~2 + rank 1's ~1002) / 2


def test_torchrun_fp16_a_nan_loss_on_one_rank_is_a_non_finite_step_on_both(tiny_data, tmp_path):
    """fp16 under DDP: rank 1's loss is NaN every third step. Both ranks must see a non-finite step (not an
    overflow: the scale stays), or their scales and skip counts would drift apart and max_nonfinite hang them."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text("""
import os
if os.environ.get("TORCHELASTIC_RUN_ID"):
    import objective, optim
    optim.LossScale.__init__.__defaults__ = (2.0 ** 8, 2000)  # a scale that never overflows here
    real, calls = objective.flow_matching_loss, {"n": 0}
    def loss(*a, **k):
        value, per_sample, t = real(*a, **k)
        calls["n"] += 1
        nan = os.environ["RANK"] == "1" and calls["n"] % 3 == 0
        return (value * float("nan") if nan else value), per_sample, t
    objective.flow_matching_loss = loss
""")
    torchrun_with_hooks(hooks, tiny_args(tiny_data, tmp_path, max_steps=12, log_every=1, run_name="nan",
                                         mixed_precision="fp16", max_nonfinite=3, val_fraction=0.0))
    with open(os.path.join(tmp_path, "nan", "log.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [float(r["loss_scale"]) for r in rows] == [256.0] * 12
    assert [int(r["nonfinite"]) for r in rows] == [0, 0, 1] * 4


def test_torchrun_a_signal_during_the_stop_all_reduce_is_not_lost(tiny_data, tmp_path):
    """A SIGTERM that reaches one worker while it waits in the end-of-step all-reduce (of the stop flag built
    before it) must stop the run at the next step's end, not be overwritten by the ranks' 'no stop'."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text("""
import os, signal
if os.environ.get("TORCHELASTIC_RUN_ID") and os.environ["RANK"] == "1":
    import torch, torch.distributed as dist
    real, calls = dist.all_reduce, {"n": 0}
    def all_reduce(tensor, *a, **k):
        if tensor.dtype == torch.float64:  # train.py's stop/time flags, once a step
            calls["n"] += 1
            if calls["n"] == 3:
                os.kill(os.getpid(), signal.SIGTERM)
        return real(tensor, *a, **k)
    dist.all_reduce = all_reduce
""")
    out = torchrun_with_hooks(hooks, tiny_args(tiny_data, tmp_path, max_steps=40, log_every=1, run_name="late",
                                               checkpoint_every=1000))
    assert "stopped by signal 15 at step 4 (checkpoint saved)" in out, out[-2000:]


def test_torchrun_a_killed_process_leaves_the_last_completed_step_checkpointed(tiny_data, tmp_path):
    """kill -9 of one worker (the out-of-memory killer) mid-step: rank 0's all-reduce fails; it checkpoints the
    last completed step and exports, with one line (was a traceback losing the steps since the last checkpoint)."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text("""
import os, signal
if os.environ.get("TORCHELASTIC_RUN_ID") and os.environ["RANK"] == "1":
    import objective
    real, calls = objective.flow_matching_loss, {"n": 0}
    def loss(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:  # step 5's forward
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*a, **k)
    objective.flow_matching_loss = loss
""")
    args = tiny_args(tiny_data, tmp_path, max_steps=40, run_name="killed", checkpoint_every=1000)
    out = torchrun_with_hooks(hooks, args, ok=False)
    assert "error: another process of the job ended: " in out and "step 4 is checkpointed" in out, out[-3000:]
    assert "[rank0]: Traceback" not in out, out[-3000:]
    cfg = get_config("tiny", **args)
    assert [C.checkpoint_step(p) for p in C.list_checkpoints(cfg)] == [4]
    from model import exported_step
    assert exported_step(os.path.join(cfg.run_dir, "model")) == 4


def test_torchrun_rank_0_ending_with_an_error_is_one_line_on_every_rank(tiny_data, tmp_path):
    """Rank 0 cannot write the last checkpoint (a full disk): it exports and ends with one line; rank 1, waiting
    for it in the last barrier, stops with one line too (was a traceback from the barrier). The same for a
    data_dir that rank 0 alone checks (it generates the shapes data)."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text("""
import os
if os.environ.get("TORCHELASTIC_RUN_ID"):
    import checkpoint
    real = checkpoint.save_checkpoint
    def save(cfg, state, say=print):
        if state["step"] == cfg.max_steps:
            raise checkpoint.WriteError("step_0000004.pt: checkpoint not written (no space left)")
        return real(cfg, state, say)
    checkpoint.save_checkpoint = save
""")
    args = tiny_args(tiny_data, tmp_path, max_steps=4, run_name="full_disk")
    out = torchrun_with_hooks(hooks, args, ok=False)
    assert "error: step_0000004.pt: checkpoint not written" in out, out[-3000:]
    assert "[rank1]: Traceback" not in out and "[rank0]: Traceback" not in out, out[-3000:]
    # rank 0 alone refuses a data_dir (not a shapes set): rank 1 waited for it in the cache's barrier
    stray = tmp_path / "not_shapes"
    stray.mkdir()
    (stray / "photo.png").write_bytes(b"not ours")
    args.update(data_dir=str(stray), cache_dir=str(tmp_path / "stray_cache"), run_name="stray")
    out = torchrun_with_hooks(hooks, args, ok=False)
    assert "no generated shapes set" in out and "[rank1]: Traceback" not in out, out[-3000:]


def test_torchrun_a_resume_after_the_time_limit_trains_no_step(tiny_data, tmp_path):
    """The ranks stop on the clock of the one that started first (rank 0 sets up the run folder and encodes the
    prompts meanwhile, here 3 s): the checkpoint's clock is that one, so a resume trains no step (rank 0's own
    clock was saved: every resume trained a few steps more and wrote another checkpoint)."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text("""
import os, time
if os.environ.get("TORCHELASTIC_RUN_ID") and os.environ["RANK"] == "0":
    import sample
    real = sample.encode_prompts
    def slow(*a, **k):
        time.sleep(3)
        return real(*a, **k)
    sample.encode_prompts = slow
""")
    args = tiny_args(tiny_data, tmp_path, max_steps=100000, checkpoint_every=100000, max_minutes=0.1, run_name="clock")
    out = torchrun_with_hooks(hooks, args)
    assert "stopped after max_minutes=0.1" in out, out[-3000:]
    cfg = get_config("tiny", **args)
    [saved] = C.list_checkpoints(cfg)
    out = torchrun_with_hooks(hooks, dict(args, resume="auto"))
    assert f"max_minutes=0.1 was used up at step {C.checkpoint_step(saved)}" in out, out[-3000:]
    assert C.list_checkpoints(cfg) == [saved]


def test_torchrun_resume_is_exact_and_keeps_each_ranks_noise(tiny_data, tmp_path, capsys):
    """Under torchrun: the cache is built by both ranks (a fresh cache_dir), each rank's noise/t stream is in
    the checkpoint, so 2 + resume + 2 steps equal 4 uninterrupted steps (with rank 0's stream on both ranks
    after a resume they did not); a resume with one process goes on at the same place in the epoch."""
    from conftest import on_a_free_port
    base = tiny_args(tiny_data, tmp_path, checkpoint_every=2, keep_checkpoints=5, cache_dir=str(tmp_path / "cache"))

    def torchrun(**extra):
        args = dict(base, **extra)
        def run(port):
            proc = run_script(["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                               "train.py", "tiny"] + [f"{k}={v}" for k, v in args.items()])
            out, _ = proc.communicate(timeout=300)
            assert proc.returncode == 0, out
            return out
        return on_a_free_port(run)

    torchrun(run_name="full", max_steps=4)
    ckpt = lambda run, n: torch.load(os.path.join(tmp_path, run, "checkpoints", f"step_{n:07d}.pt"), weights_only=False)
    at2 = ckpt("full", 2)
    assert at2["world_size"] == 2 and len(at2["rng_ranks"]) == 2
    assert not torch.equal(at2["rng_ranks"][0]["gen"], at2["rng_ranks"][1]["gen"])
    resume = os.path.join(tmp_path, "full", "checkpoints", "step_0000002.pt")
    torchrun(run_name="resumed", max_steps=4, resume=resume)
    a, b = ckpt("full", 4), ckpt("resumed", 4)
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), f"{name} differs after a torchrun resume"
    single = T.train(get_config("tiny", **dict(base, run_name="single", max_steps=3, resume=resume)))
    assert single["step"] == 3 and "note: resuming a 2-process run with 1" in capsys.readouterr().out
    assert ckpt("single", 3)["batch_in_epoch"] == 2 * at2["batch_in_epoch"] + 1


def test_torchrun_job_signalled_as_a_whole_saves_a_checkpoint(tiny_data, tmp_path):
    """A scheduler's SIGTERM to every process of a torchrun job reaches each worker twice (directly and
    forwarded by torchrun): still one request to stop, so the checkpoint is saved, not given up on."""
    from conftest import on_a_free_port
    args = tiny_args(tiny_data, tmp_path, max_steps=100000, checkpoint_every=100000, log_every=1, run_name="job")
    log = os.path.join(tmp_path, "job", "log.csv")

    def run(port):
        proc = run_script(["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                           "train.py", "tiny"] + [f"{k}={v}" for k, v in args.items()], start_new_session=True)
        ok = wait_for(lambda: os.path.exists(log) and sum(1 for _ in open(log)) >= 4, proc)
        if ok:  # each worker, then torchrun (which sends each worker another)
            with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
                for worker in f.read().split():
                    os.kill(int(worker), signal.SIGTERM)
            time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
        return out

    out = on_a_free_port(run)
    assert "checkpoint saved" in out, out[-3000:]
    ckpts = os.listdir(os.path.join(tmp_path, "job", "checkpoints"))
    assert len(ckpts) == 1 and os.path.isfile(os.path.join(tmp_path, "job", "model", "model.safetensors"))


def test_sanity_check_overfits(tiny_data, tmp_path):
    from sanity_check import sanity_check
    cfg = get_config("tiny", **tiny_args(tiny_data, tmp_path))
    for prediction in ("x", "edm"):  # (the tiny preset's, and the slowest to overfit)
        cfg = get_config("tiny", **tiny_args(tiny_data, tmp_path, prediction=prediction))
        result = sanity_check(cfg, verbose=False)  # the default steps suffice
        assert result["ok"] and result["factor"] >= 10 and os.path.isfile(result["path"]), result["factor"]
    from config import ConfigError
    from sanity_check import split_args
    for bad in ("steps=0", "lr=-1", "min_factor=0", "lr=nan", "min_factor=inf"):
        with pytest.raises(ConfigError, match=bad.split("=")[0] + ".*must be a number > 0"):
            split_args([bad])


def test_resume_errors_and_fallback(tiny_data, tmp_path, capsys):
    from config import ConfigError
    args = tiny_args(tiny_data, tmp_path, max_steps=4, checkpoint_every=2, keep_checkpoints=3, run_name="r")
    cfg = get_config("tiny", **args)
    T.train(cfg)
    newest = C.list_checkpoints(cfg)[-1]
    with open(newest, "wb") as f:  # damage the newest checkpoint
        f.write(b"not a checkpoint")
    path, state = C.load_resume_checkpoint(get_config("tiny", **dict(args, resume="auto")))
    assert path.endswith("step_0000002.pt") and state["step"] == 2  # fell back to the older one
    for foreign in (torch.zeros(3), {"latents": torch.zeros(3)}):  # readable, but not one of our checkpoints
        torch.save(foreign, newest)
        assert C.load_resume_checkpoint(get_config("tiny", **dict(args, resume="auto")))[0] == path
    with pytest.raises(ConfigError, match="not a readable checkpoint"):
        C.load_resume_checkpoint(get_config("tiny", **dict(args, resume=newest)))
    with pytest.raises(ConfigError, match="no such checkpoint"):
        T.train(get_config("tiny", **dict(args, resume=str(tmp_path / "missing.pt"))))
    wider = get_config("tiny", **dict(args, run_name="wider", hidden_size=64, resume=path))
    with pytest.raises(ConfigError, match="does not match this config .hidden_size=32 there, 64 here"):
        T.train(wider)
    switched = T.train(get_config("tiny", **dict(args, run_name="r8", optimizer="adamw8bit", max_steps=3,
                                                 resume=path)))  # another optimiser: a fresh state for it
    assert switched["step"] == 3 and switched["status"] == "done"
    capsys.readouterr()
    flat = T.train(get_config("tiny", **dict(args, run_name="r8", optimizer="adamw8bit", flat_8bit="on", max_steps=4,
                                             resume="auto")))  # the state per tensor, this run's flat
    out = capsys.readouterr().out
    assert flat["step"] == 4 and "its optimiser state is per tensor, this run's flat (flat_8bit)" in out
    auto = T.train(get_config("tiny", **dict(args, run_name="r8", optimizer="adamw8bit", max_steps=5,
                                             resume="auto")))  # auto takes the checkpoint's layout: flat
    assert auto["step"] == 5 and "fresh state" not in capsys.readouterr().out
    # resumed on a cache of other text embeddings (a shorter max_token_length): a warning, not a note
    other = T.train(get_config("tiny", **dict(args, run_name="r8", optimizer="adamw8bit", max_steps=6, resume="auto",
                                              max_token_length=12, cache_dir=str(tmp_path / "cache12"))))
    out = capsys.readouterr().out
    assert other["step"] == 6 and "warning: resuming with changed settings: " in out
    assert "max_token_length 16 -> 12" in out and "trained on other text embeddings or latents" in out


def test_a_resume_on_another_kind_of_device_or_fewer_gpus_restores_what_fits(tiny_data, tmp_path, monkeypatch,
                                                                             capsys):
    """device= may change on resume, but a CUDA generator's state (16 bytes: seed, offset) does not fit a CPU
    generator (5056 bytes) nor the other way round (set_state raises): the noise stream then starts afresh.
    A run on a machine with more GPUs saved one global CUDA state per GPU: only the visible ones are restored."""
    args = tiny_args(tiny_data, tmp_path, max_steps=2, checkpoint_every=2, run_name="gpu")
    T.train(get_config("tiny", **args))
    path = C.list_checkpoints(get_config("tiny", **args))[-1]
    ckpt = torch.load(path, weights_only=False)
    cuda_gen = torch.tensor([7, 0], dtype=torch.int64).view(torch.uint8)  # what torch.Generator("cuda") saves
    ckpt["rng"] = dict(ckpt["rng"], gen=cuda_gen, cuda=[cuda_gen.clone(), cuda_gen.clone()])  # two GPUs there
    torch.save(ckpt, path)
    capsys.readouterr()
    result = T.train(get_config("tiny", **dict(args, max_steps=3, resume=path)))  # here: a CPU
    assert result["step"] == 3 and result["status"] == "done"
    assert "written on another kind of device" in capsys.readouterr().out

    class CudaGenerator:  # torch.Generator("cuda")'s state handling, on a machine without one
        state = cuda_gen.clone()

        def get_state(self):
            return self.state.clone()

        def set_state(self, state):
            if state.numel() != 16:
                raise RuntimeError("RNG state is wrong size")
            self.state = state.clone()

    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: restored.append(list(states)))
    assert C.set_rng_state(ckpt["rng"], CudaGenerator())  # a GPU run on one GPU of the two it had
    assert len(restored[-1]) == 1
    cpu_state = C.rng_state(torch.Generator())
    assert not C.set_rng_state(cpu_state, CudaGenerator())  # a CPU run resumed on a GPU: no error


def test_a_resume_goes_on_with_the_clock_the_logs_and_its_own_checkpoints(tiny_data, tmp_path, capsys):
    """Resuming from step 4 of a 6-step run: the log rows of steps 5-6 (and a row cut off by a kill) go,
    the later checkpoint is renamed *.abandoned (pruning and resume=auto must not prefer it), and the
    max_minutes clock goes on from the checkpoint's (a resumed run at its time limit stops at once)."""
    from config import ConfigError
    args = tiny_args(tiny_data, tmp_path, max_steps=6, checkpoint_every=2, keep_checkpoints=3, run_name="b")
    cfg = get_config("tiny", **args)
    T.train(cfg)
    with open(os.path.join(cfg.run_dir, "log.csv"), "a") as f:
        f.write("7,0,0.41")  # cut off mid-row
    step4 = os.path.join(C.checkpoint_dir(cfg), "step_0000004.pt")
    state = torch.load(step4, weights_only=False)
    assert 0 < state["train_seconds"] < 60
    state["train_seconds"] = 600.0  # as if 10 minutes had been spent up to step 4
    torch.save(state, step4)
    lock = C.lock_run(cfg)  # another train.py on the run
    with pytest.raises(ConfigError, match="in use by another train.py"):
        T.train(get_config("tiny", **dict(args, resume=step4)))
    C.unlock_run(lock)
    branch = get_config("tiny", **dict(args, resume=step4, max_steps=10, max_minutes=10.0, learning_rate=5e-4))
    result = T.train(branch)
    assert result["status"].startswith("max_minutes=10.0 was used up") and result["step"] == 4
    assert "note: resuming with changed settings: learning_rate 0.001 -> 0.0005" in capsys.readouterr().out
    with open(os.path.join(cfg.run_dir, "log.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    names = sorted(os.listdir(C.checkpoint_dir(cfg)))
    assert names == ["step_0000002.pt", "step_0000004.pt", "step_0000006.pt.abandoned"]
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".lock")]
    nested = get_config("tiny", **dict(args, run_name="sweep/lr5e-4"))  # a run in a folder of runs
    C.unlock_run(C.lock_run(nested))
    open(os.path.join(C.checkpoint_dir(cfg), "step_final.pt"), "w").close()  # a stray file: not ours
    torch.save(state, os.path.join(C.checkpoint_dir(cfg), "step_10000000.pt"))
    assert [C.checkpoint_step(p) for p in C.list_checkpoints(cfg)] == [2, 4, 10000000]  # by step


def test_a_lock_left_to_the_dataloader_workers_of_a_killed_run_is_waited_for(tmp_path):
    """kill -9 of train.py with num_workers > 0: its DataLoader workers (forked with the lock's file) hold the
    lock for seconds more. A resume=auto right after waits for them, not 'in use by another train.py'."""
    cfg = get_config("tiny", out_dir=str(tmp_path), run_name="killed")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock_file = tmp_path / ".killed.lock"
    lock_file.write_text(gone.stdout.strip())  # the killed train.py's pid (it ran and ended)
    worker = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(2)",
                               str(lock_file)], stdout=subprocess.PIPE, text=True)
    assert worker.stdout.readline().strip() == "locked"
    start = time.time()
    lock = C.lock_run(cfg)  # waits for the 'worker' to end
    assert time.time() - start > 1
    C.unlock_run(lock)
    worker.wait(timeout=30)


def test_a_fresh_run_sets_an_earlier_one_in_its_folder_aside(tiny_data, tmp_path):
    args = tiny_args(tiny_data, tmp_path, checkpoint_every=2, run_name="same")
    first = get_config("tiny", **dict(args, max_steps=6))
    T.train(first)
    T.train(get_config("tiny", **dict(args, max_steps=2)))  # e.g. `python train.py` again after editing config.py
    T.train(get_config("tiny", **dict(args, max_steps=4, resume="auto")))  # resuming stays in the folder
    assert sorted(os.listdir(tmp_path)) == ["same", "same.1"]
    assert [os.path.basename(p) for p in C.list_checkpoints(first)] == ["step_0000002.pt", "step_0000004.pt"]
    with open(os.path.join(first.run_dir, "log.csv")) as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2, 3, 4]  # only the new run, resumed
    earlier = os.path.join(tmp_path, "same.1")
    assert sorted(os.listdir(os.path.join(earlier, "checkpoints"))) == ["step_0000004.pt", "step_0000006.pt"]
    with open(os.path.join(earlier, "log.csv")) as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2, 3, 4, 5, 6]


def test_max_minutes_stops_cleanly_with_a_checkpoint(tiny_data, tmp_path):
    cfg = get_config("tiny", **tiny_args(tiny_data, tmp_path, max_steps=1000, max_minutes=1e-6,
                                           checkpoint_every=1000, log_every=5, run_name="timed"))
    result = T.train(cfg)
    assert result["status"].startswith("stopped after max_minutes") and result["step"] == 1
    assert [os.path.basename(p) for p in C.list_checkpoints(cfg)] == ["step_0000001.pt"]
    assert os.path.isfile(os.path.join(cfg.run_dir, "model", "model.safetensors"))
    with open(os.path.join(cfg.run_dir, "log.csv")) as f:  # the steps since the last log line are logged too
        assert [r["step"] for r in csv.DictReader(f)] == ["1"]


def test_a_run_ended_by_max_minutes_validates_and_samples_its_last_step(tiny_data, tmp_path):
    """val_every=0 is "end only": a run the time limit ended had no validation and no sample grid at all."""
    cfg = get_config("tiny", **tiny_args(tiny_data, tmp_path, max_steps=1000, max_minutes=1e-6, val_every=0,
                                           run_name="timed_val"))
    assert T.train(cfg)["step"] == 1
    with open(os.path.join(cfg.run_dir, "val.csv")) as f:
        assert [r["step"] for r in csv.DictReader(f)] == ["1"]
    assert sorted(os.listdir(os.path.join(cfg.run_dir, "samples"))) == ["step_0000001_ema.png", "step_0000001_raw.png"]


def test_self_consistency_starts_by_the_clock_in_a_run_that_max_minutes_ends(tiny_data, tmp_path, monkeypatch):
    """self_consistency_start is a fraction of training: a run that the time limit will end (as the learning
    rate anneals, lr_at's time_frac) switches it on by the clock, not only at that fraction of max_steps."""
    base = tiny_args(tiny_data, tmp_path, max_steps=2, run_name="clock", self_consistency_loss=1.0,
                     self_consistency_start=0.5)
    T.train(get_config("tiny", **base))
    path = C.list_checkpoints(get_config("tiny", **base))[-1]
    ckpt = torch.load(path, weights_only=False)
    ckpt["train_seconds"] = 0.999 * 60 * 0.01  # 99.9% of max_minutes=0.01 used: past the start by the clock
    torch.save(ckpt, path)
    with_ema = []
    real = T.flow_matching_loss

    def spy(model, batch, cfg, gen, ema=None, **kw):
        if gen is not None:  # a training step's (validation's gives t and eps)
            with_ema.append(ema is not None)
        return real(model, batch, cfg, gen, ema, **kw)
    monkeypatch.setattr(T, "flow_matching_loss", spy)
    T.train(get_config("tiny", **dict(base, max_steps=1000, max_minutes=0.01, resume="auto")))
    assert with_ema and all(with_ema)  # step 2 of 1000, but 99.9% of the time


def test_fused_adamw_matches_the_per_tensor_one_and_loads_its_state():
    """make_optimizer's torch AdamW runs fused (one kernel for all weights); it must update like the
    plain (foreach) AdamW and take over that one's state from an older checkpoint."""
    from model import DiTConfig, SingleStreamDiT
    cfg = get_config("tiny", optimizer="adamw", weight_decay=0.01)
    torch.manual_seed(0)
    a = SingleStreamDiT(DiTConfig.from_config(cfg))
    b = SingleStreamDiT(DiTConfig.from_config(cfg))
    b.load_state_dict(a.state_dict())
    opt_a = T.make_optimizer(a, cfg)
    opt_b = torch.optim.AdamW(b.param_groups(cfg.weight_decay), lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                              foreach=True)
    assert opt_a.defaults["fused"] and not opt_b.defaults["fused"]
    gen = torch.Generator().manual_seed(1)

    def steps(n):
        for _ in range(n):
            for pa, pb in zip(a.parameters(), b.parameters()):
                pa.grad = torch.randn(pa.shape, generator=gen)
                pb.grad = pa.grad.clone()
            opt_a.step()
            opt_b.step()

    init = a.joint_blocks[0].mlp.w3.weight.detach().clone()
    steps(3)
    assert (a.joint_blocks[0].mlp.w3.weight - init).abs().max() > 1e-3  # the steps moved the weights
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=name)
    opt_a = T.make_optimizer(a, cfg)
    saved = io.BytesIO()
    torch.save(opt_b.state_dict(), saved)  # a checkpoint of a run with the per-tensor AdamW ...
    saved.seek(0)
    opt_a.load_state_dict(torch.load(saved, weights_only=True))  # ... resumed with the fused one
    steps(2)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("flat", ["off", "on"])
def test_adamw8bit_without_per_tensor_sync_matches_bitsandbytes(flat):
    """make_optimizer's AdamW8bit skips bnb's per-parameter synchronize and must update exactly like it; with
    flat_8bit=on the weights are views into a few flat buffers, updated a buffer at a time: still exactly."""
    import bitsandbytes as bnb
    from model import DiTConfig, SingleStreamDiT
    cfg = get_config("tiny", optimizer="adamw8bit", hidden_size=64, num_heads=2, flat_8bit=flat)
    torch.manual_seed(0)
    a = SingleStreamDiT(DiTConfig.from_config(cfg))
    b = SingleStreamDiT(DiTConfig.from_config(cfg))
    b.load_state_dict(a.state_dict())
    a_init = a.joint_blocks[0].mlp.w3.weight.detach().clone()
    opt_a = T.make_optimizer(a, cfg)
    opt_b = bnb.optim.AdamW8bit(b.param_groups(cfg.weight_decay), lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2))
    assert type(opt_a).step is not bnb.optim.AdamW8bit.step
    assert any(p.numel() >= 4096 for p in a.parameters())  # some tensors take the 8-bit blockwise path
    assert any(p.numel() < 4096 for p in a.parameters())  # and some keep 32-bit moments
    params = [p for g in opt_a.param_groups for p in g["params"]]
    assert len(params) == (4 if flat == "on" else len(list(a.parameters())))  # (no) decay x 8-bit/32-bit
    gen = torch.Generator().manual_seed(1)

    def steps(n):
        for _ in range(n):
            opt_a.zero_grad(), opt_b.zero_grad()
            for pa, pb in zip(a.parameters(), b.parameters()):
                pa.grad = torch.randn(pa.shape, generator=gen)
                pb.grad = pa.grad.clone()
            opt_a.step()
            opt_b.step()

    steps(3)
    assert not torch.equal(a.joint_blocks[0].mlp.w3.weight, a_init)  # the steps did move the weights
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    # the per-tensor state, or each weight's share of its flat buffer's: 8-bit moments, absmax, step count
    where = {id(p): (flat_p, at) for flat_p, views in opt_a.members for p, at in views}
    for pa, pb in zip(a.parameters(), b.parameters()):
        flat_p, at = where.get(id(pa), (pa, 0))
        sa, sb = opt_a.state[flat_p], opt_b.state[pb]
        assert sa.keys() == sb.keys() and sa["step"] == sb["step"] == 3 and "state1" in sa
        if flat == "on":
            assert pa.untyped_storage().data_ptr() == flat_p.untyped_storage().data_ptr()  # a view of it
        for k in ("state1", "state2", "absmax1", "absmax2"):
            if k in sb:
                per = 256 if k.startswith("absmax") else 1
                assert torch.equal(sa[k].reshape(-1)[at // per:at // per + sb[k].numel()], sb[k].reshape(-1)), k
    saved = io.BytesIO()  # a checkpoint of both (views into flat buffers save and load as weights)
    torch.save({"model": a.state_dict(), "opt": opt_a.state_dict()}, saved)
    saved.seek(0)
    ckpt = torch.load(saved, weights_only=True)
    torch.manual_seed(5)
    a = SingleStreamDiT(DiTConfig.from_config(cfg))
    opt_a = T.make_optimizer(a, cfg)
    a.load_state_dict(ckpt["model"])
    opt_a.load_state_dict(ckpt["opt"])
    steps(2)  # resumed: still equal to the optimiser that went on
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    if flat == "on":  # the flat gradients are freed after the update, not held through the next forward
        assert all(p.grad is None for g in opt_a.param_groups for p in g["params"])
        for p in a.parameters():  # as .to(another device) does: no longer views of the optimiser's buffers
            p.data = p.data.clone()  # -> an error, not silent updates of the buffers
        with pytest.raises(RuntimeError, match="moved or replaced after the optimiser was made"):
            steps(1)


@pytest.mark.parametrize("optimizer,flat", [("adamw", "off"), ("adamw8bit", "off"), ("adamw8bit", "on")])
def test_a_non_finite_gradient_skips_the_step_on_the_device_like_the_host_check(optimizer, flat, monkeypatch):
    """optimizer_update with fused AdamW decides on the device (found_inf, an EMA weight of 0): it must give
    exactly what the host-side check gives (the adamw8bit path): a NaN or inf step changes nothing at all."""
    import optim
    from model import DiTConfig, SingleStreamDiT
    cfg = get_config("tiny", optimizer=optimizer, hidden_size=64, num_heads=2, grad_clip=1.0, flat_8bit=flat)
    torch.manual_seed(0)
    models = [SingleStreamDiT(DiTConfig.from_config(cfg)) for _ in range(4)]  # a, its EMA, b, its EMA
    for m in models[1:]:
        m.load_state_dict(models[0].state_dict())
    (a, ema_a, b, ema_b), opt_a, opt_b = models, T.make_optimizer(models[0], cfg), T.make_optimizer(models[2], cfg)
    assert optim.skips_on_device(opt_a) == (optimizer == "adamw")
    on_device = optim.skips_on_device
    gen = torch.Generator().manual_seed(1)

    def state(m, ema, opt):
        return ([p.detach().clone() for p in m.parameters()] + [p.clone() for p in ema.parameters()]
                + [v.clone() for st in opt.state.values() for v in st.values() if torch.is_tensor(v)])

    for bad in (None, float("nan"), None, float("inf"), float("nan"), None):
        for pa, pb in zip(a.parameters(), b.parameters()):
            pa.grad = torch.randn(pa.shape, generator=gen)
            if bad is not None and pa is next(a.parameters()):
                pa.grad[0] = bad  # one bad value anywhere makes the norm non-finite
            pb.grad = pa.grad.clone()
        before = state(a, ema_a, opt_a)
        monkeypatch.setattr(optim, "skips_on_device", on_device)
        norm_a, finite_a = optim.optimizer_update(a, ema_a, opt_a, cfg, step=5)
        monkeypatch.setattr(optim, "skips_on_device", lambda opt: False)  # the host-side check
        norm_b, finite_b = optim.optimizer_update(b, ema_b, opt_b, cfg, step=5)
        after_a, after_b = state(a, ema_a, opt_a), state(b, ema_b, opt_b)
        assert bool(finite_a) == bool(finite_b) == (bad is None)
        assert len(after_a) == len(after_b) and all(torch.equal(x, y) for x, y in zip(after_a, after_b))
        changed = [not torch.equal(x, y) for x, y in zip(before, after_a)] if len(before) == len(after_a) else [1]
        assert any(changed) == (bad is None)  # a good step moves weights, EMA and state; a bad one nothing
    steps = {int(st["step"]) for st in opt_a.state.values()}
    assert steps == {3}  # three good steps counted (bias correction), the skipped ones not
    with torch.device("meta"):  # the EMA takes the weight as a device tensor: no .item() (a sync on CUDA)
        ema, net = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
        optim.update_ema(ema, net, torch.tensor(True) * 0.5)


def test_compile_for_training_regional_with_checkpointing_matches_eager():
    """compile=off leaves the model as is; with grad_checkpointing the blocks are compiled one by one
    (checkpointed around) and the loss and every gradient equal the eager model's."""
    import bench
    from model import DiTConfig, SingleStreamDiT
    cpu = torch.device("cpu")
    cfg = get_config("tiny", grad_checkpointing=True, compile="on")
    torch.manual_seed(0)
    eager = SingleStreamDiT(DiTConfig.from_config(cfg))
    with torch.no_grad():  # off the AdaLN-zero init, so every block matters
        for p in eager.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model = SingleStreamDiT(DiTConfig.from_config(cfg))
    model.load_state_dict(eager.state_dict())
    assert T.compile_for_training(eager, get_config("tiny", compile="off"), cpu) is eager
    fwd = T.compile_for_training(model, cfg, cpu)
    assert fwd is model and all(b._compiled_call_impl is not None for b in model.joint_blocks)
    batch = T.to_device(bench.synthetic_batch(cfg, cpu, 4, gen=torch.Generator().manual_seed(0)), cpu, True)
    losses = []
    for m in (eager, fwd):
        loss, _, _ = T.flow_matching_loss(m, batch, cfg, torch.Generator().manual_seed(1))
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    for (name, a), b in zip(eager.named_parameters(), model.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-6, rtol=1e-4, msg=name)
    assert list(model.state_dict()) == list(eager.state_dict())  # export keys unchanged


def test_peak_memory_is_read_from_the_runs_gpu(monkeypatch):
    """device=cuda:1 in one process: the current device stays cuda:0, whose allocator never held the run's
    memory; log.csv's peak_mem_mb must come from cuda:1's."""
    peaks = {torch.device("cuda", 1): 3 * 2**20}
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: peaks.get(device, 0))
    assert runtime.peak_memory_mb(torch.device("cuda", 1)) == 3.0
    assert runtime.peak_memory_mb(torch.device("cpu")) == ""


def test_compile_auto_means_gpu_only(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not T.use_compile(get_config("tiny", compile="auto"), cpu)
    monkeypatch.setattr(runtime, "triton_installed", lambda: True)
    for capability, compiled in (((9, 0), True), ((7, 5), True), ((6, 0), False)):  # Triton needs 7.0+
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        assert T.use_compile(get_config("tiny", compile="auto"), cuda) == compiled
    monkeypatch.setattr(runtime, "triton_installed", lambda: False)  # no Triton (Windows): eager
    assert not T.use_compile(get_config("tiny", compile="auto"), cuda)
    assert T.use_compile(get_config("tiny", compile="on"), cpu)
    assert not T.use_compile(get_config("tiny", compile="off"), cuda)
    with pytest.raises(ConfigError, match="compile=on: torch.compile needs Triton on a GPU"):
        T.use_compile(get_config("tiny", compile="on"), cuda)  # not a traceback at the first step


def test_compiled_run_keeps_short_batches_when_no_bucket_fills_one(tiny_data, tmp_path, monkeypatch):
    """Compiled runs drop each bucket's short last batch; with every bucket under one batch that would
    leave nothing to train on, so the short batches stay (compilation itself stubbed out: slow on CPU)."""
    monkeypatch.setattr(T, "use_compile", lambda cfg, device: True)
    monkeypatch.setattr(T, "compile_for_training", lambda model, cfg, device: model)
    cfg = get_config("tiny", out_dir=str(tmp_path), run_name="big_batch", batch_size=64, max_steps=2, **tiny_data)
    T.train(cfg)
    assert os.path.isfile(os.path.join(cfg.run_dir, "model", "model.safetensors"))


def test_compiled_model_trains_on_a_second_bucket_shape():
    """Whole-model torch.compile on two buckets: the second shape gets its own graph (with symbolic H and W
    inductor failed to lower it: "cannot determine truth value of Relational") and both match eager. The
    weights are views into flat 8-bit AdamW buffers: the compiled graphs see the optimiser's updates."""
    from model import DiTConfig, SingleStreamDiT
    cfg = get_config("tiny", compile="on", optimizer="adamw8bit", flat_8bit="on")
    torch.manual_seed(0)
    eager = SingleStreamDiT(DiTConfig.from_config(cfg))
    with torch.no_grad():
        for p in eager.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model = SingleStreamDiT(DiTConfig.from_config(cfg))
    model.load_state_dict(eager.state_dict())
    opt = T.make_optimizer(model, cfg)
    fwd = T.compile_for_training(model, cfg, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    for H, W in [(32, 32), (24, 40)]:
        x, t = torch.randn(3, 3, H, W, generator=gen), torch.rand(3, generator=gen)
        text, mask = torch.randn(3, 5, cfg.text_dim, generator=gen), torch.ones(3, 5, dtype=torch.bool)
        out = fwd(x, t, text, mask, None, text_padded=False)
        torch.testing.assert_close(out, eager(x, t, text, mask, None, text_padded=False), atol=1e-5, rtol=1e-4)
        out.pow(2).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    opt.step()
    with torch.no_grad():
        after = fwd(x, t, text, mask, None, text_padded=False)
        assert not torch.allclose(after, out)  # the update moved the weights the graph reads
        torch.testing.assert_close(after, model(x, t, text, mask, None, text_padded=False), atol=1e-5, rtol=1e-4)


def test_validation_loss_does_not_depend_on_batch_size_or_order(tiny_data):
    """Each validation sample's t and noise are fixed by its place in the split: the same loss (and the
    same per-quarter losses) whatever batch size the run uses, and t covers all four quarters."""
    from dataset import make_loader
    from metrics import validation_loss
    from model import DiTConfig, SingleStreamDiT
    rows = []
    for batch_size, seed_shift in ((1, 0), (5, 0), (16, 0), (5, 1)):
        cfg = get_config("tiny", **tiny_args(tiny_data, "unused", batch_size=batch_size, val_fraction=0.3))
        loader, sampler, val_set = make_loader(cfg, "val")
        sampler.set_epoch(seed_shift)  # another order of the batches
        torch.manual_seed(0)
        model = SingleStreamDiT(DiTConfig.from_config(cfg))
        with torch.no_grad():
            for p in model.parameters():  # off the zero init: the output depends on t
                p.add_(torch.randn_like(p) * 0.05)
        rows.append(validation_loss(model, loader, cfg, torch.device("cpu")))
    assert len(val_set) >= 8 and all(rows[0][f"val_loss_t{i}"] != "" for i in range(4))
    for row in rows[1:]:
        for key, value in rows[0].items():
            assert row[key] == pytest.approx(value, rel=1e-5), key


def test_flatten_groups_keeps_values_aligns_and_caps_buffers():
    """Each weight becomes a view into a flat buffer at a 256-element boundary (4 for the small ones), with
    its values; no buffer holds more than max_numel elements unless one weight alone does."""
    import optim
    from model import DiTConfig, SingleStreamDiT
    torch.manual_seed(0)
    model = SingleStreamDiT(DiTConfig.from_config(get_config("tiny", hidden_size=64, num_heads=2)))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    groups, members, small = optim.flatten_groups(model.param_groups(0.1), min_8bit_size=4096, max_numel=20000)
    assert len(groups) == len(members) > 4 and small  # capped: more buffers than the 4 size/decay classes
    assert [g["weight_decay"] for g in groups].count(0.1) >= 2
    seen = set()
    for i, (flat, views) in enumerate(members):
        assert groups[i]["params"] == [flat]
        assert flat.numel() <= 20000 or len(views) == 1
        for p, at in views:
            assert at % (4 if i in small else 256) == 0 and p.data_ptr() == flat.data_ptr() + 4 * at
            seen.add(id(p))
    assert seen == {id(p) for p in model.parameters()}  # every weight once
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_an_old_checkpoint_that_cannot_be_removed_is_a_warning(tmp_path, monkeypatch):
    """Pruning is housekeeping: a file that cannot be removed (a permission) or is gone already (deleted by
    the user meanwhile) is reported, and the new checkpoint counts as written."""
    cfg = get_config("tiny", out_dir=str(tmp_path), run_name="r", keep_checkpoints=1)
    said = []
    remove = os.remove

    def refuse(path):
        if path.endswith("step_0000001.pt"):
            raise PermissionError(13, "Permission denied", path)
        remove(path)
    monkeypatch.setattr(C.os, "remove", refuse)
    for step in (1, 2, 3):
        assert os.path.isfile(C.save_checkpoint(cfg, {"step": step}, say=said.append))
    assert [os.path.basename(p) for p in C.list_checkpoints(cfg)] == ["step_0000001.pt", "step_0000003.pt"]
    assert len(said) == 2 and all("step_0000001.pt: not removed (Permission denied)" in s for s in said)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_damaged_cache_file_mid_run_keeps_the_steps_done(tiny_data, tmp_path, monkeypatch, num_workers):
    """A cache too big for RAM is read batch by batch: a file damaged or deleted since the run started stops
    it with one line naming the file (from a DataLoader worker too), after checkpointing the last completed
    step and exporting; once the file is fixed, resume=auto runs the failed step again and goes on."""
    import shutil
    import dataset as D
    from cache import CacheError
    cache = str(tmp_path / "cache")
    shutil.copytree(tiny_data["cache_dir"], cache)
    monkeypatch.setattr(D, "IN_MEMORY_MAX_BYTES", 0)  # lazy loading, as for a cache over 2 GiB
    args = tiny_args(dict(tiny_data, cache_dir=cache), tmp_path, max_steps=30, checkpoint_every=100,
                     num_workers=num_workers, run_name="lazy")
    cfg = get_config("tiny", **args)
    victim = D.CachedDataset(cfg, "train").paths[5]
    intact = open(victim, "rb").read()
    with open(victim, "wb") as f:
        f.write(b"\0" * len(intact))  # same size: the cache check at the start does not see it
    with pytest.raises(CacheError) as err:
        T.train(cfg)
    message = str(err.value)
    assert victim in message and "\n" not in message and "Traceback" not in message
    saved = C.list_checkpoints(cfg)
    assert len(saved) == 1 and f"step {C.checkpoint_step(saved[0])} is checkpointed" in message
    state = torch.load(saved[0], weights_only=False)
    assert 0 < state["step"] < 12 and state["batch_in_epoch"] == state["step"] and state["epoch"] == 0
    assert os.path.isfile(os.path.join(cfg.run_dir, "model", "model.safetensors"))
    with open(victim, "wb") as f:
        f.write(intact)
    result = T.train(get_config("tiny", **dict(args, resume="auto")))
    assert result["status"] == "done" and result["step"] == 30


def test_sigterm_to_the_process_group_with_workers_saves_a_checkpoint(tiny_data, tmp_path):
    """A SIGTERM to the whole process group (Slurm's scancel, docker stop, kill -- -PGID) reaches the
    DataLoader workers too: they leave it to the main process, which finishes the step and saves."""
    args = tiny_args(tiny_data, tmp_path, max_steps=100000, checkpoint_every=100000, log_every=1,
                     num_workers=2, run_name="group")
    cfg = get_config("tiny", **args)
    proc = run_script(["train.py", "tiny"] + [f"{k}={v}" for k, v in args.items()], start_new_session=True)
    log = os.path.join(cfg.run_dir, "log.csv")
    ok = wait_for(lambda: os.path.exists(log) and sum(1 for _ in open(log)) >= 4, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert ok, out
    assert proc.returncode == 0 and "stopped by signal 15" in out and "Traceback" not in out, out
    ckpts = C.list_checkpoints(cfg)
    assert len(ckpts) == 1 and torch.load(ckpts[0], weights_only=False)["step"] >= 3


def test_a_resume_without_the_runs_preset_fails_before_any_data_work(tiny_data, tmp_path, monkeypatch):
    """python train.py resume=auto run_name=<a tiny run>: the shapes preset's model does not fit the
    checkpoint; that is one line naming the settings and the preset, before the cache is built or loaded."""
    import preprocess
    from config import ConfigError
    args = tiny_args(tiny_data, tmp_path, max_steps=2, run_name="t")
    T.train(get_config("tiny", **args))
    built = []
    monkeypatch.setattr(preprocess, "ensure_cache", lambda *a, **k: built.append(1))
    with pytest.raises(ConfigError, match=r"step_0000002.pt: does not match this config \(.*patch_size=2 there, "
                                          r"4 here.*\); was it trained with the tiny preset\?"):
        T.train(get_config("shapes", out_dir=str(tmp_path), run_name="t", resume="auto"))
    assert built == []


def test_a_resume_after_the_time_limit_trains_no_step(tiny_data, tmp_path):
    """The max_minutes clock goes on from the checkpoint: a run that used it up resumes to the same step
    (not one more step and checkpoint per resume); a larger max_minutes trains on."""
    args = tiny_args(tiny_data, tmp_path, max_steps=2, run_name="clock")
    cfg = get_config("tiny", **args)
    T.train(cfg)
    path = C.list_checkpoints(cfg)[-1]
    state = torch.load(path, weights_only=False)
    state["train_seconds"] = 120.0  # it trained for 2 minutes
    torch.save(state, path)
    result = T.train(get_config("tiny", **dict(args, resume="auto", max_steps=10, max_minutes=1.0)))
    assert result["step"] == 2 and "max_minutes=1.0 was used up at step 2" in result["status"]
    assert [C.checkpoint_step(p) for p in C.list_checkpoints(cfg)] == [2]
    result = T.train(get_config("tiny", **dict(args, resume="auto", max_steps=4, max_minutes=5.0)))
    assert result["step"] == 4 and result["status"] == "done"


def test_resume_auto_without_a_readable_checkpoint_says_so_once(tiny_data, tmp_path, capsys):
    args = tiny_args(tiny_data, tmp_path, max_steps=1, run_name="junk", resume="auto")
    cfg = get_config("tiny", **args)
    os.makedirs(os.path.join(cfg.run_dir, "checkpoints"))
    with open(os.path.join(cfg.run_dir, "checkpoints", "step_0000004.pt"), "wb") as f:
        f.write(b"junk")
    capsys.readouterr()
    assert T.train(cfg)["step"] == 1
    out = capsys.readouterr().out
    assert "not a readable checkpoint" in out and "held an earlier run" not in out
    assert f"resume=auto: no readable checkpoint in {cfg.run_dir}/checkpoints: starting fresh (what the folder " \
           f"held is moved to {cfg.run_dir}.1)" in out


def test_caption_dropout_0_with_guidance_warns_that_the_null_caption_is_not_trained(tiny_data, tmp_path, capsys):
    cfg = get_config("tiny", **tiny_args(tiny_data, tmp_path, max_steps=3, run_name="nodrop", caption_dropout=0.0))
    capsys.readouterr()
    T.train(cfg)
    assert "warning: caption_dropout=0 does not train the null caption that cfg_scale=2.5" in capsys.readouterr().out
    ckpt = torch.load(C.list_checkpoints(cfg)[-1], weights_only=False)
    torch.manual_seed(cfg.seed)  # the model's init (train.py seeds the same before building it)
    from model import DiTConfig, SingleStreamDiT
    assert torch.equal(ckpt["model"]["null_caption"], SingleStreamDiT(DiTConfig.from_config(cfg)).null_caption.data)
    T.train(get_config("tiny", **tiny_args(tiny_data, tmp_path, max_steps=1, run_name="nodrop_noguidance",
                                           caption_dropout=0.0, cfg_scale=1.0)))
    assert "caption_dropout=0" not in capsys.readouterr().out


def test_a_warmup_as_long_as_the_run_warns_that_the_lr_never_decays(tiny_data, tmp_path, capsys):
    cfg = get_config("tiny", **tiny_args(tiny_data, tmp_path, max_steps=2, warmup_steps=4, run_name="warm"))
    capsys.readouterr()
    T.train(cfg)
    out = capsys.readouterr().out
    assert "warning: warmup_steps=4 >= max_steps=2: the learning rate ends at 5.00e-04 still warming up" in out
    with open(os.path.join(cfg.run_dir, "log.csv")) as f:
        assert [float(r["lr"]) for r in csv.DictReader(f)] == [2.5e-4, 5e-4]  # no decay: half the peak at the end
    T.train(get_config("tiny", **tiny_args(tiny_data, tmp_path, max_steps=3, warmup_steps=2, run_name="warm2")))
    assert "warmup_steps" not in capsys.readouterr().out


def test_adamw8bit_without_bitsandbytes_is_a_one_line_error_before_any_work(tiny_data, tmp_path, monkeypatch):
    """(no wheel for the platform, a broken install): it was an ImportError traceback after the data work"""
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes raises ImportError
    cache = os.path.join(tmp_path, "cache_nobnb")
    cfg = get_config("tiny", **tiny_args(tiny_data, tmp_path, max_steps=1, optimizer="adamw8bit", cache_dir=cache))
    with pytest.raises(T.ConfigError, match=r"^optimizer=adamw8bit: bitsandbytes cannot be imported .*: pip install "
                                            r"bitsandbytes, or optimizer=adamw$"):
        T.train(cfg)
    assert not os.path.exists(cache)


def test_hflip_on_the_shapes_data_is_a_one_line_error(tiny_data, tmp_path):
    """Its captions name the side ("top left"): a flipped image would contradict its caption half the time."""
    r = subprocess.run([sys.executable, "train.py", "tiny", "hflip=true", "max_steps=1",
                        *[f"{k}={v}" for k, v in tiny_args(tiny_data, tmp_path).items()]],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.startswith("error: hflip=True: the shapes captions say left and right")
    assert len(r.stderr.strip().splitlines()) == 1 and not os.path.exists(os.path.join(tmp_path, "tiny"))


def assert_same_last_weights(args, run_a, run_b):
    """The newest checkpoints of two tiny runs (tiny_args + run_name) hold identical weights."""
    a, b = (torch.load(C.list_checkpoints(get_config("tiny", **dict(args, run_name=n)))[-1], weights_only=False)
            for n in (run_a, run_b))
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("fail_at", [14, 22])
def test_a_batch_that_fails_to_load_in_a_later_micro_batch_resumes_exactly(tiny_data, tmp_path, monkeypatch,
                                                                           fail_at):
    """grad_accum=2: a failure in the second micro-batch comes after the first drew its noise and t; the
    checkpoint keeps the step's starting noise state, so failure + resume trains the same weights."""
    import dataset as D
    from cache import CacheError
    monkeypatch.setattr(D, "IN_MEMORY_MAX_BYTES", 0)
    args = tiny_args(tiny_data, tmp_path, max_steps=6, grad_accum=2, checkpoint_every=100)
    straight = T.train(get_config("tiny", **dict(args, run_name="straight")))
    real_load, calls = D.load_cache_file, {"n": 0}

    def load_once_broken(path):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise CacheError(f"{path}: missing or corrupt cache file (injected)")
        return real_load(path)
    monkeypatch.setattr(D, "load_cache_file", load_once_broken)
    with pytest.raises(CacheError, match="is checkpointed"):
        T.train(get_config("tiny", **dict(args, run_name="failed")))
    resumed = T.train(get_config("tiny", **dict(args, run_name="failed", resume="auto")))
    assert resumed["step"] == straight["step"] == 6
    assert_same_last_weights(args, "straight", "failed")


def test_a_worker_killed_mid_step_stops_with_a_checkpoint(tiny_data, tmp_path, monkeypatch):
    """A DataLoader worker killed while the main process computes (the out-of-memory killer): PyTorch's
    SIGCHLD handler would raise mid-backward; instead the next batch load notices, and the run stops with
    one line after checkpointing the last completed step."""
    import dataset as D
    from cache import CacheError
    real_item, real_loss = D.CachedDataset.__getitem__, T.flow_matching_loss

    def item(self, i):
        if self.split == "train" and torch.utils.data.get_worker_info() is not None:
            self.served = getattr(self, "served", 0) + 1
            if self.served == 10:
                os.kill(os.getpid(), signal.SIGKILL)
        return real_item(self, i)

    def slow_loss(*a, **k):
        time.sleep(0.2)  # the step's compute outlasts loading its batch, as usual
        return real_loss(*a, **k)
    monkeypatch.setattr(D.CachedDataset, "__getitem__", item)
    monkeypatch.setattr(T, "flow_matching_loss", slow_loss)
    cfg = get_config("tiny", **tiny_args(tiny_data, tmp_path, max_steps=50, num_workers=1, checkpoint_every=100))
    with pytest.raises(CacheError) as err:
        T.train(cfg)
    assert str(err.value).startswith("DataLoader worker") and "is checkpointed" in str(err.value)
    assert len(C.list_checkpoints(cfg)) == 1


def test_a_worker_that_ends_while_handing_over_a_batch_is_a_stop_with_a_checkpoint(tiny_data, tmp_path, monkeypatch):
    """A SIGTERM to the process group can end a DataLoader worker while the main process takes over its batch
    (the tensor's file descriptor comes through the worker's socket): ConnectionResetError, not PyTorch's
    'DataLoader worker exited'. That is the same stop: the last completed step is checkpointed and the run
    stops cleanly (here with no signal to the main process: one line)."""
    import dataset as D
    from cache import CacheError
    real_iter = torch.utils.data.DataLoader.__iter__

    def iterate(loader):
        for i, batch in enumerate(real_iter(loader)):
            if i == 3:
                raise ConnectionResetError(104, "Connection reset by peer")
            yield batch
    monkeypatch.setattr(torch.utils.data.DataLoader, "__iter__", iterate)
    cfg = get_config("tiny", **tiny_args(tiny_data, tmp_path, max_steps=50, checkpoint_every=100))
    with pytest.raises(CacheError, match=r"a DataLoader worker ended while handing over a batch "
                                         r"\(ConnectionResetError: .*\) \(step 3 is checkpointed"):
        T.train(cfg)
    assert torch.load(C.list_checkpoints(cfg)[0], weights_only=False)["step"] == 3
    assert D.loading_failure(EOFError()) and D.loading_failure(ValueError("x")) is None
    assert D.loading_failure(FileNotFoundError(2, "No such file or directory"))  # the worker's socket: gone


def test_a_worker_ended_by_the_signal_that_stops_the_run_just_before_it_is_a_stop(tiny_data, tmp_path, monkeypatch):
    """SIGTERM to the process group: a DataLoader worker can end (and the batch fail) before the main process
    handles its own SIGTERM; the run waits a moment for it, and stops by the signal with a checkpoint."""
    import threading
    real_iter = torch.utils.data.DataLoader.__iter__

    def iterate(loader):
        for i, batch in enumerate(real_iter(loader)):
            if i == 3:
                threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()  # ours, a moment later
                raise RuntimeError("DataLoader worker (pid(s) 12345) exited unexpectedly")
            yield batch
    monkeypatch.setattr(torch.utils.data.DataLoader, "__iter__", iterate)
    cfg = get_config("tiny", **tiny_args(tiny_data, tmp_path, max_steps=50, checkpoint_every=100))
    result = T.train(cfg)
    assert result["status"] == "stopped by signal 15 at step 3 (checkpoint saved)"
    assert torch.load(C.list_checkpoints(cfg)[0], weights_only=False)["step"] == 3


def test_validation_that_cannot_load_its_batches_is_skipped(tiny_data, tmp_path, monkeypatch, capsys):
    def broken(*a, **k):
        raise RuntimeError("DataLoader worker (pid(s) 12345) exited unexpectedly")
    monkeypatch.setattr(T, "validation_loss", broken)
    result = T.train(get_config("tiny", **tiny_args(tiny_data, tmp_path, max_steps=2)))
    assert result["status"] == "done"
    assert "step 2: validation loss skipped: DataLoader worker (pid(s) 12345) exited unexpectedly" in \
        capsys.readouterr().out


def test_a_resume_from_an_older_checkpoint_sets_the_later_export_aside(tiny_data, tmp_path):
    """The export of the abandoned later steps must not pass for this run's (sample.py prefers the export
    unless a checkpoint is newer)."""
    from model import exported_step
    args = tiny_args(tiny_data, tmp_path, max_steps=6, checkpoint_every=2, keep_checkpoints=3, run_name="br")
    cfg = get_config("tiny", **args)
    T.train(cfg)
    step2 = os.path.join(C.checkpoint_dir(cfg), "step_0000002.pt")
    T.train(get_config("tiny", **dict(args, resume=step2, max_steps=3)))
    assert exported_step(os.path.join(cfg.run_dir, "model.abandoned")) == 6
    assert exported_step(os.path.join(cfg.run_dir, "model")) == 3


def test_out_of_memory_mid_run_checkpoints_the_last_step_and_says_what_to_lower(tiny_data, tmp_path, monkeypatch):
    """A step that runs out of (GPU) memory: one line naming the batch and the settings that need less, the
    last completed step checkpointed and exported, and a resume goes on to the weights of a run that never
    failed (grad_accum=2, the failure in the second micro-batch: the step's noise state is restored)."""
    from config import ConfigError
    args = tiny_args(tiny_data, tmp_path, max_steps=6, grad_accum=2, checkpoint_every=100)
    straight = T.train(get_config("tiny", **dict(args, run_name="straight")))
    real_loss, calls = T.flow_matching_loss, {"n": 0}

    def loss_once_out_of_memory(*a, **k):
        calls["n"] += 1
        if calls["n"] == 8:  # step 4, its second micro-batch
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return real_loss(*a, **k)
    monkeypatch.setattr(T, "flow_matching_loss", loss_once_out_of_memory)
    cfg = get_config("tiny", **dict(args, run_name="failed"))
    with pytest.raises(ConfigError) as err:
        T.train(cfg)
    message = str(err.value)
    assert message.startswith("out of memory on cpu in a step of 4 images at 16x16") and "\n" not in message
    assert "batch_size=2 grad_accum=4" in message and "grad_checkpointing=true" in message
    assert "step 3 is checkpointed" in message
    assert [C.checkpoint_step(p) for p in C.list_checkpoints(cfg)] == [3]
    from model import exported_step
    assert exported_step(os.path.join(cfg.run_dir, "model")) == 3
    monkeypatch.setattr(T, "flow_matching_loss", real_loss)
    resumed = T.train(get_config("tiny", **dict(args, run_name="failed", resume="auto")))
    assert resumed["step"] == straight["step"] == 6
    assert_same_last_weights(args, "straight", "failed")


def test_out_of_memory_after_the_noise_was_drawn_resumes_exactly(tiny_data, tmp_path, monkeypatch):
    """grad_accum=1 (the default): the forward that runs out of memory has drawn the step's noise and t; the
    checkpoint keeps the noise state from before the step, so failure + resume trains the same weights."""
    from config import ConfigError
    args = tiny_args(tiny_data, tmp_path, max_steps=6, checkpoint_every=100)
    T.train(get_config("tiny", **dict(args, run_name="straight")))
    real_loss, calls = T.flow_matching_loss, {"n": 0}

    def out_of_memory_in_step_4(*a, **k):
        out = real_loss(*a, **k)  # t and noise drawn; then (as far as train.py can tell) the forward fails
        calls["n"] += 1
        if calls["n"] == 4:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return out
    monkeypatch.setattr(T, "flow_matching_loss", out_of_memory_in_step_4)
    with pytest.raises(ConfigError, match="step 3 is checkpointed"):
        T.train(get_config("tiny", **dict(args, run_name="failed")))
    monkeypatch.setattr(T, "flow_matching_loss", real_loss)
    assert T.train(get_config("tiny", **dict(args, run_name="failed", resume="auto")))["step"] == 6
    assert_same_last_weights(args, "straight", "failed")


def test_validation_or_sampling_out_of_memory_is_skipped_and_the_run_saved(tiny_data, tmp_path, monkeypatch, capsys):
    """The last step's validation and sample grids come before its checkpoint: running out of memory there
    costs a warning, not the run's final checkpoint and export."""
    import sample
    from model import exported_step

    def out_of_memory(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")
    real_generate, calls = sample.generate, {"n": 0}

    def generate_raw_only(model, *a, **k):  # the EMA grid (first) runs out of memory, the raw one does not
        calls["n"] += 1
        return out_of_memory() if calls["n"] == 1 else real_generate(model, *a, **k)
    monkeypatch.setattr(T, "validation_loss", out_of_memory)
    monkeypatch.setattr(sample, "generate", generate_raw_only)
    cfg = get_config("tiny", **tiny_args(tiny_data, tmp_path, max_steps=2, checkpoint_every=100))
    result = T.train(cfg)
    out = capsys.readouterr().out
    assert result["status"] == "done" and result["step"] == 2
    assert "step 2: validation loss skipped: out of memory" in out
    assert "step 2: ema sample grid skipped: out of memory" in out
    samples = os.listdir(os.path.join(cfg.run_dir, "samples"))
    assert samples == ["step_0000002_raw.png"], samples
    assert [C.checkpoint_step(p) for p in C.list_checkpoints(cfg)] == [2]
    assert exported_step(os.path.join(cfg.run_dir, "model")) == 2
