"""Prompt -> PNG with a trained run.

    python sample.py runs/shapes --prompt "a large red circle in the center on a white background"
    python sample.py runs/flowers --prompts-file prompts.txt --num 4 --steps 30 --cfg 4.0 --sampler heun
    python sample.py runs/shapes --checkpoint 4000 --prompt "..."     # the EMA weights of the step-4000 checkpoint
    python sample.py runs/shapes/checkpoints/step_0004000.pt --prompt "..."   # the same
    python sample.py runs/shapes --prompts-file p.txt --num 4 --out pngs/   # a folder: one PNG per image
    python sample.py runs/flowers --prompts-file p.txt --batch 4 --out pngs/   # fewer images per forward pass

Loads the run's config.json and its exported EMA model (runs/<name>/model/, or the EMA weights of the
newest checkpoint if the run has not exported yet), encodes prompts with the same text encoder and token
length the cache was built with, samples, decodes through the run's latent space and writes one image, a
labelled grid, or (--out a folder) one PNG per image, each batch's written as soon as it is sampled.
Image j of each prompt uses the noise of seed + j; --batch (images per forward pass) does not change them
(on a GPU, up to rounding).
"""
import argparse
import math
import os
import re
import sys
import textwrap
import time
from contextlib import nullcontext
from dataclasses import replace

import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from config import MAX_CFG_SCALE, SAMPLERS, ConfigError, main_guard, resolve_device
from images import Skip, decode_text
from runs import latent_space_for, load_run, run_and_checkpoint, run_step
import samplers as S

MAX_IMAGE_TOKENS = 256 * 256  # --size: patches per image
MAX_SAMPLE_STEPS = 10000  # --steps (sample.py, evaluate.py)
MAX_IMAGES = 10 ** 6  # images in one call (prompts x --num): far more than an FID set; more only fills memory


def encode_prompts(cfg, prompts, device, chunk=64):
    """(text (N, L, D), mask (N, L)) on device; the encoder is loaded, used and freed. Each distinct prompt
    is encoded once, `chunk` at a time (a long --prompts-file never meets the encoder in one batch)."""
    from text_encoder import load_text_encoder
    if not prompts or any(not p.strip() for p in prompts):
        raise ConfigError("empty prompt: give some text to --prompt or in --prompts-file")
    for prompt in prompts:
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError:  # bytes that are not UTF-8 on a command line (Python keeps them as surrogates)
            raise ConfigError(f"prompt {prompt!r}: not UTF-8 text (is the terminal's encoding UTF-8?)") from None
    encoder = load_text_encoder(cfg, device=device)
    distinct = list(dict.fromkeys(prompts))
    for prompt, n in zip(distinct, encoder.token_counts(distinct)):
        if n > cfg.max_token_length:  # the model was trained on captions of at most this many tokens
            print(f"warning: prompt {prompt[:40]!r}{'...' if len(prompt) > 40 else ''} has {n} tokens; only the "
                  f"first {cfg.max_token_length} are used (max_token_length)", file=sys.stderr)
    parts = [encoder.encode(distinct[i:i + chunk]) for i in range(0, len(distinct), chunk)]
    del encoder
    text, mask = torch.cat([t for t, _ in parts]), torch.cat([m for _, m in parts])  # (P, L, D), (P, L)
    if len(distinct) < len(prompts):
        where = {p: i for i, p in enumerate(distinct)}
        index = torch.tensor([where[p] for p in prompts])
        text, mask = text[index], mask[index]                                       # (N, L, D), (N, L)
    return text.to(device), mask.to(device)


def default_size(cfg):
    """The bucket nearest to square (the square one where there is one): (W, H) in pixels."""
    from images import bucket_for, make_buckets
    return tuple(bucket_for(1, 1, make_buckets(cfg.target_resolution, cfg.bucket_align, cfg.max_aspect_ratio)))


def parse_size(text, cfg):
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--size {text!r}: expected WxH, e.g. 448x448") from None
    a = cfg.patch_align
    if w <= 0 or h <= 0 or w % a or h % a:
        raise ConfigError(f"--size {text}: width and height must be positive multiples of {a} "
                          f"(vae_downsample {cfg.vae_downsample} x patch_size {cfg.patch_size})")
    if (w // a) * (h // a) > MAX_IMAGE_TOKENS:  # attention over more runs out of memory, or takes hours
        raise ConfigError(f"--size {text}: {(w // a) * (h // a)} image tokens ({a} px per patch side); at most "
                          f"{MAX_IMAGE_TOKENS}, e.g. {256 * a}x{256 * a}")
    return w, h


def generate(model, latent_space, prompt_emb, cfg, seed=0, size=None, steps=None, cfg_scale=None,
             sampler=None, negative_emb=None, batch_size=16, callback=None, return_nfe=False, progress=False):
    """Images (list of PIL) for prompt embeddings; image i uses noise seeded with seed + i (seed: an int), or
    with seed[i] (a list of one seed per image). negative_emb: (text, mask) of a negative prompt for every image
    (one row) or one per image, in place of the null caption. batch_size images share a forward pass (twice
    that with CFG); the images do not depend on it (on a GPU, up to rounding). With return_nfe: (images,
    evaluations per image)."""
    images, nfe = [], 0
    for _, batch, nfe in generate_batches(model, latent_space, prompt_emb, cfg, seed, size, steps, cfg_scale,
                                          sampler, negative_emb, batch_size, callback, progress):
        images += batch
    return (images, nfe) if return_nfe else images


@torch.no_grad()
def generate_batches(model, latent_space, prompt_emb, cfg, seed=0, size=None, steps=None, cfg_scale=None,
                     sampler=None, negative_emb=None, batch_size=16, callback=None, progress=False, repeat=1):
    """generate(), a batch at a time: yields (index of the batch's first image, its images, NFE per image)
    as each batch is decoded, so a caller can write them before the next batch is sampled. repeat: each
    prompt embedding stands for that many images in a row (sample.py --num), picked out a batch at a time."""
    from latents import tensor_to_images
    text, mask = prompt_emb
    if cfg.trim_text:  # padding is never attended: cut it once for all steps (same images, faster)
        text, mask = S.trim_padding(text, mask)
        if negative_emb is not None:
            negative_emb = S.trim_padding(*negative_emb)
    w, h = size or default_size(cfg)
    f = cfg.vae_downsample
    steps = steps or cfg.sample_steps
    scale = cfg.cfg_scale if cfg_scale is None else cfg_scale
    method = sampler or cfg.sampler
    device = text.device
    shift = sampling_shift(cfg, h // f, w // f)
    n = text.shape[0] * repeat
    seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed + i for i in range(n)]
    # progress: a bar over the images, shown in a terminal only (disable=None), gone when done
    bar = tqdm(total=n, desc="sampling", unit="img", leave=False, disable=None if progress else True)
    try:
        for start in range(0, n, batch_size):
            idx = range(start, min(start + batch_size, n))
            rows = torch.arange(idx.start, idx.stop, device=device) // repeat  # the prompt of each image
            noise = torch.stack([torch.randn((cfg.latent_channels, h // f, w // f),
                                             generator=torch.Generator().manual_seed(seeds[i])) for i in idx])
            neg = negative_emb
            if neg is not None and neg[0].shape[0] > 1:  # one per image (one row: the same for all)
                neg = (neg[0][idx.start:idx.stop], neg[1][idx.start:idx.stop])
            velocity = S.guided_velocity_fn(model, text[rows], mask[rows], scale,
                                            S.Prediction.from_config(cfg),
                                            neg_text=neg[0] if neg else None, neg_mask=neg[1] if neg else None)
            with bf16_autocast(cfg, device):
                x0, nfe = S.sample_ode(velocity, noise.to(device), steps, method, shift=shift, callback=callback)
            images = tensor_to_images(latent_space.decode(x0.float()))
            bar.update(len(idx))
            yield start, images, nfe
    finally:
        bar.close()


def bf16_autocast(cfg, device):
    """The model in bf16 where the run's precision resolves to bf16 on this device (an Ampere+ GPU: several
    times faster than fp32); otherwise as the caller has it (fp32, or train.py's fp16 sample grids). fp16 is
    not switched on here: a model trained in bf16 may have activations beyond fp16's range."""
    from runtime import precision_for
    device = torch.device(device)
    if precision_for(cfg, device) == torch.bfloat16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def sampling_shift(cfg, latent_h: int, latent_w: int) -> float:
    """Time shift of the sampling grid: sample_shift when set, else the training's for this size."""
    return cfg.sample_shift or S.time_shift_for(cfg, (latent_h // cfg.patch_size) * (latent_w // cfg.patch_size))


def with_sample_shift(cfg, shift):
    """cfg with sample_shift set from a --shift option (None: unchanged; must be >= 0)."""
    if shift is None:
        return cfg
    if not (math.isfinite(shift) and shift >= 0):
        raise ConfigError(f"--shift {shift}: must be a number >= 0 (0 = the training shift)")
    return replace(cfg, sample_shift=shift)


def check_sampling_options(args):
    """One-line errors for --steps / --cfg / --seed values that would crash after the model is loaded, run for
    hours, or give black images (nan, inf)."""
    if args.steps is not None and not 1 <= args.steps <= MAX_SAMPLE_STEPS:
        raise ConfigError(f"--steps {args.steps}: must be from 1 to {MAX_SAMPLE_STEPS}")
    if args.cfg is not None and not (math.isfinite(args.cfg) and 0 <= args.cfg <= MAX_CFG_SCALE):
        raise ConfigError(f"--cfg {args.cfg}: must be a number from 0 to {MAX_CFG_SCALE} (1 = no guidance)")
    if not -2 ** 63 <= args.seed < 2 ** 63:
        raise ConfigError(f"--seed {args.seed}: must fit in 64 bits")


def save_grid(images, labels, path, cols=None, min_side=128):
    """A labelled grid PNG. Images may differ in size (buckets): each is upscaled by an integer factor
    (nearest, so small images can be looked at) and centred in a cell of the largest size; labels are
    wrapped at word boundaries to the cell's width (up to 4 lines)."""
    n = len(images)
    cols = cols or min(n, 4)
    rows = (n + cols - 1) // cols
    up = max(1, -(-min_side // min(min(im.size) for im in images)))
    cw, ch = max(im.size[0] for im in images) * up, max(im.size[1] for im in images) * up
    wrapped = [textwrap.wrap(label, max(8, cw // 6))[:4] for label in labels] if labels else []
    label_h = 4 + 12 * max(map(len, wrapped)) if wrapped else 0
    grid = Image.new("RGB", (cols * cw, rows * (ch + label_h)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, img in enumerate(images):
        x, y = (i % cols) * cw, (i // cols) * (ch + label_h)
        w, h = img.size[0] * up, img.size[1] * up
        grid.paste(img.resize((w, h), Image.NEAREST), (x + (cw - w) // 2, y + (ch - h) // 2))
        if wrapped:
            draw.multiline_text((x + 2, y + ch + 1), "\n".join(wrapped[i]), fill=(0, 0, 0), spacing=1)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    grid.save(path)
    return path


def image_name(k: int, prompt: str, seed: int) -> str:
    """File name of image k in an --out folder: 0000_a-large-red-circle-in-the-center_seed0.png (the prompt
    cut to 48 characters of letters, digits and dashes)."""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:48].rstrip("-") or "prompt"
    return f"{k:04d}_{slug}_seed{seed}.png"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--prompt", action="append", default=[], help="may be given several times")
    p.add_argument("--prompts-file", help="one prompt per line")
    p.add_argument("--negative", default=None, help="negative prompt (replaces the null caption in CFG)")
    p.add_argument("--num", type=int, default=1, help="images per prompt")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--cfg", type=float, default=None,
                   help="guidance scale (1 = off: the prompt alone; 0 = the prompt ignored)")
    p.add_argument("--sampler", choices=SAMPLERS, default=None)
    p.add_argument("--shift", type=float, default=None, help="time shift of the sampling grid (0 = training's)")
    p.add_argument("--size", default=None, help="WxH in pixels")
    p.add_argument("--seed", type=int, default=0, help="image j of each prompt uses seed + j")
    p.add_argument("--batch", type=int, default=16, help="images per forward pass (CFG: twice as many); smaller "
                   "needs less memory, the images are the same (on a GPU up to rounding)")
    p.add_argument("--checkpoint", default=None,
                   help="a step of the run (e.g. 4000) or a checkpoint file: its EMA weights (default: the newest)")
    p.add_argument("--out", default="out.png", help="one image, or a labelled grid of several; a folder (ending "
                   "in /): one PNG per image, named NNNN_<prompt>_seed<S>.png")
    p.add_argument("--device", default="auto")
    args = p.parse_args()

    device = resolve_device(args.device)
    prompts = list(args.prompt)
    if args.prompts_file:
        try:
            with open(args.prompts_file, "rb") as f:
                text = decode_text(f.read(), args.prompts_file)  # UTF-8, -16, -32 like caption files
        except OSError as e:
            raise ConfigError(f"--prompts-file {args.prompts_file}: {e.strerror}") from None
        except Skip as e:
            raise ConfigError(f"--prompts-file: {e}") from None
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if not lines:
            raise ConfigError(f"--prompts-file {args.prompts_file}: no prompt in it (one prompt per line)")
        prompts += lines
    if not prompts:
        raise ConfigError("no prompt: use --prompt \"...\" or --prompts-file F")
    if args.num < 1:
        raise ConfigError(f"--num {args.num}: must be >= 1")
    if len(prompts) * args.num > MAX_IMAGES:
        raise ConfigError(f"--num {args.num}: {len(prompts)} prompt(s) x {args.num} is more than {MAX_IMAGES} images")
    if args.batch < 1:
        raise ConfigError(f"--batch {args.batch}: must be >= 1")
    check_sampling_options(args)
    if args.negative is not None and not args.negative.strip():
        raise ConfigError("--negative is empty: leave it out to guide away from the null caption")
    Image.init()
    separate = os.path.isdir(args.out) or args.out.endswith(("/", os.sep))  # a folder: one PNG per image
    if not separate and Image.registered_extensions().get(os.path.splitext(args.out)[1].lower()) \
            not in Image.SAVE:  # a format Pillow writes
        raise ConfigError(f"--out {args.out}: give an image file name (.png, .jpg, .webp) or a folder (ending in /)")
    out_dir = os.path.abspath(args.out) if separate else os.path.dirname(os.path.abspath(args.out))
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {args.out}: cannot make its folder ({e.filename}: {e.strerror})") from None
    if not os.access(out_dir, os.W_OK):
        raise ConfigError(f"--out {args.out}: its folder is not writable")
    from runtime import allow_tf32
    allow_tf32()
    args.run_dir, args.checkpoint = run_and_checkpoint(args.run_dir, args.checkpoint)
    cfg, model = load_run(args.run_dir, device, args.checkpoint)
    cfg = with_sample_shift(cfg, args.shift)
    if args.negative is not None and (cfg.cfg_scale if args.cfg is None else args.cfg) == 1:
        print("warning: --negative has no effect at --cfg 1 (no guidance)", file=sys.stderr)
    size = parse_size(args.size, cfg) if args.size else None
    if size:
        from images import make_buckets
        trained = make_buckets(cfg.target_resolution, cfg.bucket_align, cfg.max_aspect_ratio)
        if size not in trained:
            print(f"warning: --size {args.size} is not a size the model was trained at (its buckets: "
                  f"{', '.join(f'{w}x{h}' for w, h in trained)}): expect worse images", file=sys.stderr)
    latent_space = latent_space_for(cfg, device)
    all_prompts = [p for p in prompts for _ in range(args.num)]
    text, mask = encode_prompts(cfg, prompts, device)  # one per prompt: --num of them are not copies in memory
    negative = None
    if args.negative is not None:
        nt, nm = encode_prompts(cfg, [args.negative], device)
        negative = (nt, nm)  # one for all images
    seeds = [args.seed + j for _ in prompts for j in range(args.num)]  # a prompt's images: whatever else is asked
    names = [image_name(k, p, s) for k, (p, s) in enumerate(zip(all_prompts, seeds))]
    written = []  # --out a folder: paths of the PNGs written so far

    def kept():  # for a message that stops the run: what stays written
        return f"; {len(written)} of {len(all_prompts)} images written to {args.out}" if written else ""

    t0 = time.time()
    images, nfe = [], 0  # --out a file: all images, for the grid; a folder: each batch written when it is done
    try:
        for start, batch, nfe in generate_batches(model, latent_space, (text, mask), cfg, seeds, size, args.steps,
                                                  args.cfg, args.sampler, negative, args.batch, progress=True,
                                                  repeat=args.num):
            if not separate:
                images += batch
                continue
            for path, image in zip([os.path.join(args.out, n) for n in names[start:start + len(batch)]], batch):
                try:
                    image.save(path)
                except OSError as e:  # a full disk: what is written stays
                    raise ConfigError(f"{path}: not written ({e.strerror or e}){kept()}") from None
                written.append(path)
    except torch.OutOfMemoryError:
        w, h = size or default_size(cfg)
        n = min(args.batch, len(all_prompts))
        hint = f"--batch {n // 2} needs less" if n > 1 else "a smaller --size needs less"
        raise ConfigError(f"out of memory sampling {n} image(s) at {w}x{h} on {device}: {hint}{kept()}") from None
    except KeyboardInterrupt:
        raise KeyboardInterrupt(kept().removeprefix("; ")) from None
    seconds = time.time() - t0
    if not separate:
        try:
            if len(images) == 1:
                images[0].save(args.out)
            else:
                save_grid(images, all_prompts, args.out)
        except (OSError, ValueError) as e:  # a full disk, a grid beyond the format's size limit (WebP: 16383 px)
            why, folder = str(e).splitlines()[0], os.path.splitext(args.out)[0] + "_images"
            try:  # the images are not lost with the grid: one PNG each, as --out a folder writes them
                os.makedirs(folder, exist_ok=True)
                for name, image in zip(names, images):
                    image.save(os.path.join(folder, name))
            except OSError:
                raise ConfigError(f"--out {args.out}: not written ({why})") from None
            raise ConfigError(f"--out {args.out}: not written ({why}); its {len(images)} image(s) are in "
                              f"{folder}/ instead") from None
    what = f"{written[0]}{f' ... {written[-1]}' if len(written) > 1 else ''}" if separate else args.out
    step = run_step(args.run_dir, args.checkpoint)
    print(f"wrote {what}: {len(all_prompts)} image(s), NFE {nfe}, {seconds / len(all_prompts):.3f} s/image "
          f"({args.run_dir}{f', trained {step} steps' if step else ''})")


if __name__ == "__main__":
    main_guard(main)
