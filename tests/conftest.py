"""Shared fixtures: a tiny shapes data set with its cache, and a tiny trained run (built once per session)."""
import os
import socket
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
for _key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID"):  # a session started inside a distributed
    os.environ.pop(_key, None)  # job's shell: the scripts run single-process (the two-process tests set their own)


def on_a_free_port(run, attempts=3):
    """run(port) -> output, for a two-process test: on a port found free just before, and again on another
    if a process elsewhere took it in between (the output says 'address already in use')."""
    for _ in range(attempts):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        out = run(port)
        if "address already in use" not in out.lower():
            return out
    return out


def teardown_probe(folder) -> str:
    """sitecustomize code for distributed workers: each writes started<RANK> into `folder` when it starts and
    teardown<RANK> from an atexit handler, which runs only if the interpreter's teardown does."""
    return f"""
import atexit as _atexit, os as _os
if _os.environ.get("RANK") is not None:
    _mark = lambda name: open(_os.path.join({str(folder)!r}, name + _os.environ["RANK"]), "w").close()
    _mark("started")
    _atexit.register(_mark, "teardown")
"""


def probe_marks(folder) -> list:
    """The marks teardown_probe left in `folder`, sorted (['started0', 'started1']: two workers, no teardown)."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(("started", "teardown")))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """{'data_dir', 'cache_dir'}: 48 generated shapes images cached with the tiny preset."""
    from config import get_config
    from preprocess import ensure_cache
    root = tmp_path_factory.mktemp("tiny_data")
    paths = {"data_dir": str(root / "shapes"), "cache_dir": str(root / "cache")}
    ensure_cache(get_config("tiny", **paths))
    return paths


@pytest.fixture(scope="session")
def tiny_run(tiny_data, tmp_path_factory):
    """A trained tiny run folder (a few steps): for sample.py, evaluate.py and the notebook."""
    from config import get_config
    from train import train
    out = tmp_path_factory.mktemp("tiny_runs")
    cfg = get_config("tiny", out_dir=str(out), run_name="tiny", optimizer="adamw", max_steps=6, **tiny_data)
    train(cfg)
    return cfg.run_dir
