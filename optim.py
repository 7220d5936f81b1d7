"""Optimisation for train.py: the learning-rate schedule, AdamW (torch or bitsandbytes 8-bit), gradient
clipping with a skip on non-finite gradients, and the fp32 EMA of the weights.
"""
import math

import torch

from config import Config


def lr_at(step: int, cfg: Config, time_frac: float = 0.0) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * learning_rate.

    time_frac (elapsed / max_minutes) makes the decay follow whichever budget runs out first: the
    cosine is taken at max(step, time_frac * max_steps), so on a machine too slow to reach max_steps
    in time the run still anneals fully by the deadline. On a fast machine the step always leads and
    the schedule is the plain (deterministic) one.
    """
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    at = max(step, time_frac * cfg.max_steps)
    progress = min(1.0, (at - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    ratio = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.learning_rate * ratio


def make_optimizer(model, cfg: Config):
    groups = model.param_groups(cfg.weight_decay)
    betas = (cfg.beta1, cfg.beta2)
    if cfg.optimizer == "adamw8bit":
        import logging
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # optional-kernel notices on CPU
        return adamw8bit_class()(groups, lr=cfg.learning_rate, betas=betas)
    # fused: one kernel over all weights instead of a few per tensor (CPU: 0.7 vs 2.6 ms for the shapes model)
    fused = next(model.parameters()).device.type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=betas, fused=fused)


def adamw8bit_class():
    """bitsandbytes' AdamW8bit, minus the torch.cuda.synchronize() its step() runs after every parameter.

    That sync exists for paged optimizers (not used here); with ~230 weight tensors it stalls the GPU
    ~230 times a step while Python prepares the next update. Same kernels, same state, same results.
    """
    import bitsandbytes as bnb  # imported here: it is slow to import

    class AdamW8bit(bnb.optim.AdamW8bit):
        @torch.no_grad()
        def step(self, closure=None):
            if self.is_paged:
                return super().step(closure)
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            if not self.initialized:
                self.check_overrides()
                self.to_gpu()
                self.initialized = True
            for gindex, group in enumerate(self.param_groups):
                for pindex, p in enumerate(group["params"]):
                    if p.grad is None:
                        continue
                    if len(self.state[p]) == 0:
                        self.init_state(group, p, gindex, pindex)
                    self.update_step(group, p, gindex, pindex)
            return loss

    return AdamW8bit


def optimizer_update(model, ema_model, optimizer, cfg: Config, step: int):
    """Clip, then step the optimiser and the EMA, unless the gradient is non-finite (a NaN or inf loss gives
    a non-finite norm): then the step is skipped, weights, optimiser state and EMA left as they were.

    Returns (grad_norm, finite), 0-dim tensors on the device. Fused torch AdamW skips on the device (its
    found_inf input, as under GradScaler; the EMA moves by a weight of 0), so the step needs no host-device
    sync. bitsandbytes has no such input: for adamw8bit the check reads the norm on the host, one sync a step.
    """
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    finite = torch.isfinite(grad_norm)
    ema_weight = 1 - min(cfg.ema_decay, (1 + step) / (10 + step))
    if skips_on_device(optimizer):
        optimizer.found_inf = (~finite).float()
        optimizer.step()
        update_ema(ema_model, model, finite * ema_weight)
    elif finite:  # the host-device sync
        optimizer.step()
        update_ema(ema_model, model, ema_weight)
    return grad_norm, finite


def skips_on_device(optimizer) -> bool:
    """Whether the optimiser can skip a step given a found_inf tensor (torch's fused AdamW can)."""
    return isinstance(optimizer, torch.optim.AdamW) and bool(optimizer.defaults.get("fused"))


@torch.no_grad()
def update_ema(ema_model, model, weight):
    """ema += weight * (model - ema), in fp32; weight = 1 - decay, a float or a 0-dim tensor on the device
    (passed as a list: the single-weight overload would read a tensor on the host, a sync)."""
    ema_params = list(ema_model.parameters())
    params = [p.detach().float() for p in model.parameters()]
    torch._foreach_lerp_(ema_params, params, [weight] * len(params) if torch.is_tensor(weight) else weight)
