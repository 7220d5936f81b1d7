"""Rectified flow: noising, targets, time shifts, timestep sampling, ODE samplers, guidance.

Time convention, used everywhere in this repo:

    t in [0, 1];  t = 0 is clean data, t = 1 is pure noise.
    x_t = (1 - t) * x0 + t * eps                       (rectified flow, Liu et al. 2022; SD3, Esser et al. 2024)
    v   = dx_t/dt = eps - x0                           (the velocity target)
    sampling integrates dx/dt = v(x, t) from t = 1 (noise) down to t = 0 (data).

The network may predict the velocity (prediction="v") or the clean sample (prediction="x", Li & He 2025,
"Back to Basics: Let Denoising Generative Models Denoise"), or the clean sample through EDM's skip
connection (prediction="edm", Karras et al. 2022, see edm_coefficients); the loss and the samplers always
work in velocity space, converting an x-prediction with v = (x_t - x0_hat) / max(t, t_min) (at t = 0
exactly, where x0_hat = x_t carries no information, the exact field v = -x_t).

Everything here is a small pure function of tensors; the model knows nothing of the schedule.
Tensors x are (B, C, H, W) (any trailing shape works); t is a (B,) tensor or a Python float.
"""
import math
from dataclasses import dataclass

import torch

from config import PREDICTIONS, SAMPLERS, T_SAMPLINGS, ConfigError

# ----------------------------------------------------------------------------------------------------
# Noising, targets and conversions between the two parametrisations


def _per_sample(t, x: torch.Tensor) -> torch.Tensor:
    """t as a float, 0-d or (B,) tensor -> broadcastable against x, in x's dtype: (B, 1, 1, 1) for a (B,) t, else 0-d."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    return t.reshape(-1, *([1] * (x.dim() - 1))) if t.dim() > 0 else t


def add_noise(x0: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
    """x_t = (1 - t) x0 + t eps: the straight line from data (t=0) to noise (t=1)."""
    t = _per_sample(t, x0)                                         # (B, 1, 1, 1), or () for a scalar t
    return (1 - t) * x0 + t * eps                                  # (B, C, H, W)


def velocity_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """v = d x_t / dt = eps - x0 (constant along each straight path)."""
    return eps - x0


def x0_from_velocity(x_t: torch.Tensor, v: torch.Tensor, t) -> torch.Tensor:
    """x0 = x_t - t v (exact inverse of add_noise given the true velocity)."""
    return x_t - _per_sample(t, x_t) * v


def velocity_from_x0(x_t: torch.Tensor, x0_hat: torch.Tensor, t, t_min: float) -> torch.Tensor:
    """v = (x_t - x0_hat) / t, with t clamped at t_min (Li & He 2025): near t=0 the division would
    amplify any error in x0_hat without bound. Below t_min the velocity loss (on eps - x0, unclamped) then
    trains the output towards x_t - t_min v rather than x0, so the velocity it implies stays the true one
    (to_x0 undoes this for the image-space losses)."""
    return (x_t - x0_hat) / _per_sample(t, x_t).clamp(min=t_min)


EDM_SIGMA_DATA = 0.5  # default data std of prediction="edm" (EDM's value for images in [-1, 1]; cfg.sigma_data)


def edm_coefficients(t, x: torch.Tensor, sigma_data: float = EDM_SIGMA_DATA):
    """prediction="edm": x0_hat = a x_t + b out (Karras et al. 2022's c_skip / c_out, in rectified-flow time).

    With x_t = (1 - t) x0 + t eps and D = t^2 + (1 - t)^2 s^2 (the variance of x_t for data of std s):
    a = s^2 (1 - t) / D (the best linear guess of x0 from x_t), b = t s / sqrt(D). At t = 1 this is a scaled
    x-prediction (a = 0, b = s); near t = 0 the clean sample is mostly x_t itself (a -> 1, b -> 0), so fine
    detail already in x_t passes straight through instead of being rebuilt from the patch tokens.
    Returns (a, b, c, d) with x0_hat = a x_t + b out and velocity = c x_t - d out (no 1/t anywhere)."""
    t = _per_sample(t, x)
    s2 = sigma_data ** 2
    D = t * t + (1 - t) ** 2 * s2
    root = D.sqrt()
    a, b = s2 * (1 - t) / D, t * sigma_data / root
    c, d = (t - (1 - t) * s2) / D, sigma_data / root              # (x_t - x0_hat) / t, simplified
    return a, b, c, d


def to_velocity(out: torch.Tensor, x_t: torch.Tensor, t, prediction: str, t_min: float,
                sigma_data: float = EDM_SIGMA_DATA) -> torch.Tensor:
    """The network output (a velocity, a clean sample or EDM-preconditioned, per prediction "v" | "x" |
    "edm") as a velocity."""
    if prediction == "v":
        return out
    if prediction == "x":
        # at t = 0 an x-prediction says nothing (x0_hat = x_t): the exact field there is E[eps | x0] - x_t = -x_t
        return torch.where(_per_sample(t, x_t) == 0, -x_t, velocity_from_x0(x_t, out, t, t_min))
    if prediction == "edm":
        _, _, c, d = edm_coefficients(t, x_t, sigma_data)
        return c * x_t - d * out
    raise ConfigError(f"prediction={prediction!r}: must be one of {', '.join(PREDICTIONS)}")


def to_x0(out: torch.Tensor, x_t: torch.Tensor, t, prediction: str, sigma_data: float = EDM_SIGMA_DATA,
          t_min: float = 0.05) -> torch.Tensor:
    """The network output as a clean-sample estimate x0_hat (for image-space losses and previews): the clean end
    x_t - t v of the straight line through x_t along the velocity to_velocity gives (t_min: as there)."""
    if prediction == "v":
        return x0_from_velocity(x_t, out, t)
    if prediction == "x":
        # The output itself where t >= t_min. Below, the velocity loss trains (x_t - out) / t_min to E[v | x_t], so
        # the output is x_t - t_min v, not x0 (x0 + (t - t_min)(eps - x0): noise left in); the clean end of the line
        # is x_t - t v = x_t - (t / t_min)(x_t - out) (x_t at t = 0), as for v and edm, so the image-space losses
        # (Fourier, self-consistency) want what the velocity loss wants instead of pulling the output elsewhere.
        t = _per_sample(t, x_t)
        return torch.where(t < t_min, x_t - t / t_min * (x_t - out), out)
    if prediction == "edm":
        a, b, _, _ = edm_coefficients(t, x_t, sigma_data)
        return a * x_t + b * out
    raise ConfigError(f"prediction={prediction!r}: must be one of {', '.join(PREDICTIONS)}")


@dataclass(frozen=True)
class Prediction:
    """What the network outputs (cfg.prediction: v | x | edm) with the settings its conversions need, so
    callers pass one object instead of three config fields."""
    kind: str = "v"
    t_min: float = 0.05                     # x: the 1/t clamp of velocity_from_x0 (cfg.x_pred_t_min)
    sigma_data: float = EDM_SIGMA_DATA      # edm: the data std in the skip weights (cfg.sigma_data)

    @classmethod
    def from_config(cls, cfg) -> "Prediction":
        return cls(cfg.prediction, cfg.x_pred_t_min, cfg.sigma_data)

    def velocity(self, out: torch.Tensor, x_t: torch.Tensor, t) -> torch.Tensor:
        return to_velocity(out, x_t, t, self.kind, self.t_min, self.sigma_data)

    def x0(self, out: torch.Tensor, x_t: torch.Tensor, t) -> torch.Tensor:
        return to_x0(out, x_t, t, self.kind, self.sigma_data, self.t_min)


# ----------------------------------------------------------------------------------------------------
# Time shifts: move the training/sampling time toward noise for larger images (SD3 Sec. 5.3.2, FLUX)


def shift_time(t, s: float):
    """t' = s t / (1 + (s - 1) t) (SD3 eq. 23 with t=1 noise). Fixes 0 and 1, monotone; s > 1 pushes
    t toward 1, so more training samples and sampling steps are spent near noise, where a high
    resolution image still has its global structure undecided. s = 1 is the identity."""
    return s * t / (1 + (s - 1) * t)


def flux_mu(num_image_tokens: int, base_len: int = 256, max_len: int = 4096,
            base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """FLUX's log shift, linear in the image sequence length: base_shift at base_len tokens, max_shift
    at max_len tokens (extrapolated outside). num_image_tokens = (latent H / patch) * (latent W / patch)."""
    slope = (max_shift - base_shift) / (max_len - base_len)
    return base_shift + slope * (num_image_tokens - base_len)


def dynamic_shift_time(t, mu: float):
    """FLUX's time shift exp(mu) / (exp(mu) + (1/t - 1)), written without the 1/t so t=0 is defined.
    It equals shift_time(t, exp(mu))."""
    e = math.exp(mu)
    return e * t / (e * t + (1 - t))


def time_shift_for(cfg, num_image_tokens: int) -> float:
    """The shift factor s for an image of this many tokens: exp(flux_mu) when cfg.dynamic_shift,
    else cfg.shift. Use the same s for training timesteps and the sampling grid."""
    return math.exp(flux_mu(num_image_tokens)) if cfg.dynamic_shift else cfg.shift


# ----------------------------------------------------------------------------------------------------
# Training timesteps and the sampling grid


def sample_timesteps(batch: int, kind: str = "logit_normal", mean: float = 0.0, std: float = 1.0,
                     shift: float = 1.0, generator: torch.Generator = None, device="cpu",
                     uniform_mix: float = 0.0) -> torch.Tensor:
    """(B,) float32 training times in [0, 1].

    uniform: t ~ U[0, 1). logit_normal: t = sigmoid(n), n ~ N(mean, std^2) (SD3 Sec. 3.1: puts more
    weight on the middle times where the velocity is hardest to predict); its median is sigmoid(mean).
    uniform_mix: this fraction of the batch (in expectation) is drawn from U[0, 1) instead, so the
    tails the logit-normal almost never visits (t < 0.1, t > 0.9) still get trained.
    Then the time shift (shift_time) is applied. Pass a seeded generator (on `device`) to reproduce.
    """
    if kind == "uniform":
        t = torch.rand(batch, generator=generator, device=device)
    elif kind == "logit_normal":
        t = torch.sigmoid(mean + std * torch.randn(batch, generator=generator, device=device))
    else:
        raise ConfigError(f"t_sampling={kind!r}: must be one of {', '.join(T_SAMPLINGS)}")
    if uniform_mix > 0 and kind != "uniform":
        pick = torch.rand(batch, generator=generator, device=device) < uniform_mix
        t = torch.where(pick, torch.rand(batch, generator=generator, device=device), t)
    return shift_time(t, shift) if shift != 1.0 else t                 # (B,)


def time_grid(steps: int, shift: float = 1.0, dtype=torch.float64, device=None) -> torch.Tensor:
    """(steps + 1,) times from 1 (noise) down to 0 (data): a uniform grid passed through shift_time,
    so sampling spends its steps where training put its timesteps."""
    if steps < 1:
        raise ConfigError(f"sample_steps={steps}: must be > 0")
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    t = shift_time(t, shift)
    t[0], t[-1] = 1.0, 0.0                     # exact endpoints whatever the rounding
    return t.to(dtype=dtype, device=device)


# ----------------------------------------------------------------------------------------------------
# ODE solvers: one step from t to t_next < t of dx/dt = v(x, t). velocity_fn(x, t) takes t as (B,).


def _call(velocity_fn, x: torch.Tensor, t: float) -> torch.Tensor:
    return velocity_fn(x, torch.full((x.shape[0],), float(t), dtype=x.dtype, device=x.device))


def euler_step(velocity_fn, x: torch.Tensor, t: float, t_next: float) -> torch.Tensor:
    """First order: 1 evaluation."""
    return x + (t_next - t) * _call(velocity_fn, x, t)


def heun_step(velocity_fn, x: torch.Tensor, t: float, t_next: float) -> torch.Tensor:
    """Second order (explicit trapezoid, as in Karras et al. 2022 Alg. 1): 2 evaluations, except a step
    that ends at t = 0, which is a plain Euler step (1 evaluation): an x-prediction says nothing at t = 0,
    and the last step's Euler error is still O(h^2), so the order is kept."""
    h = t_next - t
    v = _call(velocity_fn, x, t)
    x_euler = x + h * v
    if t_next == 0:
        return x_euler
    return x + h * 0.5 * (v + _call(velocity_fn, x_euler, t_next))


def rk4_step(velocity_fn, x: torch.Tensor, t: float, t_next: float) -> torch.Tensor:
    """Classic fourth-order Runge-Kutta: 4 evaluations (the last at t_next, which is 0 on the final
    step; an x-prediction's velocity there is the exact -x, see to_velocity)."""
    h = t_next - t
    k1 = _call(velocity_fn, x, t)
    k2 = _call(velocity_fn, x + 0.5 * h * k1, t + 0.5 * h)
    k3 = _call(velocity_fn, x + 0.5 * h * k2, t + 0.5 * h)
    k4 = _call(velocity_fn, x + h * k3, t_next)
    return x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)


STEP_FUNCTIONS = {"euler": euler_step, "heun": heun_step, "rk4": rk4_step}
assert set(STEP_FUNCTIONS) == set(SAMPLERS)


# velocity evaluations sample_ode makes in `steps` steps (heun's last step, to t = 0, is a plain Euler step)
NFE_FOR_STEPS = {"euler": lambda steps: steps, "heun": lambda steps: 2 * steps - 1, "rk4": lambda steps: 4 * steps}
assert set(NFE_FOR_STEPS) == set(SAMPLERS)


def nfe_for(method: str, steps: int) -> int:
    """Velocity evaluations sample_ode makes with this sampler and number of steps."""
    return NFE_FOR_STEPS[method](steps)


def steps_for_nfe(method: str, nfe: int) -> int:
    """The most steps of this sampler within a budget of nfe evaluations (at least 1): samplers at equal NFE."""
    return max([s for s in range(1, nfe + 1) if nfe_for(method, s) <= nfe], default=1)


@torch.no_grad()
def sample_ode(velocity_fn, noise: torch.Tensor, steps: int, method: str = "euler", shift: float = 1.0,
               callback=None, progress: bool = False, t_start: float = 1.0):
    """Integrate dx/dt = velocity_fn(x, t) from t = 1 (x = noise) to t = 0 on time_grid(steps, shift).

    t_start < 1 starts from a partly noised sample x_t instead (SDEdit, Meng et al. 2022): the grid is
    time_grid(steps, shift) scaled by t_start.

    Returns (x0, nfe), nfe = the number of velocity_fn calls (one batched CFG forward counts once):
    see nfe_for. callback(i, t_next, x_next) is called after each step i = 0..steps-1 with the state x_t
    (e.g. to plot the trajectory, as inference.ipynb does).
    """
    if method not in STEP_FUNCTIONS:
        raise ConfigError(f"sampler={method!r}: must be one of {', '.join(SAMPLERS)}")
    step_fn = STEP_FUNCTIONS[method]
    nfe = 0

    def counted(x, t):
        nonlocal nfe
        nfe += 1
        return velocity_fn(x, t)

    if not 0.0 < t_start <= 1.0:
        raise ConfigError(f"t_start={t_start}: must be in (0, 1]")
    grid = (time_grid(steps, shift) * t_start).tolist()  # Python floats: step sizes computed in float64
    x = noise
    iterator = range(steps)
    if progress:
        from tqdm import tqdm
        iterator = tqdm(iterator, desc=f"{method} x{steps}", leave=False)
    for i in iterator:
        x = step_fn(counted, x, grid[i], grid[i + 1])
        if callback is not None:
            callback(i, grid[i + 1], x)
    return x, nfe


# ----------------------------------------------------------------------------------------------------
# Classifier-free guidance (Ho & Salimans 2022), in velocity space


def _pad_tokens(text: torch.Tensor, mask: torch.Tensor, length: int):
    """Right-pad (B, L, D) embeddings and their (B, L) mask to `length` tokens (padding masked out)."""
    extra = length - text.shape[1]
    if extra == 0:
        return text, mask
    text = torch.cat([text, text.new_zeros(text.shape[0], extra, text.shape[2])], dim=1)
    mask = torch.cat([mask, mask.new_zeros(mask.shape[0], extra)], dim=1)
    return text, mask


def trim_padding(text: torch.Tensor, mask: torch.Tensor):
    """text (B, L, D) and mask (B, L) cut to the longest caption: padding is never attended, so the model's
    output is the same, for less work."""
    longest = max(1, int(mask.sum(1).max()))
    return text[:, :longest], mask[:, :longest]


def guided_velocity_fn(model, text: torch.Tensor, text_mask: torch.Tensor, cfg_scale: float,
                       prediction: Prediction, neg_text: torch.Tensor = None, neg_mask: torch.Tensor = None):
    """A velocity_fn(x, t) for sample_ode: v = v_u + s (v_c - v_u).

    text (B, L, D), text_mask (B, L) bool. The unconditional branch is the model's learned null caption
    (drop=True), or the negative prompt embeddings when given (neg_text (B or 1, L', D), drop=False).
    Conditional and unconditional run in ONE forward of batch 2B; scale 1 runs the conditional only
    (batch B). The guidance is applied to velocities: an x-prediction is converted first, so every
    sampler and both parametrisations mix the same quantity.
    """
    if (neg_text is None) != (neg_mask is None):
        raise ValueError("neg_text and neg_mask must be given together")
    # whether the model's masks hide any token: the same in every step, so worked out in the first (one host
    # sync) and passed on, instead of the model's own check (a host-device sync in every step)
    padded = []

    def forward(x, t, text, mask, drop):
        if not padded and mask is not None:  # a null caption (drop) attends to its first token only
            padded.append(bool((~mask.bool()).any()) or (drop is not None and mask.shape[1] > 1 and bool(drop.any())))
        return model(x, t, text, mask, drop=drop, text_padded=padded[0] if padded else None)

    def velocity_fn(x, t):
        B = x.shape[0]
        if cfg_scale == 1.0:
            out = forward(x, t, text, text_mask, None).to(x.dtype)              # (B, C, H, W)
            return prediction.velocity(out, x, t)
        if neg_text is None:
            un_text, un_mask = text, text_mask       # ignored by the model: drop=True uses the null caption
            drop = torch.cat([torch.zeros(B, dtype=torch.bool), torch.ones(B, dtype=torch.bool)]).to(x.device)
        else:
            un_text = neg_text.expand(B, -1, -1)
            un_mask = neg_mask.expand(B, -1)
            drop = torch.zeros(2 * B, dtype=torch.bool, device=x.device)
        length = max(text.shape[1], un_text.shape[1])
        c_text, c_mask = _pad_tokens(text, text_mask, length)
        u_text, u_mask = _pad_tokens(un_text, un_mask, length)
        x2, t2 = torch.cat([x, x]), torch.cat([t, t])                           # (2B, C, H, W), (2B,)
        out = forward(x2, t2, torch.cat([c_text, u_text]), torch.cat([c_mask, u_mask]), drop)
        v_cond, v_uncond = prediction.velocity(out.to(x.dtype), x2, t2).chunk(2)
        return v_uncond + cfg_scale * (v_cond - v_uncond)                       # (B, C, H, W)

    return velocity_fn


# ----------------------------------------------------------------------------------------------------
# Loss per timestep bucket (minRF logs this: the loss is very different near data and near noise)


def timestep_bucket(t: torch.Tensor, n: int = 4) -> torch.Tensor:
    """(B,) long index of t in n equal buckets of [0, 1]: [0, 1/n), ..., [(n-1)/n, 1] (t=1 in the last)."""
    return (t.detach().float() * n).long().clamp(0, n - 1)


def loss_per_bucket(per_sample_loss: torch.Tensor, t: torch.Tensor, n: int = 4, skip_nonfinite: bool = False):
    """(sums, counts), both (n,) float: the detached per-sample losses summed per time bucket, and how
    many samples fell in each (skip_nonfinite: non-finite losses left out, as training skips their steps);
    accumulate over a logging window, then log sums / counts."""
    idx = timestep_bucket(t, n).to(per_sample_loss.device)
    loss = per_sample_loss.detach().float()
    finite = torch.isfinite(loss) if skip_nonfinite else torch.ones_like(loss, dtype=torch.bool)
    sums = torch.zeros(n, device=loss.device).index_add_(0, idx, torch.where(finite, loss, 0.0))
    counts = torch.zeros(n, device=idx.device).index_add_(0, idx, finite.float())
    # (index_add_, not bincount: bincount's output size needs a host-device sync on CUDA)
    return sums, counts
