"""The cache preprocess.py writes, as its readers see it: manifest.json (read, written atomically, checked
against a config), cache file names, the fingerprints that decide what is re-encoded, per-channel latent
statistics, and the checks for damaged or stray cache files. dataset.py and check_cache.py need only this.
"""
import hashlib
import json
import os
import re

import numpy as np

from checkpoint import write_json
from config import Config, ConfigError
from images import caption_path_for, metadata_caption

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
ENTRY_KEYS = {"file", "fingerprint", "bucket", "latent_shape", "tokens", "sum", "sumsq", "count"}
# The settings a cache is built with: using it with other values would be silently wrong data.
CACHE_SETTINGS = ("latent_space", "vae", "vae_subfolder", "latent_channels", "vae_downsample",
                  "text_encoder", "text_layer", "text_dim", "max_token_length", "target_resolution", "bucket_align",
                  "max_aspect_ratio")


class CacheError(ConfigError):
    """The cache is missing, damaged, or was built with other settings; the message names which."""


class ManifestUnreadable(CacheError):
    """A damaged manifest or one of another version: preprocess re-encodes everything (like --force)."""


def fingerprint(image_path: str, root: str = None) -> str:
    """Size and mtime of the image and of its caption file (a hash of its caption when that comes from a
    metadata.jsonl/csv, so editing one row re-encodes one image): a change re-encodes the sample."""
    def stamp(p):
        st = os.stat(p)
        return f"{st.st_size}:{st.st_mtime_ns}"
    cap = caption_path_for(image_path)
    if cap:
        return f"{stamp(image_path)}|{os.path.basename(cap)}:{stamp(cap)}"
    meta, text, _ = metadata_caption(image_path, root)
    caption = f"{os.path.basename(meta)}:{hashlib.sha1(text.encode()).hexdigest()[:12]}" if meta else "no caption"
    return f"{stamp(image_path)}|{caption}"


def cache_name(source: str) -> str:
    """A flat, readable, collision-free file name for a source path: <stem>-<hash>.pt."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", os.path.splitext(os.path.basename(source))[0])[:48]
    return f"{stem}-{hashlib.sha1(os.fsencode(source)).hexdigest()[:10]}.pt"  # fsencode: names not in UTF-8


# --- the manifest --------------------------------------------------------------------------------------

def load_manifest(cache_dir: str):
    """The manifest dict, or None when the cache does not exist yet."""
    path = os.path.join(cache_dir, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise ManifestUnreadable(f"{path}: unreadable manifest ({e}); python preprocess.py rebuilds it") from None
    if not isinstance(manifest, dict) or manifest.get("version") != MANIFEST_VERSION:
        version = manifest.get("version") if isinstance(manifest, dict) else None
        raise ManifestUnreadable(f"{path}: manifest version {version} (expected {MANIFEST_VERSION}); "
                                 "python preprocess.py rebuilds it")
    entries, skipped = manifest.get("entries"), manifest.get("skipped", {})
    if not (isinstance(entries, dict) and isinstance(skipped, dict)
            and all(isinstance(e, dict) and ENTRY_KEYS <= e.keys() for e in entries.values())
            and all(isinstance(s, dict) and {"fingerprint", "reason"} <= s.keys() for s in skipped.values())):
        raise ManifestUnreadable(f"{path}: damaged manifest (entries without the keys {sorted(ENTRY_KEYS)}); "
                                 "python preprocess.py rebuilds it")
    return manifest


def write_manifest(cache_dir: str, manifest: dict):
    """Atomically: a reader sees the old or the new manifest, never half of one."""
    write_json(os.path.join(cache_dir, MANIFEST), manifest, indent=1)


def check_manifest(cfg: Config, manifest: dict):
    """CacheError naming the first setting the cache was built with that differs from cfg."""
    for key in CACHE_SETTINGS:
        if key in ("vae", "text_encoder") and os.path.isdir(getattr(cfg, key)) \
                and isinstance(manifest.get(key), str) and built_from(manifest, getattr(cfg, key), key):
            continue  # models/vae, models/vae/, ../models/vae from elsewhere and /abs/models/vae are one folder
        if manifest.get(key) != getattr(cfg, key):
            raise CacheError(f"cache_dir={cfg.cache_dir} was built with {key}={manifest.get(key)!r} but the "
                             f"config has {key}={getattr(cfg, key)!r}: rebuild it (python preprocess.py "
                             f"... --force) or use another cache_dir")


def latent_stats(entries: dict, channels: int):
    """Per-channel mean and std over all cached latents, from each entry's sums (no file reads)."""
    total, total_sq, count = np.zeros(channels), np.zeros(channels), 0
    for e in entries.values():
        total += e["sum"]
        total_sq += e["sumsq"]
        count += e["count"]
    if count == 0:
        return None, None
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean ** 2, 1e-12))
    return mean.tolist(), std.tolist()


def same_folder(a, b) -> bool:
    """data_dir=data/x, data/x/ and /abs/data/x are one folder (a changed spelling must not re-encode)."""
    return a is not None and os.path.realpath(a) == os.path.realpath(b)


LOCAL_FOLDERS = ("data_dir", "vae", "text_encoder")  # kept in the manifest as given and as absolute paths


def absolute_folders(cfg: Config) -> dict:
    """{'<key>_abs': absolute path} of cfg's local folders (a vae or text_encoder that is a hub id has none)."""
    return {f"{key}_abs": os.path.realpath(getattr(cfg, key)) for key in LOCAL_FOLDERS
            if key == "data_dir" or os.path.isdir(getattr(cfg, key))}


def built_from(manifest: dict, folder: str, key: str = "data_dir") -> bool:
    """Whether the cache was built from this folder (data_dir, or a local vae / text_encoder): the folder as it
    was given (relative: from where the run started), which still holds when the project folder moved, or as an
    absolute path (<key>_abs), which holds when a run starts elsewhere (a job script's own folder) with another
    spelling of it."""
    return same_folder(manifest.get(key), folder) or same_folder(manifest.get(f"{key}_abs"), folder)


def cache_file_intact(cache_dir: str, entry: dict) -> bool:
    """The entry's .pt file exists with the size it was written with (caches from before sizes were
    recorded: exists). Cheap, and catches truncated or overwritten files without reading them."""
    try:
        size = os.path.getsize(os.path.join(cache_dir, entry["file"]))
    except OSError:
        return False
    return size == entry.get("bytes", size)


def delete_unreferenced(cache_dir: str, entries: dict, ours: set):
    """Remove the cache files (and write_atomic's .tmp files) no entry points at: deleted images, files now
    skipped, killed runs. Only names in `ours` (the old manifest's files, the current images' cache_name)
    are touched: a user's own files beside the cache stay."""
    keep = {e["file"] for e in entries.values()}
    for name in os.listdir(cache_dir):
        if name.removesuffix(".tmp") in ours and name not in keep:
            os.remove(os.path.join(cache_dir, name))
