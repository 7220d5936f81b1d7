"""Speed, MFU and memory of training, sampling and preprocessing on whatever device is present.

    python bench.py                                   # shapes preset on this machine
    python bench.py flowers batch_size=16             # the full model at a 448x448 bucket
    python bench.py flowers peak_tflops=165           # MFU against a peak you give (e.g. RTX 4090 bf16)
    python bench.py flowers --compare grad_checkpointing=true    # baseline vs change, interleaved
    python bench.py tiny --only train steps=5 warmup=2
    python bench.py tiny --only sample preprocess     # several parts: listed, comma-separated or --only again
    python bench.py flowers --profile                 # torch.profiler table of the train step's kernels

Inputs are synthetic (random latents and text embeddings of the preset's shapes), so no data is needed.
Prints a small table and one JSON line (for tracking over time). Benchmarks print figures; they are not
timed tests.
"""
import json
import os
import resource
import statistics
import sys
import time
from dataclasses import fields

import torch

from config import (Config, ConfigError, apply_overrides, exit_with_help_if_asked, main_guard, parse_args,
                    resolve_device, unknown_setting)

# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, matched against the device name;
# fp16 for the pre-Ampere T4 and V100, where mixed_precision=auto trains in fp16.
PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.0,
               "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 70.0, "A10": 125.0,
               "RTX 4090": 165.2, "RTX 4080": 97.5, "RTX 3090": 71.0, "RTX A6000": 155.0,
               "T4": 65.0, "V100": 125.0}
BENCH_DEFAULTS = {"steps": 10, "warmup": 3, "peak_tflops": 0.0, "sample_batch": 8, "sample_steps": 30,
                  "rounds": 3, "padded": 1}  # padded=0: every caption fills max_token_length (no attention mask)
CONFIG_KEYS = [f.name for f in fields(Config)]
PARTS = ("train", "sample", "preprocess")


def peak_for(device) -> float:
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_TFLOPS.items():
        if key in name:
            return peak
    return 0.0


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux -> GiB


def synthetic_batch(cfg, device, batch_size, padded=True, gen=None):
    """Random latents at the square bucket and text embeddings with a realistic padding mask."""
    side = cfg.target_resolution // cfg.vae_downsample
    side -= side % cfg.patch_size
    L = cfg.max_token_length
    # captions rarely fill max_token_length: lengths between a quarter and three quarters of it
    lengths = torch.randint(max(1, L // 4), max(2, 3 * L // 4) + 1, (batch_size,), generator=gen) if padded \
        else torch.full((batch_size,), L)
    mask = torch.arange(L)[None] < lengths[:, None]
    return {"latents": torch.randn(batch_size, cfg.latent_channels, side, side, generator=gen).to(device),
            "text": torch.randn(batch_size, L, cfg.text_dim, generator=gen).to(device),
            "mask": mask.to(device), "drop": torch.zeros(batch_size, dtype=torch.bool, device=device)}


class TrainStep:
    """One configuration's model, EMA and optimiser, and a timed training step."""

    def __init__(self, cfg, device, padded=True):
        import train as T
        from model import DiTConfig, SingleStreamDiT
        self.cfg, self.device, self.T = cfg, device, T
        torch.manual_seed(cfg.seed)
        self.model = SingleStreamDiT(DiTConfig.from_config(cfg)).to(device)
        self.ema = SingleStreamDiT(DiTConfig.from_config(cfg)).to(device).requires_grad_(False)
        self.opt = T.make_optimizer(self.model, cfg)
        self.loss_scale = T.LossScale(device, enabled=T.precision_for(cfg, device) == torch.float16)
        self.fwd = T.compile_for_training(self.model, cfg, device)
        self.gen = torch.Generator(device=device).manual_seed(0)
        self.batch = T.to_device(synthetic_batch(cfg, device, cfg.batch_size, padded), device, cfg.trim_text)
        self.images_per_step = cfg.batch_size * cfg.grad_accum

    def phases(self):
        """The step as (name, callable) phases: forward, backward, optimiser update (as train.py)."""
        loss = []
        # self_consistency_loss: the EMA forward it adds to a step (train.py's steps after its start)
        ema = self.ema if self.cfg.self_consistency_loss > 0 else None

        def forward():
            with self.T.autocast_for(self.cfg, self.device):
                loss.append(self.T.flow_matching_loss(self.fwd, self.batch, self.cfg, self.gen, ema)[0])

        # grad_accum micro-steps (on the same batch), then one update: as train.py's step
        backward = ("backward", lambda: self.loss_scale.backward(loss.pop() / self.cfg.grad_accum))
        return [("forward", forward), backward] * self.cfg.grad_accum + [
            ("optimizer", lambda: self.T.optimizer_update(self.model, self.ema, self.opt, self.cfg, step=10**6,
                                                          loss_scale=self.loss_scale))]

    def step(self):
        self.opt.zero_grad(set_to_none=True)
        for _, run in self.phases():
            run()

    def memory_phases(self) -> dict:
        """CUDA peak memory (GiB) within the forward, the backward and the optimiser update of one step."""
        if self.device.type != "cuda":
            return {}
        out = {}
        self.opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize(self.device)
        for phase, run in self.phases():
            torch.cuda.reset_peak_memory_stats(self.device)
            run()
            torch.cuda.synchronize(self.device)
            out[f"peak_mem_{phase}_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return out

    def time(self, steps) -> float:
        if steps == 0:  # warmup=0
            return 0.0
        sync(self.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step()
        sync(self.device)
        return (time.perf_counter() - t0) / steps

    def phase_times(self, steps) -> dict:
        """Seconds per step in the forward, the backward and the optimiser update (EMA included), the
        device synchronised around each: where the time of a step goes."""
        out = {}
        for _ in range(steps):
            self.opt.zero_grad(set_to_none=True)
            for phase, run in self.phases():
                sync(self.device)
                t0 = time.perf_counter()
                run()
                sync(self.device)
                out[f"phase_{phase}_s"] = out.get(f"phase_{phase}_s", 0.0) + (time.perf_counter() - t0) / steps
        return out

    def flops_per_step(self) -> float:
        from model import DiTConfig, flops_per_image
        h, w = self.batch["latents"].shape[-2:]
        text_len = self.batch["text"].shape[1]  # after trimming: the work actually done
        return 3 * flops_per_image(DiTConfig.from_config(self.cfg), h, w, text_len) * self.images_per_step


def bench_train(cfg, device, opts) -> dict:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runner = TrainStep(cfg, device, bool(opts["padded"]))
    runner.time(opts["warmup"])
    sec = runner.time(opts["steps"])
    tflops = runner.flops_per_step() / sec / 1e12
    peak = opts["peak_tflops"] or peak_for(device)
    return {"train_s_per_step": sec, "train_images_per_s": runner.images_per_step / sec, "train_tflops": tflops,
            "mfu": tflops / peak if peak else None, "peak_tflops": peak or None,
            "peak_mem_gib": peak_memory_gib(device), **runner.phase_times(min(opts["steps"], 10)),
            **runner.memory_phases()}


@torch.no_grad()
def bench_sample(cfg, device, opts) -> dict:
    """Seconds per image per NFE with CFG batched (one forward of 2B) and unbatched (two forwards of B), with
    the preset's sampler (sampler=euler|heun|rk4) over sample_steps steps."""
    import samplers as S
    import train as T
    from model import DiTConfig, SingleStreamDiT
    model = SingleStreamDiT(DiTConfig.from_config(cfg)).to(device).eval()
    b = T.to_device(synthetic_batch(cfg, device, opts["sample_batch"]), device, cfg.trim_text)
    pred = S.Prediction.from_config(cfg)
    batched = S.guided_velocity_fn(model, b["text"], b["mask"], cfg.cfg_scale, pred)
    cond = S.guided_velocity_fn(model, b["text"], b["mask"], 1.0, pred)

    def unbatched(x, t):  # the naive way: a second forward for the unconditional branch
        drop = torch.ones(x.shape[0], dtype=torch.bool, device=device)
        v_u = pred.velocity(model(x, t, b["text"], b["mask"], drop), x, t)
        v_c = cond(x, t)
        return v_u + cfg.cfg_scale * (v_c - v_u)

    out = {"sampler": cfg.sampler}
    nfe = S.nfe_for(cfg.sampler, opts["sample_steps"])
    for name, fn in (("cfg_batched", batched), ("cfg_unbatched", unbatched)):
        def run():
            with T.autocast_for(cfg, device):
                S.sample_ode(fn, torch.randn_like(b["latents"]), opts["sample_steps"], cfg.sampler)
        run()
        sync(device)
        t0 = time.perf_counter()
        run()
        sync(device)
        sec = time.perf_counter() - t0
        out[f"sample_{name}_s_per_image_per_nfe"] = sec / (opts["sample_batch"] * nfe)
        out[f"sample_{name}_s_per_image"] = sec / opts["sample_batch"]  # at sample_steps steps of the sampler
    return out


@torch.no_grad()
def bench_preprocess(cfg, device, opts) -> dict:
    """Images/s through the latent space (VAE) and captions/s through the text encoder, batched."""
    out = {}
    side = cfg.target_resolution - cfg.target_resolution % cfg.bucket_align
    images = torch.rand(opts["sample_batch"], 3, side, side, device=device) * 2 - 1
    from preprocess import encode_device_and_dtype
    _, dtype = encode_device_and_dtype(cfg, distributed=False)  # the precision preprocess.py encodes in
    try:
        from latents import LatentSpace
        space = LatentSpace.from_config(cfg, device=device, dtype=dtype)
        space.encode(images)
        sync(device)
        t0 = time.perf_counter()
        space.encode(images)
        sync(device)
        out["vae_images_per_s"] = images.shape[0] / (time.perf_counter() - t0)
    except Exception as e:  # no local VAE weights: report, do not fail the other figures
        out["vae_images_per_s"] = f"skipped ({str(e).splitlines()[0][:80]})"
    try:
        from text_encoder import load_text_encoder
        enc = load_text_encoder(cfg, device=device, dtype=dtype)
        captions = ["a small red circle in the top left on a white background"] * opts["sample_batch"]
        enc.encode(captions)
        sync(device)  # the warm-up's GPU work done before the clock starts, as for the VAE
        t0 = time.perf_counter()
        enc.encode(captions)
        sync(device)
        out["text_captions_per_s"] = len(captions) / (time.perf_counter() - t0)
    except Exception as e:
        out["text_captions_per_s"] = f"skipped ({str(e).splitlines()[0][:80]})"
    return out


def profile_train(cfg, device, opts, rows=25) -> dict:
    """Print torch.profiler's table of the training step's operators, most device time first."""
    from torch.profiler import ProfilerActivity, profile
    runner = TrainStep(cfg, device, bool(opts["padded"]))
    runner.time(opts["warmup"])
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        runner.time(opts["steps"])
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=60))
    return {"profiled_steps": opts["steps"]}


def compare(cfg_a, cfg_b, device, opts) -> dict:
    """Baseline vs change in one process, interleaved rounds; ratio > 1 means B is faster."""
    a, b = TrainStep(cfg_a, device, bool(opts["padded"])), TrainStep(cfg_b, device, bool(opts["padded"]))
    a.time(opts["warmup"])
    b.time(opts["warmup"])
    times_a, times_b = [], []
    for _ in range(opts["rounds"]):
        times_a.append(a.time(opts["steps"]))
        times_b.append(b.time(opts["steps"]))
    ta, tb = statistics.median(times_a), statistics.median(times_b)
    return {"a_s_per_step": ta, "b_s_per_step": tb, "speedup_b_over_a": ta / tb}


def split_args(argv):
    """Bench options (steps=, warmup=, peak_tflops=, ..., --only, --compare ...) apart from Config overrides."""
    exit_with_help_if_asked(argv)
    opts, only, compare_overrides, rest = dict(BENCH_DEFAULTS), None, None, []
    if "--profile" in argv:
        argv = [a for a in argv if a != "--profile"]
        only = ["profile"]
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--only":  # the word after it, and the part names that follow; a repeated --only adds
            if i + 1 == len(argv):
                raise ConfigError("--only: expected train, sample and/or preprocess after it")
            parts = argv[i + 1].split(",")
            i += 2
            while i < len(argv) and set(argv[i].split(",")) <= set(PARTS):  # (not a preset after them)
                parts += argv[i].split(",")
                i += 1
            only = list(dict.fromkeys((only or []) + parts))  # in order, each once
            continue
        if arg == "--compare":  # the changes to the end; bench settings among them (steps=...) are those
            changes = [a for a in argv[i + 1:] if a.partition("=")[0] not in BENCH_DEFAULTS]
            bad = [a for a in changes if "=" not in a or a.startswith("=")]
            if not changes or bad:
                raise ConfigError(f"--compare{''.join(' ' + b for b in bad)}: expected the change as key=value ... "
                                  "after it")
            compare_overrides = dict(a.split("=", 1) for a in changes)
            argv = argv[:i] + [a for a in argv[i + 1:] if a not in changes]
            continue
        key, sep, value = arg.partition("=")
        if sep and key in BENCH_DEFAULTS:
            try:
                opts[key] = type(BENCH_DEFAULTS[key])(value)
            except ValueError:
                raise ConfigError(f"{key}={value!r}: expected a number") from None
        elif sep and key and key.lstrip("-") not in CONFIG_KEYS:  # parse_args would suggest Config keys only
            raise unknown_setting(key, list(BENCH_DEFAULTS) + CONFIG_KEYS)
        else:
            rest.append(arg)
        i += 1
    lowest = {"steps": 1, "rounds": 1, "sample_batch": 1, "sample_steps": 1, "warmup": 0, "peak_tflops": 0}
    for key, low in lowest.items():
        if opts[key] < low:
            raise ConfigError(f"{key}={opts[key]}: must be >= {low}")
    if opts["padded"] not in (0, 1):
        raise ConfigError(f"padded={opts['padded']}: must be 0 or 1")
    return parse_args(rest), opts, only, compare_overrides


def main():
    cfg, opts, only, compare_overrides = split_args(sys.argv[1:])
    device = resolve_device(cfg.device)
    from runtime import allow_tf32
    allow_tf32()
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"  # CPU: the threads torch computes with
            else f"CPU ({torch.get_num_threads()} torch threads / {os.cpu_count()} CPUs)")
    result = {"preset": cfg.run_name, "device": name, "batch_size": cfg.batch_size,
              "resolution": cfg.target_resolution, "tokens_text": cfg.max_token_length}
    if compare_overrides is not None and only and set(only) != {"train"}:
        raise ConfigError(f"--compare times training steps only, not --only {','.join(only)}: time those without "
                          "--compare, once per setting")
    if compare_overrides is not None:
        cfg_b = apply_overrides(cfg, compare_overrides).validate()
        same = [f"{k}={v}" for k, v in compare_overrides.items() if getattr(cfg_b, k) == getattr(cfg, k)]
        if same:  # e.g. a preset's default given again: that part of B is A, its ratio is noise around 1
            print(f"warning: --compare {' '.join(same)}: the baseline has {'these' if len(same) > 1 else 'it'} "
                  "already" + (" (nothing to compare)" if len(same) == len(compare_overrides) else ""),
                  file=sys.stderr)
        result.update(compare(cfg, cfg_b, device, opts), compare=compare_overrides)
    else:
        parts = only or list(PARTS)
        unknown = [p for p in parts if p not in PARTS + ("profile",)]
        if unknown:
            raise ConfigError(f"--only {','.join(unknown)}: expected train, sample and/or preprocess")
        for part in parts:
            result.update({"train": bench_train, "sample": bench_sample, "preprocess": bench_preprocess,
                           "profile": profile_train}[part](
                cfg, device, opts))
    print(f"bench on {name}:")
    for key, value in result.items():
        shown = f"{value:.4g}" if isinstance(value, float) else value
        print(f"  {key:40s} {shown}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main_guard(main)
