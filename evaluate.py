"""How good is a run?

    python evaluate.py runs/shapes                      # shapes: pixel-analysis scores per attribute
    python evaluate.py runs/flowers --inception inception-2015-12-05.pt   # + FID on held-out images
    python evaluate.py runs/flowers --clip openai/clip-vit-large-patch14  # + CLIP score on held-out captions
    python evaluate.py runs/shapes --renoise            # + at which noise level attributes get lost
    python evaluate.py runs/shapes --checkpoint 4000    # an earlier checkpoint (scores in eval/step_4000/)
    python evaluate.py runs/flowers --batch 4           # fewer images per forward pass: less GPU memory

For the shapes data set it generates one image per fixed evaluation prompt (every attribute value,
the held-out (colour, shape) pairs included), scores each by deterministic pixel analysis against its
prompt (shapes.py) and prints a table per attribute, seen and held-out pairs apart; the scored grid goes
to runs/<name>/eval/. For any data set it reports the validation loss per timestep bucket on the
held-out split, FID against held-out images when a local Inception network is given, and the CLIP score
(how well images follow their captions) when a CLIP model is given; both on the same generated images.

--renoise (shapes) noises ground-truth renders of the evaluation prompts to t and lets the model denoise
them back (SDEdit, Meng et al. 2022): an attribute whose score drops between two starting t is one the
model loses in that noise range, which tells where training time should go (see the README).
"""
import argparse
import math
import os
import sys
import time

import torch
from tqdm import tqdm

from checkpoint import write_json
from config import SAMPLERS, ConfigError, main_guard, resolve_device

ATTRIBUTES = ("background", "color", "shape", "size", "position", "all")
MAX_PER_PAIR = 1000  # 18000 prompts


def eval_sizes(cfg):
    """(W, H) in pixels for the square, wide and tall buckets of this run."""
    import shapes
    from images import bucket_for, make_buckets
    buckets = make_buckets(cfg.target_resolution, cfg.bucket_align, cfg.max_aspect_ratio)
    return {aspect: tuple(bucket_for(*shapes.canvas_size(aspect, 96), buckets))
            for aspect in ("square", "wide", "tall")}


def evaluate_shapes(cfg, model, device, steps=None, cfg_scale=None, sampler=None, seed=0, out_dir=None,
                    per_pair=8, batch_size=16):
    """Generate the evaluation prompts, score them; returns {'seen': {...}, 'held_out': {...}, ...}."""
    import shapes
    from runs import latent_space_for
    from sample import encode_prompts, generate, save_grid
    attrs_list = shapes.eval_prompts(n_per_pair=per_pair)
    prompts = [shapes.caption(a) for a in attrs_list]
    space = latent_space_for(cfg, device)
    text, mask = encode_prompts(cfg, prompts, device)
    sizes = eval_sizes(cfg)
    images = [None] * len(prompts)
    t0 = time.time()
    for aspect, size in sizes.items():
        idx = [i for i, a in enumerate(attrs_list) if a["aspect"] == aspect]
        if not idx:
            continue
        sel = torch.tensor(idx, device=text.device)
        out = generate(model, space, (text[sel], mask[sel]), cfg, seed=seed, size=size, steps=steps,
                       cfg_scale=cfg_scale, sampler=sampler, batch_size=batch_size, progress=True)
        for i, img in zip(idx, out):
            images[i] = img
    seconds = time.time() - t0
    scores = [shapes.score_image(img, a) for img, a in zip(images, attrs_list)]
    summary = shapes.score_images(images, attrs_list)
    if out_dir:
        labels = [("OK " if s["all"] else "x  ") + " ".join(k[:3] for k in ATTRIBUTES[:-1] if not s[k])
                  + " | " + p for s, p in zip(scores, prompts)]
        path = os.path.join(out_dir, "shapes_scored.png")
        try:
            save_grid(images, labels, path, cols=8)
        except OSError as e:  # a full disk costs the picture, not the scores (eval.json, the table)
            print(f"warning: {path}: not written ({e.strerror or e})", file=sys.stderr)
    summary["seconds"] = seconds
    summary["num_images"] = len(images)
    return summary


def print_table(summary):
    print(f"{'':10s}{'prompts':>8s}" + "".join(f"{a:>11s}" for a in ATTRIBUTES))
    for group in ("seen", "held_out"):
        if group in summary:
            row = summary[group]
            print(f"{group:10s}{row['n']:8d}" + "".join(f"{100 * row[a]:10.1f}%" for a in ATTRIBUTES))


RENOISE_STARTS = (0.0, 0.1, 0.2, 0.3, 0.45, 0.6, 0.8, 1.0)


def renoise_shapes(cfg, model, device, starts=RENOISE_STARTS, steps=None, cfg_scale=None, sampler=None,
                   seed=0, per_pair=4):
    """{t_start: score summary}: the evaluation prompts' ground truth (rendered and resized to the
    evaluation buckets as preprocess.py does), noised to x_t = (1 - t) x0 + t eps and sampled back to
    t = 0 with the run's sampler (round(steps * t) steps, at least 1), then scored. t = 0 scores the
    ground truth itself (the checker's ceiling at this resolution), t = 1 is plain generation; a model
    that kept whatever it is given would score as the ground truth at every t < 1."""
    import random
    import shapes
    import samplers as S
    from latents import images_to_tensor, tensor_to_images
    from images import resize_and_crop
    from runs import latent_space_for
    from sample import encode_prompts, sampling_shift
    attrs_list = shapes.eval_prompts(n_per_pair=per_pair)
    space = latent_space_for(cfg, device)
    text, mask = encode_prompts(cfg, [shapes.caption(a) for a in attrs_list], device)
    rng = random.Random(seed)
    truth = [shapes.render(a, *shapes.canvas_size(a["aspect"]), rng) for a in attrs_list]
    steps = steps or cfg.sample_steps
    scale = cfg.cfg_scale if cfg_scale is None else cfg_scale
    groups = []  # per bucket, once for every start: (indices, clean latents, noise, velocity_fn, shift)
    for aspect, (w, h) in eval_sizes(cfg).items():
        idx = [i for i, a in enumerate(attrs_list) if a["aspect"] == aspect]
        if not idx:
            continue
        x0 = space.encode(images_to_tensor([resize_and_crop(truth[i], (w, h)) for i in idx]).to(device))
        noise = torch.stack([torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(seed + i))
                             for i in idx]).to(device)                                 # (B, C, h, w)
        sub_text, sub_mask = S.trim_padding(text[idx], mask[idx])
        velocity = S.guided_velocity_fn(model, sub_text, sub_mask, scale, S.Prediction.from_config(cfg))
        groups.append((idx, x0, noise, velocity, sampling_shift(cfg, *x0.shape[-2:])))
    results = {}
    for t_start in tqdm(starts, desc="renoise", unit="start t", leave=False, disable=None):
        images = [None] * len(attrs_list)
        for idx, x0, noise, velocity, shift in groups:
            x = x0
            if t_start > 0:
                x, _ = S.sample_ode(velocity, (1 - t_start) * x0 + t_start * noise, max(1, round(steps * t_start)),
                                    sampler or cfg.sampler, shift=shift, t_start=t_start)
            for i, img in zip(idx, tensor_to_images(space.decode(x.float()))):
                images[i] = img
        results[t_start] = shapes.score_images(images, attrs_list)
    return results


def print_renoise(results):
    print("denoising noised ground truth from t (all prompts):")
    print(f"{'t':>10s}" + "".join(f"{a:>11s}" for a in ATTRIBUTES))
    for t_start, summary in results.items():
        row = summary["overall"]
        print(f"{t_start:10.2f}" + "".join(f"{100 * row[a]:10.1f}%" for a in ATTRIBUTES))


# --- FID (Frechet Inception Distance) with a local Inception network -------------------------------


def frechet_distance(feats_a, feats_b):
    """FID between two (N, D) feature sets: |mu_a - mu_b|^2 + tr(Sa + Sb - 2 (Sa Sb)^1/2)."""
    a, b = feats_a.double(), feats_b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    sa, sb = torch.cov(a.T), torch.cov(b.T)
    # tr((Sa Sb)^1/2) = sum sqrt(eig(Sa^1/2 Sb Sa^1/2)), all symmetric PSD: stable via eigh
    w, v = torch.linalg.eigh(sa)
    sqrt_sa = v @ torch.diag(w.clamp_min(0).sqrt()) @ v.T
    eig = torch.linalg.eigvalsh(sqrt_sa @ sb @ sqrt_sa).clamp_min(0)
    return ((mu_a - mu_b).pow(2).sum() + sa.trace() + sb.trace() - 2 * eig.sqrt().sum()).item()


def inception_features(net, images, device, batch=32):
    """Features of PIL images; the net takes uint8-range floats (N, 3, 299, 299) as NVlabs' export."""
    import numpy as np
    feats = []
    for i in range(0, len(images), batch):
        x = torch.stack([torch.from_numpy(np.array(im.convert("RGB").resize((299, 299)))).permute(2, 0, 1)
                         for im in images[i:i + batch]]).float().to(device)
        with torch.no_grad():
            feats.append(net(x).reshape(x.shape[0], -1).float().cpu())
    return torch.cat(feats)


class HeldOutSamples:
    """Up to max_images items of the cache's held-out split with their captions, source images and the images
    the model generates for them (made on first use, once, for FID and the CLIP score alike: one batched
    generate() per bucket from the cached caption embeddings, image i from seed + i as if alone)."""

    def __init__(self, cfg, model, device, steps=None, cfg_scale=None, sampler=None, seed=0, max_images=500,
                 batch_size=16):
        from dataset import CachedDataset
        self.cfg, self.model, self.device, self.seed, self.batch_size = cfg, model, device, seed, batch_size
        self.steps, self.cfg_scale, self.sampler = steps, cfg_scale, sampler
        self.val = CachedDataset(cfg, "val")
        self.items = [self.val[i] for i in range(min(len(self.val), max_images))]
        self.captions = [it["caption"] for it in self.items]
        self._generated = None

    def sources(self) -> list:
        """The held-out source images that are still there, cropped to their buckets as in the cache."""
        from images import load_image, resize_and_crop
        f, real = self.cfg.vae_downsample, []
        for i, it in enumerate(self.items):
            src = os.path.join(self.cfg.data_dir, self.val.sources[i])
            if os.path.isfile(src):
                _, h, w = it["latents"].shape
                real.append(resize_and_crop(load_image(src), (w * f, h * f)))
        return real

    def generated(self) -> list:
        if self._generated is None:
            from runs import latent_space_for
            from sample import generate
            space, f = latent_space_for(self.cfg, self.device), self.cfg.vae_downsample
            by_bucket = {}  # latent (h, w) -> indices of the held-out items
            for i, it in enumerate(self.items):
                by_bucket.setdefault(tuple(it["latents"].shape[1:]), []).append(i)
            images = [None] * len(self.items)
            for (h, w), idx in by_bucket.items():
                emb = (torch.stack([self.items[i]["text"] for i in idx]).float().to(self.device),  # (n, L, D)
                       torch.stack([self.items[i]["mask"] for i in idx]).to(self.device))         # (n, L)
                out = generate(self.model, space, emb, self.cfg, seed=[self.seed + i for i in idx], size=(w * f, h * f),
                               steps=self.steps, cfg_scale=self.cfg_scale, sampler=self.sampler,
                               batch_size=self.batch_size, progress=True)
                for i, image in zip(idx, out):
                    images[i] = image
            self._generated = images
        return self._generated


def evaluate_fid(cfg, model, device, inception_path, steps=None, cfg_scale=None, sampler=None, seed=0,
                 max_images=500, batch_size=16, held_out=None):
    """(FID of images generated for held-out captions against the held-out source images, message), or (None,
    why it was skipped). held_out: a HeldOutSamples whose generated images are shared with other scores."""
    if not inception_path or not os.path.isfile(inception_path):
        return None, ("FID skipped: no local Inception network (give --inception PATH to a TorchScript "
                      "Inception, e.g. NVlabs' inception-2015-12-05.pt; nothing is downloaded)")
    try:
        net = torch.jit.load(inception_path, map_location=device).eval()
    except Exception as e:  # not a TorchScript file: the rest of the report still gets written
        return None, f"FID skipped: {inception_path} is not a TorchScript network ({type(e).__name__})"
    held_out = held_out or HeldOutSamples(cfg, model, device, steps, cfg_scale, sampler, seed, max_images, batch_size)
    if len(held_out.items) < 2:
        return None, "FID skipped: fewer than 2 held-out images"
    real = held_out.sources()
    if len(real) < 2:
        return None, "FID skipped: held-out source images not found"
    try:  # a TorchScript file that is not an Inception-like network: said before any image is generated
        real_features = inception_features(net, real, device)
    except Exception as e:  # (TorchScript's message ends in the Python error's line)
        return None, (f"FID skipped: {inception_path} does not map (N, 3, 299, 299) images to features "
                      f"({(str(e).strip().splitlines() or [type(e).__name__])[-1][:120]})")
    fake = held_out.generated()
    try:
        fid = frechet_distance(real_features, inception_features(net, fake, device))
    except RuntimeError as e:  # e.g. features that are not finite: eigh does not converge
        fid, why = None, str(e).splitlines()[0][:120]
    if fid is None or not math.isfinite(fid):
        return None, (f"FID skipped: {inception_path} gave features it cannot be computed from "
                      f"({why if fid is None else fid})")
    return fid, f"FID {fid:.2f} ({len(fake)} generated vs {len(real)} held-out images)"


def load_clip(name: str, device):
    """(model, tokenizer, image processor) of a CLIP-like model (CLIP, SigLIP: a text and an image tower in one
    embedding space) through transformers, from a hub id (the local Hugging Face cache, as the text encoder
    loads) or a folder; ConfigError naming `name` when it cannot be loaded or has no image tower."""
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer
    from latents import HUB_HINT, _hub_error_line, check_local_folder, files_only
    from text_encoder import quiet_transformers
    check_local_folder("--clip", name)
    offline = files_only(name)
    where = "local folder" if os.path.isdir(name) else f"hub id ({HUB_HINT})"
    with quiet_transformers():  # (its progress bars and notes: this says what it loaded or why it could not)
        try:
            model = AutoModel.from_pretrained(name, local_files_only=offline).to(device).eval()
            tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=offline)
        except Exception as e:
            raise ConfigError(f"--clip {name}: cannot load a CLIP model from this {where}: {_hub_error_line(e)}"
                              ) from None
        try:  # (PIL: no torchvision here)
            processor = AutoImageProcessor.from_pretrained(name, local_files_only=offline, backend="pil")
        except Exception as e:
            raise ConfigError(f"--clip {name}: cannot load its image processor (preprocessor_config.json; a "
                              f"text model alone cannot score images): {_hub_error_line(e)}") from None
    if not (hasattr(model, "get_image_features") and hasattr(model, "get_text_features")):
        raise ConfigError(f"--clip {name}: a {type(model).__name__} has no text and image towers in one space "
                          "(give a CLIP or SigLIP model)")
    return model, tokenizer, processor


def features(out) -> torch.Tensor:
    """get_*_features' result: a tensor (transformers 4) or an output whose pooler_output holds it (5)."""
    return out if torch.is_tensor(out) else out.pooler_output


@torch.no_grad()
def clip_score(clip, images, captions, device, batch=32) -> float:
    """CLIPScore (Hessel et al. 2021) as torchmetrics reports it: the mean over images of 100 x max(0, cosine
    of the image's and its caption's embeddings). How well images follow their prompts; compare runs with the
    same CLIP model (the scale differs between models). Captions longer than the text tower are truncated."""
    model, tokenizer, processor = clip
    max_length = getattr(getattr(model.config, "text_config", model.config), "max_position_embeddings", 77)
    padding = "max_length" if "siglip" in model.config.model_type else True  # SigLIP was trained on padded text
    scores = []
    for i in range(0, len(images), batch):
        text = tokenizer(captions[i:i + batch], padding=padding, truncation=True, max_length=max_length,
                         return_tensors="pt").to(device)
        pixels = processor(images=[im.convert("RGB") for im in images[i:i + batch]],
                           return_tensors="pt")["pixel_values"].to(device)
        t = features(model.get_text_features(input_ids=text["input_ids"], attention_mask=text.get("attention_mask")))
        t = torch.nn.functional.normalize(t.float(), dim=-1)
        v = torch.nn.functional.normalize(features(model.get_image_features(pixel_values=pixels)).float(), dim=-1)
        scores.append((100 * (t * v).sum(-1)).clamp_min(0).cpu())  # (n,)
    return torch.cat(scores).mean().item()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--cfg", type=float, default=None, help="guidance scale (1 = off)")
    p.add_argument("--sampler", choices=SAMPLERS, default=None)
    p.add_argument("--shift", type=float, default=None, help="time shift of the sampling grid (0 = training's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", default=None,
                   help="a step of the run (e.g. 4000) or a checkpoint file (default: the newest); scores go to "
                        "eval/step_<N>/")
    p.add_argument("--per-pair", type=int, default=None,
                   help="shapes: prompts per (colour, shape) pair (default 8; --renoise: 4)")
    p.add_argument("--inception", default=None, help="local TorchScript Inception for FID")
    p.add_argument("--clip", default=None, help="CLIP (or SigLIP) model, a hub id in the local cache or a folder: "
                   "the CLIP score of images generated for the held-out captions")
    p.add_argument("--batch", type=int, default=16, help="images per forward pass and VAE decode (CFG: twice "
                   "as many); smaller needs less memory, the scores are the same (--renoise samples each "
                   "bucket's renders in one batch)")
    p.add_argument("--renoise", action="store_true",
                   help="shapes: also score denoising of noised ground truth from several t")
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    if args.per_pair is not None and not 1 <= args.per_pair <= MAX_PER_PAIR:  # 18 pairs each
        raise ConfigError(f"--per-pair {args.per_pair}: must be from 1 to {MAX_PER_PAIR}")
    if args.batch < 1:
        raise ConfigError(f"--batch {args.batch}: must be >= 1")
    if args.inception and not os.path.isfile(args.inception):
        raise ConfigError(f"--inception {args.inception}: no such file (a local TorchScript Inception)")
    from runs import load_run, run_and_checkpoint, run_step
    from sample import check_sampling_options, with_sample_shift
    check_sampling_options(args)
    from dataset import make_loader
    from metrics import validation_loss
    device = resolve_device(args.device)
    from runtime import allow_tf32
    allow_tf32()
    args.run_dir, args.checkpoint = run_and_checkpoint(args.run_dir, args.checkpoint)
    cfg, model = load_run(args.run_dir, device, args.checkpoint)
    cfg = with_sample_shift(cfg, args.shift)
    clip = load_clip(args.clip, device) if args.clip else None  # a wrong name: one line before any work
    step = run_step(args.run_dir, args.checkpoint)
    # an earlier checkpoint's scores in eval/step_<N>/ (a renamed file that holds no step: eval/<its name>/)
    named = f"step_{step}" if step is not None else os.path.splitext(os.path.basename(str(args.checkpoint)))[0]
    out_dir = os.path.join(args.run_dir, "eval", *([named] if args.checkpoint is not None else []))
    os.makedirs(out_dir, exist_ok=True)
    report = {"trained_steps": step, "sampler": args.sampler or cfg.sampler,
              "steps": args.steps or cfg.sample_steps, "cfg_scale": cfg.cfg_scale if args.cfg is None else args.cfg,
              "sample_shift": cfg.sample_shift}
    report_path = os.path.join(out_dir, "eval.json")

    def save_report():  # after each part: a Ctrl-C later keeps the scores printed so far
        write_json(report_path, report)

    if cfg.data_source == "shapes":
        summary = evaluate_shapes(cfg, model, device, args.steps, args.cfg, args.sampler, args.seed, out_dir,
                                  args.per_pair or 8, args.batch)
        print_table(summary)
        report["shapes"] = summary
        save_report()
        if args.renoise:
            results = renoise_shapes(cfg, model, device, steps=args.steps, cfg_scale=args.cfg,
                                     sampler=args.sampler, seed=args.seed, per_pair=args.per_pair or 4)
            print_renoise(results)
            report["renoise"] = {str(t): r for t, r in results.items()}
    elif args.renoise:
        print("--renoise skipped: only for the shapes data set (its ground truth can be rendered)")
    try:
        loader, _, val = make_loader(cfg, "val")
        if len(val):
            row = validation_loss(model, loader, cfg, device)
            report["val"] = row
            print("val loss " + " ".join(f"{k}={v:.4f}" for k, v in row.items() if v != ""))
    except (FileNotFoundError, ConfigError) as e:
        print(f"validation loss skipped: {e}")
    held_out = None
    if args.inception or clip:  # their scores share one generation
        held_out = HeldOutSamples(cfg, model, device, args.steps, args.cfg, args.sampler, args.seed,
                                  batch_size=args.batch)
    fid, message = evaluate_fid(cfg, model, device, args.inception, held_out=held_out)
    print(message)
    report["fid"] = fid
    save_report()
    if clip and held_out.items:
        report["clip_score"] = clip_score(clip, held_out.generated(), held_out.captions, device)
        report["clip_model"] = args.clip
        print(f"CLIP score {report['clip_score']:.2f} ({len(held_out.items)} images generated for held-out captions, "
              f"{args.clip})")
        save_report()
    elif clip:
        print("CLIP score skipped: no held-out images (val_fraction=0)")
    print(f"wrote {out_dir}/eval.json (a model trained {report['trained_steps']} steps; {report['sampler']}, "
          f"{report['steps']} steps, cfg {report['cfg_scale']}, "
          f"sample_shift {report['sample_shift'] or 'as trained'})")


if __name__ == "__main__":
    main_guard(main)
