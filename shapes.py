"""The embedded `shapes` data set: caption grammar, renderer, generator and a pixel checker.

Each image is one filled, anti-aliased shape on a plain background, captioned from a fixed grammar:

    a {size} {color} {shape} in the {position} on a {background} background

Two (color, shape) pairs in HELD_OUT never appear in the generated training data, so evaluate.py can
measure compositional generalisation: can the model draw a purple triangle having seen purple things and
triangles, but never the two together? (Held-out attribute combinations as in CLEVR-CoGenT, Johnson et
al. 2017.) The checker (predict_attributes, score_image) reads the attributes back from pixels with fixed
rules, no learned model, so the same image always gets the same score.

    python shapes.py [out_dir] [--num N] [--seed S] [--base B] [--force]
"""
import argparse
import json
import math
import os
import random
import re
import time

import numpy as np
from PIL import Image
from tqdm import tqdm

from config import Config, ConfigError, main_guard

# --- the data set's definition -------------------------------------------------------------------------
BACKGROUNDS = {"white": (240, 240, 240), "black": (16, 16, 16), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
          "yellow": (235, 210, 40), "purple": (140, 60, 190), "orange": (240, 140, 30)}
SIZES = {"small": 0.25, "large": 0.45}      # bounding-box side as a fraction of min(W, H)
POSITIONS = {"top left": (0.27, 0.27), "top right": (0.73, 0.27), "bottom left": (0.27, 0.73),
             "bottom right": (0.73, 0.73), "center": (0.5, 0.5)}  # box centre as a fraction of (W, H)
POSITION_JITTER = 0.04                      # uniform +-4% of W (x) and of H (y) around the anchor
HELD_OUT = {("purple", "triangle"), ("orange", "square")}  # never in the training data
ASPECTS = {"square": (1, 1), "wide": (5, 3), "tall": (3, 5)}  # width : height
ATTRIBUTES = ("background", "color", "shape", "size", "position")
GENERATION_BASE = 96                        # canvas side of square images; wide/tall are 120x72, 72x120
MARKER = "_complete"                        # {"complete": false} first, the settings last: a folder with
                                            # neither is not ours (a user's images: never written into)
_FORMAT_VERSION = 1                         # bump when rendering changes, so old sets are regenerated

# --- checker thresholds ----------------------------------------------------------------------------------
FG_DISTANCE = 40.0         # RGB distance from the background that counts as foreground (purple-gray is 93)
MIN_BLOB = 0.01            # smaller blobs (in min(W, H)**2) are noise; the smallest shape is 0.031
MAX_BLOB = 0.5             # a blob over half the image is not a shape on a background
MAX_FIT_ERROR = 0.25       # fit_shape error above this: no clear shape (noise blobs score > 0.4)
SIZE_SPLIT = 0.35          # side / min(W, H) below this is "small" (the sizes are 0.25 and 0.45)
ANALYSIS_MAX_SIDE = 160    # larger images are box-downsampled first (keeps the checker fast)
BLUR_SIGMAS = (0.0, 0.08, 0.16)  # template blurs tried, in units of the shape's side
_AREA_PER_SIDE2 = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}  # area / side**2


def is_held_out(attrs: dict) -> bool:
    return (attrs["color"], attrs["shape"]) in HELD_OUT


def _check_attrs(attrs: dict):
    for key, allowed in zip(ATTRIBUTES, (BACKGROUNDS, COLORS, SHAPES, SIZES, POSITIONS)):
        if key not in attrs:
            raise ValueError(f"shapes attributes: missing '{key}' in {attrs}")
        if attrs[key] not in allowed:
            raise ValueError(f"shapes attributes: {key}={attrs[key]!r} is not one of {', '.join(allowed)}")


def caption(attrs: dict) -> str:
    """`a small red circle in the top left on a white background`."""
    _check_attrs(attrs)
    return (f"a {attrs['size']} {attrs['color']} {attrs['shape']} in the {attrs['position']}"
            f" on a {attrs['background']} background")


_CAPTION_RE = re.compile(r"a (\S+) (\S+) (\S+) in the (.+) on a (\S+) background")


def parse_caption(text: str) -> dict:
    """The inverse of caption(); ValueError naming the problem for a caption outside the grammar."""
    match = _CAPTION_RE.fullmatch(" ".join(text.lower().split()))
    if not match:
        raise ValueError(f"caption {text!r} is outside the shapes grammar "
                         "'a {size} {color} {shape} in the {position} on a {background} background'")
    attrs = dict(zip(("size", "color", "shape", "position", "background"), match.groups()))
    try:
        _check_attrs(attrs)
    except ValueError as e:
        raise ValueError(f"caption {text!r}: {str(e).split(': ', 1)[1]}") from None
    return attrs


def sample_attributes(rng: random.Random, held_out_allowed: bool = False) -> dict:
    """Uniformly random attributes (the five caption keys); held-out pairs are redrawn unless allowed."""
    while True:
        attrs = {"background": rng.choice(list(BACKGROUNDS)), "color": rng.choice(list(COLORS)),
                 "shape": rng.choice(SHAPES), "size": rng.choice(list(SIZES)),
                 "position": rng.choice(list(POSITIONS))}
        if held_out_allowed or not is_held_out(attrs):
            return attrs


def canvas_size(aspect: str, base: int = GENERATION_BASE) -> tuple:
    """(width, height): square is base x base; wide/tall have sides 5/4 and 3/4 of base, so the ratio is
    exactly 5:3 and the pixel count is within 6% of base**2 (96 -> 120x72, 32 -> 40x24)."""
    if aspect not in ASPECTS:
        raise ValueError(f"aspect={aspect!r} is not one of {', '.join(ASPECTS)}")
    long_side, short_side = round(base * 5 / 4), round(base * 3 / 4)
    return {"square": (base, base), "wide": (long_side, short_side), "tall": (short_side, long_side)}[aspect]


# --- rendering -----------------------------------------------------------------------------------------
def shape_coverage(shape: str, cx: float, cy: float, side: float, width: int, height: int,
                   supersample: int = 4) -> np.ndarray:
    """Fraction of each pixel covered by the shape, (H, W) in [0, 1], from supersample**2 points a pixel.

    Pixel (row i, column j) spans [j, j+1) x [i, i+1). (cx, cy) is the centre of the shape's bounding
    box, side its side. Triangle: upright isosceles, base = height = side; circle: diameter = side."""
    cover = np.zeros((height, width))
    half = side / 2
    x0, x1 = max(math.floor(cx - half), 0), min(math.ceil(cx + half), width)
    y0, y1 = max(math.floor(cy - half), 0), min(math.ceil(cy + half), height)
    if x1 <= x0 or y1 <= y0:
        return cover
    offsets = (np.arange(supersample) + 0.5) / supersample
    dx = (np.arange(x0, x1)[:, None] + offsets).reshape(1, -1) - cx  # (1, nx*ss)
    dy = (np.arange(y0, y1)[:, None] + offsets).reshape(-1, 1) - cy  # (ny*ss, 1)
    if shape == "square":
        inside = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    elif shape == "circle":
        inside = dx ** 2 + dy ** 2 <= half ** 2
    elif shape == "triangle":
        depth = dy + half                                  # distance below the apex
        inside = (depth >= 0) & (depth <= side) & (np.abs(dx) <= depth / 2)
    else:
        raise ValueError(f"shape={shape!r} is not one of {', '.join(SHAPES)}")
    cover[y0:y1, x0:x1] = inside.reshape(y1 - y0, supersample, x1 - x0, supersample).mean(axis=(1, 3))
    return cover


def render(attrs: dict, width: int, height: int, rng: random.Random) -> Image.Image:
    """One RGB image of attrs; the position jitter is drawn from rng (a random.Random)."""
    _check_attrs(attrs)
    side = SIZES[attrs["size"]] * min(width, height)
    anchor_x, anchor_y = POSITIONS[attrs["position"]]
    cx = (anchor_x + rng.uniform(-POSITION_JITTER, POSITION_JITTER)) * width
    cy = (anchor_y + rng.uniform(-POSITION_JITTER, POSITION_JITTER)) * height
    # Keep a 1-pixel margin so the image border is pure background (the checker reads it there);
    # this only nudges large shapes at the extreme of the corner jitter on square canvases.
    cx = min(max(cx, side / 2 + 1), width - side / 2 - 1)
    cy = min(max(cy, side / 2 + 1), height - side / 2 - 1)
    # 8x8 supersampling = rendering at 8x and box-downsampling: exact-looking anti-aliased edges.
    alpha = shape_coverage(attrs["shape"], cx, cy, side, width, height, supersample=8)[..., None]  # (H, W, 1)
    bg, fg = np.array(BACKGROUNDS[attrs["background"]], float), np.array(COLORS[attrs["color"]], float)
    rgb = bg + alpha * (fg - bg)                                                                  # (H, W, 3)
    return Image.fromarray(np.rint(rgb).astype(np.uint8), "RGB")


# --- generation ----------------------------------------------------------------------------------------
def _balanced(values, n: int, rng: random.Random) -> list:
    """n items cycling through values, shuffled: each value appears n // len(values) times or once more."""
    items = [values[i % len(values)] for i in range(n)]
    rng.shuffle(items)
    return items


def plan_dataset(num_images: int, seed: int = 0) -> list:
    """Attributes (plus aspect) of every image: each attribute and aspect is balanced on its own,
    (color, shape) cycles through the allowed pairs only, and the rest is shuffled independently."""
    rng = random.Random(seed)
    pairs = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in HELD_OUT]
    columns = {"pair": _balanced(pairs, num_images, rng)}
    for key, values in [("background", BACKGROUNDS), ("size", SIZES), ("position", POSITIONS),
                        ("aspect", ASPECTS)]:
        columns[key] = _balanced(list(values), num_images, rng)
    return [{"background": columns["background"][i], "color": columns["pair"][i][0],
             "shape": columns["pair"][i][1], "size": columns["size"][i], "position": columns["position"][i],
             "aspect": columns["aspect"][i]} for i in range(num_images)]


def generate_dataset(out_dir: str, num_images: int, seed: int = 0, base: int = GENERATION_BASE,
                     progress: bool = False) -> int:
    """Write {i:05d}.png + {i:05d}.txt (the caption) for i < num_images, then the MARKER file.

    The same (num_images, seed, base) gives the same bytes. The marker says "incomplete" first and holds the
    settings last, so an interrupted run leaves a folder that ensure_shapes_data regenerates."""
    if num_images < 1:
        raise ValueError(f"num_images={num_images}: must be > 0")
    os.makedirs(out_dir, exist_ok=True)
    marker = os.path.join(out_dir, MARKER)
    with open(marker, "w") as f:
        json.dump({"complete": False}, f)
    plan = plan_dataset(num_images, seed)
    for i, attrs in enumerate(tqdm(plan, desc="shapes", unit="img", disable=not progress)):
        width, height = canvas_size(attrs["aspect"], base)
        image = render(attrs, width, height, random.Random(seed * 1_000_003 + i))
        image.save(os.path.join(out_dir, f"{i:05d}.png"), format="PNG")
        with open(os.path.join(out_dir, f"{i:05d}.txt"), "w") as f:
            f.write(caption(attrs))
    # Numbered files left over from a larger earlier set would leak into training: remove them.
    for name in os.listdir(out_dir):
        stem, ext = os.path.splitext(name)
        if ext in (".png", ".txt") and re.fullmatch(r"\d{5,}", stem) and int(stem) >= num_images:
            os.remove(os.path.join(out_dir, name))
    with open(marker, "w") as f:
        json.dump({"num_images": num_images, "seed": seed, "base": base, "version": _FORMAT_VERSION}, f)
    return num_images


def _read_marker(out_dir: str):
    try:
        with open(os.path.join(out_dir, MARKER)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _ensure(out_dir: str, num_images: int, seed: int, base: int, force: bool = False,
            setting: str = "data_dir") -> bool:
    """Generate unless a complete set with these settings is there; True if it generated."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConfigError(f"{setting}={out_dir!r}: is a file, expected a folder")
    want = {"num_images": num_images, "seed": seed, "base": base, "version": _FORMAT_VERSION}
    have = _read_marker(out_dir)
    if have == want and not force:
        return False
    listed = [n for n in os.listdir(out_dir) if not n.startswith(".")] if os.path.isdir(out_dir) else []
    if listed and not os.path.exists(os.path.join(out_dir, MARKER)):  # (.DS_Store, .gitkeep: still empty)
        # a folder of someone's own images (data_source=folder forgotten): generating would overwrite and delete
        # its numbered files (00000.png ...) and mix shapes into it
        raise ConfigError(f"{setting}={out_dir!r}: holds files but no generated shapes set (no {MARKER} in it): "
                          "not writing shapes images into it; for your own images give data_source=folder, "
                          "else an empty or new folder")
    why = "forced" if force else "missing" if not os.path.isdir(out_dir) else \
        "no complete set there" if not isinstance(have, dict) or have.get("complete") is False else \
        f"settings changed: {have}"
    print(f"shapes: generating {num_images} images into {out_dir} (seed {seed}, {why})")
    generate_dataset(out_dir, num_images, seed, base, progress=True)
    return True


def ensure_shapes_data(cfg) -> str:
    """Generate the shapes set into cfg.data_dir (cfg.num_shapes images, cfg.data_seed) if it is missing,
    incomplete or made with other settings; return the folder. Images are at least GENERATION_BASE px
    and at least cfg.target_resolution (rounded up to a multiple of 8), then preprocess.py resizes."""
    base = max(GENERATION_BASE, -(-cfg.target_resolution // 8) * 8)
    _ensure(cfg.data_dir, cfg.num_shapes, cfg.data_seed, base)
    return cfg.data_dir


def eval_prompts(n_per_pair: int = 4, seed: int = 0) -> list:
    """A fixed set of attribute dicts (with 'aspect') for evaluation: n_per_pair prompts for each of the
    18 (color, shape) pairs, held-out pairs included; background, size, position and aspect are each
    balanced over the whole set, so every value appears (for any n_per_pair >= 1)."""
    rng = random.Random(seed)
    pairs = [(c, s) for c in COLORS for s in SHAPES for _ in range(n_per_pair)]
    n = len(pairs)
    columns = {key: _balanced(list(values), n, rng) for key, values in
               [("background", BACKGROUNDS), ("size", SIZES), ("position", POSITIONS), ("aspect", ASPECTS)]}
    return [{"background": columns["background"][i], "color": c, "shape": s, "size": columns["size"][i],
             "position": columns["position"][i], "aspect": columns["aspect"][i]}
            for i, (c, s) in enumerate(pairs)]


# --- the checker ---------------------------------------------------------------------------------------
def _to_rgb_array(img) -> np.ndarray:
    """PIL image or (H, W, 3) uint8 array -> (H, W, 3) float64, box-downsampled if large."""
    if isinstance(img, np.ndarray):
        if img.ndim != 3 or img.shape[2] not in (3, 4):
            raise ValueError(f"image array must be (H, W, 3) uint8, got shape {img.shape}")
        img = Image.fromarray(np.clip(img[..., :3], 0, 255).astype(np.uint8), "RGB")
    img = img.convert("RGB")
    scale = ANALYSIS_MAX_SIDE / max(img.size)
    if scale < 1:
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BOX)
    return np.asarray(img, dtype=np.float64)


def _nearest(palette: dict, rgb: np.ndarray) -> str:
    return min(palette, key=lambda name: float(((np.array(palette[name]) - rgb) ** 2).sum()))


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected region of a boolean (H, W) mask (stray pixels are separate regions)."""
    height, width = mask.shape
    flat = mask.ravel().tolist()
    label = [0] * len(flat)
    best, best_size, current = 0, 0, 0
    for start in np.flatnonzero(mask.ravel()).tolist():
        if label[start]:
            continue
        current += 1
        label[start], stack, size = current, [start], 0
        while stack:  # depth-first flood fill
            p = stack.pop()
            size += 1
            r, c = divmod(p, width)
            for rr in (r - 1, r, r + 1):
                if 0 <= rr < height:
                    for cc in (c - 1, c, c + 1):
                        q = rr * width + cc
                        if 0 <= cc < width and flat[q] and not label[q]:
                            label[q] = current
                            stack.append(q)
        if size > best_size:
            best, best_size = current, size
    return (np.array(label).reshape(height, width) == best) & mask


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    """Grow a boolean mask by `steps` pixels (3x3 neighbourhood each step)."""
    for _ in range(steps):
        p = np.pad(mask, 1)
        mask = np.zeros_like(mask)
        for dr in range(3):
            for dc in range(3):
                mask |= p[dr:dr + mask.shape[0], dc:dc + mask.shape[1]]
    return mask


def _gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of an (H, W) array (zero outside), as K_rows @ image @ K_cols^T. einsum, not `@`:
    a multi-threaded BLAS crawls on small matrices when the CPU cores are busy with other work."""
    if sigma <= 0:
        return image
    def kernel_matrix(n):
        offsets = np.arange(n)[:, None] - np.arange(n)[None, :]
        k = np.where(np.abs(offsets) <= 4 * sigma, np.exp(-0.5 * (offsets / sigma) ** 2), 0.0)  # no denormals
        taps = np.arange(-math.floor(4 * sigma), math.floor(4 * sigma) + 1)
        return k / np.exp(-0.5 * (taps / sigma) ** 2).sum()
    rows_blurred = np.einsum("ij,jk->ik", kernel_matrix(image.shape[0]), image)
    return np.einsum("ik,lk->il", rows_blurred, kernel_matrix(image.shape[1]))


def fit_shape(alpha: np.ndarray) -> tuple:
    """Best (shape, cx, cy, side, error) for a soft coverage map (H, W), by analysis-by-synthesis.

    For each shape the side follows from the total coverage (area) and the box centre from the centroid
    (a triangle's centroid lies side/6 below its box centre); the shape whose rendered coverage, blurred
    by the best of BLUR_SIGMAS (blur is a nuisance: soft model outputs, resizing), is closest wins.
    Area and centroid survive blur and resizing, so this holds on small, soft images.
    error = squared error / area (a clean render: < 0.01)."""
    height, width = alpha.shape
    area = alpha.sum()
    ys, xs = np.mgrid[0:height, 0:width] + 0.5
    mx, my = (alpha * xs).sum() / area, (alpha * ys).sum() / area
    best = None
    for shape in SHAPES:
        side = math.sqrt(area / _AREA_PER_SIDE2[shape])
        cy = my - side / 6 if shape == "triangle" else my
        cover = shape_coverage(shape, mx, cy, side, width, height)
        for sigma in BLUR_SIGMAS:
            error = ((alpha - _gaussian_blur(cover, sigma * side)) ** 2).sum()
            if best is None or error < best[0]:
                best = (error, shape, mx, cy, side)
    return best[1:] + (best[0] / area,)


def predict_attributes(img) -> dict:
    """The attributes read from pixels; color/shape/size/position are None without a clear foreground."""
    rgb = _to_rgb_array(img)                                       # (H, W, 3)
    height, width = rgb.shape[:2]
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])  # (2W + 2H, 3)
    bg = np.median(border, axis=0)
    pred = {"background": _nearest(BACKGROUNDS, bg), "color": None, "shape": None, "size": None,
            "position": None}
    distance = np.linalg.norm(rgb - bg, axis=-1)                   # (H, W)
    blob = largest_component(distance > FG_DISTANCE)               # ignores stray pixels and noise
    short = min(height, width)
    if not (max(3, MIN_BLOB * short ** 2) <= blob.sum() <= MAX_BLOB * height * width):
        return pred
    # Edge pixels are mixed with the background: take the median of the blob's most distant quarter.
    d = distance[blob]
    fg = np.median(rgb[blob][d >= np.quantile(d, 0.75)], axis=0)
    # Soft coverage: each pixel's position on the background -> shape-colour line, near the blob only.
    axis = fg - bg
    alpha = np.clip(((rgb - bg) * axis).sum(-1) / (axis ** 2).sum(), 0, 1) * _dilate(blob, 2)  # (H, W)
    shape, cx, cy, side, error = fit_shape(alpha)
    if error > MAX_FIT_ERROR:  # noise or a smear, not one of the shapes
        return pred
    pred["color"] = _nearest(COLORS, fg)
    pred["shape"] = shape
    pred["size"] = "small" if side / short < SIZE_SPLIT else "large"
    pred["position"] = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx / width) ** 2
                           + (POSITIONS[p][1] - cy / height) ** 2)
    return pred


def score_image(img, attrs: dict) -> dict:
    """{attribute: detected == wanted} for the five attributes, plus 'all'."""
    pred = predict_attributes(img)
    result = {key: pred[key] is not None and pred[key] == attrs[key] for key in ATTRIBUTES}
    result["all"] = all(result.values())
    return result


def score_images(imgs, attrs_list) -> dict:
    """Accuracy per attribute and 'all', for 'seen' pairs, 'held_out' pairs and 'overall'; each group
    also has 'n' (its image count; accuracies are None when n is 0)."""
    if len(imgs) != len(attrs_list):
        raise ValueError(f"score_images: {len(imgs)} images but {len(attrs_list)} attribute dicts")
    groups = {"seen": [], "held_out": [], "overall": []}
    for img, attrs in zip(imgs, attrs_list):
        result = score_image(img, attrs)
        groups["held_out" if is_held_out(attrs) else "seen"].append(result)
        groups["overall"].append(result)
    summary = {}
    for name, results in groups.items():
        summary[name] = {"n": len(results)}
        for key in ATTRIBUTES + ("all",):
            summary[name][key] = sum(r[key] for r in results) / len(results) if results else None
    return summary


def main(argv=None):
    defaults = Config()
    parser = argparse.ArgumentParser(description="Generate the shapes data set (skipped if complete).")
    parser.add_argument("out_dir", nargs="?", default=defaults.data_dir)
    parser.add_argument("--num", type=int, default=defaults.num_shapes, help="number of images")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--base", type=int, default=GENERATION_BASE, help="side of square images")
    parser.add_argument("--force", action="store_true", help="regenerate even if complete")
    args = parser.parse_args(argv)
    if args.num < 1:
        raise ConfigError(f"--num={args.num}: must be > 0")
    if args.base < 8:
        raise ConfigError(f"--base={args.base}: must be >= 8")
    start = time.time()
    made = _ensure(args.out_dir, args.num, args.seed, args.base, args.force, setting="out_dir")
    sizes = ", ".join(f"{a} {'x'.join(map(str, canvas_size(a, args.base)))}" for a in ASPECTS)
    held = ", ".join(f"{c} {s}" for c, s in sorted(HELD_OUT))
    print(f"shapes: {args.num} images in {args.out_dir} ({'generated' if made else 'already complete'}"
          f" in {time.time() - start:.1f}s; {sizes}; held out: {held})")


if __name__ == "__main__":
    main_guard(main)
