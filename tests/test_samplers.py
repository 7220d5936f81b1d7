"""samplers.py: conversions, time shifts, timestep sampling, ODE order on an analytic flow, CFG, NFE."""
import math
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import samplers as S  # noqa: E402
from config import Config, ConfigError, get_config  # noqa: E402

torch.set_num_threads(1)


def _rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---------------------------------------------------------------- conversions


def test_noising_target_and_conversions_are_exact_inverses():
    x0, eps = _rand(5, 3, 4, 4, seed=1), _rand(5, 3, 4, 4, seed=2)
    t = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64)
    x_t = S.add_noise(x0, eps, t)
    assert x_t.shape == x0.shape
    torch.testing.assert_close(x_t[0], x0[0])                      # t = 0 is data
    torch.testing.assert_close(x_t[-1], eps[-1])                   # t = 1 is noise
    torch.testing.assert_close(x_t[2], 0.5 * (x0[2] + eps[2]))
    v = S.velocity_target(x0, eps)
    torch.testing.assert_close(v, eps - x0)
    torch.testing.assert_close(S.x0_from_velocity(x_t, v, t), x0)
    # x-pred -> v is exact wherever t >= t_min
    v_from_x = S.velocity_from_x0(x_t, x0, t, t_min=0.05)
    torch.testing.assert_close(v_from_x[1:], v[1:])
    # below t_min the division is clamped: (x_t - x0) / t_min, not / t
    torch.testing.assert_close(v_from_x[0], (x_t[0] - x0[0]) / 0.05)
    # scalar t works too
    torch.testing.assert_close(S.add_noise(x0, eps, 0.25), 0.75 * x0 + 0.25 * eps)


def test_x_and_v_prediction_conversions_agree():
    x0, eps = _rand(4, 3, 2, 2, seed=3), _rand(4, 3, 2, 2, seed=4)
    t = torch.tensor([0.2, 0.4, 0.6, 1.0], dtype=torch.float64)
    x_t = S.add_noise(x0, eps, t)
    v = S.velocity_target(x0, eps)
    # a perfect v-network and a perfect x-network give the same velocity and the same clean sample
    torch.testing.assert_close(S.to_velocity(v, x_t, t, "v", 0.05), S.to_velocity(x0, x_t, t, "x", 0.05))
    torch.testing.assert_close(S.to_x0(v, x_t, t, "v"), S.to_x0(x0, x_t, t, "x"))
    torch.testing.assert_close(S.to_x0(v, x_t, t, "v"), x0)
    with pytest.raises(ConfigError, match="prediction"):
        S.to_velocity(v, x_t, t, "eps", 0.05)


def test_clean_sample_and_velocity_of_every_prediction_lie_on_one_line():
    """x0_hat = x_t - t v_hat at every t, also below an x-prediction's t_min: there the velocity loss trains
    (x_t - out) / t_min to the velocity, so `out` is x_t - t_min v, a noised sample (x0 + (t - t_min)(eps - x0)),
    and the Fourier and self-consistency losses, which compare x0_hat with x0, pulled it elsewhere."""
    x0, eps, out = _rand(5, 3, 2, 2, seed=7), _rand(5, 3, 2, 2, seed=8), _rand(5, 3, 2, 2, seed=9)
    t = torch.tensor([0.0, 0.01, 0.04, 0.3, 1.0], dtype=torch.float64)
    x_t = S.add_noise(x0, eps, t)
    for kind in ("v", "x", "edm"):
        pred = S.Prediction(kind, t_min=0.05)
        torch.testing.assert_close(pred.x0(out, x_t, t), x_t - t.view(-1, 1, 1, 1) * pred.velocity(out, x_t, t))
    pred = S.Prediction("x", t_min=0.05)
    assert torch.equal(pred.x0(out, x_t, t)[3:], out[3:])              # the output itself from t_min on
    v = S.velocity_target(x0, eps)                                     # the velocity loss's minimiser below t_min ...
    trained = x_t - t.clamp(min=0.05).view(-1, 1, 1, 1) * v
    torch.testing.assert_close(pred.velocity(trained, x_t, t)[1:], v[1:])
    torch.testing.assert_close(pred.x0(trained, x_t, t), x0)            # ... is the clean sample


def test_prediction_from_config_carries_all_three_settings():
    cfg = Config(prediction="edm", x_pred_t_min=0.1, sigma_data=0.3)
    pred = S.Prediction.from_config(cfg)
    assert pred == S.Prediction("edm", 0.1, 0.3)
    x_t, out = _rand(2, 3, 2, 2, seed=1), _rand(2, 3, 2, 2, seed=2)
    t = torch.tensor([0.02, 0.5], dtype=torch.float64)
    torch.testing.assert_close(pred.velocity(out, x_t, t), S.to_velocity(out, x_t, t, "edm", 0.1, 0.3))
    torch.testing.assert_close(pred.x0(out, x_t, t), S.to_x0(out, x_t, t, "edm", 0.3))
    x_pred = S.Prediction.from_config(Config(prediction="x", x_pred_t_min=0.1))
    # below t_min the x-prediction's 1/t is clamped at the configured value
    torch.testing.assert_close(x_pred.velocity(out, x_t, t)[0], (x_t[0] - out[0]) / 0.1)


@pytest.mark.parametrize("sigma", [0.5, 0.2])
def test_edm_preconditioning_is_exact_and_passes_x_t_through_at_low_noise(sigma):
    x0, eps = _rand(5, 3, 2, 2, seed=5), _rand(5, 3, 2, 2, seed=6)
    t = torch.tensor([0.0, 0.01, 0.3, 0.7, 1.0], dtype=torch.float64)
    x_t = S.add_noise(x0, eps, t)
    a, b, c, d = S.edm_coefficients(t, x_t, sigma)
    out = (x0 - a * x_t) / b.clamp(min=1e-12)                      # the output a perfect network gives
    # a perfect edm-network gives the true clean sample and velocity, even at t = 0.01 (no t_min clamp)
    torch.testing.assert_close(S.to_x0(out, x_t, t, "edm", sigma)[1:], x0[1:])
    v = S.to_velocity(out, x_t, t, "edm", 0.05, sigma)
    torch.testing.assert_close(v[1:], S.velocity_target(x0, eps)[1:])
    guided = S.guided_velocity_fn(lambda x, tt, text, mask, drop=None, text_padded=None: out, None, None, 1.0,
                                  S.Prediction("edm", 0.05, sigma))
    torch.testing.assert_close(guided(x_t, t), v)                  # the samplers use the same sigma
    # the velocity form is (x_t - x0_hat) / t, simplified
    x0_hat = S.to_x0(eps, x_t, t, "edm", sigma)
    torch.testing.assert_close(S.to_velocity(eps, x_t, t, "edm", 0.05, sigma)[1:],
                               ((x_t - x0_hat) / S._per_sample(t, x_t))[1:])
    # t = 0: the clean sample is x_t whatever the network says; t = 1: a scaled x-prediction
    torch.testing.assert_close(x0_hat[0], x_t[0])
    torch.testing.assert_close(x0_hat[-1], sigma * eps[-1])
    # the network's target has about unit variance at every t when the data have std sigma_data
    gen = torch.Generator().manual_seed(0)
    x0 = sigma * torch.randn(5, 20000, generator=gen, dtype=torch.float64)
    x_t = S.add_noise(x0, torch.randn(5, 20000, generator=gen, dtype=torch.float64), t)
    a, b, _, _ = S.edm_coefficients(t, x_t, sigma)
    target_std = ((x0 - a * x_t) / b.clamp(min=1e-12))[1:].std(dim=1)
    assert ((target_std > 0.97) & (target_std < 1.03)).all(), target_std


# ---------------------------------------------------------------- time shifts


def test_shift_time_identity_monotone_endpoints():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    torch.testing.assert_close(S.shift_time(t, 1.0), t)
    for s in [0.5, 3.0, 10.0]:
        u = S.shift_time(t, s)
        assert u[0] == 0 and u[-1] == 1
        assert (u[1:] > u[:-1]).all()
    assert (S.shift_time(t[1:-1], 3.0) > t[1:-1]).all()           # s > 1 moves toward noise
    assert (S.shift_time(t[1:-1], 0.5) < t[1:-1]).all()
    assert S.shift_time(0.5, 3.0) == pytest.approx(0.75)


def test_dynamic_shift_matches_shift_and_flux_mu():
    t = torch.linspace(0, 1, 51, dtype=torch.float64)
    for mu in [-0.3, 0.5, 1.15, 2.0]:
        torch.testing.assert_close(S.dynamic_shift_time(t, mu), S.shift_time(t, math.exp(mu)))
    tm = t[1:]                                                    # the literal FLUX formula, away from t=0
    torch.testing.assert_close(S.dynamic_shift_time(tm, 0.7), math.exp(0.7) / (math.exp(0.7) + (1 / tm - 1)))
    assert S.flux_mu(256) == pytest.approx(0.5)
    assert S.flux_mu(4096) == pytest.approx(1.15)
    assert S.flux_mu(2176) == pytest.approx(0.825)                 # linear in between
    assert S.time_shift_for(get_config("tiny", shift=3.0), 64) == 3.0
    assert S.time_shift_for(get_config("tiny", dynamic_shift=True), 4096) == pytest.approx(math.exp(1.15))


def test_time_grid():
    g = S.time_grid(10)
    assert g.shape == (11,) and g[0] == 1 and g[-1] == 0
    torch.testing.assert_close(g, torch.linspace(1, 0, 11, dtype=torch.float64))
    gs = S.time_grid(10, shift=3.0)
    assert gs[0] == 1 and gs[-1] == 0 and (gs[1:] < gs[:-1]).all()
    torch.testing.assert_close(gs, S.shift_time(g, 3.0))
    # shift > 1: the steps near noise are smaller than those near data
    assert (gs[0] - gs[1]) < (gs[-2] - gs[-1])


# ---------------------------------------------------------------- training timesteps


def test_timesteps_range_median_and_determinism():
    gen = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    t = S.sample_timesteps(20000, "logit_normal", mean=0.5, std=1.0, generator=gen())
    assert t.shape == (20000,) and t.dtype == torch.float32
    assert (t > 0).all() and (t < 1).all()
    assert t.median().item() == pytest.approx(1 / (1 + math.exp(-0.5)), abs=0.01)   # sigmoid(mean)
    torch.testing.assert_close(t, S.sample_timesteps(20000, "logit_normal", 0.5, 1.0, generator=gen()))
    assert not torch.equal(t, S.sample_timesteps(20000, "logit_normal", 0.5, 1.0))
    u = S.sample_timesteps(20000, "uniform", generator=gen())
    assert (u >= 0).all() and (u < 1).all()
    assert u.mean().item() == pytest.approx(0.5, abs=0.01)
    # the shift maps the median: median of shifted = shift(median)
    us = S.sample_timesteps(20000, "uniform", shift=3.0, generator=gen())
    torch.testing.assert_close(us, S.shift_time(u, 3.0))
    assert us.median().item() == pytest.approx(0.75, abs=0.01)
    with pytest.raises(ConfigError, match="t_sampling"):
        S.sample_timesteps(4, "beta")


def test_timesteps_uniform_mix():
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    ln = S.sample_timesteps(50000, "logit_normal", 0.4, 1.0, generator=gen())
    torch.testing.assert_close(ln, S.sample_timesteps(50000, "logit_normal", 0.4, 1.0, generator=gen(),
                                                      uniform_mix=0.0))   # 0: the plain draw, same rng use
    mixed = S.sample_timesteps(50000, "logit_normal", 0.4, 1.0, generator=gen(), uniform_mix=0.2)
    # P(t < 0.1): logit-normal(0.4, 1) Phi(-2.60) = 0.0047; the mixture 0.8 * 0.0047 + 0.2 * 0.1 = 0.0237
    assert (ln < 0.1).float().mean().item() == pytest.approx(0.0047, abs=0.002)
    assert (mixed < 0.1).float().mean().item() == pytest.approx(0.0237, abs=0.003)
    assert (mixed >= 0).all() and (mixed < 1).all()
    full = S.sample_timesteps(50000, "logit_normal", 0.4, 1.0, generator=gen(), uniform_mix=1.0)
    assert full.mean().item() == pytest.approx(0.5, abs=0.01) and full.std().item() == pytest.approx(0.2887, abs=0.01)
    with pytest.raises(ConfigError, match="t_uniform_mix"):
        Config(t_uniform_mix=1.5).validate()


# ---------------------------------------------------------------- ODE samplers on an analytic flow
#
# Data x0 ~ N(m, s^2) per dimension, eps ~ N(0, 1). Then x_t = (1-t) x0 + t eps is Gaussian with mean
# mu_t = (1-t) m and std sig_t = sqrt((1-t)^2 s^2 + t^2). (x0, eps, x_t) are jointly Gaussian with
# Cov(eps, x_t) = t and Cov(x0, x_t) = (1-t) s^2, so
#   v(x, t) = E[eps - x0 | x_t = x] = -m + (t - (1-t) s^2) / sig_t^2 * (x - mu_t),
# i.e. dx/dt = mu_t' + sig_t' z with z = (x - mu_t) / sig_t: the flow keeps z fixed (maps quantiles to
# quantiles), so the exact endpoint of noise eps (z = eps at t=1) is m + s * eps.

M = torch.tensor([1.5, -0.5, 0.0], dtype=torch.float64).reshape(1, 3, 1, 1)
SD = torch.tensor([0.5, 2.0, 0.8], dtype=torch.float64).reshape(1, 3, 1, 1)


def analytic_velocity(x, t):
    t = t.reshape(-1, 1, 1, 1)
    mu = (1 - t) * M
    var = (1 - t) ** 2 * SD ** 2 + t ** 2
    return -M + (t - (1 - t) * SD ** 2) / var * (x - mu)


# each sampler's least convergence order and largest error at 64 steps: a new sampler must be added here
ORDER = {"euler": (0.8, 0.2), "heun": (1.7, 1e-2), "rk4": (3.5, 1e-6)}


def test_every_sampler_has_an_order_test():
    assert set(ORDER) == set(S.SAMPLERS)


@pytest.mark.parametrize("method", list(ORDER))
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_sampler_order_on_analytic_flow(method, shift):
    min_slope, max_error = ORDER[method]
    noise = _rand(4, 3, 2, 2, seed=5)
    exact = M + SD * noise
    steps = [8, 16, 32, 64]                   # past the pre-asymptotic regime, above float64 round-off
    errors = []
    for n in steps:
        x0, nfe = S.sample_ode(analytic_velocity, noise, n, method, shift=shift)
        assert nfe == S.nfe_for(method, n)
        errors.append((x0 - exact).abs().max().item())
    assert errors[-1] < errors[0]
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert slope > min_slope, (method, shift, errors, slope)
    assert errors[-1] < max_error, errors


def test_rk4_with_an_ideal_x_prediction_matches_the_ideal_velocity():
    """RK4's last evaluation is at t = 0, where an x-prediction says nothing (x0_hat = x_t for any network
    that has learnt E[x0 | x_t]): the clamped (x_t - x0_hat) / t_min is 0 there, while the exact field is
    E[eps | x0] - x_t = -x_t. That 0 shrank every RK4 sample towards 0 by h/6 (2.1% at 8 steps)."""
    noise = _rand(4, 3, 2, 2, seed=5)
    pred = S.Prediction("x", 0.05)

    def ideal_x_network(x, t):                                     # E[x0 | x_t] of the analytic flow
        return S.x0_from_velocity(x, analytic_velocity(x, t), t)

    for steps in (4, 8):                                           # every other evaluation at t >= t_min
        by_v, _ = S.sample_ode(analytic_velocity, noise, steps, "rk4")
        by_x, _ = S.sample_ode(lambda x, t: pred.velocity(ideal_x_network(x, t), x, t), noise, steps, "rk4")
        torch.testing.assert_close(by_x, by_v)
    x_t, t0 = _rand(2, 3, 2, 2, seed=1), torch.zeros(2, dtype=torch.float64)
    torch.testing.assert_close(pred.velocity(x_t, x_t, t0), -x_t)
    torch.testing.assert_close(pred.velocity(x_t + 1, x_t, 0.0), -x_t)   # whatever the network says at t = 0


def test_sample_ode_nfe_callback_and_errors():
    noise = _rand(2, 3, 2, 2, seed=6)
    assert (S.nfe_for("euler", 5), S.nfe_for("heun", 5), S.nfe_for("rk4", 5)) == (5, 9, 20)
    assert [S.steps_for_nfe(m, 24) for m in ("euler", "heun", "rk4")] == [24, 12, 6]  # the notebook's budget
    assert [S.steps_for_nfe(m, 2) for m in ("euler", "heun", "rk4")] == [2, 1, 1]    # at least one step
    seen = []
    x0, nfe = S.sample_ode(analytic_velocity, noise, 5, "heun", shift=2.0,
                           callback=lambda i, t, x: seen.append((i, t, x.shape)))
    assert nfe == 9
    grid = S.time_grid(5, 2.0).tolist()
    assert [s[0] for s in seen] == list(range(5))
    assert [s[1] for s in seen] == pytest.approx(grid[1:])
    assert seen[-1][1] == 0.0 and all(s[2] == noise.shape for s in seen)
    # one Euler step of a constant field lands exactly on noise - v
    x, nfe = S.sample_ode(lambda x, t: torch.ones_like(x), noise, 1, "euler")
    torch.testing.assert_close(x, noise - 1)
    assert nfe == 1
    with pytest.raises(ConfigError, match="sampler"):
        S.sample_ode(analytic_velocity, noise, 4, "dpm")


def test_sample_ode_from_a_partly_noised_sample():
    # data = one point c: the exact velocity is (x_t - c) / t, so any step from x_t lands on c
    c, eps = _rand(2, 3, 4, 4, seed=7), _rand(2, 3, 4, 4, seed=8)
    seen = []
    x, nfe = S.sample_ode(lambda x, t: (x - c) / S._per_sample(t, x), (1 - 0.3) * c + 0.3 * eps, 3, "euler",
                          t_start=0.3, callback=lambda i, t, x: seen.append(t))
    torch.testing.assert_close(x, c)
    assert nfe == 3 and seen == pytest.approx([0.2, 0.1, 0.0])
    for bad in (0.0, 1.5):
        with pytest.raises(ConfigError, match="t_start"):
            S.sample_ode(analytic_velocity, eps, 2, "euler", t_start=bad)


def test_velocity_fn_gets_per_sample_t():
    shapes = []

    def fn(x, t):
        shapes.append((t.shape, t.dtype))
        return torch.zeros_like(x)

    S.sample_ode(fn, torch.zeros(3, 3, 2, 2), 2, "rk4")
    assert shapes == [((3,), torch.float32)] * 8


# ---------------------------------------------------------------- classifier-free guidance


class FakeModel:
    """Any callable with the model signature; output depends on text and on drop, and counts calls."""

    def __init__(self):
        self.null = 0.3
        self.calls = []

    def __call__(self, x, t, text, text_mask, drop=None, text_padded=None):
        self.calls.append((x.shape[0], None if drop is None else drop.tolist()))
        assert x.shape[0] == t.shape[0] == text.shape[0] == text_mask.shape[0]
        pooled = (text * text_mask[..., None]).sum(1).mean(-1)               # (B,)
        if drop is not None:
            pooled = torch.where(drop, torch.full_like(pooled, self.null), pooled)
        return x * 0.5 + pooled.reshape(-1, 1, 1, 1) + t.reshape(-1, 1, 1, 1)


def _cfg_inputs(B=2, L=5):
    x = _rand(B, 3, 4, 4, seed=8, dtype=torch.float32)
    t = torch.full((B,), 0.6)
    text = _rand(B, L, 8, seed=9, dtype=torch.float32)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, 3:] = False
    return x, t, text, mask


@pytest.mark.parametrize("prediction", ["v", "x"])
def test_cfg_scale_one_is_the_conditional_in_one_forward(prediction):
    x, t, text, mask = _cfg_inputs()
    model = FakeModel()
    v = S.guided_velocity_fn(model, text, mask, 1.0, S.Prediction(prediction, 0.05))(x, t)
    assert model.calls == [(2, None)]
    cond = S.to_velocity(FakeModel()(x, t, text, mask), x, t, prediction, 0.05)
    assert torch.equal(v, cond)


@pytest.mark.parametrize("prediction", ["v", "x"])
def test_cfg_mixes_in_velocity_space_in_one_batched_forward(prediction):
    x, t, text, mask = _cfg_inputs()
    model = FakeModel()
    v = S.guided_velocity_fn(model, text, mask, 4.0, S.Prediction(prediction, 0.05))(x, t)
    assert model.calls == [(4, [False, False, True, True])]
    ref = FakeModel()
    v_c = S.to_velocity(ref(x, t, text, mask), x, t, prediction, 0.05)
    v_u = S.to_velocity(ref(x, t, text, mask, drop=torch.ones(2, dtype=torch.bool)), x, t, prediction, 0.05)
    torch.testing.assert_close(v, v_u + 4.0 * (v_c - v_u))
    assert not torch.allclose(v, v_c)
    # scale 0 is the unconditional prediction
    torch.testing.assert_close(S.guided_velocity_fn(FakeModel(), text, mask, 0.0, S.Prediction(prediction, 0.05))(x, t),
                               v_u)


def test_cfg_negative_prompt_replaces_null_caption():
    x, t, text, mask = _cfg_inputs(L=5)
    neg = _rand(1, 7, 8, seed=10, dtype=torch.float32)            # one negative prompt, longer than text
    neg_mask = torch.ones(1, 7, dtype=torch.bool)
    model = FakeModel()
    v = S.guided_velocity_fn(model, text, mask, 3.0, S.Prediction("v"), neg_text=neg, neg_mask=neg_mask)(x, t)
    assert model.calls == [(4, [False] * 4)]                      # no null caption used
    ref = FakeModel()
    v_c = ref(x, t, text, mask)
    v_n = ref(x, t, neg.expand(2, -1, -1), neg_mask.expand(2, -1))
    torch.testing.assert_close(v, v_n + 3.0 * (v_c - v_n))
    v_null = S.guided_velocity_fn(FakeModel(), text, mask, 3.0, S.Prediction("v"))(x, t)
    assert not torch.allclose(v, v_null)


def test_cfg_nfe_counts_batched_forward_once():
    x, t, text, mask = _cfg_inputs()
    for method, steps, scale in [("euler", 3, 4.0), ("heun", 3, 4.0), ("rk4", 2, 1.0)]:
        model = FakeModel()
        fn = S.guided_velocity_fn(model, text, mask, scale, S.Prediction("x", 0.05))
        x0, nfe = S.sample_ode(fn, x, steps, method)
        assert nfe == len(model.calls) == S.nfe_for(method, steps)
        assert all(b == (4 if scale != 1 else 2) for b, _ in model.calls)
        assert x0.shape == x.shape and torch.isfinite(x0).all()


# ---------------------------------------------------------------- loss per timestep bucket


def test_timestep_buckets():
    t = torch.tensor([0.0, 0.24, 0.25, 0.5, 0.74, 0.99, 1.0])
    assert S.timestep_bucket(t).tolist() == [0, 0, 1, 2, 2, 3, 3]
    assert S.timestep_bucket(t, n=2).tolist() == [0, 0, 0, 1, 1, 1, 1]
    loss = torch.tensor([1.0, 3.0, 2.0, 4.0, 6.0, 5.0, 7.0], requires_grad=True)
    sums, counts = S.loss_per_bucket(loss, t)
    assert sums.tolist() == [4.0, 2.0, 10.0, 12.0] and counts.tolist() == [2.0, 1.0, 2.0, 2.0]
    assert not sums.requires_grad
    sums, counts = S.loss_per_bucket(loss[:2], t[:2])
    assert counts.tolist() == [2.0, 0.0, 0.0, 0.0]
    bad = torch.tensor([1.0, float("nan"), 2.0, float("inf")])
    sums, counts = S.loss_per_bucket(bad, t[[0, 1, 3, 4]], skip_nonfinite=True)  # training: skipped steps out
    assert sums.tolist() == [1.0, 0.0, 2.0, 0.0] and counts.tolist() == [1.0, 0.0, 1.0, 0.0]
    sums, counts = S.loss_per_bucket(bad, t[[0, 1, 3, 4]])  # validation: a NaN model shows as NaN
    assert math.isnan(sums[0]) and math.isinf(sums[2]) and counts.tolist() == [2.0, 0.0, 2.0, 0.0]
