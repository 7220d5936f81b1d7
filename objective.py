"""The training objective: rectified flow matching (t=0 data, t=1 noise; see samplers.py), minRF-style.

    loss, per_sample, t = flow_matching_loss(model, batch, cfg, gen)

Noise the clean latents to x_t = (1 - t) x0 + t eps at t from the configured schedule (logit-normal,
SD3), run the model, and take the loss on the velocity it implies (whatever it predicts: v, x or EDM),
plus the optional Fourier and self-consistency terms. train.py's loop and bench.py call it.
"""
import torch
import torch.nn.functional as F

import samplers as S
from config import LOSSES, Config, ConfigError


def fourier_losses(x0_hat, x0):
    """Amplitude loss (match |FFT|) and correlation loss (1 - normalised spectral cross-correlation).

    |z| has no gradient at z = 0, which is exactly where a zero-initialised x-prediction starts, so the
    magnitudes are taken as sqrt(|z|^2 + tiny). The correlation is scale-free, so its gradient grows as
    1/|x0_hat| (3.8e8 at a zero output): x0_hat's power counts as at least 1e-3 of x0's in the norm."""
    fa = torch.fft.rfft2(x0_hat.float(), norm="ortho")
    fb = torch.fft.rfft2(x0.float(), norm="ortho")
    power_a, power_b = fa.real ** 2 + fa.imag ** 2, fb.real ** 2 + fb.imag ** 2
    amp = F.mse_loss((power_a + 1e-12).sqrt(), power_b.sqrt())
    cross = (fa * fb.conj()).real.sum(dim=(-2, -1))
    total_b = power_b.sum(dim=(-2, -1)).clamp_min(1e-12)
    norm = (torch.maximum(power_a.sum(dim=(-2, -1)), 1e-3 * total_b) * total_b).sqrt()
    corr = (1 - cross / norm).mean()
    return amp, corr


def elementwise_loss(pred, target, cfg: Config):
    if cfg.loss == "mse":
        return (pred - target).pow(2)
    if cfg.loss == "l1":
        return (pred - target).abs()
    if cfg.loss == "huber":
        return F.huber_loss(pred, target, reduction="none", delta=cfg.huber_delta)
    raise ConfigError(f"loss={cfg.loss!r}: must be one of {', '.join(LOSSES)}")


def noise_like(x0, cfg: Config, gen):
    """Gaussian noise for x0; with offset_noise plus a per-channel constant (helps very dark/bright images)."""
    eps = torch.randn(x0.shape, generator=gen, device=x0.device)
    if cfg.offset_noise > 0:
        eps = eps + cfg.offset_noise * torch.randn((*x0.shape[:-2], 1, 1), generator=gen, device=x0.device)
    return eps


def flow_matching_loss(model, batch, cfg: Config, gen, ema_model=None, t=None, eps=None):
    """Loss on the (implied) velocity. Returns (loss, per-sample loss, t). t and the noise eps are drawn
    with gen unless given."""
    x0, text, mask, drop = batch["latents"], batch["text"], batch["mask"], batch["drop"]
    B, C, H, W = x0.shape
    if eps is None:
        eps = noise_like(x0, cfg, gen)
    if t is None:
        n_tokens = (H // cfg.patch_size) * (W // cfg.patch_size)
        t = S.sample_timesteps(B, cfg.t_sampling, cfg.t_mean, cfg.t_std,
                               S.time_shift_for(cfg, n_tokens), generator=gen, device=x0.device,
                               uniform_mix=cfg.t_uniform_mix)
    x_t = S.add_noise(x0, eps, t)                                          # (B, C, H, W)
    out = model(x_t, t, text, mask, drop, text_padded=batch.get("text_padded"))
    pred = S.Prediction.from_config(cfg)
    v_hat = pred.velocity(out.float(), x_t, t)
    per_sample = elementwise_loss(v_hat, S.velocity_target(x0, eps), cfg).mean(dim=(1, 2, 3))  # (B,)
    loss = per_sample.mean()
    if cfg.fourier_amp_loss > 0 or cfg.fourier_corr_loss > 0:
        amp, corr = fourier_losses(pred.x0(out.float(), x_t, t), x0)
        loss = loss + cfg.fourier_amp_loss * amp + cfg.fourier_corr_loss * corr
    if ema_model is not None and cfg.self_consistency_loss > 0:
        # Self-evaluation consistency: the EMA model, shown the same sample with less noise (same eps,
        # t scaled by 0.5), gives a better x0; the online model at t is pulled towards it.
        with torch.no_grad():
            t_less = t * 0.5
            x_less = S.add_noise(x0, eps, t_less)
            # the batch's padding flag too: without it the model reads the mask on the host, a sync every step
            out_less = ema_model(x_less, t_less, text, mask, drop, text_padded=batch.get("text_padded"))
            target = pred.x0(out_less.float(), x_less, t_less)
        x0_hat = pred.x0(out.float(), x_t, t)
        loss = loss + cfg.self_consistency_loss * F.mse_loss(x0_hat, target)
    return loss, per_sample.detach(), t
