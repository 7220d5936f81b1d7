"""Summarise a preprocess.py cache and decode a few entries back to pixels, to see the cache is right.

    python check_cache.py [preset] [key=value ...] [--decode N]

Prints samples per bucket with latent shapes and dtypes, per-channel latent mean/std (recomputed from
the files and compared with the manifest's), and caption token lengths (how many hit max_token_length,
i.e. were probably truncated). Every file is loaded, so a damaged one is reported by name (its latents and
text are also compared with the sums recorded when it was written); the exit code is 1 when a file is
damaged or a PNG could not be written.
--decode N writes, for N entries spread over the cache, <cache_dir>/check/<name>_decoded.png (the
latents through the VAE decoder) beside <name>_source.png (the source image resized and cropped to its
bucket) and prints the PSNR between the two: pixel space should be lossless up to 8-bit rounding,
the FLUX VAE gives roughly 30 dB or more on photos.
"""
import math
import os
import sys
from collections import Counter

import torch
from tqdm import tqdm

from config import ConfigError, main_guard, parse_args
from images import Skip, decode_min_side, load_image, make_buckets, resize_and_crop
from cache import CacheError, check_manifest, load_manifest


def file_problem(d: dict, e: dict, cfg) -> str:
    """What is wrong with a loaded cache file d against its manifest entry e ("" if nothing)."""
    z = d["latents"]
    if list(z.shape) != e["latent_shape"]:
        return f"latents {tuple(z.shape)} != manifest {e['latent_shape']}"
    if d["text"].shape != (cfg.max_token_length, cfg.text_dim) or d["mask"].shape != (cfg.max_token_length,):
        return f"text {tuple(d['text'].shape)}, mask {tuple(d['mask'].shape)} != ({cfg.max_token_length}, " \
               f"{cfg.text_dim}), ({cfg.max_token_length},) of max_token_length, text_dim"
    if not (z.isfinite().all() and d["text"].isfinite().all()):
        return "values that are not finite (nan, inf)"
    # the sums when written: a damaged file of the same size loads without error (older caches lack text_sum)
    if "sum" in e and not torch.allclose(z.double().flatten(1).sum(1), torch.tensor(e["sum"], dtype=torch.float64),
                                         rtol=1e-6, atol=1e-3):
        return "latents differ from those written (their sums per channel)"
    if "text_sum" in e and not math.isclose(d["text"].double().sum().item(), e["text_sum"], rel_tol=1e-6,
                                            abs_tol=1e-3):
        return "text embeddings differ from those written (their sum)"
    return ""


def summarise_cache(cfg, manifest) -> dict:
    """Load every cache file, check it against its entry, and print the statistics."""
    per_bucket, shapes, dtypes, tokens, bad = Counter(), {}, set(), [], []
    C = cfg.latent_channels
    total, total_sq, count = torch.zeros(C, dtype=torch.float64), torch.zeros(C, dtype=torch.float64), 0
    for source, e in tqdm(manifest["entries"].items(), desc="check", unit="file"):
        path = os.path.join(cfg.cache_dir, e["file"])
        try:
            d = torch.load(path, map_location="cpu", weights_only=True)
            z = d["latents"]
            problem = file_problem(d, e, cfg)
        except Exception as err:
            problem = f"{type(err).__name__}: {str(err)[:120]}"
        if problem:
            bad.append(path)
            tqdm.write(f"warning: {path}: {problem}", file=sys.stderr)
            continue
        key = tuple(e["bucket"])
        per_bucket[key] += 1
        shapes[key] = "x".join(map(str, z.shape))
        dtypes.add((str(z.dtype), str(d["text"].dtype), str(d["mask"].dtype)))
        tokens.append(int(d["mask"].sum()))
        z64 = z.double().flatten(1)                                           # (C, h*w)
        total, total_sq, count = total + z64.sum(1), total_sq + z64.pow(2).sum(1), count + z64.shape[1]

    print(f"cache {cfg.cache_dir}: {len(manifest['entries'])} samples, latent_space={manifest['latent_space']}, "
          f"scale={manifest['scale']}, shift={manifest['shift']}, text_encoder={manifest['text_encoder']}")
    print(f"{'bucket (WxH)':>14} {'latents (CxhxW)':>16} {'samples':>8}")
    for key in sorted(per_bucket, key=lambda b: b[0] / b[1]):
        print(f"{key[0]:>7}x{key[1]:<6} {shapes[key]:>16} {per_bucket[key]:>8}")
    for latent_dtype, text_dtype, mask_dtype in sorted(dtypes):
        print(f"dtypes: latents {latent_dtype}, text {text_dtype}, mask {mask_dtype}")
    mean = std = None
    if count:
        mean = total / count
        std = (total_sq / count - mean ** 2).clamp_min(0).sqrt()
        print("latent mean per channel: " + " ".join(f"{v:+.3f}" for v in mean.tolist()))
        print("latent std  per channel: " + " ".join(f"{v:.3f}" for v in std.tolist()))
        if manifest.get("latent_mean") is not None:
            diff = (mean - torch.tensor(manifest["latent_mean"], dtype=torch.float64)).abs().max().item()
            print(f"  (manifest stats differ by at most {diff:.2e})")
    if tokens:
        at_max = sum(t >= cfg.max_token_length for t in tokens)
        print(f"caption tokens: min {min(tokens)}, mean {sum(tokens) / len(tokens):.1f}, max {max(tokens)} "
              f"of {cfg.max_token_length}; {at_max} at the limit (probably truncated)")
    reasons = Counter(s["reason"] for s in manifest.get("skipped", {}).values())
    if reasons:
        print("skipped at preprocess: " + ", ".join(f"{n} {r}" for r, n in reasons.most_common()))
    return {"per_bucket": dict(per_bucket), "bad": bad, "tokens": tokens,
            "mean": None if mean is None else mean.tolist(), "std": None if std is None else std.tolist()}


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB between two images in [-1, 1] (peak-to-peak 2)."""
    mse = (a.float() - b.float()).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(4.0 / mse)


def decode_entries(cfg, manifest, n: int, bad=()) -> tuple:
    """Decode n entries spread over the cache (leaving out the files in bad); write <name>_decoded.png and
    <name>_source.png. Returns (paths written, paths that could not be written)."""
    from latents import LatentSpace, images_to_tensor, tensor_to_images
    bad = set(bad)
    sources = [s for s in sorted(manifest["entries"])
               if os.path.join(cfg.cache_dir, manifest["entries"][s]["file"]) not in bad]
    n = min(n, len(sources))
    if n <= 0:
        return [], []
    picks = [sources[int(i * (len(sources) - 1) / max(n - 1, 1) + 0.5)] for i in range(n)]  # evenly, distinct
    space = LatentSpace.from_config(cfg, stats=None)  # cached latents are before the optional mean/std
    out_dir = os.path.join(cfg.cache_dir, "check")
    os.makedirs(out_dir, exist_ok=True)
    written, not_written = [], []
    # where the cache was built from, if still there
    data_dir = next((d for d in (manifest.get("data_dir"), manifest.get("data_dir_abs")) if d and os.path.isdir(d)),
                    cfg.data_dir)
    min_side = decode_min_side(make_buckets(cfg.target_resolution, cfg.bucket_align, cfg.max_aspect_ratio))
    for source in tqdm(picks, desc="decode", unit="img"):
        e = manifest["entries"][source]
        stem = os.path.splitext(e["file"])[0]
        try:
            d = torch.load(os.path.join(cfg.cache_dir, e["file"]), map_location="cpu", weights_only=True)
        except Exception as err:  # removed or damaged since the check
            tqdm.write(f"warning: {e['file']}: cannot load it ({type(err).__name__}) - not decoded", file=sys.stderr)
            continue
        decoded = space.decode(d["latents"][None].float()).clamp(-1, 1)          # (1, 3, H, W)
        decoded_path = os.path.join(out_dir, f"{stem}_decoded.png")
        try:
            tensor_to_images(decoded)[0].save(decoded_path)
        except OSError as err:  # a full disk: one line per file, the other files and the summary go on
            tqdm.write(f"warning: {decoded_path}: not written ({err.strerror or err})", file=sys.stderr)
            not_written.append(decoded_path)
            continue
        written.append(decoded_path)
        line = f"{source}: {decoded_path}"
        try:
            src = resize_and_crop(load_image(os.path.join(data_dir, source), min_side),  # as preprocess
                                  tuple(e["bucket"]))
        except (Skip, OSError) as err:
            tqdm.write(line + f" (source unavailable: {err})")
            continue
        src_path = os.path.join(out_dir, f"{stem}_source.png")
        try:
            src.save(src_path)
            written.append(src_path)
            line += f" vs {os.path.basename(src_path)}"
        except OSError as err:
            tqdm.write(f"warning: {src_path}: not written ({err.strerror or err})", file=sys.stderr)
            not_written.append(src_path)
            line += " vs its source"
        tqdm.write(line + f": PSNR {psnr(decoded, images_to_tensor([src])):.1f} dB")
    return written, not_written


def main():
    argv = sys.argv[1:]
    n_decode = 0
    if "--decode" in argv:
        i = argv.index("--decode")
        try:
            n_decode = int(argv[i + 1])
        except (IndexError, ValueError):
            n_decode = 0
        if n_decode < 1:
            raise ConfigError("--decode needs a number of entries (>= 1), e.g. --decode 4")
        argv = argv[:i] + argv[i + 2:]
    cfg = parse_args(argv)
    manifest = load_manifest(cfg.cache_dir)
    if manifest is None:
        raise CacheError(f"cache_dir={cfg.cache_dir}: no cache there; run python preprocess.py first")
    check_manifest(cfg, manifest)
    stats = summarise_cache(cfg, manifest)
    written, not_written = decode_entries(cfg, manifest, n_decode, stats["bad"])
    print(f"checked {len(manifest['entries'])} files ({len(stats['bad'])} damaged) in "
          f"{len(stats['per_bucket'])} buckets" + (f"; wrote {len(written)} PNGs to "
                                                   f"{os.path.join(cfg.cache_dir, 'check')}" if written else "")
          + (f"; {len(not_written)} PNGs not written" if not_written else ""))
    if stats["bad"]:  # preprocess.py re-encodes a missing file; one of the right size it cannot tell from a good one
        print(f"{len(stats['bad'])} damaged file(s) (named above): delete them and run python preprocess.py to "
              "re-encode them", file=sys.stderr)
    # for scripts: a damaged cache is a failure, as are missing PNGs
    if stats["bad"] or not_written:
        sys.exit(1)


if __name__ == "__main__":
    main_guard(main)
