"""The cached data set (from preprocess.py) and a bucket batch sampler.

    loader, sampler, data = make_loader(cfg, "train", rank, world_size)
    data.set_epoch(epoch); sampler.set_position(epoch, batches_done)   # before iter(loader)

Every batch comes from one aspect-ratio bucket, so its latents stack without padding. All randomness
(order, caption dropout, flips) is a function of (seed, epoch, index), so a resumed run sees exactly
the batches it would have seen, and DataLoader workers agree with each other.

Error policy: a missing or corrupt cache file is an error naming the file (a CacheError, printed as
one line), at startup for in-memory data sets and at first use for lazy ones; never silently skipped,
because a silently shorter data set changes what a resumed run sees. A file with non-finite latents is
reported once; train.py skips the steps it is in (their loss is non-finite).
"""
import hashlib
import os
import random
import signal
import sys

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from config import Config
from cache import CacheError, check_manifest, load_manifest

IN_MEMORY_MAX_BYTES = 2 * 1024 ** 3  # in_memory=None: load the whole cache into RAM below this estimate


def split_fraction(source: str) -> float:
    """A stable number in [0, 1) per file name: the train/val split never moves when files are added."""
    return int(hashlib.sha1(os.fsencode(source)).hexdigest()[:12], 16) / 16 ** 12


def split_sources(sources, val_fraction: float):
    """(train, val) lists. If no file hashes below val_fraction, the lowest-hash file is validation."""
    sources = sorted(sources)
    val = [s for s in sources if split_fraction(s) < val_fraction]
    if val_fraction > 0 and not val and len(sources) > 1:
        val = [min(sources, key=split_fraction)]
    val_set = set(val)
    return [s for s in sources if s not in val_set], val


def load_cache_file(path: str) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CacheError(f"{path}: missing or corrupt cache file ({type(e).__name__}); "
                         "delete it and re-run python preprocess.py to re-encode it") from None


def loading_failure(e: Exception):
    """One line on why a batch could not be loaded, or None for other errors: a missing or damaged cache
    file (from a DataLoader worker it arrives with the worker's traceback: its last line is kept), or a
    worker killed (e.g. by the out-of-memory killer) or ended."""
    if isinstance(e, CacheError):
        lines = [line for line in str(e).splitlines() if line.strip()]
        return lines[-1].split("CacheError: ", 1)[-1] if lines else "a cache file could not be loaded"
    if isinstance(e, RuntimeError) and str(e).startswith("DataLoader worker"):
        return str(e).splitlines()[0]
    # any other OSError or EOFError out of the loader (every error of a cache file is a CacheError): a worker
    # that ended while its batch was handed over (the tensors' file descriptors come through its socket, which
    # is gone: ConnectionResetError, FileNotFoundError), e.g. a SIGTERM to the whole process group
    if isinstance(e, (OSError, EOFError)):
        return f"a DataLoader worker ended while handing over a batch ({type(e).__name__}: {e})"
    return None


def quiet_worker_exit(worker_id: int):
    """A SIGTERM to a DataLoader worker ends it quietly, as Ctrl-C does (PyTorch's worker loop catches the
    KeyboardInterrupt). A signal to the whole process group (Slurm's scancel, docker stop) reaches the
    workers too; killed by it, they failed the step with a traceback. The main process finishes its step and
    saves (a batch it then misses from an ended worker counts as the stop: see loading_failure). Ignoring
    the signal would block PyTorch's own terminate() of a stuck worker at exit; under torchrun it is ignored
    all the same: a rank that misses a batch cannot finish the step the other ranks wait in (the job would
    stop without a checkpoint of it), and torchrun, which also passes its SIGTERM on to the workers' process
    groups, ends them with SIGKILL after its --shutdown_timeout."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, signal.default_int_handler)


def item_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The random stream for one item in one epoch: the same in any worker, process or resumed run."""
    return random.Random((seed * 1_000_003 + epoch) * 1_000_003 + index)


class CachedDataset(Dataset):
    """Items of a preprocess.py cache: latents (C, h, w), text (L, D), mask (L,), drop, caption.

    The split is by a hash of each file's path (cfg.val_fraction). Caption dropout and flips apply to
    the train split only; validation items always keep their caption.
    """

    def __init__(self, cfg: Config, split: str = "train", in_memory=None):
        assert split in ("train", "val"), split
        manifest = load_manifest(cfg.cache_dir)
        if manifest is None:
            raise CacheError(f"cache_dir={cfg.cache_dir}: no cache there; run python preprocess.py first (with "
                             "the same preset and settings)")
        check_manifest(cfg, manifest)
        self.cfg, self.split, self.epoch = cfg, split, 0
        train, val = split_sources(manifest["entries"], cfg.val_fraction)
        self.sources = train if split == "train" else val
        entries = [manifest["entries"][s] for s in self.sources]
        self.paths = [os.path.join(cfg.cache_dir, e["file"]) for e in entries]
        self.bucket_keys = [tuple(e["bucket"]) for e in entries]  # (W, H) per item, for the sampler
        for p in self.paths:
            if not os.path.exists(p):
                raise CacheError(f"{p}: cache file missing; re-run python preprocess.py to rebuild it")
        # latent_norm: per-channel mean/std of the cache (latents.py applies the same in decode)
        self.mean = self.std = None
        if cfg.latent_norm:
            self.mean = torch.tensor(manifest["latent_mean"]).view(-1, 1, 1)  # (C, 1, 1)
            self.std = torch.tensor(manifest["latent_std"]).view(-1, 1, 1)
        bytes_per_item = [4 * _prod(e["latent_shape"]) + cfg.max_token_length * (2 * cfg.text_dim + 1)
                          for e in entries]
        self.in_memory = sum(bytes_per_item) < IN_MEMORY_MAX_BYTES if in_memory is None else in_memory
        self.items, self.warned = None, set()  # warned: items found non-finite (each reported once)
        if self.in_memory:
            self.items = [load_cache_file(p) for p in tqdm(self.paths, desc=f"load {split}", unit="file",
                                                          disable=len(self.paths) < 1000)]

    def __len__(self):
        return len(self.paths)

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __getitem__(self, i: int) -> dict:
        d = self.items[i] if self.items is not None else load_cache_file(self.paths[i])
        latents = d["latents"].float()                                      # (C, h, w)
        if i not in self.warned and not torch.isfinite(latents).all():  # a damaged file: its steps are skipped
            self.warned.add(i)
            print(f"warning: {self.paths[i]}: non-finite latents (a damaged cache file); the steps with it are "
                  "skipped: delete it and re-run python preprocess.py", file=sys.stderr)
        if self.mean is not None:
            latents = (latents - self.mean) / self.std
        drop = False
        if self.split == "train":
            rng = item_rng(self.cfg.seed, self.epoch, i)
            drop = rng.random() < self.cfg.caption_dropout
            if self.cfg.hflip and rng.random() < 0.5:
                latents = latents.flip(-1)  # in VAE latent space only approximately the flipped image's latent
        return {"latents": latents, "text": d["text"].float(), "mask": d["mask"].bool(),  # (L, D), (L,)
                "drop": torch.tensor(drop), "caption": d["caption"], "index": i}


def _prod(xs):
    out = 1
    for x in xs:
        out *= x
    return out


def collate(items: list) -> dict:
    """Stack one bucket's items: latents (B, C, h, w), text (B, L, D), mask (B, L), drop (B,), captions,
    index (B,)."""
    if len({tuple(it["latents"].shape) for it in items}) > 1:
        raise ValueError("collate: items from different buckets (use BucketBatchSampler)")
    return {"latents": torch.stack([it["latents"] for it in items]),
            "text": torch.stack([it["text"] for it in items]),
            "mask": torch.stack([it["mask"] for it in items]),
            "drop": torch.stack([it["drop"] for it in items]),
            "captions": [it["caption"] for it in items],
            "index": torch.tensor([it.get("index", -1) for it in items])}  # the samples' places in the split


class BucketBatchSampler(Sampler):
    """Batches of indices from one bucket each, shuffled per (seed, epoch), interleaved across buckets.

    Distributed: the epoch's batch list is shared by all ranks and rank r takes every world_size-th
    batch from r, so ranks get disjoint batches and the same number of them. When the count does not
    divide, drop_last=True drops the last few batches; otherwise the first few are repeated to pad.
    Within a bucket, the final short batch is kept (drop_last=False) or dropped (drop_last=True).

    Resume: set_position(epoch, batches_done) makes the next iteration start after the batches this
    rank has already consumed; len() is the number of batches the next iteration yields.
    """

    def __init__(self, bucket_keys, batch_size: int, seed: int = 0, drop_last: bool = False,
                 rank: int = 0, world_size: int = 1):
        assert 0 <= rank < world_size and batch_size > 0
        self.batch_size, self.seed, self.drop_last = batch_size, seed, drop_last
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start_batch = 0, 0
        groups = {}
        for i, key in enumerate(bucket_keys):
            groups.setdefault(tuple(key), []).append(i)
        self.groups = [groups[k] for k in sorted(groups)]  # a fixed order, whatever order keys came in
        n = sum(len(g) // batch_size if drop_last else -(-len(g) // batch_size) for g in self.groups)
        self.total_batches = n
        self.batches_per_epoch = n // world_size if drop_last else -(-n // world_size)

    def set_epoch(self, epoch: int):
        self.set_position(epoch, 0)

    def set_position(self, epoch: int, batch_index: int):
        """Next iteration: epoch `epoch`, skipping the first batch_index batches of this rank."""
        self.epoch, self.start_batch = epoch, min(max(batch_index, 0), self.batches_per_epoch)

    def epoch_batches(self, epoch: int) -> list:
        """This rank's batches for an epoch (all of them, ignoring the start position)."""
        rng = random.Random(self.seed * 1_000_003 + epoch)
        batches = []
        for group in self.groups:
            order = group[:]
            rng.shuffle(order)
            for s in range(0, len(order), self.batch_size):
                batch = order[s:s + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        rng.shuffle(batches)  # interleave buckets
        need = self.batches_per_epoch * self.world_size
        if batches:  # pad by repeating batches from the start (or cut, with drop_last)
            batches = [batches[i % len(batches)] for i in range(need)]
        return batches[self.rank::self.world_size]

    def __iter__(self):
        yield from self.epoch_batches(self.epoch)[self.start_batch:]

    def __len__(self):
        return self.batches_per_epoch - self.start_batch


class BatchStream:
    """A loader's batches epoch after epoch, from a position a checkpoint holds: (epoch, batches of it taken). A
    resumed run takes the batch the interrupted one would have taken next (each epoch's order, caption dropout
    and flips are functions of the seed and the epoch)."""

    def __init__(self, loader, epoch: int = 0, position: int = 0):
        self.loader, self.epoch, self.position = loader, epoch, position
        self.batches = self._start()

    def _start(self):
        self.loader.dataset.set_epoch(self.epoch)
        self.loader.batch_sampler.set_position(self.epoch, self.position)
        return iter(self.loader)

    def next(self) -> dict:
        batch = next(self.batches, None)
        if batch is None:  # the epoch is finished
            self.epoch, self.position = self.epoch + 1, 0
            self.batches = self._start()
            batch = next(self.batches)
        self.position += 1
        return batch


def make_loader(cfg: Config, split: str = "train", rank: int = 0, world_size: int = 1, drop_last: bool = False):
    """(DataLoader, BucketBatchSampler, CachedDataset) for a split of the cache."""
    dataset = CachedDataset(cfg, split)
    sampler = BucketBatchSampler(dataset.bucket_keys, cfg.batch_size, seed=cfg.seed, drop_last=drop_last,
                                 rank=rank, world_size=world_size)
    # persistent_workers=False: workers are re-created for every iter(loader), so they pick up set_epoch
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.num_workers,
                        pin_memory=torch.cuda.is_available(), persistent_workers=False,
                        worker_init_fn=quiet_worker_exit if cfg.num_workers > 0 else None)
    return loader, sampler, dataset
