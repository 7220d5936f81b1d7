"""The training objective's options: each trains, and the extra losses measure what they claim."""
import math

import pytest
import torch

import objective as O
import train as T
from config import get_config
from model import DiTConfig, SingleStreamDiT


def batch_for(cfg, B=3, L=5):
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, 3:] = False
    return {"latents": torch.randn(B, cfg.latent_channels, 8, 8, generator=g),
            "text": torch.randn(B, L, cfg.text_dim, generator=g), "mask": mask,
            "drop": torch.tensor([False, True, False])}


def test_fourier_losses_are_zero_for_identical_and_positive_otherwise():
    x = torch.randn(2, 3, 8, 8)
    amp, corr = O.fourier_losses(x, x)
    assert amp.item() < 1e-10 and abs(corr.item()) < 1e-6
    amp, corr = O.fourier_losses(x, -x)  # same amplitudes, opposite phase
    assert amp.item() < 1e-10 and abs(corr.item() - 2.0) < 1e-5
    amp, corr = O.fourier_losses(x, torch.randn(2, 3, 8, 8))
    assert amp.item() > 0 and 0 < corr.item() < 2


def test_each_loss_is_its_own_and_an_unknown_one_is_an_error():
    from dataclasses import replace
    from config import LOSSES, ConfigError
    cfg, pred, target = get_config("tiny", huber_delta=0.5), torch.tensor([0.0, 0.2, 3.0]), torch.zeros(3)
    want = {"mse": [0.0, 0.04, 9.0], "l1": [0.0, 0.2, 3.0], "huber": [0.0, 0.02, 1.375]}
    assert set(want) == set(LOSSES)  # a new loss needs its case here
    for name, values in want.items():
        torch.testing.assert_close(O.elementwise_loss(pred, target, replace(cfg, loss=name)), torch.tensor(values))
    with pytest.raises(ConfigError, match="loss='charbonnier': must be one of mse, l1, huber"):
        O.elementwise_loss(pred, target, replace(cfg, loss="charbonnier"))  # (not silently huber)


def test_lr_schedule_warmup_then_cosine_to_the_floor():
    cfg = get_config("tiny", learning_rate=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert T.lr_at(0, cfg) == pytest.approx(0.1) and T.lr_at(9, cfg) == pytest.approx(1.0)
    assert T.lr_at(60, cfg) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the cosine
    assert T.lr_at(110, cfg) == pytest.approx(0.1)
    # with a time budget the cosine follows whichever runs out first: the step or the clock
    assert T.lr_at(60, cfg, time_frac=0.2) == T.lr_at(60, cfg)             # ahead of the clock: by step
    assert T.lr_at(20, cfg, time_frac=60 / 110) == pytest.approx(T.lr_at(60, cfg))  # behind: by time
    assert T.lr_at(30, cfg, time_frac=1.0) == pytest.approx(0.1)           # deadline: fully annealed
    assert T.lr_at(5, cfg, time_frac=0.01) == T.lr_at(5, cfg)              # warmup by step ...
    # ... capped by the clock's decay: no jump down at its end on a slow machine, annealed if time runs out in it
    slow = [T.lr_at(s, cfg, time_frac=(s + 1) / 20) for s in range(20)]   # 20 steps' worth of time
    assert max(abs(a - b) for a, b in zip(slow, slow[1:])) < 0.25 and slow[-1] == pytest.approx(0.1)
    assert T.lr_at(5, cfg, time_frac=1.0) == pytest.approx(0.1)


@pytest.mark.parametrize("overrides", [
    {"prediction": "v"}, {"prediction": "x"}, {"prediction": "edm"}, {"loss": "l1"}, {"loss": "huber"},
    {"offset_noise": 0.1}, {"fourier_amp_loss": 0.5, "fourier_corr_loss": 0.5},
    {"self_consistency_loss": 1.0}, {"t_sampling": "uniform", "shift": 3.0}, {"dynamic_shift": True},
])
def test_every_objective_option_gives_a_finite_loss_and_gradients(overrides):
    cfg = get_config("tiny", **overrides)
    torch.manual_seed(0)
    model = SingleStreamDiT(DiTConfig.from_config(cfg))
    for p in model.parameters():  # leave the zero init so the output (and the extra losses) are non-trivial
        torch.nn.init.normal_(p, std=0.02)
    ema = SingleStreamDiT(DiTConfig.from_config(cfg))
    ema.load_state_dict(model.state_dict())
    gen = torch.Generator().manual_seed(0)
    loss, per_sample, t = O.flow_matching_loss(model, batch_for(cfg), cfg, gen, ema_model=ema)
    loss.backward()
    assert math.isfinite(loss.item()) and per_sample.shape == (3,) and ((t > 0) & (t < 1)).all()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    assert sum(float(p.grad.abs().sum()) for p in model.parameters() if p.grad is not None) > 0


@pytest.mark.parametrize("prediction", ["x", "v"])
def test_fourier_losses_have_finite_gradients_from_the_zero_initialised_output(prediction):
    """AdaLN-zero makes a fresh model output exactly 0: an x-prediction's clean estimate is then all zeros,
    where |FFT| has no gradient (this once stopped every run with fourier_amp_loss after 5 NaN steps)."""
    cfg = get_config("tiny", prediction=prediction, fourier_amp_loss=1.0, fourier_corr_loss=1.0)
    torch.manual_seed(0)
    model = SingleStreamDiT(DiTConfig.from_config(cfg))
    loss, _, _ = O.flow_matching_loss(model, batch_for(cfg), cfg, torch.Generator().manual_seed(0))
    loss.backward()
    assert math.isfinite(loss.item())
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    assert sum(float(p.grad.abs().sum()) for p in model.parameters() if p.grad is not None) > 0
    # the eps does not change the values: amplitude loss of identical spectra is 0, correlation of x with 2x is 0
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    amp, corr = O.fourier_losses(x, x)
    assert amp.item() < 1e-10 and abs(corr.item()) < 1e-6
    assert abs(O.fourier_losses(2 * x, x)[1].item()) < 1e-6
    zero = torch.zeros_like(x, requires_grad=True)  # the correlation's gradient at a zero output: bounded
    O.fourier_losses(zero, x)[1].backward()
    assert 0 < zero.grad.norm() < 10  # (was 3.8e8: it dominated a run's first steps)
    torch.testing.assert_close(O.fourier_losses(x, torch.zeros_like(x))[0],
                               torch.fft.rfft2(x, norm="ortho").abs().pow(2).mean())


def test_x_prediction_loss_is_on_the_implied_velocity():
    """A perfect clean-sample prediction gives zero loss; v-loss of an x-pred error scales with 1/t."""
    cfg = get_config("tiny", prediction="x")
    b = batch_for(cfg)
    x0 = b["latents"]
    t_fixed = torch.tensor([0.5, 0.25, 0.8])

    class Oracle(torch.nn.Module):  # returns the true x0 (+ offset): the loss must be offset^2 / t^2
        def __init__(self, offset):
            super().__init__()
            self.offset = offset

        def forward(self, x, t, text, mask, drop, text_padded=None):
            return x0 + self.offset

    gen = torch.Generator().manual_seed(0)
    loss, per_sample, _ = O.flow_matching_loss(Oracle(0.0), b, cfg, gen, t=t_fixed)
    assert loss.item() < 1e-10
    _, per_sample, _ = O.flow_matching_loss(Oracle(0.1), b, cfg, gen, t=t_fixed)
    assert torch.allclose(per_sample, 0.01 / t_fixed ** 2, rtol=1e-4)


def test_to_device_trims_text_to_the_longest_caption():
    cfg = get_config("tiny")
    b = batch_for(cfg, L=7)
    b["mask"][:, 5:] = False
    out = T.to_device(b, torch.device("cpu"), trim_text=True)
    assert out["text"].shape[1] == 5 and out["mask"].shape[1] == 5 and out["text_padded"] is True
    full = T.to_device(dict(b, mask=torch.ones(3, 7, dtype=torch.bool), drop=torch.zeros(3, dtype=torch.bool)),
                       torch.device("cpu"), trim_text=True)
    assert full["text"].shape[1] == 7 and full["text_padded"] is False


def test_the_ema_forward_of_the_consistency_loss_gets_the_padding_flag():
    """runtime.to_device computes text_padded on the host so that no forward reads the mask on the device (a
    host-device sync on a GPU); the EMA forward of self_consistency_loss must get it as the online one does."""
    cfg = get_config("tiny", self_consistency_loss=1.0)
    torch.manual_seed(0)
    model, ema = SingleStreamDiT(DiTConfig.from_config(cfg)), SingleStreamDiT(DiTConfig.from_config(cfg))
    seen = []
    forward = ema.forward
    ema.forward = lambda *a, **k: seen.append(k.get("text_padded")) or forward(*a, **k)
    batch = T.to_device(batch_for(cfg), torch.device("cpu"))
    loss, _, _ = O.flow_matching_loss(model, batch, cfg, torch.Generator().manual_seed(1), ema_model=ema)
    assert seen == [True] and torch.isfinite(loss)
