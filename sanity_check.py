"""Overfit one cached batch: the loss must end far below that of predicting v = 0 (the same yardstick for
every prediction type), and the sample must come back.

    python sanity_check.py                 # tiny preset, seconds on a CPU
    python sanity_check.py shapes steps=600

If this fails, something between the cache, the model and the objective is broken; nothing else will
train either. Prints the loss curve, writes runs/<name>/sanity/reconstruction.png (target | sample) and
exits 1 when the loss is not `min_factor` times below v = 0's. The learning rate `lr` holds for the first
half of `steps`, then anneals to 0, so the score is that of a settled fit. It trains plain velocity MSE at
t from `t_sampling` (no shift), whatever `loss`, `shift` or the extra losses say: it checks the cache, the
model and the prediction type; the objective's options are tested in tests/test_objective.py (an L1 fit,
for one, ends only ~3x below v = 0 on this yardstick).
"""
import math
import os
import sys
from dataclasses import fields

import torch

from config import Config, ConfigError, exit_with_help_if_asked, get_config, main_guard, unknown_setting
import samplers as S

CHECK_DEFAULTS = {"steps": 300, "min_factor": 10.0, "lr": 3e-3}  # settings of this check only
CONFIG_KEYS = [f.name for f in fields(Config)]


def check_lr(step, steps, lr):
    """lr for a step: constant for the first half, then a cosine down to 0 at the last step. At a constant
    lr the loss, near 0.002, can jump 100x at any step, and the score is taken after the last one."""
    decay_start = steps // 2
    if step < decay_start:
        return lr
    return lr * 0.5 * (1 + math.cos(math.pi * (step - decay_start + 1) / (steps - decay_start)))


def split_args(argv):
    """Check settings (steps=, min_factor=, lr=) apart from Config overrides; preset first."""
    exit_with_help_if_asked(argv)
    preset, overrides, check = "tiny", {}, dict(CHECK_DEFAULTS)
    if argv and "=" not in argv[0]:
        preset = argv.pop(0)
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise ConfigError(f"expected key=value, got '{arg}'")
        if key in check:
            try:
                check[key] = type(CHECK_DEFAULTS[key])(value)
            except ValueError:
                raise ConfigError(f"{key}={value!r}: expected a number") from None
        elif key in CONFIG_KEYS:
            overrides[key] = value
        else:  # get_config would suggest Config keys only: stepz -> "did you mean steps?" needs ours too
            raise unknown_setting(key, list(CHECK_DEFAULTS) + CONFIG_KEYS)
    for key in ("steps", "min_factor", "lr"):
        if not (math.isfinite(check[key]) and check[key] > 0):  # (nan is not <= 0 either)
            raise ConfigError(f"{key}={check[key]}: must be a number > 0")
    return get_config(preset, **overrides), check


def sanity_check(cfg, steps=300, min_factor=10.0, lr=3e-3, verbose=True):
    from dataset import collate, CachedDataset
    from latents import LatentSpace, tensor_to_images
    from model import DiTConfig, SingleStreamDiT
    from preprocess import ensure_cache
    from sample import save_grid

    torch.manual_seed(cfg.seed)
    manifest = ensure_cache(cfg)
    data = CachedDataset(cfg, "train")
    if len(data) == 0:
        raise ConfigError(f"cache_dir={cfg.cache_dir}: no samples to overfit")
    same_bucket = [i for i in range(len(data)) if data.bucket_keys[i] == data.bucket_keys[0]]
    batch = collate([data[i] for i in same_bucket[:min(4, cfg.batch_size)]])
    batch["drop"] = torch.zeros_like(batch["drop"])
    model = SingleStreamDiT(DiTConfig.from_config(cfg))
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    eps = torch.randn(batch["latents"].shape, generator=gen)
    x0, text, mask, drop = batch["latents"], batch["text"], batch["mask"], batch["drop"]
    pred = S.Prediction.from_config(cfg)

    def fixed_loss():
        """Velocity loss at 10 fixed t per sample: a noise-free measure of the fit."""
        with torch.no_grad():
            total = 0.0
            for t_value in torch.linspace(0.05, 0.95, 10):
                t = torch.full((eps.shape[0],), float(t_value))
                x_t = S.add_noise(x0, eps, t)
                v_hat = pred.velocity(model(x_t, t, text, mask, drop), x_t, t)
                total += (v_hat - S.velocity_target(x0, eps)).pow(2).mean().item() / 10
        return total

    start = S.velocity_target(x0, eps).pow(2).mean().item()  # predicting v = 0: the same yardstick for v/x/edm
    losses = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = check_lr(step, steps, lr)
        t = S.sample_timesteps(eps.shape[0], cfg.t_sampling, cfg.t_mean, cfg.t_std, 1.0, generator=gen,
                               uniform_mix=cfg.t_uniform_mix)
        x_t = S.add_noise(x0, eps, t)
        v_hat = pred.velocity(model(x_t, t, text, mask, drop), x_t, t)
        loss = (v_hat - S.velocity_target(x0, eps)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # x-prediction's 1/t makes rare spikes
        opt.step()
        losses.append(loss.item())
        if verbose and (step % max(1, steps // 15) == 0 or step == steps - 1):
            print(f"step {step:4d}  loss {loss.item():.5f}")
    end = fixed_loss()
    factor = start / max(end, 1e-12)

    # sample from the same noise with the overfit model: it should land on the target
    model.eval()
    velocity = S.guided_velocity_fn(model, text, mask, 1.0, pred)
    with torch.no_grad():
        sample, _ = S.sample_ode(velocity, eps, 20, "euler")
    recon_error = (sample - x0).pow(2).mean().item()
    space = LatentSpace.from_config(cfg, stats=manifest)
    with torch.no_grad():
        targets = tensor_to_images(space.decode(x0))
        samples = tensor_to_images(space.decode(sample))
    path = os.path.join(cfg.run_dir, "sanity", "reconstruction.png")
    try:
        save_grid(targets + samples, ["target"] * len(targets) + ["sample"] * len(samples), path, cols=len(targets))
        wrote = f"wrote {path}"
    except OSError as e:  # a full disk or an unwritable out_dir costs the picture, not the verdict
        wrote, path = f"{path} not written ({e.strerror or e})", None
    ok = factor >= min_factor
    print(f"{'PASS' if ok else 'FAIL'}: loss at fixed t {end:.4f}, {factor:.1f}x below v = 0's {start:.4f} "
          f"(need {min_factor}x), sample MSE {recon_error:.4f}, {wrote}")
    return {"ok": ok, "factor": factor, "losses": losses, "recon_mse": recon_error, "path": path}


if __name__ == "__main__":
    def main():
        cfg, check = split_args(sys.argv[1:])
        return sanity_check(cfg, **check)

    sys.exit(0 if main_guard(main)["ok"] else 1)
