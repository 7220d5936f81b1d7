"""evaluate.py: runs on a tiny run; FID maths; the checker scores ground truth (see test_shapes.py)."""
import json
import os
import shutil
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


def save_tiny_clip_with_processor(path):
    """A tiny CLIP folder as a hub snapshot has it: model, tokenizer and image processor (16 px)."""
    from tiny_models import save_tiny_clip
    from transformers import CLIPImageProcessorPil
    model = save_tiny_clip(str(path))
    CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(str(path))
    return model


def test_clip_score_is_the_models_own_image_caption_similarity(tmp_path):
    """The CLIP score of images and captions equals 100 x the cosine CLIPModel's forward gives for each pair
    (logits_per_image over its logit scale), floored at 0 and averaged; batching and a caption longer than the
    text tower (truncated) change nothing."""
    import numpy as np
    from PIL import Image
    from evaluate import clip_score, load_clip
    save_tiny_clip_with_processor(tmp_path / "clip")
    clip = load_clip(str(tmp_path / "clip"), torch.device("cpu"))
    model, tokenizer, processor = clip
    rng = np.random.RandomState(0)
    images = [Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in
              [(20, 30), (16, 16), (40, 24), (33, 17), (16, 50), (28, 28)]]
    captions = ["a red square", "a blue circle", "red", "circle square red blue", "a", "a small green triangle"]
    with torch.no_grad():
        out = model(**tokenizer(captions, padding=True, return_tensors="pt"),
                    pixel_values=processor(images=images, return_tensors="pt")["pixel_values"])
    cosine = out.logits_per_image.diag() / model.logit_scale.exp()
    assert (cosine < 0).any() and (cosine > 0).any()  # the floor at 0 is exercised
    expected = (100 * cosine).clamp_min(0).mean().item()
    assert abs(clip_score(clip, images, captions, torch.device("cpu")) - expected) < 1e-4
    assert abs(clip_score(clip, images, captions, torch.device("cpu"), batch=4) - expected) < 1e-4
    long = ["a red square " * 20] + captions[1:]  # 60 words: past the tiny text tower's 16 positions
    assert 0 <= clip_score(clip, images, long, torch.device("cpu"), batch=4) <= 100


def test_clip_score_and_fid_share_one_generation_on_the_cli(tiny_run, tmp_path, monkeypatch, capsys):
    """evaluate.py --clip --inception: both scores in eval.json, from one generation of the held-out captions."""
    import evaluate
    import sample

    class Features(torch.nn.Module):  # a stand-in TorchScript Inception: (N,3,299,299) -> (N,2)
        def forward(self, x):
            return torch.stack([x.mean((1, 2, 3)), x.std((1, 2, 3))], 1)

    torch.jit.script(Features()).save(str(tmp_path / "inception.pt"))
    save_tiny_clip_with_processor(tmp_path / "clip")
    calls = []
    generate = sample.generate
    monkeypatch.setattr(sample, "generate", lambda *a, **k: calls.append(k) or generate(*a, **k))
    monkeypatch.setattr(sys, "argv", ["evaluate.py", tiny_run, "--steps", "2", "--per-pair", "1",
                                      "--inception", str(tmp_path / "inception.pt"), "--clip", str(tmp_path / "clip")])
    evaluate.main()
    report = json.load(open(os.path.join(tiny_run, "eval", "eval.json")))
    out = capsys.readouterr().out
    assert report["fid"] is not None and 0 <= report["clip_score"] <= 100
    assert report["clip_model"] == str(tmp_path / "clip")
    assert f"CLIP score {report['clip_score']:.2f}" in out
    held_out = [k for k in calls if isinstance(k["seed"], list)]  # (the shapes prompts: one seed for all)
    assert len(held_out) == 1, calls  # one bucket in the tiny run: one batched call for FID and CLIP


def test_a_clip_model_that_cannot_be_loaded_is_one_line(tiny_run, tmp_path):
    save_tiny_clip_with_processor(tmp_path / "clip")
    from tiny_models import save_tiny_t5
    save_tiny_t5(str(tmp_path / "t5"))
    shutil.copytree(tmp_path / "t5", tmp_path / "t5_with_processor")
    shutil.copy(tmp_path / "clip" / "preprocessor_config.json", tmp_path / "t5_with_processor")
    os.remove(tmp_path / "clip" / "preprocessor_config.json")  # a CLIP text model's folder has no image processor
    for name, expected in [(str(tmp_path / "missing"), f"--clip={str(tmp_path / 'missing')!r}: no such folder"),
                           (str(tmp_path / "t5"), f"--clip {tmp_path / 't5'}: cannot load its image processor"),
                           (str(tmp_path / "t5_with_processor"), f"--clip {tmp_path / 't5_with_processor'}: a T5Model "
                                                                 "has no text and image towers"),
                           (str(tmp_path / "clip"), f"--clip {tmp_path / 'clip'}: cannot load its image processor")]:
        r = subprocess.run([sys.executable, "evaluate.py", tiny_run, "--clip", name], cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 2 and r.stderr.startswith(f"error: {expected}"), r.stderr[-500:]
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
