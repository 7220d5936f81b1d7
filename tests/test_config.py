import os
import subprocess
import sys

import pytest
import torch

from config import ConfigError, config_from_dict, get_config, main_guard, parse_args, to_dict, PRESETS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_defaults_are_the_shapes_preset_and_valid():
    cfg = parse_args([])
    assert cfg.run_name == "shapes" and cfg.latent_space == "pixel" and cfg.data_source == "shapes"
    assert cfg == get_config("shapes")


def test_every_preset_validates():
    for name in PRESETS:
        cfg = get_config(name)
        assert cfg.run_name == name
    flowers = get_config("flowers")
    assert (flowers.hidden_size, flowers.num_heads, flowers.depth, flowers.refiner_depth) == (768, 12, 16, 2)
    assert (flowers.latent_channels, flowers.vae_downsample, flowers.text_dim) == (16, 8, 1152)
    assert (flowers.max_token_length, flowers.target_resolution, flowers.bucket_align) == (128, 448, 32)
    assert (flowers.batch_size, flowers.learning_rate, flowers.ema_decay) == (16, 2e-4, 0.999)


def test_a_bad_key_in_a_preset_names_the_preset(monkeypatch):
    monkeypatch.setitem(PRESETS, "medium", {**PRESETS["flowers"], "hidden_sise": 384})
    with pytest.raises(ConfigError, match=r"PRESETS\['medium'\] in config.py: unknown setting 'hidden_sise' "
                                          r"\(did you mean hidden_size\?\)"):
        get_config("medium")


def test_overrides_are_typed():
    cfg = parse_args(["flowers", "batch_size=8", "learning_rate=1e-4", "hflip=true", "sampler=heun"])
    assert cfg.batch_size == 8 and isinstance(cfg.batch_size, int)
    assert cfg.learning_rate == 1e-4 and cfg.hflip is True and cfg.sampler == "heun"
    assert parse_args(["shift=3"]).shift == 3.0 and isinstance(parse_args(["shift=3"]).shift, float)
    home = os.path.expanduser("~")  # zsh (macOS) and fish pass data_dir=~/x on with the ~
    cfg = parse_args(["data_dir=~/my images", "cache_dir=~/cache", "out_dir=~", "val_prompts=~ a wave"])
    assert (cfg.data_dir, cfg.cache_dir, cfg.out_dir) == (f"{home}/my images", f"{home}/cache", home)
    assert cfg.val_prompts == "~ a wave"  # not a path


@pytest.mark.parametrize("argv, key", [
    (["batch_sise=8"], "batch_sise"),
    (["batch_size=eight"], "batch_size"),
    (["hflip=maybe"], "hflip"),
    (["nopreset"], "nopreset"),
    (["hidden_size=100", "num_heads=3"], "hidden_size"),
    (["hidden_size=36", "num_heads=6"], "num_heads"),     # head dim 6: not divisible by 4 (2D RoPE)
    (["flowers", "bucket_align=24"], "bucket_align"),
    (["sampler=ddim"], "sampler"),
    (["loss=mae"], "loss"),
    (["latent_space=flux"], "vae"),
    (["latent_space=pixel", "latent_channels=4"], "latent_channels"),
    (["ema_decay=1.5"], "ema_decay"),
    (["batch_size=0"], "batch_size"),
    (["prediction=eps"], "prediction"),
    (["sigma_data=0"], "sigma_data"),
    (["val_prompts= | "], "val_prompts"),
    (["data_dir=data/x", "cache_dir=data/x/"], "cache_dir"),
    (["max_aspect_ratio=inf"], "max_aspect_ratio"),     # (bucket making would never end)
    (["t_mean=nan"], "t_mean"),
    (["learning_rate=inf"], "learning_rate"),
    (["seed=100000000000000000"], "seed"),
    (["cache_dir="], "cache_dir"),
    (["out_dir="], "out_dir"),                          # (the run went into the working folder)
    ([f"out_dir={os.path.join(ROOT, 'README.md')}"], "out_dir"),  # a file: one line naming it, not Errno 17
    ([f"cache_dir={os.path.join(ROOT, 'README.md')}"], "cache_dir"),
    ([f"out_dir={ROOT}", "run_name=README.md"], "run_name"),  # (was Errno 20 after the data work)
    (["max_token_length=1"], "max_token_length"),
    (["cfg_scale=1e308"], "cfg_scale"),                 # (the guided velocity overflows: black images)
])
def test_bad_settings_name_the_key(argv, key):
    with pytest.raises(ConfigError) as e:
        parse_args(argv)
    assert key in str(e.value) and "\n" not in str(e.value)


def test_unknown_key_suggests_the_close_one():
    for typo in ("batch_sise=8", "Batch_Size=8"):
        with pytest.raises(ConfigError, match="did you mean batch_size"):
            parse_args([typo])


def test_round_trip_through_dict():
    cfg = parse_args(["tiny", "depth=3"])
    assert config_from_dict(to_dict(cfg)) == cfg


def test_script_prints_one_line_error():
    r = subprocess.run([sys.executable, "config.py", "foo=1"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: unknown setting 'foo'")
    assert "Traceback" not in r.stderr


def test_help_prints_the_scripts_usage():
    for script in ("train.py", "preprocess.py", "sanity_check.py", "bench.py", "generate_graph.py"):
        r = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 0 and f"python {script}" in r.stdout and "presets: shapes" in r.stdout, r.stderr


def test_main_guard_turns_errors_and_ctrl_c_into_one_line_and_an_exit_code(capsys):
    def fails(exc):
        def main():
            raise exc
        return main

    for exc, code in [(ConfigError("batch_size=0: must be > 0"), 2), (FileNotFoundError("x.png: gone"), 2),
                      (KeyboardInterrupt(), 130), (KeyboardInterrupt("the 3 images are cached"), 130),
                      (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9 GiB\nmore lines"), 2),
                      (RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                                    "memory: you tried to allocate 73728000000 bytes. Error code 12"), 2)]:
        with pytest.raises(SystemExit) as e:
            main_guard(fails(exc))
        err = capsys.readouterr().err
        assert e.value.code == code and len(err.strip().splitlines()) == 1
        assert err.startswith("error: " if code == 2 else "interrupted")
    assert main_guard(lambda: 7) == 7
    with pytest.raises(RuntimeError, match="a bug"):  # any other error keeps its traceback
        main_guard(fails(RuntimeError("a bug")))


def test_main_guard_under_torchrun_a_collective_that_lost_a_process_is_one_line(capsys, monkeypatch):
    """Under torchrun, rank 0 ending with an error (its own line) leaves the others in a collective (the cache's
    barrier, the last one in train.py): gloo says so in a plain RuntimeError, NCCL in a DistError."""
    gloo = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                        "[127.0.0.1]:4005. This is typically caused by a remote worker crashing.")

    def fails():
        raise gloo
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    with pytest.raises(RuntimeError, match="Connection closed"):  # not under torchrun: kept as it is
        main_guard(fails)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    with pytest.raises(SystemExit) as e:
        main_guard(fails)
    assert e.value.code == 2
    assert capsys.readouterr().err == ("error: another process of the job ended: Connection closed by peer "
                                       "[127.0.0.1]:4005\n")


def test_main_guard_a_bug_in_a_distributed_worker_keeps_its_traceback_and_skips_the_teardown():
    """A bug (not bad input) keeps its traceback; in a torchrun worker (RANK set) the process then ends with exit
    code 1 without the interpreter's teardown (atexit hooks do not run), which gloo's threads could turn into an
    abort (SIGABRT)."""
    script = ("import atexit, config; atexit.register(lambda: print('teardown', flush=True)); "
              "config.main_guard(lambda: 1 / 0)")
    env = {k: v for k, v in os.environ.items() if k != "RANK"}
    for rank, teardown in [(None, True), ("1", False)]:
        r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                           env=env if rank is None else {**env, "RANK": rank})
        assert r.returncode == 1 and r.stderr.startswith("Traceback") and "ZeroDivisionError" in r.stderr, r.stderr
        assert ("teardown" in r.stdout) == teardown, r.stdout


def test_resolve_device_names_a_bad_or_missing_device():
    import torch
    from config import resolve_device
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="device='tpu': not a device"):
        resolve_device("tpu")
    with pytest.raises(ConfigError, match="device='cuda:99': no such CUDA GPU"):
        resolve_device("cuda:99")


def test_inf_where_it_means_no_limit():
    """max_minutes / grad_clip / huber_delta = inf mean no limit (older runs' config.json hold them); nan never."""
    cfg = parse_args(["max_minutes=inf", "grad_clip=inf", "huber_delta=inf"])
    assert cfg.max_minutes == cfg.grad_clip == cfg.huber_delta == float("inf")
    for bad in ("max_minutes=nan", "grad_clip=-inf", "shift=inf"):
        with pytest.raises(ConfigError, match="must be a finite number"):
            parse_args([bad])
