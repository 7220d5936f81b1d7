"""dataset.py: the cached data set, its split and randomness, and the bucket batch sampler."""
import os

import pytest
import torch

import preprocess as P
from config import get_config
from dataset import BatchStream, BucketBatchSampler, CachedDataset, collate, make_loader, split_sources
from tiny_models import make_image_folder, save_tiny_t5

SIZES = [(64, 64), (80, 48), (48, 80), (40, 40), (96, 56), (56, 96), (32, 32)] * 3  # 21 images, 3 buckets


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A pixel-space cache of 21 images in 3 buckets, encoded with the tiny T5 (text_dim 32)."""
    root = tmp_path_factory.mktemp("cache")
    save_tiny_t5(str(root / "t5"))
    make_image_folder(str(root / "data"), SIZES)
    cfg = data_cfg(root)
    P.ensure_cache(cfg, verbose=False)
    return root


def data_cfg(root, **kw):
    settings = dict(data_source="folder", data_dir=str(root / "data"), cache_dir=str(root / "cache"),
                    target_resolution=32, bucket_align=8, text_encoder=str(root / "t5"), text_dim=32,
                    max_token_length=8, val_fraction=0.2, caption_dropout=0.3, batch_size=2, seed=3)
    return get_config("tiny", **{**settings, **kw})


def test_items_have_the_documented_shapes_and_types(cache):
    data = CachedDataset(data_cfg(cache), "train")
    val = CachedDataset(data_cfg(cache), "val")
    assert len(data) + len(val) == 21 and len(val) >= 1
    assert not set(data.sources) & set(val.sources)
    item = data[0]
    W, H = data.bucket_keys[0]
    assert item["latents"].shape == (3, H, W) and item["latents"].dtype == torch.float32
    assert item["text"].shape == (8, 32) and item["text"].dtype == torch.float32
    assert item["mask"].shape == (8,) and item["mask"].dtype == torch.bool
    assert item["drop"].dtype == torch.bool and item["drop"].shape == ()
    assert isinstance(item["caption"], str) and item["caption"].endswith("background")
    assert set(data.bucket_keys) == {(32, 32), (40, 24), (24, 40)}
    assert not any(val[i]["drop"] for i in range(len(val)))  # no caption dropout in validation


def test_lazy_and_in_memory_agree_and_latent_norm_uses_the_cache_stats(cache):
    eager = CachedDataset(data_cfg(cache), in_memory=True)
    lazy = CachedDataset(data_cfg(cache), in_memory=False)
    assert eager.in_memory and not lazy.in_memory and CachedDataset(data_cfg(cache)).in_memory
    for i in range(len(eager)):
        a, b = eager[i], lazy[i]
        assert all(torch.equal(a[k], b[k]) for k in ("latents", "text", "mask", "drop"))
    normed = CachedDataset(data_cfg(cache, latent_norm=True, val_fraction=0.0))
    z = torch.cat([normed[i]["latents"].flatten(1) for i in range(len(normed))], 1)  # (C, all pixels)
    assert torch.allclose(z.mean(1), torch.zeros(3), atol=1e-4)
    assert torch.allclose(z.std(1, unbiased=False), torch.ones(3), atol=1e-4)


def test_caption_dropout_and_flips_are_deterministic_per_seed_epoch_index(cache):
    def drops(cfg, epoch):
        data = CachedDataset(cfg)
        data.set_epoch(epoch)
        return [bool(data[i]["drop"]) for i in range(len(data))]

    cfg = data_cfg(cache)
    assert drops(cfg, 0) == drops(cfg, 0)                     # same (seed, epoch): same drops
    many = [drops(cfg, e) for e in range(8)]
    assert len({tuple(d) for d in many}) > 1                  # they change with the epoch
    rate = sum(map(sum, many)) / sum(map(len, many))
    assert 0.15 < rate < 0.45                                 # caption_dropout = 0.3
    assert drops(data_cfg(cache, seed=4), 0) != drops(cfg, 0)
    flip = CachedDataset(data_cfg(cache, hflip=True, caption_dropout=0.0))
    plain = CachedDataset(data_cfg(cache, caption_dropout=0.0))
    flipped = [not torch.equal(flip[i]["latents"], plain[i]["latents"]) for i in range(len(flip))]
    assert any(flipped) and not all(flipped)
    i = flipped.index(True)
    assert torch.equal(flip[i]["latents"], plain[i]["latents"].flip(-1))


def test_split_is_stable_when_files_are_added():
    old = [f"photos/img_{i:04d}.jpg" for i in range(500)]
    new = old + [f"more/extra_{i:04d}.png" for i in range(300)]
    train_old, val_old = split_sources(old, 0.1)
    train_new, val_new = split_sources(new, 0.1)
    assert 25 < len(val_old) < 80
    assert set(val_new) & set(old) == set(val_old) and set(train_new) & set(old) == set(train_old)
    assert split_sources(["a.png", "b.png"], 0.01)[1]  # tiny sets still get one validation file
    assert split_sources(old, 0.0)[1] == []


def test_errors_name_the_file_or_setting(cache, tmp_path):
    cfg = data_cfg(cache)
    with pytest.raises(P.CacheError, match="max_token_length"):
        CachedDataset(data_cfg(cache, max_token_length=9))
    with pytest.raises(P.CacheError, match="no cache"):
        CachedDataset(data_cfg(cache, cache_dir=str(tmp_path / "empty")))
    # a corrupt file in a copy of the cache
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(cfg.cache_dir, copy)
    bad_cfg = data_cfg(cache, cache_dir=str(copy))
    victim = CachedDataset(bad_cfg, in_memory=False).paths[2]
    with open(victim, "wb") as f:
        f.write(b"garbage")
    lazy = CachedDataset(bad_cfg, in_memory=False)
    with pytest.raises(P.CacheError, match=os.path.basename(victim)):
        lazy[2]
    with pytest.raises(P.CacheError, match=os.path.basename(victim)):
        CachedDataset(bad_cfg, in_memory=True)
    os.remove(victim)
    with pytest.raises(P.CacheError, match=os.path.basename(victim)):
        CachedDataset(bad_cfg, in_memory=False)


# --- the sampler ---------------------------------------------------------------------------------------

KEYS = [(32, 32)] * 13 + [(40, 24)] * 7 + [(24, 40)] * 5 + [(48, 16)] * 1  # 26 items, 4 buckets


def test_batches_are_single_bucket_and_cover_the_epoch_once():
    sampler = BucketBatchSampler(KEYS, 4, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 4 + 2 + 2 + 1
    assert all(len({KEYS[i] for i in b}) == 1 for b in batches)
    assert sorted(i for b in batches for i in b) == list(range(len(KEYS)))
    assert [len({KEYS[b[0]] for b in batches[:k]}) for k in (4,)][0] > 1  # buckets interleaved
    dropped = BucketBatchSampler(KEYS, 4, seed=1, drop_last=True)
    assert len(list(dropped)) == 3 + 1 + 1 and all(len(b) == 4 for b in dropped)


def test_order_is_deterministic_per_seed_and_epoch():
    a, b = BucketBatchSampler(KEYS, 4, seed=1), BucketBatchSampler(list(KEYS), 4, seed=1)
    assert list(a) == list(b)
    a.set_epoch(1)
    assert list(a) != list(b)
    b.set_epoch(1)
    assert list(a) == list(b)
    assert list(BucketBatchSampler(KEYS, 4, seed=2)) != list(BucketBatchSampler(KEYS, 4, seed=1))


@pytest.mark.parametrize("world,drop_last", [(2, False), (3, False), (3, True), (4, True)])
def test_ranks_get_disjoint_batches_and_the_same_count(world, drop_last):
    samplers = [BucketBatchSampler(KEYS, 3, seed=5, drop_last=drop_last, rank=r, world_size=world)
                for r in range(world)]
    per_rank = [list(s) for s in samplers]
    assert len({len(p) for p in per_rank}) == 1 and all(len(s) == len(per_rank[0]) for s in samplers)
    single = list(BucketBatchSampler(KEYS, 3, seed=5, drop_last=drop_last))
    if len(single) % world == 0 or drop_last:  # no padding: batches are disjoint across ranks
        seen = [i for p in per_rank for b in p for i in b]
        assert len(seen) == len(set(seen))
    else:  # padded by repeating: every sample is still seen, a few batches twice
        assert {i for p in per_rank for b in p for i in b} == set(range(len(KEYS)))
        assert sum(map(len, per_rank)) - len(single) < world


def test_resume_mid_epoch_gives_exactly_the_remaining_batches():
    sampler = BucketBatchSampler(KEYS, 3, seed=7, rank=1, world_size=2)
    sampler.set_epoch(4)
    full = list(sampler)
    sampler.set_position(4, 3)
    assert len(sampler) == len(full) - 3 and list(sampler) == full[3:]
    fresh = BucketBatchSampler(KEYS, 3, seed=7, rank=1, world_size=2)  # a new process after a restart
    fresh.set_position(4, 3)
    assert list(fresh) == full[3:]
    fresh.set_position(4, len(full))
    assert list(fresh) == [] and len(fresh) == 0


def test_loader_yields_collated_single_bucket_batches(cache):
    cfg = data_cfg(cache)
    loader, sampler, data = make_loader(cfg, "train")
    sampler.set_position(0, 0)
    batches = list(loader)
    assert len(batches) == len(sampler) and sum(len(b["captions"]) for b in batches) == len(data)
    for b in batches:
        B, C, H, W = b["latents"].shape
        assert b["text"].shape == (B, 8, 32) and b["mask"].shape == (B, 8) and b["drop"].shape == (B,)
        assert C == 3 and (W, H) in {(32, 32), (40, 24), (24, 40)}
    i, j = [k for k in range(len(data)) if data.bucket_keys[k] == data.bucket_keys[0]][:2]
    one = collate([data[i], data[j]])
    assert one["latents"].shape[0] == 2 and one["captions"] == [data[i]["caption"], data[j]["caption"]]
    other = data.bucket_keys.index(next(k for k in data.bucket_keys if k != data.bucket_keys[0]))
    with pytest.raises(ValueError, match="bucket"):
        collate([data[i], data[other]])
    # two workers give exactly the same batches (randomness comes from (seed, epoch, index))
    cfg2 = data_cfg(cache, num_workers=2)
    loader2, sampler2, data2 = make_loader(cfg2, "train")
    data.set_epoch(1), data2.set_epoch(1), sampler.set_epoch(1), sampler2.set_epoch(1)
    for a, b in zip(loader, loader2):
        assert torch.equal(a["latents"], b["latents"]) and torch.equal(a["drop"], b["drop"])


def test_a_batch_stream_goes_on_across_epochs_and_from_a_saved_position(cache):
    """BatchStream: epoch after epoch (the epoch's own order, caption dropout), its position counting the batches
    taken; a stream started at a position it reported gives the same batches as the one that reported it."""
    stream = BatchStream(make_loader(data_cfg(cache), "train")[0])
    reference, sampler, data = make_loader(data_cfg(cache), "train")
    n = len(sampler)
    epochs = []
    for epoch in (0, 1):
        data.set_epoch(epoch), sampler.set_epoch(epoch)
        epochs += list(reference)
    taken = [stream.next() for _ in range(n + 3)]
    assert (stream.epoch, stream.position) == (1, 3)
    for got, expected in zip(taken, epochs):  # epoch 1 in its order, with its caption dropout
        assert got["captions"] == expected["captions"] and torch.equal(got["drop"], expected["drop"])
    assert not all(torch.equal(a["drop"], b["drop"]) for a, b in zip(epochs[:n], epochs[n:]))  # (they differ)
    position = (stream.epoch, stream.position)
    ahead = [stream.next() for _ in range(n)]
    again = BatchStream(make_loader(data_cfg(cache), "train")[0], *position)  # a resumed run
    for a, b in zip(ahead, [again.next() for _ in range(n)]):
        assert a["captions"] == b["captions"] and torch.equal(a["drop"], b["drop"])
    assert (again.epoch, again.position) == (stream.epoch, stream.position) == (2, 3)


def test_loader_with_drop_last_gives_full_batches_only(cache):
    """What compiled training uses (one graph per bucket): every batch full, each bucket's remainder dropped."""
    cfg = data_cfg(cache, batch_size=3)
    kept, sampler, data = make_loader(cfg, "train")
    full, full_sampler, _ = make_loader(cfg, "train", drop_last=True)
    per_bucket = [data.bucket_keys.count(k) for k in set(data.bucket_keys)]
    assert any(n % 3 for n in per_bucket)  # the data has short batches to drop
    sizes = [len(b["captions"]) for b in kept]
    full_sizes = [len(b["captions"]) for b in full]
    assert min(sizes) < 3 and sum(sizes) == len(data)
    assert set(full_sizes) == {3} and len(full_sizes) == len(full_sampler) == sum(n // 3 for n in per_bucket)


@pytest.mark.parametrize("torchrun", [False, True])
def test_a_dataloader_worker_leaves_a_sigterm_to_the_main_process(torchrun, monkeypatch):
    """quiet_worker_exit: alone, a worker ends quietly on SIGTERM (KeyboardInterrupt, which PyTorch's worker loop
    catches); under torchrun it ignores it: a rank whose worker ended cannot finish the step the other ranks wait
    in, so the job stopped without checkpointing it (torchrun passes its SIGTERM on to the workers' groups)."""
    import signal
    from dataset import quiet_worker_exit
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    if torchrun:
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    before = signal.getsignal(signal.SIGTERM)
    try:
        quiet_worker_exit(0)
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            ended = False
        except KeyboardInterrupt:  # (caught here: it would end the whole test session)
            ended = True
        assert ended == (not torchrun)
    finally:
        signal.signal(signal.SIGTERM, before)
