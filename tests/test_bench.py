"""bench.py prints its figures (speed is measured by the script, never asserted here)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args):
    return subprocess.run([sys.executable, "bench.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def test_bench_prints_a_table_and_json():
    r = run("tiny", "steps=2", "warmup=1", "peak_tflops=1.0", "sample_steps=2")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    for key in ("train_s_per_step", "train_images_per_s", "train_tflops", "mfu", "peak_mem_gib",
                "sample_cfg_batched_s_per_image_per_nfe", "sample_cfg_unbatched_s_per_image_per_nfe",
                "vae_images_per_s", "text_captions_per_s"):
        assert key in result, key
    assert result["train_s_per_step"] > 0 and result["peak_mem_gib"] > 0
    assert all(result[f"phase_{p}_s"] > 0 for p in ("forward", "backward", "optimizer"))  # where a step goes
    assert abs(result["mfu"] - result["train_tflops"] / 1.0) < 1e-9


def test_compare_prints_a_ratio():
    r = run("tiny", "steps=1", "warmup=0", "rounds=1", "--compare", "grad_checkpointing=true")  # (no warm-up)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["speedup_b_over_a"] > 0 and result["compare"] == {"grad_checkpointing": "true"}


def test_bad_settings_are_one_line():
    for args, start in [(["steps=many"], "error: steps="), (["steps=0"], "error: steps=0: must be >= 1"),
                        (["padded=2"], "error: padded=2"), (["--compare"], "error: --compare:"),
                        (["--compare", "depth"], "error: --compare depth:"), (["--only"], "error: --only"),
                        (["--only", "speed"], "error: --only speed"),
                        (["--only", "sample", "--compare", "depth=2"], "error: --compare times training steps only")]:
        r = run("tiny", *args)
        assert r.returncode == 2 and r.stderr.startswith(start) and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_only_takes_several_parts():
    """`--only sample preprocess`, `--only sample,preprocess` and `--only sample --only preprocess` all run
    both; a preset after the parts stays the preset."""
    import bench
    for args in (["--only", "sample", "preprocess"], ["--only", "sample,preprocess"],
                 ["--only", "sample", "--only", "preprocess", "--only", "sample"]):
        cfg, opts, only, _ = bench.split_args(["tiny", *args, "steps=2"])
        assert only == ["sample", "preprocess"] and opts["steps"] == 2, args
    cfg, _, only, _ = bench.split_args(["--only", "train", "tiny"])
    assert only == ["train"] and cfg.run_name == "tiny"
    r = run("tiny", "sample_steps=2", "sample_batch=2", "--only", "sample", "--only", "preprocess")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert "sample_cfg_batched_s_per_image" in result and "vae_images_per_s" in result
    assert "train_s_per_step" not in result


def test_bench_settings_after_compare_are_bench_settings():
    """`--compare depth=2 steps=5`: steps= is bench.py's own setting, not a change to compare (it was an error,
    "unknown setting 'steps' (did you mean max_steps?)")."""
    import bench
    _, opts, _, changes = bench.split_args(["tiny", "--compare", "depth=2", "steps=5", "rounds=1"])
    assert changes == {"depth": "2"} and (opts["steps"], opts["rounds"]) == (5, 1)
    with pytest.raises(bench.ConfigError, match="--compare: expected the change"):
        bench.split_args(["tiny", "--compare", "steps=5"])


def test_compare_warns_when_the_change_is_the_baseline():
    r = run("tiny", "steps=1", "warmup=0", "rounds=1", "--compare", "depth=1")  # tiny has depth=1 already
    assert r.returncode == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if "--compare" in line]
    assert warnings == ["warning: --compare depth=1: the baseline has it already (nothing to compare)"], r.stderr
    r = run("tiny", "steps=1", "warmup=0", "rounds=1", "--compare", "depth=1", "hidden_size=64")
    assert r.returncode == 0 and "warning: --compare depth=1: the baseline has it already\n" in r.stderr, r.stderr


def test_own_settings_get_a_did_you_mean():
    """bench.py's and sanity_check.py's own key=value settings are suggested like Config's."""
    import pytest
    import bench
    import sanity_check
    from config import ConfigError
    cases = [(bench, "stepz", "steps"), (bench, "sample_step", "sample_steps"), (sanity_check, "stepz", "steps"),
             (sanity_check, "min_factr", "min_factor"), (sanity_check, "batch_sise", "batch_size")]
    for script, typo, meant in cases:
        with pytest.raises(ConfigError, match=f"unknown setting '{typo}' \\(did you mean {meant}\\?\\)"):
            script.split_args(["tiny", f"{typo}=5"])
    r = subprocess.run([sys.executable, "sanity_check.py", "tiny", "stepz=5"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and r.stderr == "error: unknown setting 'stepz' (did you mean steps?)\n", r.stderr


def test_sanity_check_anneals_its_learning_rate(tiny_data, tmp_path, monkeypatch):
    """The score is taken after the last step: at a constant lr that step can throw a fit of loss 0.002 back
    to 0.2 (shapes steps=600 failed at 0.7x). The lr holds for the first half, then goes down to 0."""
    import torch
    from config import get_config
    from sanity_check import sanity_check
    used = []
    step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        used.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)
    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    cfg = get_config("tiny", out_dir=str(tmp_path), **tiny_data)
    sanity_check(cfg, steps=10, lr=1e-3, verbose=False)
    assert len(used) == 10 and used[:5] == [1e-3] * 5 and used[-1] == 0.0
    assert all(a >= b for a, b in zip(used, used[1:]))


def test_sanity_check_gives_its_verdict_when_the_picture_cannot_be_written(tiny_data, tmp_path, capsys):
    """runs/<name>/sanity not writable (here a file of that name; a full disk): the PASS/FAIL line still comes,
    saying the PNG was not written, not an OSError naming neither."""
    from config import get_config
    from sanity_check import sanity_check
    cfg = get_config("tiny", out_dir=str(tmp_path), **tiny_data)
    os.makedirs(cfg.run_dir)
    open(os.path.join(cfg.run_dir, "sanity"), "w").close()
    result = sanity_check(cfg, steps=2, verbose=False)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith(("PASS", "FAIL")) and last.endswith("sanity/reconstruction.png not written (File exists)")
    assert result["path"] is None and "factor" in result


def test_sampling_is_timed_with_the_configured_sampler(monkeypatch):
    """sampler=rk4 times RK4 (it timed Euler whatever was asked), per NFE, and the figures say which."""
    import bench
    import samplers
    from config import get_config
    methods, real = [], samplers.sample_ode
    monkeypatch.setattr(samplers, "sample_ode",
                        lambda f, x, steps, method, **k: methods.append(method) or real(f, x, steps, method, **k))
    opts = dict(bench.BENCH_DEFAULTS, sample_steps=2, sample_batch=2)
    out = bench.bench_sample(get_config("tiny", sampler="rk4"), bench.resolve_device("cpu"), opts)
    assert out["sampler"] == "rk4" and methods == ["rk4"] * 4  # warm-up and timed, batched and unbatched CFG
    for kind in ("batched", "unbatched"):  # per NFE: 4 evaluations per RK4 step
        assert out[f"sample_cfg_{kind}_s_per_image_per_nfe"] * 8 == pytest.approx(out[f"sample_cfg_{kind}_s_per_image"])


def test_self_consistency_is_timed_with_its_ema_forward():
    """self_consistency_loss adds an EMA forward to a training step: bench timed the step without it, so
    --compare self_consistency_loss=0.5 showed no cost."""
    import bench
    from config import get_config
    runner = bench.TrainStep(get_config("tiny", self_consistency_loss=0.5), bench.resolve_device("cpu"))
    calls = []
    runner.ema.register_forward_hook(lambda *a: calls.append(1))
    runner.step()
    assert calls == [1]
    plain = bench.TrainStep(get_config("tiny"), bench.resolve_device("cpu"))
    plain.ema.register_forward_hook(lambda *a: calls.append(1))
    plain.step()
    assert calls == [1]


def test_a_step_with_grad_accum_runs_its_micro_steps():
    """grad_accum=2 is two forward/backward passes and one update a step (as train.py), images/s counting both:
    bench timed one, so `--compare batch_size=2 grad_accum=2` showed a 2x speedup for the same images a step."""
    import bench
    from config import get_config
    runner = bench.TrainStep(get_config("tiny", grad_accum=3), bench.resolve_device("cpu"))
    calls = []
    runner.model.register_forward_hook(lambda *a: calls.append(1))
    runner.step()
    assert len(calls) == 3 and runner.images_per_step == 3 * 4
    out = bench.bench_train(get_config("tiny", grad_accum=3), bench.resolve_device("cpu"),
                            dict(bench.BENCH_DEFAULTS, steps=1, warmup=0))
    assert out["train_images_per_s"] == pytest.approx(12 / out["train_s_per_step"])


def test_preprocess_timings_start_after_the_warm_up_is_done(monkeypatch):
    """On a GPU the warm-up call returns before its kernels finish: each clock must start after a sync, or
    the warm-up's tail is timed with the measured call (VAE and text encoder alike)."""
    import time
    import torch
    import bench
    import text_encoder
    from config import get_config
    events = []
    monkeypatch.setattr(bench, "sync", lambda device: events.append("sync"))
    clock = time.perf_counter
    monkeypatch.setattr(bench.time, "perf_counter", lambda: events.append("clock") or clock())

    class Encoder:
        def encode(self, captions):
            events.append("encode")

    monkeypatch.setattr(text_encoder, "load_text_encoder", lambda cfg, device, dtype: Encoder())
    bench.bench_preprocess(get_config("tiny"), torch.device("cpu"), dict(bench.BENCH_DEFAULTS, sample_batch=2))
    starts = [i for i, e in enumerate(events) if e == "clock"][::2]  # each timing: start, then stop
    assert len(starts) == 2 and all(events[i - 1] == "sync" for i in starts), events
