"""evaluate.py: runs on a tiny run; FID maths; the checker scores ground truth (see test_shapes.py)."""
import json
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_evaluate_runs_on_a_tiny_run(tiny_run):
    r = subprocess.run([sys.executable, "evaluate.py", tiny_run, "--steps", "2"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "held_out" in r.stdout and "FID skipped" in r.stdout
    seen_line = next(line for line in r.stdout.splitlines() if line.startswith("seen"))
    assert int(seen_line.split()[1]) == json.load(open(os.path.join(tiny_run, "eval", "eval.json")))[
        "shapes"]["seen"]["n"]  # the number of prompts is printed
    report = json.load(open(os.path.join(tiny_run, "eval", "eval.json")))
    seen = report["shapes"]["seen"]
    assert seen["n"] > 0 and 0.0 <= seen["all"] <= 1.0
    assert report["shapes"]["held_out"]["n"] >= 8
    assert os.path.isfile(os.path.join(tiny_run, "eval", "shapes_scored.png"))
    assert report["steps"] == 2


def test_frechet_distance_known_values():
    from evaluate import frechet_distance
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 3, generator=g, dtype=torch.float64)
    assert abs(frechet_distance(a, a)) < 1e-6
    b = a * 2 + 1  # mean shift 1 per dim, cov 4x: FID = 3*1 + 3*(1 + 4 - 2*2) = 6
    assert abs(frechet_distance(a, b) - 6.0) < 0.3


def test_fid_with_a_local_feature_network(tiny_run, tmp_path, monkeypatch):
    from evaluate import evaluate_fid
    from sample import load_run

    class Features(torch.nn.Module):  # stands in for a TorchScript Inception: (N,3,299,299) -> (N,4)
        def forward(self, x):
            return torch.stack([x.mean((1, 2, 3)), x.std((1, 2, 3)), x[:, 0].mean((1, 2)), x[:, 2].mean((1, 2))], 1)

    path = tmp_path / "inception.pt"
    torch.jit.script(Features()).save(str(path))
    cfg, model = load_run(tiny_run)
    import text_encoder

    def no_encoder(*a, **k):
        raise AssertionError("FID uses the cached caption embeddings: no text encoder is loaded")
    monkeypatch.setattr(text_encoder, "load_text_encoder", no_encoder)
    import sample
    calls = []
    generate = sample.generate
    monkeypatch.setattr(sample, "generate", lambda *a, **k: calls.append(k) or generate(*a, **k))
    fid, message = evaluate_fid(cfg, model, torch.device("cpu"), str(path), steps=2)
    assert fid is not None and fid >= 0 and message.startswith("FID")
    n = int(message.split("(")[1].split()[0])                     # "FID x (n generated vs ...)"
    assert len(calls) == 1 and calls[0]["seed"] == list(range(n)) and n >= 2  # one bucket: one batched call, seed + i
    again, _ = evaluate_fid(cfg, model, torch.device("cpu"), str(path), steps=2, batch_size=1)  # --batch 1
    assert calls[-1]["batch_size"] == 1 and again == fid
    none, message = evaluate_fid(cfg, model, torch.device("cpu"), str(tmp_path / "missing.pt"))
    assert none is None and "FID skipped" in message
    (tmp_path / "junk.pt").write_bytes(b"not TorchScript")
    none, message = evaluate_fid(cfg, model, torch.device("cpu"), str(tmp_path / "junk.pt"))
    assert none is None and "junk.pt is not a TorchScript network" in message


def test_fid_with_a_network_that_is_not_an_inception_is_skipped(tiny_run, tmp_path, monkeypatch):
    """A TorchScript file that takes other inputs, or gives features FID cannot be computed from (nan): 'FID
    skipped' with why (evaluate.py printed a traceback and lost the report's validation loss), and a network
    that cannot read the images is found out before any image is generated."""
    from evaluate import evaluate_fid
    from sample import load_run

    class Linear(torch.nn.Module):  # e.g. a classifier head saved on its own
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(10, 4)

        def forward(self, x):
            return self.lin(x)

    class NanFeatures(torch.nn.Module):
        def forward(self, x):
            return x.mean((2, 3)) * float("nan")

    cfg, model = load_run(tiny_run)
    import sample
    calls = []
    generate = sample.generate
    monkeypatch.setattr(sample, "generate", lambda *a, **k: calls.append(k) or generate(*a, **k))
    for net, expected in ((Linear(), "does not map (N, 3, 299, 299) images to features (RuntimeError: mat1"),
                          (NanFeatures(), "gave features it cannot be computed from")):
        path = tmp_path / f"{type(net).__name__}.pt"
        torch.jit.script(net).save(str(path))
        fid, message = evaluate_fid(cfg, model, torch.device("cpu"), str(path), steps=1)
        assert fid is None and message.startswith(f"FID skipped: {path} {expected}"), message
        assert len(calls) == (0 if isinstance(net, Linear) else 1)


def test_bad_arguments_are_one_line(tiny_run, tmp_path):
    for args in (["--steps", "0"], ["--per-pair", "-1"], ["--inception", str(tmp_path / "missing.pt")],
                 ["--cfg", "nan"], ["--seed", str(2 ** 70)], ["--steps", str(10 ** 20)], ["--per-pair", "100000"],
                 ["--batch", "0"]):
        r = subprocess.run([sys.executable, "evaluate.py", tiny_run, *args], cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, \
            (args, r.stderr[-300:])


def test_renoise_keeps_ground_truth_at_tiny_t_and_is_on_the_cli(tiny_run):
    from evaluate import renoise_shapes
    from sample import load_run
    cfg, model = load_run(tiny_run)
    results = renoise_shapes(cfg, model, torch.device("cpu"), starts=(0.0, 1e-3, 1.0), steps=2, per_pair=1)
    assert list(results) == [0.0, 1e-3, 1.0]
    truth, near = results[0.0]["overall"], results[1e-3]["overall"]
    assert truth["n"] == near["n"] == 18 and truth["color"] == truth["background"] == 1.0
    # from t = 0.001 the (barely trained) model can change almost nothing: it scores as the ground truth
    assert abs(near["all"] - truth["all"]) <= 1 / 18
    assert 0.0 <= results[1.0]["overall"]["all"] <= 1.0
    r = subprocess.run([sys.executable, "evaluate.py", tiny_run, "--steps", "2", "--renoise", "--per-pair", "1"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "denoising noised ground truth" in r.stdout
    report = json.load(open(os.path.join(tiny_run, "eval", "eval.json")))
    assert set(report["renoise"]) == {"0.0", "0.1", "0.2", "0.3", "0.45", "0.6", "0.8", "1.0"}
    assert report["renoise"]["0.1"]["overall"]["n"] == report["shapes"]["overall"]["n"] == 18  # --per-pair 1: both


def test_a_grid_that_cannot_be_written_keeps_the_scores(tiny_run, monkeypatch, capsys):
    """A full disk under runs/<run>/eval costs the scored grid (one warning), not the table and eval.json."""
    import errno
    import evaluate
    import sample

    def disk_full(images, labels, path, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(sample, "save_grid", disk_full)
    out_dir = os.path.join(tiny_run, "eval")
    for name in ("eval.json", "shapes_scored.png"):
        if os.path.exists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
    monkeypatch.setattr(sys, "argv", ["evaluate.py", tiny_run, "--steps", "2", "--per-pair", "1"])
    evaluate.main()
    out, err = capsys.readouterr()
    grid = os.path.join(out_dir, "shapes_scored.png")
    assert f"warning: {grid}: not written (No space left on device)" in err.splitlines()
    assert any(line.startswith("seen") for line in out.splitlines()) and "val loss" in out and "FID skipped" in out
    report = json.load(open(os.path.join(out_dir, "eval.json")))
    assert report["shapes"]["seen"]["n"] > 0 and "val" in report and not os.path.exists(grid)


def test_batch_sets_images_per_forward_pass_not_the_scores(tiny_run, monkeypatch):
    """--batch (batch_size) bounds the images sampled at once (less GPU memory), the scores stay the same."""
    import samplers
    from evaluate import evaluate_shapes
    from sample import load_run
    cfg, model = load_run(tiny_run)
    batches, real = [], samplers.sample_ode
    monkeypatch.setattr(samplers, "sample_ode", lambda f, x, *a, **k: batches.append(x.shape[0]) or real(f, x, *a, **k))
    default = evaluate_shapes(cfg, model, torch.device("cpu"), steps=2, per_pair=1)
    assert max(batches) > 3  # a bucket's prompts at once (fewer than 16 here)
    batches.clear()
    small = evaluate_shapes(cfg, model, torch.device("cpu"), steps=2, per_pair=1, batch_size=3)
    assert max(batches) == 3 and sum(batches) == small["num_images"]
    for part in ("seen", "held_out"):
        assert small[part] == default[part]
