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
    """Clip, and unless the gradient is non-finite, step the optimiser and the EMA.

    Returns (grad_norm tensor, stepped). The finiteness check is the step's one host-device sync.
    """
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    if not torch.isfinite(grad_norm):  # a non-finite loss gives a non-finite norm: skip the step
        return grad_norm, False
    optimizer.step()
    update_ema(ema_model, model, min(cfg.ema_decay, (1 + step) / (10 + step)))
    return grad_norm, True


@torch.no_grad()
def update_ema(ema_model, model, decay: float):
    ema_params = list(ema_model.parameters())
    params = [p.detach().float() for p in model.parameters()]
    torch._foreach_lerp_(ema_params, params, 1 - decay)
