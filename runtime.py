"""Where and how train.py's step runs: torchrun's process group and device, the precision (autocast dtype:
bf16, fp16 or fp32), torch.compile, and moving a batch to the device."""
import importlib.util
import os
from contextlib import nullcontext
from datetime import timedelta

import torch
import torch.distributed as dist

import samplers as S
from config import Config, ConfigError, native_bf16


# how long a rank waits in a collective for the others: NCCL's default, 10 minutes, ends the job when the ranks
# finish their shares of a long preprocessing that far apart (the other ranks' encoded files then are lost) or
# rank 0 alone is slow (a checkpoint to a network disk); a process that dies ends the job at once anyway (torchrun)
PROCESS_GROUP_TIMEOUT = timedelta(hours=2)


def init_process_group():
    """torchrun's process group: NCCL on GPUs, gloo on CPUs, with PROCESS_GROUP_TIMEOUT."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, timeout=PROCESS_GROUP_TIMEOUT)
    return backend


def setup_distributed():
    """(rank, world_size, device) from torchrun's environment, or a single process."""
    if "RANK" not in os.environ:
        return 0, 1, None
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", 0))
    backend = init_process_group()
    device = torch.device(f"cuda:{local}") if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return rank, world, device


class StaticImageSize(torch.nn.Module):
    """A compiled model whose input height and width are marked static, so each bucket compiles its own
    graph (text length may still turn dynamic; the batch size is fixed: compiled runs drop short batches).
    With symbolic H and W, inductor (torch 2.11-2.13) fails to lower the unpatchify ("cannot determine
    truth value of Relational") as soon as a second bucket shape arrives."""

    def __init__(self, compiled):
        super().__init__()
        self.compiled = compiled

    def forward(self, x, *args, **kwargs):
        torch._dynamo.mark_static(x, 2)
        torch._dynamo.mark_static(x, 3)
        return self.compiled(x, *args, **kwargs)


def use_compile(cfg: Config, device) -> bool:
    """cfg.compile resolved: auto compiles on GPUs that Triton (inductor's GPU compiler) supports, compute
    capability 7.0+ (Kaggle's P100 or a GTX 10xx would fail at the first step), not on CPUs: on 2 CPU cores
    compiling the shapes preset makes a step ~1.2x faster but costs ~3 min of compiling (one graph per
    bucket), a loss in a 13.5-minute run."""
    if cfg.compile == "on" and device.type == "cuda" and not triton_installed():  # else: a traceback at step 1
        raise ConfigError("compile=on: torch.compile needs Triton on a GPU, and it is not installed (pip install "
                          "triton, or triton-windows on Windows), or compile=off")
    if cfg.compile != "auto":
        return cfg.compile == "on"
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 7 and triton_installed()


def triton_installed() -> bool:
    """Whether inductor's GPU compiler is there: pip's Linux CUDA torch brings it, Windows and some conda builds
    do not (there compile=auto trains eager; `pip install triton-windows` / `triton` enables it)."""
    return importlib.util.find_spec("triton") is not None


def compile_for_training(model, cfg: Config, device):
    """The callable to train with: the model, torch.compile'd when use_compile(cfg, device).

    With grad_checkpointing each block is compiled on its own (regional compilation) and checkpointed
    around: compiling the whole model lets inductor's partitioner choose what to save, and on an H100 it
    kept most activations (flowers, batch 16: 8.9 GiB peak, vs 3.8 GiB for eager checkpointing).
    """
    if not use_compile(cfg, device):
        return model
    # One graph per bucket: a few compiles, then every bucket runs its own static-shape graph.
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 64))
    if not cfg.grad_checkpointing:
        return StaticImageSize(torch.compile(model, mode=cfg.compile_mode))
    for blocks in (model.noise_refiner, model.context_refiner, model.joint_blocks, model.final_stack):
        for block in blocks:
            block.compile(mode=cfg.compile_mode)
    return model


def precision_for(cfg: Config, device):
    """The autocast dtype, or None for fp32. auto: bf16 on GPUs with native bf16 (compute capability 8+),
    fp16 with a loss scale (optim.LossScale) on Volta/Turing (7.x: V100, T4, RTX 20xx), fp32 on older GPUs
    (fp16 at a fraction of fp32 speed there) and on CPUs (bf16 matmuls are ~25x slower on ours)."""
    precision = cfg.mixed_precision
    if precision == "auto":
        volta_turing = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 7
        precision = "bf16" if native_bf16(device) else "fp16" if volta_turing else "fp32"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def autocast_for(cfg: Config, device):
    dtype = precision_for(cfg, device)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def allow_tf32():
    """Let fp32 matmuls and convolutions on Ampere+ GPUs use TF32 tensor cores (10-bit mantissa products,
    fp32 sums; nanoGPT does the same): the parts of a step that stay fp32 under autocast, and fp32 runs."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def peak_memory_mb(device):
    """log.csv's peak_mem_mb: the most memory the run's GPU has held allocated so far (MiB), "" on other devices.
    Asked of that device: a run on cuda:1 (a single process leaves the current device at cuda:0) would read
    cuda:0's, nothing."""
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else ""


def to_device(batch: dict, device, trim_text=False) -> dict:
    """Move a batch; with trim_text, cut the text to the longest caption (padding is never attended)."""
    if trim_text:
        text, mask = S.trim_padding(batch["text"], batch["mask"])
        batch = dict(batch, text=text, mask=mask)
    # computed on the host before the copy, so the model needs no host-device sync to pick its kernel
    batch = dict(batch, text_padded=bool((~batch["mask"]).any() or batch["drop"].any()))
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
