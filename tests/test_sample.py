"""sample.py end to end on a tiny trained run: files, determinism, errors."""
import os

import pytest
import subprocess
import sys

import numpy as np
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "a large red circle in the center on a white background"


def run(*args):
    return subprocess.run([sys.executable, "sample.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_one_image_is_deterministic_and_sized(tiny_run, tmp_path):
    a, b, c = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    r1 = run(tiny_run, "--prompt", PROMPT, "--out", str(a), "--steps", "3", "--seed", "5")
    r2 = run(tiny_run, "--prompt", PROMPT, "--out", str(b), "--steps", "3", "--seed", "5")
    r3 = run(tiny_run, "--prompt", PROMPT, "--out", str(c), "--steps", "3", "--seed", "6", "--size", "24x16")
    assert r1.returncode == 0 and r2.returncode == 0, r1.stderr + r2.stderr
    assert "NFE 3" in r1.stdout and "s/image" in r1.stdout
    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
    assert Image.open(a).size == (16, 16)  # the tiny preset's square bucket
    assert r3.returncode == 0, r3.stderr
    assert Image.open(c).size == (24, 16) and "not a size the model was trained at (its buckets: 16x16)" in r3.stderr
    assert "warning" not in r1.stderr


def test_grid_with_several_prompts_samplers_and_negative(tiny_run, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPT + "\n\na small blue square in the top left on a black background\n",
                       encoding="utf-16")  # Notepad's "Unicode"; UTF-8 is read too
    out = tmp_path / "grid.png"
    r = run(tiny_run, "--prompts-file", str(prompts), "--num", "2", "--sampler", "heun", "--steps", "2",
            "--negative", "blurry", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "4 image(s), NFE 3" in r.stdout  # heun: 2 * steps - 1
    assert Image.open(out).size[0] >= 4 * 16
    r = run(tiny_run, "--prompt", PROMPT, "--steps", "1", "--cfg", "1", "--negative", "blurry", "--out", str(out))
    assert r.returncode == 0 and "warning: --negative has no effect at --cfg 1" in r.stderr


def test_bad_input_gives_one_line_errors(tiny_run, tmp_path):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("a caf\xe9 sign".encode("latin-1"))
    cases = [
        (str(tmp_path / "no_such_run"), "--prompt", PROMPT),
        (tiny_run, "--prompt", "   "),
        (tiny_run,),
        (tiny_run, "--prompt", PROMPT, "--size", "17x16"),
        (tiny_run, "--prompt", PROMPT, "--size", "big"),
        (tiny_run, "--prompt", PROMPT, "--size", "100000x100000"),  # not an out-of-memory traceback
        (tiny_run, "--prompts-file", str(tmp_path / "missing.txt")),
        (tiny_run, "--prompts-file", str(latin1)),
        (tiny_run, "--prompt", PROMPT, "--shift", "-1"),
        (tiny_run, "--prompt", PROMPT, "--shift", "nan"),
        (tiny_run, "--prompt", PROMPT, "--cfg", "inf"),
        (tiny_run, "--prompt", PROMPT, "--cfg", "1e308"),
        (tiny_run, "--prompt", PROMPT, "--seed", "99999999999999999999"),
        (tiny_run, "--prompt", PROMPT, "--steps", "100000000000000000000"),
        (tiny_run, "--prompt", PROMPT, "--out", str(tmp_path / "no_extension")),
        (tiny_run, "--prompt", PROMPT, "--out", str(tmp_path / "x.psd")),  # Pillow reads it, cannot write it
        (tiny_run, "--prompt", PROMPT, "--negative", " "),
        (tiny_run, "--prompt", PROMPT, "--batch", "0"),
        (tiny_run, "--prompt", PROMPT, "--prompt", "b", "--num", "500001"),  # (10**11 filled memory: killed)
    ]
    for args in cases:
        r = run(*args, *([] if "--out" in args else ["--out", str(tmp_path / "x.png")]))
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not (tmp_path / "x.png").exists()
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \r\n")
    r = run(tiny_run, "--prompts-file", str(blank), "--out", str(tmp_path / "x.png"))
    assert r.returncode == 2 and r.stderr.startswith(f"error: --prompts-file {blank}: no prompt in it"), r.stderr


def test_checkpoint_that_does_not_match_the_config(tiny_run, tmp_path):
    import json
    import shutil
    bad = tmp_path / "bad_run"
    shutil.copytree(tiny_run, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["hidden_size"], cfg["num_heads"] = 64, 4
    (bad / "config.json").write_text(json.dumps(cfg))
    r = run(str(bad), "--prompt", PROMPT, "--out", str(tmp_path / "y.png"))
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr, r.stderr


def test_damaged_files_fall_back_or_give_one_line(tiny_run, tmp_path):
    import shutil
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    good = tmp_path / "good.png"
    assert run(str(run_dir), "--prompt", PROMPT, "--out", str(good), "--steps", "2").returncode == 0
    weights = run_dir / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a damaged export: the newest checkpoint's EMA is used
    ckpts = sorted((run_dir / "checkpoints").glob("*.pt"))
    assert len(ckpts) >= 2
    torch.save({"ema": [1, 2]}, ckpts[-1])  # ... and a foreign newest checkpoint: the one before it
    r = run(str(run_dir), "--prompt", PROMPT, "--out", str(tmp_path / "fallback.png"), "--steps", "2")
    assert r.returncode == 0, r.stderr
    warnings = r.stderr.strip().splitlines()
    assert len(warnings) == 2 and str(ckpts[-1]) in warnings[0] and "model.safetensors" in warnings[1]
    assert str(ckpts[-2]) in warnings[1] and (tmp_path / "fallback.png").exists()
    for damaged in ckpts:
        damaged.write_bytes(b"")
    r = run(str(run_dir), "--prompt", PROMPT, "--out", str(tmp_path / "none.png"))
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "model.safetensors" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "none.png").exists()
    for text in ["{not json", "[1, 2]"]:
        (run_dir / "config.json").write_text(text)
        r = run(str(run_dir), "--prompt", PROMPT, "--out", str(tmp_path / "none.png"))
        assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
        assert "config.json" in r.stderr


def test_sample_shift_moves_the_time_grid(tiny_run, tmp_path):
    """--shift 3 puts more of the steps at high noise: a different image from the same seed; --shift 0
    (the training shift, 1 for the tiny preset) gives the default image back."""
    outs = {}
    for shift in (None, "0", "3"):
        out = tmp_path / f"s{shift}.png"
        r = run(tiny_run, "--prompt", PROMPT, "--steps", "3", "--out", str(out), *(["--shift", shift] if shift else []))
        assert r.returncode == 0, r.stderr
        outs[shift] = np.asarray(Image.open(out)).astype(int)
    assert np.array_equal(outs[None], outs["0"])
    assert np.abs(outs[None] - outs["3"]).max() > 0


def test_a_prompt_longer_than_the_trained_captions_is_warned_about(tiny_run, capsys):
    from sample import encode_prompts, load_run
    cfg, _ = load_run(tiny_run)
    long = "a large red circle in the center on a white background " * 3
    text, mask = encode_prompts(cfg, [PROMPT, long], "cpu")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a large red circle in the center on a wh" in err[0]
    assert f"only the first {cfg.max_token_length} are used" in err[0]
    assert text.shape[:2] == mask.shape == (2, cfg.max_token_length) and mask[1].all() and not mask[0].all()


def test_generate_runs_the_model_in_bf16_where_the_run_resolves_to_it(tiny_run):
    """On an Ampere+ GPU (precision auto -> bf16) sampling runs the model in bf16, not in slow fp32; here on
    the CPU with mixed_precision=bf16 set. fp32 (the CPU default) stays fp32; the images stay close."""
    from dataclasses import replace
    from sample import encode_prompts, generate, latent_space_for, load_run
    cfg, model = load_run(tiny_run)
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(torch.get_autocast_dtype("cpu")
                                                                if torch.is_autocast_enabled("cpu") else None))
    emb = encode_prompts(cfg, [PROMPT], "cpu")
    space = latent_space_for(cfg)
    full = generate(model, space, emb, cfg, steps=2)
    assert set(seen) == {None}
    seen.clear()
    half = generate(model, space, emb, replace(cfg, mixed_precision="bf16"), steps=2)
    assert set(seen) == {torch.bfloat16}
    diff = np.abs(np.asarray(full[0], dtype=float) - np.asarray(half[0], dtype=float)).mean()
    assert diff < 8, diff  # grey levels


def test_latent_space_for_uses_the_cache_stats_like_training(tmp_path, capsys):
    """sample.py, evaluate.py and the notebook decode with the cache's latent mean/std when latent_norm is
    on (as train.py does), and say so when they cannot; run_step names the step a run was trained to."""
    import json
    from config import get_config
    from sample import latent_space_for, run_step
    cfg = get_config("tiny", latent_norm=True, cache_dir=str(tmp_path / "cache"))
    assert latent_space_for(cfg).mean is None and "latent_norm is on but" in capsys.readouterr().err
    os.makedirs(cfg.cache_dir)
    with open(os.path.join(cfg.cache_dir, "manifest.json"), "w") as f:
        json.dump({"latent_mean": [0.1, 0.2, 0.3], "latent_std": [1.0, 2.0, 3.0]}, f)
    assert latent_space_for(cfg).std.tolist() == [1.0, 2.0, 3.0]
    assert latent_space_for(get_config("tiny", cache_dir=cfg.cache_dir)).mean is None  # latent_norm off
    os.makedirs(tmp_path / "run" / "checkpoints")
    for name in ("step_0000200.pt", "step_0001000.pt", "step_final.pt"):
        (tmp_path / "run" / "checkpoints" / name).write_bytes(b"")
    assert run_step(str(tmp_path / "run")) == 1000 and run_step(str(tmp_path / "nothing")) is None


def test_a_run_keeps_the_latent_stats_it_was_trained_with(tiny_data, tmp_path):
    """latent_norm: train.py writes the stats its data was normalised with into the run; sampling uses
    them even after the cache changed (images added), and from wherever the run folder was moved to."""
    import json
    import shutil
    from config import get_config
    from sample import latent_space_for, load_run
    from train import train
    cache = str(tmp_path / "cache")
    shutil.copytree(tiny_data["cache_dir"], cache)
    cfg = get_config("tiny", out_dir=str(tmp_path / "runs"), optimizer="adamw", max_steps=2, latent_norm=True,
                     data_dir=tiny_data["data_dir"], cache_dir=cache)
    train(cfg)
    with open(os.path.join(cache, "manifest.json")) as f:
        manifest = json.load(f)
    with open(os.path.join(cfg.run_dir, "latent_stats.json")) as f:
        assert json.load(f)["latent_std"] == manifest["latent_std"]
    manifest["latent_std"] = [s * 2 for s in manifest["latent_std"]]  # the cache, refreshed with more images
    with open(os.path.join(cache, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    moved = str(tmp_path / "elsewhere" / "myrun")
    shutil.move(cfg.run_dir, moved)
    loaded, _ = load_run(moved)
    assert loaded.run_dir == moved
    std = latent_space_for(loaded).std.tolist()
    assert std == pytest.approx([s / 2 for s in manifest["latent_std"]]) and std != manifest["latent_std"]


def test_the_default_size_is_a_trained_bucket():
    """The square bucket, or where the buckets have no square one (target_resolution 12 with align 8 gives
    8x16 and 16x8), the one nearest to square: never a size the model was not trained at."""
    from config import get_config
    from images import make_buckets
    from sample import default_size
    for kw, want in [({}, (16, 16)), ({"target_resolution": 12}, None), ({"target_resolution": 15, "bucket_align": 2},
                                                                         None), ("flowers", (448, 448))]:
        cfg = get_config("flowers") if kw == "flowers" else get_config("tiny", **kw)
        size = default_size(cfg)
        assert size in make_buckets(cfg.target_resolution, cfg.bucket_align, cfg.max_aspect_ratio)
        assert want is None or size == want


def test_a_checkpoint_newer_than_the_export_is_used(tiny_run, tmp_path, capsys):
    """A resumed run that stopped before its export (kill -9, out of memory) leaves model/ from an earlier
    step: load_run takes the newer checkpoint's EMA weights (with a warning), run_step names its step."""
    import shutil
    from model import SingleStreamDiT, exported_step
    from sample import load_run, run_step
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    ckpts = sorted((run_dir / "checkpoints").glob("step_*.pt"))
    assert exported_step(str(run_dir / "model")) == 6 == run_step(str(run_dir))  # train.py records the step
    _, model = load_run(str(run_dir))
    assert capsys.readouterr().err == ""
    newest = torch.load(ckpts[-1], weights_only=False)["ema"]
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, newest[k], rtol=0, atol=0)
    older = SingleStreamDiT(model.dc)  # the export of an earlier run, step 4
    older.load_state_dict(torch.load(ckpts[0], weights_only=False)["ema"])
    older.save_pretrained(str(run_dir / "model"), step=4)
    _, model = load_run(str(run_dir))
    assert "from step 4" in capsys.readouterr().err and run_step(str(run_dir)) == 6
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, newest[k], rtol=0, atol=0)
    older.save_pretrained(str(run_dir / "model"))  # no step recorded (exports before this): the export
    _, model = load_run(str(run_dir))
    assert any(not torch.equal(v, newest[k]) for k, v in model.state_dict().items())


def test_damaged_latent_stats_are_a_warning(tmp_path, capsys):
    import json
    from config import get_config
    from sample import latent_space_for
    cfg = get_config("tiny", latent_norm=True, out_dir=str(tmp_path), run_name="run")
    os.makedirs(cfg.run_dir)
    good = {"latent_mean": [0.0, 0.1, 0.2], "latent_std": [1.0, 2.0, 3.0]}
    for stats in ([], {"latent_mean": [0, 0, 0]}, dict(good, latent_std=[1.0, 2.0]),
                  dict(good, latent_std=[1.0, 0.0, 1.0]), dict(good, latent_mean=["a", 0, 0])):
        with open(os.path.join(cfg.run_dir, "latent_stats.json"), "w") as f:
            json.dump(stats, f)
        space = latent_space_for(cfg)
        assert space.std is None and "latent_stats.json" in capsys.readouterr().err, stats
    with open(os.path.join(cfg.run_dir, "latent_stats.json"), "w") as f:
        json.dump(good, f)
    assert latent_space_for(cfg).std.tolist() == [1.0, 2.0, 3.0] and capsys.readouterr().err == ""


def test_a_run_config_from_before_the_out_dir_check_loads(tiny_run, tmp_path):
    """config.json of runs trained with out_dir="" (allowed before): the run's folder is where it is now."""
    import json
    import shutil
    from sample import load_run
    run_dir = tmp_path / "old"
    shutil.copytree(tiny_run, run_dir)
    saved = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps(dict(saved, out_dir="")))
    cfg, _ = load_run(str(run_dir))
    assert cfg.run_dir == str(run_dir)


def test_a_prompt_gives_the_same_images_whatever_else_is_asked_for(tiny_run, tmp_path):
    """Image j of a prompt uses seed + j: the same with the prompt alone, with --num, or after other prompts
    (the grid shows each image upscaled by 8 in a 128 px cell: cell k's top left is image k)."""
    other = "a small blue square in the top left on a black background"
    alone, grid = tmp_path / "alone.png", tmp_path / "grid.png"
    r1 = run(tiny_run, "--prompt", PROMPT, "--steps", "2", "--seed", "3", "--out", str(alone))
    r2 = run(tiny_run, "--prompt", other, "--prompt", PROMPT, "--num", "2", "--steps", "2", "--seed", "3",
             "--out", str(grid))
    assert r1.returncode == 0 and r2.returncode == 0, r1.stderr + r2.stderr
    cells = np.asarray(Image.open(grid).convert("RGB"))
    one = np.asarray(Image.open(alone).convert("RGB"))
    first_of_prompt = cells[:128, 2 * 128:3 * 128][::8, ::8]  # images: other x2, then PROMPT x2
    assert np.array_equal(first_of_prompt, one)


def test_an_out_that_cannot_be_written_is_one_line(tiny_run, tmp_path):
    """A --out under a file is an error before any sampling; a grid too large for its format (WebP: 16383 px
    a side) is one line naming --out, not a traceback, and its images are written one by one instead."""
    (tmp_path / "file.png").write_bytes(b"")
    r = run(tiny_run, "--prompt", PROMPT, "--out", str(tmp_path / "file.png" / "x.png"))
    assert r.returncode == 2 and r.stderr.startswith("error: --out ") and len(r.stderr.strip().splitlines()) == 1
    assert r.stdout == "", r.stdout
    r = run(tiny_run, "--prompt", PROMPT, "--num", "500", "--steps", "1", "--out", str(tmp_path / "big.webp"))
    assert r.returncode == 2 and r.stderr.startswith("error: --out ") and "Traceback" not in r.stderr, r.stderr
    # ... and the 500 sampled images are not lost with it: one PNG each beside it
    assert r.stderr.strip().endswith(f"its 500 image(s) are in {tmp_path / 'big_images'}/ instead"), r.stderr
    names = sorted(os.listdir(tmp_path / "big_images"))
    assert len(names) == 500 and names[-1] == "0499_a-large-red-circle-in-the-center-on-a-white-back_seed499.png"
    assert Image.open(tmp_path / "big_images" / names[0]).size == (16, 16)


def test_a_path_inside_a_run_names_the_run_folder(tiny_run, tmp_path):
    """The run's model/ (which has a config.json of its own) or checkpoints/ given instead of the run folder: one
    line naming the run folder to give. (A checkpoint file is that checkpoint: test_checkpoint_picks_an_earlier_step.)"""
    for inside in ("model", "checkpoints"):
        r = run(os.path.join(tiny_run, inside), "--prompt", PROMPT, "--out", str(tmp_path / "x.png"))
        assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
        assert f"give the run folder, {os.path.abspath(tiny_run)}" in r.stderr, r.stderr


def test_checkpoint_picks_an_earlier_step(tiny_run, tmp_path):
    """--checkpoint STEP (or a checkpoint file) samples that checkpoint's EMA weights and says its step; evaluate.py
    scores it into eval/step_<N>/; a step the run has no checkpoint of is one line naming the ones it has."""
    import json
    from checkpoint import checkpoint_step, step_files
    from sample import load_run, run_step
    ckpts = step_files(os.path.join(tiny_run, "checkpoints"))
    assert len(ckpts) >= 2
    first, step = ckpts[0], checkpoint_step(ckpts[0])
    _, model = load_run(tiny_run, checkpoint=str(step))
    ema = torch.load(first, map_location="cpu", weights_only=False)["ema"]
    assert all(torch.equal(v, ema[k]) for k, v in model.state_dict().items())
    _, newest = load_run(tiny_run)
    assert not all(torch.equal(v, ema[k]) for k, v in newest.state_dict().items())
    assert run_step(tiny_run, first) == step and run_step(tiny_run) > step
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    r1 = run(tiny_run, "--prompt", PROMPT, "--steps", "2", "--checkpoint", str(step), "--out", str(a))
    r2 = run(tiny_run, "--prompt", PROMPT, "--steps", "2", "--checkpoint", first, "--out", str(b))
    assert r1.returncode == 0 and r2.returncode == 0, r1.stderr + r2.stderr
    assert f"trained {step} steps" in r1.stdout
    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
    c = tmp_path / "c.png"
    r3 = run(first, "--prompt", PROMPT, "--steps", "2", "--out", str(c))   # the checkpoint file as the run
    assert r3.returncode == 0 and f"trained {step} steps" in r3.stdout, r3.stderr
    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(c)))
    state = torch.load(first, map_location="cpu", weights_only=False)
    torch.save(state, tmp_path / "my_copy.pt")                       # renamed: its step is read from it
    assert run_step(tiny_run, str(tmp_path / "my_copy.pt")) == step
    state["config"]["prediction"] = "v" if state["config"]["prediction"] != "v" else "x"
    torch.save(state, tmp_path / "other_run.pt")                     # another run's: read the wrong way
    r = run(tiny_run, "--prompt", PROMPT, "--checkpoint", str(tmp_path / "other_run.pt"), "--out", str(a))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"not a checkpoint of {tiny_run} (prediction=" in r.stderr
    r = run(tiny_run, "--prompt", PROMPT, "--checkpoint", "999", "--out", str(a))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("error: --checkpoint 999: no such checkpoint") and str(step) in r.stderr
    r = subprocess.run([sys.executable, "evaluate.py", first, "--steps", "1", "--per-pair", "1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    report = json.load(open(os.path.join(tiny_run, "eval", f"step_{step}", "eval.json")))
    assert report["trained_steps"] == step
    state = torch.load(first, map_location="cpu", weights_only=False)
    del state["step"]
    torch.save(state, tmp_path / "no_step.pt")                       # a copy that holds no step: named by its file
    r = subprocess.run([sys.executable, "evaluate.py", tiny_run, "--checkpoint", str(tmp_path / "no_step.pt"),
                        "--steps", "1", "--per-pair", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert os.path.isfile(os.path.join(tiny_run, "eval", "no_step", "eval.json"))


def test_out_folder_writes_one_png_per_image(tiny_run, tmp_path):
    """--out a folder: one PNG per image, named by index, prompt and seed; each the image --out FILE gives."""
    other = "a small blue square in the top left on a black background!"
    folder = tmp_path / "pngs"
    r = run(tiny_run, "--prompt", PROMPT, "--prompt", other, "--num", "2", "--steps", "2", "--seed", "7",
            "--out", str(folder) + os.sep)
    assert r.returncode == 0, r.stderr
    names = sorted(os.listdir(folder))
    assert names == ["0000_a-large-red-circle-in-the-center-on-a-white-back_seed7.png",
                     "0001_a-large-red-circle-in-the-center-on-a-white-back_seed8.png",
                     "0002_a-small-blue-square-in-the-top-left-on-a-black-b_seed7.png",
                     "0003_a-small-blue-square-in-the-top-left-on-a-black-b_seed8.png"], names
    single = tmp_path / "one.png"
    assert run(tiny_run, "--prompt", other, "--steps", "2", "--seed", "8", "--out", str(single)).returncode == 0
    assert np.array_equal(np.asarray(Image.open(folder / names[3])), np.asarray(Image.open(single)))
    assert Image.open(folder / names[0]).size == (16, 16)
    r = run(tiny_run, "--prompt", PROMPT, "--steps", "1", "--out", str(folder))  # an existing folder, no slash
    assert r.returncode == 0 and len(os.listdir(folder)) == 5, r.stderr   # 0000_..._seed0.png added


def test_generate_shows_a_progress_bar_in_a_terminal_only(tiny_run, monkeypatch):
    import io
    from sample import encode_prompts, generate, latent_space_for, load_run

    class Terminal(io.StringIO):
        def isatty(self):
            return True
    cfg, model = load_run(tiny_run)
    space, emb = latent_space_for(cfg, "cpu"), encode_prompts(cfg, [PROMPT] * 3, "cpu")
    for stream, progress, shown in ((Terminal(), True, True), (Terminal(), False, False), (io.StringIO(), True, False)):
        monkeypatch.setattr(sys, "stderr", stream)
        generate(model, space, emb, cfg, steps=1, batch_size=2, progress=progress)
        assert ("sampling:" in stream.getvalue() and "/3 [" in stream.getvalue()) == shown, stream.getvalue()


def test_encode_prompts_encodes_each_distinct_prompt_once_in_chunks(tiny_run, monkeypatch):
    """Repeated prompts and chunks of a long list give what one batch of all of them gives."""
    import text_encoder
    from sample import encode_prompts, load_run
    cfg, _ = load_run(tiny_run)
    prompts = [PROMPT, "a small blue square", PROMPT, "a tiny green triangle at the bottom", "a small blue square"]
    encoder = text_encoder.load_text_encoder(cfg, device="cpu")
    want_text, want_mask = encoder.encode(prompts)
    batches = []
    real_encode = text_encoder.TextEncoder.encode
    monkeypatch.setattr(text_encoder.TextEncoder, "encode", lambda self, c: batches.append(list(c)) or real_encode(self, c))
    text, mask = encode_prompts(cfg, prompts, "cpu", chunk=2)
    assert batches == [[PROMPT, "a small blue square"], ["a tiny green triangle at the bottom"]]
    assert text.shape == want_text.shape and torch.equal(mask, want_mask)
    torch.testing.assert_close(text, want_text, atol=1e-5, rtol=1e-5)


def run_in_process(monkeypatch, capsys, *args):
    """sample.py's main under main_guard in this process: (exit code, stderr)."""
    import sample
    monkeypatch.setattr(sys, "argv", ["sample.py", *args])
    try:
        sample.main_guard(sample.main)
    except SystemExit as e:
        return e.code, capsys.readouterr().err
    return 0, capsys.readouterr().err


@pytest.mark.parametrize("failure", ["interrupt", "out of memory"])
def test_out_folder_keeps_the_batches_done_before_a_failure(tiny_run, tmp_path, monkeypatch, capsys, failure):
    """--out a folder: each batch's PNGs are written when it is done, so Ctrl-C or out of memory in the
    second batch keeps the first one's (identical to a run that finished), and the one line says so."""
    import samplers
    other = "a small blue square in the top left on a black background"
    full, cut = tmp_path / "full", tmp_path / "cut"
    args = ["--prompt", PROMPT, "--prompt", other, "--num", "2", "--steps", "2", "--device", "cpu"]
    code, err = run_in_process(monkeypatch, capsys, tiny_run, *args, "--batch", "3", "--out", f"{full}/")
    assert code == 0 and len(os.listdir(full)) == 4, err
    real_sample_ode, calls = samplers.sample_ode, []

    def failing_sample_ode(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt if failure == "interrupt" else torch.OutOfMemoryError("CUDA out of memory")
        return real_sample_ode(*a, **k)
    monkeypatch.setattr(samplers, "sample_ode", failing_sample_ode)
    code, err = run_in_process(monkeypatch, capsys, tiny_run, *args, "--batch", "2", "--out", f"{cut}/")
    assert code == (130 if failure == "interrupt" else 2), err
    assert len(err.strip().splitlines()) == 1 and err.strip().endswith(f"2 of 4 images written to {cut}/"), err
    if failure == "out of memory":
        assert err.startswith("error: out of memory sampling 2 image(s) at 16x16 on cpu: --batch 1 needs less"), err
    names = sorted(os.listdir(cut))
    assert names == sorted(os.listdir(full))[:2]  # the first batch, the same images whatever the batch size
    for name in names:
        assert np.array_equal(np.asarray(Image.open(cut / name)), np.asarray(Image.open(full / name)))


def test_a_prompt_that_is_not_utf8_and_weights_that_do_not_fit_say_what(tiny_run, tmp_path):
    """A --prompt with bytes that are not UTF-8 (a Latin-1 terminal) is one line, not the tokenizer's TypeError;
    a checkpoint whose weights do not fit names the weights (torch's first line, 'Error(s) in loading
    state_dict for SingleStreamDiT:', said nothing)."""
    r = run(tiny_run, "--prompt", "a caf\udce9 sign", "--out", str(tmp_path / "x.png"))  # argv byte 0xe9
    assert r.returncode == 2 and r.stderr.startswith("error: prompt ") and "not UTF-8" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    foreign = tmp_path / "foreign.pt"
    torch.save({"ema": {}}, foreign)
    r = run(tiny_run, "--checkpoint", str(foreign), "--prompt", PROMPT, "--out", str(tmp_path / "x.png"))
    assert r.returncode == 2 and "does not match" in r.stderr and "Missing key(s)" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "x.png").exists()


def test_num_does_not_copy_the_prompt_embeddings(tiny_run, tmp_path, monkeypatch, capsys):
    """--num N: the N images of a prompt share its embedding, picked out a batch at a time; the text was
    copied N times up front (on a GPU, prompts x N x max_token_length x text_dim floats whatever --batch, so
    --batch could not help an out of memory there). The images are the same as with --num 1 and --seed + j."""
    import sample
    real, rows = sample.generate_batches, []

    def recording(model, space, prompt_emb, *a, **k):
        rows.append(prompt_emb[0].shape[0])
        return real(model, space, prompt_emb, *a, **k)
    monkeypatch.setattr(sample, "generate_batches", recording)
    other = "a small blue square in the top left on a black background"
    code, err = run_in_process(monkeypatch, capsys, tiny_run, "--prompt", PROMPT, "--prompt", other, "--num", "3",
                               "--steps", "2", "--batch", "2", "--device", "cpu", "--out", f"{tmp_path / 'all'}/")
    assert code == 0 and rows == [2], (rows, err)
    code, err = run_in_process(monkeypatch, capsys, tiny_run, "--prompt", other, "--seed", "2", "--steps", "2",
                               "--device", "cpu", "--out", str(tmp_path / "one.png"))
    names = sorted(os.listdir(tmp_path / "all"))
    assert code == 0 and len(names) == 6 and names[5].endswith("_seed2.png"), names
    alone = np.asarray(Image.open(tmp_path / "one.png"))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "all" / names[5])), alone)


def test_one_negative_prompt_guides_every_batch(tiny_run):
    """generate(): a negative prompt given once (one row) guides all images, also past the first batch, as the
    same negative given once per image does."""
    from sample import encode_prompts, generate, latent_space_for, load_run
    cfg, model = load_run(tiny_run)
    emb = encode_prompts(cfg, [PROMPT, "a small blue square in the top left on a black background"] * 3, "cpu")
    neg = encode_prompts(cfg, ["blurry"], "cpu")
    space = latent_space_for(cfg)
    once = generate(model, space, emb, cfg, steps=2, cfg_scale=3.0, negative_emb=neg, batch_size=4)
    per_image = generate(model, space, emb, cfg, steps=2, cfg_scale=3.0, batch_size=4,
                         negative_emb=(neg[0].expand(6, -1, -1), neg[1].expand(6, -1)))
    plain = generate(model, space, emb, cfg, steps=2, cfg_scale=3.0, batch_size=4)
    assert len(once) == 6 and all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(once, per_image))
    assert not np.array_equal(np.asarray(once[5]), np.asarray(plain[5]))  # the negative is used in batch 2
