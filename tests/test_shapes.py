"""shapes.py: caption grammar, deterministic generation, and the pixel checker's accuracy."""
import os
import random
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageFilter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import shapes  # noqa: E402
from config import ConfigError, get_config  # noqa: E402

NUM_IMAGES = 180
VALUES = dict(zip(shapes.ATTRIBUTES, (shapes.BACKGROUNDS, shapes.COLORS, shapes.SHAPES, shapes.SIZES,
                                      shapes.POSITIONS)))
CAPTION_RE = re.compile(r"a (small|large) (\w+) (circle|square|triangle) in the (top left|top right|"
                        r"bottom left|bottom right|center) on a (white|black|gray) background")


def model_size(aspect):
    """The bucket sizes the model sees at target_resolution 32: 32x32, 40x24, 24x40."""
    return shapes.canvas_size(aspect, 32)


def aspect_of(image):
    return {(1, 1): "square", (5, 3): "wide", (3, 5): "tall"}[
        tuple(np.array(image.size) // np.gcd(*image.size))]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """(folder, [(image, attrs)]) of a generated set."""
    folder = str(tmp_path_factory.mktemp("shapes"))
    assert shapes.generate_dataset(folder, NUM_IMAGES, seed=0) == NUM_IMAGES
    items = []
    for i in range(NUM_IMAGES):
        with open(os.path.join(folder, f"{i:05d}.txt")) as f:
            attrs = shapes.parse_caption(f.read())
        image = Image.open(os.path.join(folder, f"{i:05d}.png"))
        image.load()
        items.append((image, attrs))
    return folder, items


def assert_accuracy(summary, at_least, label):
    overall = summary["overall"]
    for key in shapes.ATTRIBUTES + ("all",):
        assert overall[key] >= at_least, f"{label}: {key} {overall[key]:.3f} < {at_least} ({overall})"


# --- grammar -------------------------------------------------------------------------------------------
def test_caption_format_and_round_trip():
    attrs = dict(background="white", color="red", shape="circle", size="small", position="top left")
    assert shapes.caption(attrs) == "a small red circle in the top left on a white background"
    rng = random.Random(0)
    for _ in range(200):
        attrs = shapes.sample_attributes(rng, held_out_allowed=True)
        text = shapes.caption(attrs)
        assert CAPTION_RE.fullmatch(text), text
        assert shapes.parse_caption(text) == attrs
    messy = "  A Large BLUE square in the  center on a gray background\n"  # case and spaces are forgiven
    assert shapes.parse_caption(messy)["color"] == "blue"


@pytest.mark.parametrize("text, names", [
    ("a small pink circle in the top left on a white background", "pink"),
    ("a small red hexagon in the top left on a white background", "hexagon"),
    ("a small red circle in the middle on a white background", "middle"),
    ("a red circle", "outside the shapes grammar"),
    ("", "outside the shapes grammar"),
])
def test_parse_caption_rejects_text_outside_the_grammar(text, names):
    with pytest.raises(ValueError, match=names):
        shapes.parse_caption(text)


def test_sample_attributes_skips_held_out_pairs_unless_allowed():
    rng = random.Random(1)
    drawn = [shapes.sample_attributes(rng) for _ in range(500)]
    assert not any(shapes.is_held_out(a) for a in drawn)
    assert all(set(a) == set(shapes.ATTRIBUTES) for a in drawn)
    assert any(shapes.is_held_out(shapes.sample_attributes(rng, held_out_allowed=True)) for _ in range(500))


def test_canvas_sizes():
    assert [shapes.canvas_size(a, 96) for a in ("square", "wide", "tall")] == [(96, 96), (120, 72), (72, 120)]
    assert [model_size(a) for a in ("square", "wide", "tall")] == [(32, 32), (40, 24), (24, 40)]
    with pytest.raises(ValueError, match="aspect"):
        shapes.canvas_size("panorama", 96)


# --- generation ----------------------------------------------------------------------------------------
def test_generation_is_deterministic_and_marked_complete(dataset, tmp_path):
    folder, _ = dataset
    names = sorted(os.listdir(folder))
    expected = [f"{i:05d}.{ext}" for i in range(NUM_IMAGES) for ext in ("png", "txt")] + [shapes.MARKER]
    assert names == sorted(expected)
    again, other = str(tmp_path / "again"), str(tmp_path / "other")
    shapes.generate_dataset(again, NUM_IMAGES, seed=0)
    shapes.generate_dataset(other, NUM_IMAGES, seed=1)
    differ = 0
    for name in names:
        data = open(os.path.join(folder, name), "rb").read()
        assert open(os.path.join(again, name), "rb").read() == data, name
        differ += open(os.path.join(other, name), "rb").read() != data
    assert differ > NUM_IMAGES  # another seed gives other images and captions


def test_dataset_covers_every_value_and_never_a_held_out_pair(dataset):
    _, items = dataset
    assert not any(shapes.is_held_out(attrs) for _, attrs in items)
    for key, values in VALUES.items():
        counts = {v: sum(a[key] == v for _, a in items) for v in values}
        assert min(counts.values()) >= 0.5 * NUM_IMAGES / len(values), (key, counts)  # balanced-ish
    aspects = [aspect_of(image) for image, _ in items]
    assert {a: aspects.count(a) for a in shapes.ASPECTS} == {"square": 60, "wide": 60, "tall": 60}
    pairs = {(a["color"], a["shape"]) for _, a in items}
    assert len(pairs) == len(shapes.COLORS) * len(shapes.SHAPES) - len(shapes.HELD_OUT)


def test_pixels_match_captions(dataset):
    _, items = dataset
    for image, attrs in items:
        assert image.mode == "RGB" and image.size == shapes.canvas_size(aspect_of(image), 96)
        pixels = np.asarray(image)                                        # (H, W, 3)
        bg = shapes.BACKGROUNDS[attrs["background"]]
        for corner in (pixels[0, 0], pixels[0, -1], pixels[-1, 0], pixels[-1, -1]):
            assert tuple(corner) == bg
        ys, xs = np.nonzero((pixels != bg).any(axis=-1))
        centroid = pixels[int(round(ys.mean())), int(round(xs.mean()))]
        assert tuple(centroid) == shapes.COLORS[attrs["color"]], attrs
        height, width = pixels.shape[:2]
        side = max(xs.max() - xs.min(), ys.max() - ys.min()) + 1
        assert abs(side / min(width, height) - shapes.SIZES[attrs["size"]]) < 0.03, attrs


def test_ensure_shapes_data_generates_once_and_repairs_partial_sets(tmp_path, capsys):
    cfg = get_config("tiny", data_dir=str(tmp_path / "data"), num_shapes=9)
    assert shapes.ensure_shapes_data(cfg) == cfg.data_dir
    assert "generating 9 images" in capsys.readouterr().out
    assert len([n for n in os.listdir(cfg.data_dir) if n.endswith(".png")]) == 9
    shapes.ensure_shapes_data(cfg)
    assert capsys.readouterr().out == ""                          # complete: nothing to do
    with open(os.path.join(cfg.data_dir, shapes.MARKER), "w") as f:  # as if interrupted
        f.write('{"complete": false}')
    os.remove(os.path.join(cfg.data_dir, "00004.png"))
    shapes.ensure_shapes_data(cfg)
    assert "generating" in capsys.readouterr().out
    assert os.path.exists(os.path.join(cfg.data_dir, "00004.png"))
    shapes.ensure_shapes_data(get_config("tiny", data_dir=cfg.data_dir, num_shapes=5))
    assert sorted(os.listdir(cfg.data_dir))[-2:] == ["00004.txt", shapes.MARKER]  # stale ones removed
    with pytest.raises(ConfigError, match="is a file"):
        shapes.ensure_shapes_data(get_config("tiny", data_dir=os.path.join(cfg.data_dir, "00000.png")))


def test_shapes_are_never_generated_into_a_folder_of_other_images(tmp_path):
    """data_source=folder forgotten (python train.py data_dir=my_images): the user's numbered images would be
    overwritten and the ones past num_shapes deleted. A folder without the marker is left alone, one line."""
    own = tmp_path / "mine"
    own.mkdir()
    for name in ("00000.png", "00007.png", "00007.txt", "holiday.jpg"):
        (own / name).write_bytes(b"the user's own file " + name.encode())
    with pytest.raises(ConfigError, match=r"data_dir=.*mine.*no generated shapes set.*data_source=folder"):
        shapes.ensure_shapes_data(get_config("tiny", data_dir=str(own), num_shapes=5))
    assert sorted(os.listdir(own)) == ["00000.png", "00007.png", "00007.txt", "holiday.jpg"]
    assert (own / "00000.png").read_bytes() == b"the user's own file 00000.png"
    empty = tmp_path / "new"  # an empty folder with what a file browser or git leaves in it is generated into
    empty.mkdir()
    (empty / ".DS_Store").write_bytes(b"")
    (empty / ".gitkeep").write_bytes(b"")
    assert shapes.ensure_shapes_data(get_config("tiny", data_dir=str(empty), num_shapes=5))
    assert len(os.listdir(empty)) == 2 + 10 + 1


def test_command_line(tmp_path):
    run = lambda *args: subprocess.run([sys.executable, os.path.join(ROOT, "shapes.py"), *args],
                                       capture_output=True, text=True, cwd=tmp_path)
    done = run(str(tmp_path / "cli"), "--num", "6")
    assert done.returncode == 0, done.stderr
    summary = done.stdout.strip().splitlines()[-1]
    assert summary.startswith(f"shapes: 6 images in {tmp_path / 'cli'} (generated")
    assert len(os.listdir(tmp_path / "cli")) == 13
    assert "already complete" in run(str(tmp_path / "cli"), "--num", "6").stdout
    bad = run(str(tmp_path / "cli"), "--num", "0")
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --num=0: must be > 0"


# --- the checker ---------------------------------------------------------------------------------------
def test_checker_is_accurate_on_generated_images(dataset):
    _, items = dataset
    images, attrs = [i for i, _ in items], [a for _, a in items]
    assert_accuracy(shapes.score_images(images, attrs), 0.99, "generated size")
    small = [image.resize(model_size(aspect_of(image)), Image.LANCZOS) for image in images]
    assert {s.size for s in small} == {(32, 32), (40, 24), (24, 40)}
    assert_accuracy(shapes.score_images(small, attrs), 0.99, "model sizes")
    arrays = [np.asarray(s) for s in small[:30]]                   # numpy input works the same
    assert shapes.score_images(arrays, attrs[:30]) == shapes.score_images(small[:30], attrs[:30])


def test_eval_prompts_cover_everything_and_score_at_model_sizes():
    prompts = shapes.eval_prompts()
    assert prompts == shapes.eval_prompts()                        # fixed
    for key, values in VALUES.items():
        assert {p[key] for p in prompts} == set(values), key
    assert {p["aspect"] for p in prompts} == set(shapes.ASPECTS)
    for pair in shapes.HELD_OUT:
        assert sum((p["color"], p["shape"]) == pair for p in prompts) >= 3
    rng = random.Random(0)
    direct = [shapes.render(p, *model_size(p["aspect"]), rng) for p in prompts]
    resized = [shapes.render(p, *shapes.canvas_size(p["aspect"], 96), rng)
               .resize(model_size(p["aspect"]), Image.LANCZOS) for p in prompts]
    for images in (direct, resized):
        summary = shapes.score_images(images, prompts)
        assert summary["held_out"]["n"] == 4 * len(shapes.HELD_OUT)
        assert summary["seen"]["n"] + summary["held_out"]["n"] == len(prompts)
        assert summary["held_out"]["all"] >= 0.99
        assert_accuracy(summary, 0.99, "eval prompts")


def test_checker_survives_blur_noise_stray_pixels_and_off_colours(dataset):
    _, items = dataset
    rng = np.random.default_rng(0)
    perturbed = []
    for image, _ in items:
        small = image.resize(model_size(aspect_of(image)), Image.LANCZOS)
        small = small.filter(ImageFilter.GaussianBlur(0.7))
        x = np.asarray(small).astype(float)                            # (H, W, 3)
        x += rng.normal(0, 8, x.shape) + rng.uniform(-15, 15, 3)       # noise and a colour cast
        for _ in range(4):                                             # stray pixels
            x[rng.integers(x.shape[0]), rng.integers(x.shape[1])] = rng.uniform(0, 255, 3)
        perturbed.append(np.clip(np.rint(x), 0, 255).astype(np.uint8))
    summary = shapes.score_images(perturbed, [a for _, a in items])["overall"]
    assert min(summary[k] for k in ("background", "color", "size", "position")) >= 0.98, summary
    assert summary["shape"] >= 0.95, summary


def test_wrong_attributes_and_blank_images_score_false(dataset):
    _, items = dataset
    image, attrs = items[0]
    assert shapes.score_image(image, attrs)["all"]
    for key, values in VALUES.items():
        for other in values:
            if other != attrs[key]:
                result = shapes.score_image(image, {**attrs, key: other})
                assert not result[key] and not result["all"], (key, other)
                assert sum(result[k] for k in shapes.ATTRIBUTES) == 4
    for name, rgb in shapes.BACKGROUNDS.items():
        blank = Image.new("RGB", (32, 32), rgb)
        assert shapes.predict_attributes(blank) == {"background": name, "color": None, "shape": None,
                                                    "size": None, "position": None}
        result = shapes.score_image(blank, {**attrs, "background": name})
        assert result["background"] and not any(result[k] for k in ("color", "shape", "size", "position"))
    speckled = np.full((32, 32, 3), 240, np.uint8)
    speckled[3, 5] = speckled[20, 11] = (220, 40, 40)                  # stray pixels are not a shape
    assert shapes.predict_attributes(speckled)["shape"] is None
    noise = np.clip(np.random.default_rng(0).normal(128, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
    assert shapes.predict_attributes(noise)["shape"] is None          # a blob of noise is not a shape
    with pytest.raises(ValueError, match="2 images but 1"):
        shapes.score_images([image, image], [attrs])
