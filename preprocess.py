"""Images + captions -> a cache of latents and text embeddings, bucketed by aspect ratio.

    python preprocess.py [preset] [key=value ...] [--force]
    torchrun --nproc_per_node=4 preprocess.py flowers        # each rank encodes files[rank::4]

Reads cfg.data_dir recursively: images (images.IMAGE_EXTS: png, jpg, webp, avif, bmp, gif, tiff) with a
caption in a sibling .txt or .caption file of the same stem (UTF-8, UTF-16 or UTF-32), or in a
metadata.jsonl / metadata.csv (Hugging Face imagefolder).
Each image goes to the aspect-ratio bucket nearest its own (area about target_resolution**2, sides
multiples of bucket_align, the NovelAI/SDXL multi-aspect scheme), is
resized to cover it (Lanczos) and centre-cropped, then encoded. cfg.cache_dir gets one .pt per image
(latents (C, h, w) float32 after scale/shift, text (L, D) bf16, mask (L,) bool, bucket, caption,
source) and manifest.json (the settings, per-channel latent mean/std, one entry per image). A caption
that repeats (the shapes set has ~540 distinct ones) goes through the text encoder once per run.

Re-runs are incremental: only new or changed images (size + mtime of image and caption), and images
whose cache file is missing or no longer has the size it was written with, are encoded; entries of
deleted images are dropped; --force rebuilds. Bad input never stops the run: unreadable,
truncated or empty images, missing, empty or undecodable captions, and images that would need more than
cfg.max_upscale enlargement to fill their bucket are skipped with a one-line warning each. The
manifest is written last and atomically, so a killed run leaves the previous cache usable; Ctrl-C, a
full disk or any other error stops encoding with one line, and the images encoded before it are kept in
the manifest. While encoding, it is also written every PROGRESS_EVERY seconds, so a kill that no handler
sees (SIGKILL, the out-of-memory killer, a power cut) loses at most that much work.
"""
import os
import signal
import sys
import threading
import time
import warnings
from collections import Counter, defaultdict, deque
from concurrent.futures import ThreadPoolExecutor
from itertools import islice

import torch
from tqdm import tqdm

from cache import (CACHE_SETTINGS, MANIFEST_VERSION, CacheError, ManifestUnreadable, absolute_folders, built_from,
                   cache_file_intact, cache_name, check_manifest, delete_unreferenced, fingerprint, latent_stats,
                   load_manifest, write_manifest)
from checkpoint import WriteError, write_atomic
from config import Config, exit_process, main_guard, parse_args, resolve_device
from images import (IMAGE_EXTS, Skip, area_kept, bucket_for, decode_min_side, find_images, load_image, make_buckets,
                    read_caption, resize_and_crop, upscale_needed)

# tried again every run: a permission may be fixed, a file come back, the precision be changed
RETRIED_SKIPS = ("not accessible", "non-finite encoding")
# what was cached of an image skipped for these is kept: its file or its metadata file is back once fixed
KEEPS_CACHED = ("not accessible", "metadata unreadable")
CROP_WARNING = 0.9  # images that keep less of their area than this in their bucket are counted in a warning
CAPTION_MEMO_BYTES = 256 * 2 ** 20  # text embeddings kept for repeated captions (shapes: ~540 distinct)
PROGRESS_EVERY = 120  # seconds between manifests written while encoding: a SIGKILL loses at most this much


class EncodingStopped(Exception):
    """encode_files stopped early (a full disk, Ctrl-C): why, and what it had encoded until then."""

    def __init__(self, cause, entries, skipped):
        super().__init__(str(cause))
        self.cause, self.entries, self.skipped = cause, entries, skipped


# --- encoding ------------------------------------------------------------------------------------------

def split_for_rank(items: list, rank: int, world_size: int) -> list:
    """This rank's share of the work: items[rank::world_size] (disjoint, covers everything)."""
    return items[rank::world_size]


def prepare(cfg: Config, source: str, buckets) -> tuple:
    """(fingerprint, bucket, image resized and cropped to it, caption, fraction of its area kept) for one source;
    Skip for bad input (its .fingerprint set when the file could be stat'ed)."""
    path = os.path.join(cfg.data_dir, source)
    try:  # taken before reading: a file replaced while it is encoded is encoded again by the next run
        fp = fingerprint(path, cfg.data_dir)
    except OSError as e:  # deleted since it was listed, a dangling link, no permission
        raise Skip("not accessible", f"cannot read it ({e.strerror or e})") from None
    try:  # any failure from here on is this file's: a Skip with its fingerprint
        caption = read_caption(path, cfg.data_dir)
        img = load_image(path, min_side=decode_min_side(buckets))  # big JPEGs decode at a reduced scale
        bucket = bucket_for(img.width, img.height, buckets)
        up = upscale_needed(img.width, img.height, bucket)
        if up > cfg.max_upscale:
            raise Skip("too small", f"{img.width}x{img.height} needs {up:.1f}x enlargement to fill bucket "
                                    f"{bucket[0]}x{bucket[1]} (max_upscale={cfg.max_upscale})")
        return fp, bucket, resize_and_crop(img, bucket), caption, area_kept(img.width, img.height, bucket)
    except Exception as e:
        skip = e if isinstance(e, Skip) else Skip("unreadable", f"{type(e).__name__}: {str(e)[:100]}")
        skip.fingerprint = fp
        raise skip from None


decoding = threading.local()  # .path: the image a decoding thread is on (for one_line_warning)


def one_line_warning(message, category, filename, lineno, file=None, line=None):
    """Python warnings raised while an image is read (Pillow: corrupt EXIF, decompression-bomb size) as one
    line naming the image, like preprocess's own warnings (instead of two naming Pillow's source)."""
    where = getattr(decoding, "path", None) or f"{filename}:{lineno}"
    tqdm.write(f"warning: {where}: {category.__name__}: {message}", file=sys.stderr)


def prepared_in_order(cfg: Config, todo: list, buckets):
    """Yield (source, prepare(...) or its Skip) in order. Decoding and resizing run in threads (PIL
    releases the GIL there), a bounded window ahead of the encoder, so the GPU is not kept waiting."""
    def safe(source):
        decoding.path = os.path.join(cfg.data_dir, source)
        try:
            return prepare(cfg, source, buckets)
        except Skip as s:
            return s
        except Exception as e:  # anything else one odd file raises costs that file, not the run
            return Skip("unreadable", f"{type(e).__name__}: {str(e)[:100]}")  # (prepare() catches most)
        finally:
            decoding.path = None

    workers = min(8, os.cpu_count() or 1)
    sources = iter(todo)
    with ThreadPoolExecutor(workers) as pool:
        window = deque((s, pool.submit(safe, s)) for s in islice(sources, 4 * workers))
        while window:
            source, future = window.popleft()
            following = next(sources, None)
            if following is not None:
                window.append((following, pool.submit(safe, following)))
            yield source, future.result()


def encode_files(cfg: Config, todo: list, latent_space, text_encoder, show_progress=True, progress=None):
    """Encode the sources in todo into cfg.cache_dir. Returns (new entries, skipped {source: info});
    progress(entries, skipped), if given, is called with those so far after each batch written."""
    from latents import images_to_tensor
    buckets = make_buckets(cfg.target_resolution, cfg.bucket_align, cfg.max_aspect_ratio)
    entries, skipped = {}, {}
    pending = defaultdict(list)  # bucket -> [(source, fingerprint, image, caption, area kept)], flushed in batches
    memo, memo_bytes = {}, 0     # caption -> (text (L, D), mask (L,)) on the CPU: repeated captions encode once

    def encode_captions(captions):
        nonlocal memo_bytes
        found = {c: memo[c] for c in captions if c in memo}
        new = list(dict.fromkeys(c for c in captions if c not in memo))
        if new:
            text, mask = text_encoder.encode(new)                            # (N, L, D), (N, L)
            text, mask = text.to("cpu", torch.bfloat16), mask.cpu()
            for i, caption in enumerate(new):
                found[caption] = (text[i], mask[i])
                if memo_bytes < CAPTION_MEMO_BYTES:  # unique captions (most real data) stop filling it
                    memo[caption] = (text[i].clone(), mask[i].clone())  # clone: not the whole batch's storage
                    memo_bytes += text[i].numel() * text.element_size()
        pairs = [found[c] for c in captions]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

    def skip(source, fp, why: Skip):
        """Record a skipped source (with what decides whether a later run tries it again) and say so."""
        skipped[source] = {"fingerprint": fp, "reason": why.reason, "message": str(why),
                           "max_upscale": cfg.max_upscale}
        tqdm.write(f"warning: {os.path.join(cfg.data_dir, source)}: {why} - skipped", file=sys.stderr)

    def flush(bucket):
        items, pending[bucket] = pending[bucket], []
        if not items:
            return
        images = images_to_tensor([item[2] for item in items])             # (B, 3, H, W) in [-1, 1]
        latents = latent_space.encode(images, normalize=False).cpu()        # (B, C, H/f, W/f)
        text, mask = encode_captions([item[3] for item in items])           # (B, L, D) bf16, (B, L)
        for i, (source, fp, _, caption, kept) in enumerate(items):
            z = latents[i].float().clone()                                  # (C, h, w); clone: own storage
            if not (torch.isfinite(z).all() and torch.isfinite(text[i].float()).all()):  # e.g. a VAE in fp16
                skip(source, fp, Skip("non-finite encoding",
                                      "the VAE or text encoder gave NaN/inf (an overflow in its precision?)"))
                continue
            name = cache_name(source)
            item = {"latents": z, "text": text[i].clone(), "mask": mask[i].clone(), "bucket": tuple(bucket),
                    "caption": caption, "source": source}
            size = write_atomic(os.path.join(cfg.cache_dir, name), lambda tmp: torch.save(item, tmp))
            z64 = z.double().flatten(1)                                      # (C, h*w)
            entries[source] = {"file": name, "bytes": size, "fingerprint": fp, "bucket": list(bucket),
                               "latent_shape": list(z.shape), "tokens": int(mask[i].sum()),
                               "area_kept": round(kept, 4), "sum": z64.sum(1).tolist(),
                               "sumsq": z64.pow(2).sum(1).tolist(), "count": z64.shape[1],
                               "text_sum": item["text"].double().sum().item()}  # check_cache.py: a changed file
        if progress is not None:
            progress(entries, skipped)

    bar = tqdm(total=len(todo), desc="encode", unit="img", disable=not show_progress, dynamic_ncols=True)
    with warnings.catch_warnings():  # entered and left by this thread only; the decoding threads just warn
        warnings.filterwarnings("always", module=r"PIL\.")  # each image's, not only the first one's
        warnings.showwarning = one_line_warning
        try:
            for source, result in prepared_in_order(cfg, todo, buckets):
                bar.update(1)
                if isinstance(result, Skip):
                    skip(source, getattr(result, "fingerprint", None), result)
                    continue
                fp, bucket, img, caption, kept = result
                pending[bucket].append((source, fp, img, caption, kept))
                if len(pending[bucket]) >= cfg.preprocess_batch_size:
                    flush(bucket)
            for bucket in list(pending):
                flush(bucket)
        except (Exception, KeyboardInterrupt) as e:  # a full disk, Ctrl-C, out of memory: the caller records
            raise EncodingStopped(e, entries, skipped) from None  # what was written, then reports e
        finally:
            bar.close()
    return entries, skipped


def encode_device_and_dtype(cfg: Config, distributed: bool):
    """Where and in which precision to run the VAE and text encoder."""
    if distributed and torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    else:
        device = resolve_device(cfg.device)
    from text_encoder import default_dtype
    return device, default_dtype(device, cfg.mixed_precision)  # older GPUs: fp32 (fp16 overflows in T5s, VAEs)


def plan_encoding(cfg: Config, sources: list, old_entries: dict, old_skipped: dict, say=print) -> tuple:
    """(kept entries, kept skips, sources to encode): new or changed images, cache files gone or damaged, and
    previously skipped images whose files changed (or whose reason may not hold any more)."""
    kept, kept_skipped, todo = {}, {}, []
    for source in sources:
        try:
            fp = fingerprint(os.path.join(cfg.data_dir, source), cfg.data_dir)
        except OSError:  # gone since listed, a dangling link, no permission: prepare() reports it
            fp = None
        e, s = old_entries.get(source), old_skipped.get(source)
        if e and e["fingerprint"] == fp and cache_file_intact(cfg.cache_dir, e):
            kept[source] = e
        elif e and e["fingerprint"] == fp:  # the image is unchanged but its cache file is gone or damaged
            path = os.path.join(cfg.cache_dir, e["file"])
            say(f"warning: {path}: cache file missing or damaged - re-encoding {source}", file=sys.stderr)
            todo.append(source)
        elif s and fp is not None and s["fingerprint"] == fp and s["reason"] not in RETRIED_SKIPS and (
                s["reason"] != "too small" or s.get("max_upscale") == cfg.max_upscale):  # it would be again
            kept_skipped[source] = s
        else:
            todo.append(source)
    return kept, kept_skipped, todo


def ensure_cache(cfg: Config, force: bool = False, distributed: bool = False, verbose: bool = True) -> dict:
    """Build or refresh cfg.cache_dir from cfg.data_dir and return the manifest.

    distributed=True (every rank calls it, torch.distributed initialised): each rank encodes its share
    of the new files, rank 0 merges and writes the manifest. Otherwise one process does everything.
    """
    import torch.distributed as dist
    multi = distributed and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank, world = (dist.get_rank(), dist.get_world_size()) if multi else (0, 1)
    say = print if (verbose and rank == 0) else (lambda *a, **k: None)
    t0 = time.time()

    if cfg.data_source == "shapes" and rank == 0:
        import shapes  # generates cfg.num_shapes images + captions if missing
        shapes.ensure_shapes_data(cfg)
    if multi:
        dist.barrier()
    if not os.path.isdir(cfg.data_dir):
        cached = None if force else load_manifest(cfg.cache_dir)
        if cached is None:
            raise CacheError(f"data_dir={cfg.data_dir}: no such folder (put images + .txt captions there)")
        check_manifest(cfg, cached)  # only the cache was copied (a cluster node): train on it as it is
        say(f"warning: data_dir={cfg.data_dir} is not there: using the cache in {cfg.cache_dir} as it is",
            file=sys.stderr)
        return cached
    os.makedirs(cfg.cache_dir, exist_ok=True)

    old = None
    if not force:
        try:
            old = load_manifest(cfg.cache_dir)
        except ManifestUnreadable as e:
            say(f"warning: {e}: re-encoding everything", file=sys.stderr)
    if old is not None and not old.get("entries"):
        old = None  # nothing cached (a first run that failed): its settings bind nothing
    if old is not None:
        check_manifest(cfg, old)
        if not built_from(old, cfg.data_dir):  # nothing in the old cache is known to match
            say(f"data_dir changed ({old.get('data_dir')} -> {cfg.data_dir}): re-encoding everything")
            old = None
    old_entries = old["entries"] if old else {}
    old_skipped = old.get("skipped", {}) if old else {}

    # what needs encoding: new or changed images (and previously skipped ones whose files changed)
    unlisted = []  # folders that could not be listed just now (a permission, an unmounted drive)
    sources = find_images(cfg.data_dir, skip_dirs=(cfg.cache_dir, cfg.out_dir), unlisted=unlisted)
    if not sources:
        raise CacheError(f"data_dir={cfg.data_dir}: no images ({', '.join(IMAGE_EXTS)}) found in it")
    kept, kept_skipped, todo = plan_encoding(cfg, sources, old_entries, old_skipped, say)
    for source, e in old_entries.items():  # cached from a folder not listed just now: kept, as for a file
        if any(source.startswith(folder + "/") for folder in unlisted) and cache_file_intact(cfg.cache_dir, e):
            kept[source] = e
    removed = len(set(old_entries) - set(sources) - set(kept))

    failure = None  # what stopped encoding early: a WriteError (full disk), Ctrl-C, any other error
    # scale/shift come from the VAE when one is loaded; pixel space is the identity
    scale, shift = (old or {}).get("scale"), (old or {}).get("shift")
    if cfg.latent_space == "pixel":
        scale, shift = 1.0, 0.0

    def make_manifest(entries, skipped):
        entries, skipped = dict(sorted(entries.items())), dict(sorted(skipped.items()))
        mean, std = latent_stats(entries, cfg.latent_channels)
        return {"version": MANIFEST_VERSION, **{k: getattr(cfg, k) for k in CACHE_SETTINGS},
                "scale": scale, "shift": shift,
                "data_dir": cfg.data_dir, **absolute_folders(cfg),
                "latent_mean": mean, "latent_std": std,
                "num_samples": len(entries), "entries": entries, "skipped": skipped}

    new_entries, new_skipped = {}, {}
    if todo:
        from latents import LatentSpace
        from text_encoder import load_text_encoder
        device, dtype = encode_device_and_dtype(cfg, multi)
        latent_space = LatentSpace.from_config(cfg, device=device, dtype=dtype)  # no stats: cache holds raw-scaled
        if scale is not None and (scale, shift) != (latent_space.scale, latent_space.shift):
            raise CacheError(f"cache_dir={cfg.cache_dir} was built with scale/shift {old.get('scale')}/"
                             f"{old.get('shift')} but the VAE {cfg.vae!r} has {latent_space.scale}/"
                             f"{latent_space.shift}: rebuild with --force")
        scale, shift = latent_space.scale, latent_space.shift
        text_encoder = load_text_encoder(cfg, device=device, dtype=dtype)
        mine = split_for_rank(todo, rank, world)
        saved, cost = time.time(), 0.0  # when the last progress manifest was written, and how long that took

        def save_progress(done, done_skipped):  # a kill that no handler sees (SIGKILL, the out-of-memory
            nonlocal saved, cost                # killer, a power cut) keeps what this manifest names
            if rank == 0 and time.time() - saved >= max(PROGRESS_EVERY, 20 * cost):  # a huge one: < 5% of the time
                start = time.time()
                write_manifest(cfg.cache_dir, make_manifest({**kept, **done}, {**kept_skipped, **done_skipped}))
                saved = time.time()
                cost = saved - start

        try:
            new_entries, new_skipped = encode_files(cfg, mine, latent_space, text_encoder,
                                                    show_progress=verbose and rank == 0, progress=save_progress)
        except EncodingStopped as e:  # a full disk or Ctrl-C: record what was encoded, then report
            new_entries, new_skipped, failure = e.entries, e.skipped, e.cause
        del latent_space, text_encoder
    if multi:  # rank 0 collects everyone's entries; a rank that stopped (full disk, out of memory) stops all
        gathered = [None] * world
        why = None if failure is None else type(failure).__name__ + (f": {str(failure)[:200]}" if str(failure) else "")
        dist.all_gather_object(gathered, (new_entries, new_skipped, why))
        new_entries = {k: v for e, _, _ in gathered for k, v in e.items()}
        new_skipped = {k: v for _, s, _ in gathered for k, v in s.items()}
        stopped = [(r, w) for r, (_, _, w) in enumerate(gathered) if w is not None and r != rank]
        if failure is None and stopped:
            failure = CacheError(f"rank {stopped[0][0]} stopped encoding ({stopped[0][1]})")
            failure.elsewhere = True

    for source, s in list(new_skipped.items()):  # cached before, unreadable just now: keep what was cached
        if s["reason"] in KEEPS_CACHED and source in old_entries \
                and cache_file_intact(cfg.cache_dir, old_entries[source]):
            kept[source] = old_entries[source]
            del new_skipped[source]
    manifest = make_manifest({**kept, **new_entries}, {**kept_skipped, **new_skipped})
    entries = manifest["entries"]
    if rank == 0:
        if manifest != old:
            write_manifest(cfg.cache_dir, manifest)  # after every .pt file it names
        delete_unreferenced(cfg.cache_dir, entries,
                            {e["file"] for e in old_entries.values()} | {cache_name(s) for s in sources})
        summarise(cfg, manifest, new_entries, removed, new_skipped, time.time() - t0, say)
    if multi:
        dist.barrier()
    if failure is None:
        return manifest
    raise_stopped(cfg, failure, len(new_entries))


def raise_stopped(cfg: Config, failure: BaseException, n: int):
    """Encoding stopped early after n new images (those are cached): raise why, saying how to go on."""
    if isinstance(failure, KeyboardInterrupt):  # main_guard prints "interrupted: <this>"
        raise KeyboardInterrupt(f"the {n} images encoded so far are cached; re-run to encode the rest")
    if isinstance(failure, WriteError):
        raise WriteError(f"{failure}: the {n} images encoded before it are cached; free space and re-run to "
                         "encode the rest")
    if isinstance(failure, torch.OutOfMemoryError):
        raise CacheError(f"out of memory while encoding: the {n} images encoded before it are cached; re-run "
                         f"with a smaller preprocess_batch_size (now {cfg.preprocess_batch_size})")
    if getattr(failure, "elsewhere", False):
        raise CacheError(f"{failure}: the {n} images encoded before it are cached; a re-run encodes the rest")
    failure.add_note(f"(the {n} images encoded before it are cached; a re-run encodes the rest)")
    raise failure


def summarise(cfg, manifest, new_entries, removed, new_skipped, seconds, say=print):
    """Samples per bucket, skipped files by reason, and a one-line summary."""
    entries = manifest["entries"]
    per_bucket, new_per_bucket, shapes = Counter(), Counter(), {}
    for source, e in entries.items():
        key = tuple(e["bucket"])
        per_bucket[key] += 1
        new_per_bucket[key] += source in new_entries
        shapes[key] = "x".join(map(str, e["latent_shape"]))
    if new_entries or removed:
        say(f"{'bucket (WxH)':>14} {'latents (Cxhxw)':>16} {'samples':>8} {'new':>6}")
        for key in sorted(per_bucket, key=lambda b: b[0] / b[1]):
            say(f"{key[0]:>7}x{key[1]:<6} {shapes[key]:>16} {per_bucket[key]:>8} {new_per_bucket[key]:>6}")
    full = sum(e.get("tokens", 0) >= cfg.max_token_length for e in new_entries.values())
    if full:  # the cache cannot tell a cut caption from one that fits exactly: say how many might be cut
        say(f"note: {full} caption(s) fill all max_token_length={cfg.max_token_length} tokens: probably cut "
            "(a larger max_token_length keeps more of them)")
    cropped = sorted((e["area_kept"], s) for s, e in new_entries.items() if e.get("area_kept", 1) < CROP_WARNING)
    if cropped:  # a panorama in a 2:1 bucket loses half of itself: say so once, when it is encoded
        kept, source = cropped[0]
        say(f"warning: {len(cropped)} image(s) lost more than {1 - CROP_WARNING:.0%} of their area to the centre "
            f"crop into their bucket, e.g. {os.path.join(cfg.data_dir, source)} ({kept:.0%} kept): their aspect "
            f"ratio is beyond max_aspect_ratio={cfg.max_aspect_ratio:g} or far from every bucket", file=sys.stderr)
    reasons = Counter(s["reason"] for s in manifest["skipped"].values())
    if reasons:
        say("skipped: " + ", ".join(f"{n} {r}" for r, n in reasons.most_common())
            + (f" ({len(manifest['skipped']) - len(new_skipped)} unchanged since an earlier run)"
               if len(manifest["skipped"]) > len(new_skipped) else ""))
    say(f"cache {cfg.data_dir} -> {cfg.cache_dir}: {len(entries)} samples in "
        f"{len(per_bucket)} buckets ({len(new_entries)} encoded, {removed} removed, "
        f"{len(manifest['skipped'])} skipped) in {seconds:.1f} s")


def raise_interrupt(signum, frame):
    if "TORCHELASTIC_RUN_ID" in os.environ:  # torchrun passes its SIGTERM on twice: a second one, raised while
        signal.signal(signum, signal.SIG_IGN)  # the first is handled, lost the manifest of what was encoded
    raise KeyboardInterrupt  # SIGTERM (a cluster's time limit, `kill`) keeps the work done, as Ctrl-C does


def main():
    signal.signal(signal.SIGTERM, raise_interrupt)
    argv = sys.argv[1:]
    force = "--force" in argv
    cfg = parse_args([a for a in argv if a != "--force"])
    distributed = int(os.environ.get("WORLD_SIZE", 1)) > 1
    if distributed:
        import torch.distributed as dist
        if not dist.is_initialized():
            from runtime import init_process_group
            init_process_group()
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    manifest = ensure_cache(cfg, force=force, distributed=distributed)
    if distributed:
        dist.destroy_process_group()
    if not manifest["entries"]:
        raise CacheError(f"data_dir={cfg.data_dir}: no usable images (all {len(manifest['skipped'])} skipped, "
                         "see the warnings above or the manifest's 'skipped')")


if __name__ == "__main__":
    main_guard(main)
    exit_process(0)
