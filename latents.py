"""Latent-space conventions in one place: what the model sees and how to get back to pixels.

Three conventions (cfg.latent_space), each an encode-side transform with an exact inverse:

    flux   z = (vae_latent - shift) * scale     FLUX.1 / SD3 VAEs (scale, shift from the VAE's config)
    sd     z = vae_latent * scale                SD 1.x / SDXL VAEs (scale from the VAE's config)
    pixel  z = image                             no VAE: the model works on [-1, 1] pixels directly

Scale and shift are always read from the VAE's own config (`scaling_factor`, `shift_factor`), never
copied here, so a different VAE cannot silently get the wrong constants. On top, cfg.latent_norm
standardises ((z - mean) / std) with the data set's per-channel statistics that preprocess.py stores in the
cache manifest.

The cache holds latents after scale/shift and before the optional mean/std (so latent_norm can be
switched without re-encoding); `normalize` / `denormalize` apply the last step.
"""
import os

import numpy as np
import torch
from PIL import Image

from config import Config, ConfigError


def files_only(name: str) -> bool:
    """True when loading `name` must not touch the network: a local folder, or HF_HUB_OFFLINE=1.

    A hub id otherwise loads from the Hugging Face cache and downloads only what is missing there.
    """
    return os.path.isdir(name) or os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false", "no")


LATENT_STATS = "latent_stats.json"  # in a run folder: the latent mean/std its training data had (latent_norm)
HUB_HINT = "not in the Hugging Face cache and not downloadable: check the id, log in with `hf auth login` " \
           "for gated repos, or give a local folder; offline, HF_HUB_OFFLINE=1 skips the network retries"


def looks_like_path(name: str) -> bool:
    """Whether a vae=/text_encoder= value means a local folder rather than a hub id. A hub id is exactly
    "name" or "org/name"; a leading /, . or ~, a second '/', a backslash (Windows) or a drive letter make a path."""
    return (name.startswith(("/", ".", "~")) or name.count("/") > 1
            or any(sep in name for sep in (os.sep, os.altsep) if sep and sep != "/")
            or os.path.splitdrive(name)[0] != "")


def check_local_folder(key: str, name: str):
    """A path that is not a folder is a one-line error here: the loaders would take it for a hub id and talk
    of logins and repo id formats."""
    if not looks_like_path(name) or os.path.isdir(name):
        return
    if os.path.isdir(os.path.expanduser(name)):
        raise ConfigError(f"{key}={name!r}: no such folder (~ is not expanded here: give the full path)")
    raise ConfigError(f"{key}={name!r}: {'not a folder' if os.path.exists(name) else 'no such folder'}")


def _hub_error_line(err: Exception) -> str:
    """The first line of a loader's error: enough to see why, short enough for one line."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


def load_vae(cfg: Config, device="cpu", dtype=torch.float32):
    """diffusers AutoencoderKL from cfg.vae (hub id or local folder), in eval mode, no grad."""
    from diffusers import AutoencoderKL  # heavy import: only when a VAE is really needed
    from diffusers.utils import logging as diffusers_logging

    check_local_folder("vae", cfg.vae)
    local = os.path.isdir(cfg.vae)
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # its list of missing weights: we say it in one line below
    try:
        vae, info = AutoencoderKL.from_pretrained(cfg.vae, subfolder=cfg.vae_subfolder or None,
                                                  torch_dtype=dtype, local_files_only=files_only(cfg.vae),
                                                  low_cpu_mem_usage=False, output_loading_info=True)
    except Exception as e:  # OSError, EnvironmentError, HTTP errors, bad config: one line for the user
        where = "local folder" if local else f"hub id ({HUB_HINT})"
        raise ConfigError(f"vae={cfg.vae!r} (vae_subfolder={cfg.vae_subfolder!r}): cannot load an "
                          f"AutoencoderKL from this {where}: {_hub_error_line(e)}") from None
    finally:
        diffusers_logging.set_verbosity(verbosity)
    # diffusers leaves weights missing from the checkpoint uninitialised (a config that does not fit its
    # weights, a decoder-less file): latents and images would be garbage, so refuse as text_encoder.py does
    if info["missing_keys"]:
        raise ConfigError(f"vae={cfg.vae!r} (vae_subfolder={cfg.vae_subfolder!r}): {len(info['missing_keys'])} "
                          f"VAE weights are not in the checkpoint (e.g. {sorted(info['missing_keys'])[0]}); "
                          "they would be random")
    check_vae_matches(cfg, vae.config)
    return vae.to(device).eval().requires_grad_(False)


_load_vae = load_vae  # LatentSpace.from_config has an argument of the same name


def vae_downsample_of(vae_config) -> int:
    """Pixels per latent pixel: the encoder halves the size in every block but the last."""
    return 2 ** (len(vae_config.block_out_channels) - 1)


def check_vae_matches(cfg: Config, vae_config):
    if vae_config.latent_channels != cfg.latent_channels:
        raise ConfigError(f"latent_channels={cfg.latent_channels} but the VAE {cfg.vae!r} has "
                          f"{vae_config.latent_channels} latent channels")
    if vae_downsample_of(vae_config) != cfg.vae_downsample:
        raise ConfigError(f"vae_downsample={cfg.vae_downsample} but the VAE {cfg.vae!r} downsamples "
                          f"by {vae_downsample_of(vae_config)}")


def scale_shift_from_vae_config(latent_space: str, vae_config) -> tuple:
    """(scale, shift) for a convention, from the VAE's own config."""
    scale = float(vae_config.scaling_factor)
    shift = float(getattr(vae_config, "shift_factor", None) or 0.0)
    if latent_space == "sd":
        shift = 0.0  # SD convention: z * scale, no shift (SD VAEs have shift_factor None)
    return scale, shift


class LatentSpace:
    """Encode images to the model's latent space and decode back; pure transforms in to_model/from_model."""

    def __init__(self, kind="pixel", scale=1.0, shift=0.0, mean=None, std=None, vae=None,
                 channels=3, downsample=1):
        self.kind = kind
        self.scale, self.shift = float(scale), float(shift)
        self.vae = vae
        self.channels, self.downsample = channels, downsample
        # per-channel stats of the cached latents, (C,) float32, or None (no normalisation)
        self.mean = None if mean is None else torch.as_tensor(mean, dtype=torch.float32)
        self.std = None if std is None else torch.as_tensor(std, dtype=torch.float32)

    @classmethod
    def from_config(cls, cfg: Config, device="cpu", stats=None, load_vae=True, dtype=torch.float32):
        """The latent space cfg asks for.

        stats: the cache manifest (or any dict with latent_mean/latent_std and optionally scale/shift);
        its mean/std are used only when cfg.latent_norm. load_vae=False gives the pure transforms only
        (scale/shift then come from stats, or from the VAE's config file without loading weights).
        """
        mean = std = None
        if cfg.latent_norm and stats is not None and stats.get("latent_mean") is not None:
            mean, std = stats["latent_mean"], stats["latent_std"]
            if len(mean) != cfg.latent_channels:
                raise ConfigError(f"latent_channels={cfg.latent_channels} but the cache stats have "
                                  f"{len(mean)} channels")
        if cfg.latent_space == "pixel":
            return cls("pixel", 1.0, 0.0, mean, std, None, cfg.latent_channels, 1)
        vae = None
        if load_vae:
            vae = _load_vae(cfg, device, dtype)
            scale, shift = scale_shift_from_vae_config(cfg.latent_space, vae.config)
        elif stats is not None and stats.get("scale") is not None:
            scale, shift = float(stats["scale"]), float(stats["shift"])
        else:
            scale, shift = scale_shift_from_vae_config(cfg.latent_space, load_vae_config(cfg))
        return cls(cfg.latent_space, scale, shift, mean, std, vae, cfg.latent_channels, cfg.vae_downsample)

    # --- the pure transforms (exact inverses of each other) ---

    def _stat(self, s, z):
        return s.to(z.device).view(-1, 1, 1)  # (C, 1, 1): broadcasts over (B, C, h, w) and (C, h, w)

    def normalize(self, z):
        """Cached latents -> model latents (per-channel mean/std, if enabled)."""
        if self.mean is None:
            return z
        return (z - self._stat(self.mean, z)) / self._stat(self.std, z)

    def denormalize(self, z):
        if self.mean is None:
            return z
        return z * self._stat(self.std, z) + self._stat(self.mean, z)

    def scale_shift(self, z_raw):
        """Raw VAE latents -> cached latents: (z - shift) * scale."""
        return (z_raw.float() - self.shift) * self.scale

    def unscale_shift(self, z):
        return z.float() / self.scale + self.shift

    def to_model(self, z_raw):
        """Raw VAE latents (or [-1, 1] pixels) -> what the model sees."""
        return self.normalize(self.scale_shift(z_raw))

    def from_model(self, z):
        """What the model sees -> raw VAE latents (or [-1, 1] pixels)."""
        return self.unscale_shift(self.denormalize(z.float()))

    # --- through the VAE ---

    @torch.no_grad()
    def encode(self, images, normalize=True):
        """(B, 3, H, W) in [-1, 1] -> (B, C, H/f, W/f) float32; the posterior mean, not a sample."""
        if images.shape[-1] % self.downsample or images.shape[-2] % self.downsample:
            raise ValueError(f"image size {tuple(images.shape[-2:])} is not a multiple of {self.downsample}")
        if self.vae is None:
            if self.kind != "pixel":
                raise RuntimeError("LatentSpace built with load_vae=False cannot encode")
            z_raw = images.float()                                    # (B, 3, H, W)
        else:
            p = next(self.vae.parameters())
            with torch.autocast(p.device.type, enabled=False):  # (fp16 overflows in VAEs)
                z_raw = self.vae.encode(images.to(p.device, p.dtype)).latent_dist.mean  # (B, C, H/f, W/f)
        z = self.scale_shift(z_raw)
        return self.normalize(z) if normalize else z

    @torch.no_grad()
    def decode(self, z):
        """(B, C, h, w) model latents -> (B, 3, h*f, w*f) images in about [-1, 1] (not clamped)."""
        z_raw = self.from_model(z)
        if self.vae is None:
            if self.kind != "pixel":
                raise RuntimeError("LatentSpace built with load_vae=False cannot decode")
            return z_raw
        p = next(self.vae.parameters())
        with torch.autocast(p.device.type, enabled=False):  # in the VAE's own dtype, not the caller's fp16
            return self.vae.decode(z_raw.to(p.device, p.dtype)).sample.float()  # (B, 3, H, W)


def load_vae_config(cfg: Config):
    """The VAE's config without its weights (for scale/shift when no VAE is loaded)."""
    from diffusers import AutoencoderKL
    check_local_folder("vae", cfg.vae)
    try:
        config = AutoencoderKL.load_config(cfg.vae, subfolder=cfg.vae_subfolder or None,
                                           local_files_only=files_only(cfg.vae))
    except Exception as e:
        raise ConfigError(f"vae={cfg.vae!r}: cannot read the VAE config: {_hub_error_line(e)}") from None
    from types import SimpleNamespace
    config = SimpleNamespace(**config)
    check_vae_matches(cfg, config)
    return config


def images_to_tensor(images) -> torch.Tensor:
    """list of same-size PIL images -> (B, 3, H, W) float32 in [-1, 1]."""
    arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) for im in images]  # (H, W, 3) each
    sizes = {a.shape for a in arrays}
    if len(sizes) != 1:
        raise ValueError(f"images_to_tensor needs images of one size, got {sorted(sizes)}")
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # (B, 3, H, W) in [0, 255]
    return x / 127.5 - 1.0


def tensor_to_images(x: torch.Tensor) -> list:
    """(B, 3, H, W) or (3, H, W) in [-1, 1] -> list of PIL RGB images (values clamped)."""
    if x.dim() == 3:
        x = x[None]
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (B, 3, H, W)
    return [Image.fromarray(a) for a in x.permute(0, 2, 3, 1).cpu().numpy()]
