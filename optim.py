"""Optimisation for train.py: the learning-rate schedule, AdamW (torch or bitsandbytes 8-bit), gradient
clipping with a skip on non-finite gradients, and the fp32 EMA of the weights.
"""
import math

import torch

from config import Config, ConfigError


def lr_at(step: int, cfg: Config, time_frac: float = 0.0) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * learning_rate.

    time_frac (elapsed / max_minutes) makes the decay follow whichever budget runs out first: the
    cosine is taken at max(step, time_frac * max_steps), so on a machine too slow to reach max_steps
    in time the run still anneals fully by the deadline. On a fast machine the step always leads and
    the schedule is the plain (deterministic) one. The warmup is by step, capped by that decay: on a machine
    so slow that the clock leads already during warmup, the lr does not jump down at its end (nor stay at
    the peak when the time runs out before it ends).
    """
    at = max(step, time_frac * cfg.max_steps)
    progress = min(1.0, max(0.0, (at - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)))
    ratio = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if step < cfg.warmup_steps:
        ratio = min(ratio, (step + 1) / cfg.warmup_steps)
    return cfg.learning_rate * ratio


def make_optimizer(model, cfg: Config, resumed_state=None):
    """AdamW as cfg says. resumed_state (a checkpoint's optimiser state dict): flat_8bit=auto takes its
    layout, flat or per tensor, so a resumed run keeps its moments wherever it resumes."""
    groups = model.param_groups(cfg.weight_decay)
    betas = (cfg.beta1, cfg.beta2)
    if cfg.optimizer == "adamw8bit":
        import logging
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # optional-kernel notices on CPU
        on_gpu = next(model.parameters()).device.type == "cuda"  # on CPU the per-tensor update is cache-friendlier
        flat = cfg.flat_8bit == "on" or (cfg.flat_8bit == "auto" and on_gpu)
        saved = resumed_state.get("param_groups") if isinstance(resumed_state, dict) else None
        if cfg.flat_8bit == "auto" and isinstance(saved, list) and saved:  # one buffer per group: flat
            flat = all(isinstance(g, dict) and len(g.get("params", ())) == 1 for g in saved)
        return adamw8bit_class()(groups, lr=cfg.learning_rate, betas=betas, flat=flat)
    # fused: one kernel over all weights instead of a few per tensor (CPU: 0.7 vs 2.6 ms for the shapes model)
    fused = next(model.parameters()).device.type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=betas, fused=fused)


def adamw8bit_class():
    """bitsandbytes' AdamW8bit, minus the torch.cuda.synchronize() its step() runs after every parameter, and
    with flat=True updating the weights as a few flat buffers instead of tensor by tensor.

    The sync exists for paged optimizers (not used here); with ~230 weight tensors it stalled the GPU ~230
    times a step while Python prepared the next update. Same kernels, same state, same results.

    flat=True: bnb launches one kernel (after ~30 us of Python) per tensor it updates; the model's weights
    become views into one flat buffer per group (see flatten_groups), whose gradient is gathered from the
    weights' in one copy, so a step is ~4 updates instead of ~230. Each weight starts on a 256-element
    boundary (bnb quantises the 8-bit moments in blocks of 256) and weights under min_8bit_size keep 32-bit
    moments, as bnb gives them: the update equals the per-tensor one (tested; a weight without a gradient
    counts as one with a zero gradient, where bnb would leave it alone: every weight here has one).
    """
    try:
        import bitsandbytes as bnb  # imported here: it is slow to import
    except ImportError as e:  # no wheel for this platform, or a broken install: one line, not a traceback
        raise ConfigError(f"optimizer=adamw8bit: bitsandbytes cannot be imported ({e}): pip install bitsandbytes, "
                          "or optimizer=adamw") from None

    class AdamW8bit(bnb.optim.AdamW8bit):
        def __init__(self, params, *args, flat=False, min_8bit_size=4096, **kwargs):
            self.members, self.full_precision = [], set()  # flat=False: none
            if flat:
                params, self.members, self.full_precision = flatten_groups(list(params), min_8bit_size)
            super().__init__(params, *args, min_8bit_size=min_8bit_size, **kwargs)

        def get_config(self, gindex, pindex, group):
            config = super().get_config(gindex, pindex, group)
            if gindex in self.full_precision:  # a flat buffer of small weights: 32-bit moments
                config["optim_bits"] = 32
            return config

        def zero_grad(self, set_to_none: bool = True):
            super().zero_grad(set_to_none)
            for _, views in self.members:
                for p, _ in views:
                    if p.grad is not None:
                        p.grad = None if set_to_none else p.grad.zero_()

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
            for flat, views in self.members:  # gather the weights' gradients into their buffer's
                if views[0][0].data_ptr() != flat.data_ptr():  # .to(), .half(), load_state_dict(assign=True)
                    raise RuntimeError("flat_8bit: the model's weights were moved or replaced after the optimiser "
                                       "was made, so it would update copies: make it after, or flat_8bit=off")
                with_grad = [(p, at) for p, at in views if p.grad is not None]
                flat.grad = torch.zeros_like(flat) if with_grad else None  # zeros: padding must stay finite
                if with_grad:
                    torch._foreach_copy_([flat.grad[at:at + p.numel()] for p, at in with_grad],
                                         [p.grad.reshape(-1) for p, _ in with_grad])
            for gindex, group in enumerate(self.param_groups):
                for pindex, p in enumerate(group["params"]):
                    if p.grad is None:
                        continue
                    if len(self.state[p]) == 0:
                        self.init_state(group, p, gindex, pindex)
                    self.update_step(group, p, gindex, pindex)
            for flat, _ in self.members:
                flat.grad = None  # freed now, not held through the next forward
            return loss

    return AdamW8bit


def state_fits(optimizer, saved: dict) -> bool:
    """Whether a saved optimiser state has this optimiser's layout (flat or per tensor: as many weights per
    group); torch's load_state_dict checks no more than that either."""
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    return isinstance(groups, list) and all(isinstance(g, dict) for g in groups) and (
        [len(g.get("params", ())) for g in groups] == [len(g["params"]) for g in optimizer.param_groups])


def flatten_groups(groups: list, min_8bit_size: int, align: int = 256, max_numel: int = 2 ** 30):
    """Make each group's weights views into new flat buffers, one per (size class, dtype, device): weights
    of at least min_8bit_size elements, each starting at a multiple of `align` elements, and the smaller ones.
    A buffer holds at most max_numel elements (or one larger weight): bnb's kernels count in int32.

    Returns (groups over the flat buffers, [(buffer, [(weight, offset), ...]) per buffer], the indices of
    the groups of small weights). The buffers are new leaf Parameters holding the weights' values; the
    weights keep their identity (modules, state_dict, EMA and DDP see them as before). Call before
    torch.compile, DDP or moving the model: those must see the views.
    """
    flat_groups, members, small = [], [], set()
    for group in groups:
        params = [p for p in group["params"] if p.requires_grad]
        for is_small in (False, True):
            subset = [p for p in params if (p.numel() < min_8bit_size) == is_small]
            step = 4 if is_small else align  # 4: every view 16-byte aligned (what inductor assumes)
            chunks = []  # per buffer: [[(weight, offset), ...], elements]; same dtype and device, <= max_numel
            for kind in dict.fromkeys((p.dtype, p.device) for p in subset):
                chunks.append([[], 0])
                for p in (p for p in subset if (p.dtype, p.device) == kind):
                    size = -(-p.numel() // step) * step
                    if chunks[-1][0] and chunks[-1][1] + size > max_numel:
                        chunks.append([[], 0])
                    chunks[-1][0].append((p, chunks[-1][1]))
                    chunks[-1][1] += size
            for views, total in chunks:
                flat = torch.zeros(total, dtype=views[0][0].dtype, device=views[0][0].device)
                with torch.no_grad():
                    for p, at in views:
                        flat[at:at + p.numel()].copy_(p.reshape(-1))
                        p.data = flat[at:at + p.numel()].view(p.shape)
                if is_small:
                    small.add(len(flat_groups))
                flat = torch.nn.Parameter(flat)
                flat_groups.append({**group, "params": [flat]})
                members.append((flat, views))
    return flat_groups, members, small


class LossScale:
    """Dynamic loss scaling for fp16 training (the scheme of torch.amp.GradScaler): the loss is multiplied by
    `scale` before backward, so that small gradients do not underflow to 0 in fp16, and the gradients are
    divided by it before clipping. A non-finite gradient from a finite loss halves the scale (and the step
    is skipped, like any non-finite step); `growth_interval` finite steps in a row double it. The scale
    lives on the device and is updated there: no host-device sync. Disabled (bf16, fp32) it does nothing.
    """

    def __init__(self, device, enabled: bool, init: float = 2.0 ** 16, growth_interval: int = 2000):
        self.enabled, self.growth_interval = enabled, growth_interval
        self.scale = torch.full((), init if enabled else 1.0, device=device)
        self.growth_tracker = torch.zeros((), dtype=torch.int32, device=device)  # finite steps in a row
        self.overflow = torch.zeros((), dtype=torch.bool, device=device)

    def backward(self, loss):
        (loss * self.scale if self.enabled else loss).backward()

    def unscale_(self, params):
        grads = [p.grad for p in params if p.grad is not None]
        if self.enabled and grads:
            torch._foreach_mul_(grads, self.scale.reciprocal())  # a power of 2: exact

    def update(self, finite, loss_finite=None):
        """After a step: halve on a non-finite gradient, double after growth_interval finite ones.
        self.overflow: the step was skipped while the scale was >= 1, which the scale may explain (an fp16
        overflow of loss x scale); below 1 the gradient itself is not finite: train.py counts those steps
        towards max_nonfinite. loss_finite: whether the step's loss was finite (on every rank); a NaN/inf
        loss (a damaged sample, a diverging model) leaves the scale alone and is a non-finite step."""
        if not self.enabled:
            return
        # only a finite loss can overflow in the scaled backward: a NaN/inf loss says nothing about the scale
        if loss_finite is not None:
            loss_finite = torch.as_tensor(loss_finite, device=self.scale.device)  # (a Python bool too)
        found = ~finite if loss_finite is None else ~finite & loss_finite
        self.overflow = found & (self.scale >= 1)
        before = None if loss_finite is None else (self.scale.clone(), self.growth_tracker.clone())
        torch._amp_update_scale_(self.scale, self.growth_tracker, found.float(), 2.0, 0.5, self.growth_interval)
        if before is not None:  # such a step neither counts towards growth nor resets it
            self.scale.copy_(torch.where(loss_finite, self.scale, before[0]))
            self.growth_tracker.copy_(torch.where(loss_finite, self.growth_tracker, before[1]))

    def state_dict(self) -> dict:
        return {"scale": self.scale.item(), "growth_tracker": int(self.growth_tracker.item())}

    def load_state_dict(self, state: dict):
        if self.enabled:
            self.scale.fill_(state["scale"])
            self.growth_tracker.fill_(state["growth_tracker"])


def optimizer_update(model, ema_model, optimizer, cfg: Config, step: int, loss_scale: LossScale = None,
                     loss_finite=None):
    """Clip, then step the optimiser and the EMA, unless the gradient is non-finite (a NaN or inf loss gives
    a non-finite norm): then the step is skipped, weights, optimiser state and EMA left as they were.
    With a loss_scale (fp16), the gradients are unscaled first and the scale updated after.

    Returns (grad_norm, finite), 0-dim tensors on the device. Fused torch AdamW skips on the device (its
    found_inf input, as under GradScaler; the EMA moves by a weight of 0), so the step needs no host-device
    sync. bitsandbytes has no such input: for adamw8bit the check reads the norm on the host, one sync a step.
    """
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    if loss_scale is not None:
        loss_scale.unscale_(model.parameters())
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    finite = torch.isfinite(grad_norm)
    # EMA warm-up (the num_updates rule of tf.train.ExponentialMovingAverage): the first EMA weights follow the
    # model instead of staying near the random initialisation
    ema_weight = 1 - min(cfg.ema_decay, (1 + step) / (10 + step))
    if skips_on_device(optimizer):
        optimizer.found_inf = (~finite).float()
        optimizer.step()
        update_ema(ema_model, model, finite * ema_weight)
    elif finite:  # the host-device sync
        optimizer.step()
        update_ema(ema_model, model, ema_weight)
    if loss_scale is not None:
        loss_scale.update(finite, loss_finite)
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
