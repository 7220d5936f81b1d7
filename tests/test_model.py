"""model.py: shapes, AdaLN-zero init, masking, null caption, RoPE, checkpointing, export, FLOPs."""
import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from config import get_config, main_guard
from layers import GlobalFourierFilter, apply_rope, joint_positions, rope_angles
from model import DiTConfig, SingleStreamDiT, flops_breakdown, flops_per_image
from model import main as model_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT_DIM = 12


def tiny(**kw) -> DiTConfig:
    base = dict(in_channels=3, patch_size=2, hidden_size=32, num_heads=2, depth=2, refiner_depth=1,
                text_dim=TEXT_DIM, mlp_ratio=2.0, fourier_refiner=True, fourier_final_depth=1, local_bias=True)
    return DiTConfig(**{**base, **kw})


def perturbed(dc: DiTConfig, seed=0) -> SingleStreamDiT:
    """A model whose zero-initialised parts are non-zero, so every path affects the output."""
    torch.manual_seed(seed)
    model = SingleStreamDiT(dc)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def inputs(B=2, H=8, W=8, L=6, lengths=(6, 3), seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 3, H, W, generator=g)
    t = torch.rand(B, generator=g)
    text = torch.randn(B, L, TEXT_DIM, generator=g)
    mask = torch.arange(L)[None] < torch.tensor(lengths)[:, None]
    return x, t, text, mask


def test_shapes_for_several_buckets_with_one_model():
    model = perturbed(tiny())
    for H, W in [(8, 8), (8, 16), (16, 8), (6, 10), (2, 2)]:
        x, t, text, mask = inputs(H=H, W=W)
        out = model(x, t, text, mask)
        assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all()
        assert out.abs().mean() > 1e-3
    assert {k[:2] for k in model._rope_cache} == {(4, 4), (4, 8), (8, 4), (3, 5), (1, 1)}  # one table per bucket


def test_untrained_model_outputs_exactly_zero_but_has_gradients():
    model = SingleStreamDiT(tiny())
    x, t, text, mask = inputs()
    out = model(x, t, text, mask, drop=torch.tensor([False, True]))
    assert torch.equal(out, torch.zeros_like(x))
    out.pow(2).add(out).sum().backward()  # d loss / d out = 1 at out = 0
    assert model.final_layer.linear.weight.grad.abs().sum() > 0


def test_padding_is_never_attended_to():
    model = perturbed(tiny())
    x, t, text, mask = inputs(L=8, lengths=(5, 3))
    ref = model(x, t, text, mask)
    junk = torch.where(mask[..., None], text, torch.randn_like(text) * 100)
    junk[1, -1] = float("nan")
    assert torch.equal(model(x, t, junk, mask), ref)
    # dropping the padding altogether changes nothing either (per sample, so no padding at all)
    for i, n in enumerate((5, 3)):
        alone = model(x[i:i + 1], t[i:i + 1], text[i:i + 1, :n], mask[i:i + 1, :n])
        torch.testing.assert_close(alone, ref[i:i + 1], atol=1e-5, rtol=1e-4)
    # the mask is really needed: the same padded tokens, marked real, change the output
    assert not torch.allclose(model(x, t, text, torch.ones_like(mask)), ref, atol=1e-4)


def test_a_prompt_samples_the_same_image_alone_and_batched_with_a_longer_one():
    """End to end (guided sampler + model): a short prompt batched with a longer one (so padded, also in
    the 2B CFG forward and against a longer negative prompt) gives the image it gives alone, unpadded."""
    import samplers as S
    model = perturbed(tiny()).eval()
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(2, 3, 6, 10, generator=g)                                    # non-square 3 x 5 grid
    text = torch.randn(2, 7, TEXT_DIM, generator=g)
    mask = torch.arange(7)[None] < torch.tensor([[3], [7]])                          # lengths 3 and 7
    neg = torch.randn(1, 9, TEXT_DIM, generator=g)
    neg_mask = torch.arange(9)[None] < 4
    for prediction in ("v", "x"):
        for scale, negative in [(1.0, None), (4.0, None), (4.0, (neg, neg_mask))]:
            def sample(txt, msk, x, ngt):
                fn = S.guided_velocity_fn(model, txt, msk, scale, S.Prediction(prediction),
                                          *(ngt if ngt else (None, None)))
                return S.sample_ode(fn, x, 3, "heun")[0]
            batched = sample(text, mask, noise, negative)
            alone = sample(text[:1, :3], mask[:1, :3], noise[:1],
                           negative and (negative[0][:, :4], negative[1][:, :4]))
            torch.testing.assert_close(alone, batched[:1], atol=1e-4, rtol=1e-4)
            assert not torch.allclose(sample(text[1:], mask[1:], noise[:1], negative), batched[:1], atol=1e-3)


def test_the_sampler_tells_the_model_once_whether_any_token_is_masked():
    """guided_velocity_fn works out text_padded in its first step (the model's own check is a host-device sync in
    every step on a GPU): False only where no mask hides a token, so every step's output is the model's own."""
    import samplers as S
    model = perturbed(tiny()).eval()
    forward, seen = model.forward, []

    def spy(x, t, text, mask, drop=None, text_padded=None):
        seen.append(text_padded)
        out = forward(x, t, text, mask, drop, text_padded=text_padded)
        torch.testing.assert_close(out, forward(x, t, text, mask, drop), atol=1e-5, rtol=1e-4)  # its own check
        return out
    model.forward = spy
    g = torch.Generator().manual_seed(0)
    noise, text = torch.randn(2, 3, 6, 6, generator=g), torch.randn(2, 5, TEXT_DIM, generator=g)
    full, short = torch.ones(2, 5, dtype=torch.bool), torch.arange(5)[None] < torch.tensor([[3], [5]])
    negative = (torch.randn(1, 5, TEXT_DIM, generator=g), torch.ones(1, 5, dtype=torch.bool))
    for mask, scale, neg, padded in [(full, 1.0, (None, None), False), (short, 1.0, (None, None), True),
                                     (full, 4.0, (None, None), True),  # the null caption: its first token only
                                     (full, 4.0, negative, False), (short, 4.0, negative, True)]:
        seen.clear()
        S.sample_ode(S.guided_velocity_fn(model, text, mask, scale, S.Prediction("v"), *neg), noise, 3, "euler")
        assert seen == [padded] * 3, (scale, padded, seen)


def test_unmasked_fast_path_matches_masked_path():
    model = perturbed(tiny())
    x, t, text, mask = inputs(lengths=(6, 6))
    fast = model(x, t, text, mask, text_padded=False)
    torch.testing.assert_close(model(x, t, text, mask, text_padded=True), fast, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(model(x, t, text, mask), fast, atol=1e-5, rtol=1e-4)


def test_drop_replaces_the_text_with_the_null_caption():
    model = perturbed(tiny())
    x, t, text, mask = inputs(L=6, lengths=(6, 2))
    drop = torch.tensor([True, True])
    ref = model(x, t, text, mask, drop=drop)
    other_text, other_mask = torch.randn_like(text), torch.ones_like(mask)
    assert torch.equal(model(x, t, other_text, other_mask, drop=drop), ref)
    torch.testing.assert_close(model(x, t, text[:, :1], mask[:, :1], drop=drop), ref, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(model(x, t, text, mask), ref, atol=1e-4)  # the caption does matter
    # dropping one sample leaves the other one alone; an empty caption is the null caption
    mixed = model(x, t, text, mask, drop=torch.tensor([True, False]))
    torch.testing.assert_close(mixed[0], ref[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(mixed[1:], model(x[1:], t[1:], text[1:], mask[1:]), atol=1e-5, rtol=1e-4)
    empty = model(x, t, text, torch.zeros_like(mask))
    torch.testing.assert_close(empty, ref, atol=1e-5, rtol=1e-4)


def test_rope_scores_depend_only_on_relative_position():
    head_dim = 16
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(head_dim, generator=g), torch.randn(head_dim, generator=g)

    def score(pq, pk):
        rows, cols = torch.tensor([pq[0], pk[0]]), torch.tensor([pq[1], pk[1]])
        cos, sin = rope_angles(rows, cols, head_dim)  # (2, head_dim/2)
        rq, rk = apply_rope(torch.stack([q, k]), cos, sin)
        return torch.dot(rq, rk).item()

    base = score((1, 2), (4, 7))
    for dr, dc in [(0, 0), (5, 0), (0, 9), (13, -3), (40, 40)]:
        assert score((1 + dr, 2 + dc), (4 + dr, 7 + dc)) == pytest.approx(base, abs=1e-4)
    assert abs(score((1, 2), (4, 8)) - base) > 1e-3  # a column offset matters
    assert abs(score((1, 2), (5, 7)) - base) > 1e-3  # a row offset matters
    assert rope_angles(torch.zeros(1), torch.zeros(1), head_dim)[0].shape == (1, head_dim // 2)


def test_text_positions_lie_outside_the_image_grid():
    rows, cols = joint_positions(3, 5, 4)
    assert rows.shape == cols.shape == (4 + 15,)
    text = set(zip(rows[:4].tolist(), cols[:4].tolist()))
    image = set(zip(rows[4:].tolist(), cols[4:].tolist()))
    assert len(image) == 15 and text.isdisjoint(image)
    assert text == {(5, 5), (6, 6), (7, 7), (8, 8)}  # on the diagonal after max(h, w)
    assert (rows[4:].reshape(3, 5)[:, 0].tolist(), cols[4:].reshape(3, 5)[0].tolist()) == ([0, 1, 2], [0, 1, 2, 3, 4])


def test_gradient_checkpointing_gives_same_outputs_and_gradients():
    plain = perturbed(tiny()).train()
    ckpt = SingleStreamDiT(replace(plain.dc, grad_checkpointing=True)).train()
    ckpt.load_state_dict(plain.state_dict())
    x, t, text, mask = inputs()
    outs = []
    for model in (plain, ckpt):
        out = model(x, t, text, mask, drop=torch.tensor([False, True]))
        out.square().mean().backward()
        outs.append(out)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-6, rtol=1e-5)
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_save_load_round_trip_and_errors(tmp_path):
    model = perturbed(tiny(fourier_final_depth=2, local_bias=False)).eval()
    x, t, text, mask = inputs()
    model.save_pretrained(str(tmp_path / "m"))
    assert sorted(os.listdir(tmp_path / "m")) == ["config.json", "model.safetensors"]
    mode = os.stat(tmp_path / "m" / "config.json").st_mode
    assert os.stat(tmp_path / "m" / "model.safetensors").st_mode == mode  # not safetensors' private 0600
    loaded = SingleStreamDiT.from_pretrained(str(tmp_path / "m"))
    assert loaded.dc == model.dc
    assert torch.equal(loaded(x, t, text, mask), model(x, t, text, mask))

    with pytest.raises(FileNotFoundError, match="nowhere"):
        SingleStreamDiT.from_pretrained(str(tmp_path / "nowhere"))
    cfg_file = tmp_path / "m" / "config.json"
    json.dump({**json.loads(cfg_file.read_text()), "depth": 3}, open(cfg_file, "w"))
    with pytest.raises(ValueError, match=r"model\.safetensors: weights do not match .*missing joint_blocks\.2"):
        SingleStreamDiT.from_pretrained(str(tmp_path / "m"))
    json.dump({**json.loads(cfg_file.read_text()), "depth": 2, "hidden_size": 48}, open(cfg_file, "w"))
    with pytest.raises(ValueError, match="has shape"):
        SingleStreamDiT.from_pretrained(str(tmp_path / "m"))
    json.dump({"hidden_sise": 32}, open(cfg_file, "w"))
    with pytest.raises(ValueError, match="config.json: not a valid DiTConfig"):
        SingleStreamDiT.from_pretrained(str(tmp_path / "m"))


def test_bad_input_sizes_give_clear_errors():
    model = SingleStreamDiT(tiny())
    x, t, text, mask = inputs(H=8, W=7)
    with pytest.raises(ValueError, match="8x7 is not a multiple of patch_size=2"):
        model(x, t, text, mask)
    x, t, text, mask = inputs()
    with pytest.raises(ValueError, match="text_dim"):
        model(x, t, text[..., :5], mask)
    with pytest.raises(ValueError, match="head dim"):
        DiTConfig(hidden_size=36, num_heads=6)


def test_param_groups_cover_every_parameter_once():
    model = SingleStreamDiT(tiny())
    decay, no_decay = model.param_groups(0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert "joint_blocks.0.attn.qkv.weight" in decayed and "joint_blocks.0.mlp.w3.weight" in decayed
    for n in ["null_caption", "time_embed.0.weight", "noise_refiner.0.fourier.gain", "noise_refiner.0.fourier.gate",
              "joint_blocks.0.adaLN.bias", "context_refiner.0.norm1.weight", "joint_blocks.0.attn.q_norm.weight"]:
        assert n not in decayed and n in names.values()


def test_flops_match_a_hand_count_and_the_torch_flop_counter():
    # D=8, F=8, N=4 image tokens, T=2 text tokens, one joint block (L=6):
    # embed 4*1*8 + 2*4*8 + 256*8 + 8*8 = 2208 (+ pooled caption MLP 2*64 = 128);
    # block 6*(4*64 + 3*64) + 6*64 + 2*36*8 = 3648; final 4*8*1 + 2*64 = 160  ->  2 * 6016 (+ 2 * 128) FLOPs
    dc = DiTConfig(in_channels=1, patch_size=1, hidden_size=8, num_heads=2, depth=1, refiner_depth=0,
                   text_dim=4, mlp_ratio=1.0, fourier_refiner=False, fourier_final_depth=0, local_bias=False)
    assert flops_per_image(dc, 2, 2, 2) == 2 * (6016 + 128)
    assert flops_per_image(replace(dc, pooled_text=False), 2, 2, 2) == 2 * 6016
    # every matmul of a real forward pass (no local conv: the counter would count it; FFTs it does not)
    dc = tiny(local_bias=False)
    model = SingleStreamDiT(dc)
    x, t, text, mask = inputs(B=1, H=8, W=12, L=5, lengths=(5,))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, t, text, mask)
    counted = counter.get_flop_counts()["Global"]
    expected = flops_breakdown(dc, 8, 12, 5)
    # torch 2.13's counter does not see the CPU SDPA kernel; attention is checked by the hand count above
    sdpa = sum(v for op, v in counted.items() if "attention" in str(op))
    # each Fourier filter also looks up its gain map with two small matmuls per batch (not per image):
    # (h x 17) @ (2D, 17, 9) @ (9 x w//2+1) on the 4 x 6 patch grid
    h, w, D, filters = 4, 6, dc.hidden_size, dc.refiner_depth * dc.fourier_refiner + dc.fourier_final_depth
    gain_lookup = filters * 2 * (2 * D * h * 17 * 9 + 2 * D * h * 9 * (w // 2 + 1))
    assert sum(counted.values()) - sdpa - gain_lookup == sum(expected.values()) - expected["attention"]
    assert sdpa in (0, expected["attention"])


def test_flops_scale_with_tokens():
    dc = tiny()
    small, big = flops_breakdown(dc, 16, 16, 0), flops_breakdown(dc, 32, 32, 0)
    assert all(v > 0 for v in small.values())
    assert big["attention"] == pytest.approx(16 * small["attention"])  # 4x tokens -> 16x scores
    assert 3.9 * small["linear"] < big["linear"] < 4 * small["linear"]  # per-image AdaLN does not scale
    assert flops_per_image(dc, 32, 32, 16) > 4 * flops_per_image(dc, 16, 16, 16) * 0.9
    assert flops_per_image(dc, 16, 16, 32) > flops_per_image(dc, 16, 16, 16)


def test_fourier_filter_starts_as_identity_and_adapts_to_any_grid():
    torch.manual_seed(0)
    filt = GlobalFourierFilter(6)
    for h, w in [(4, 4), (3, 5), (7, 2), (1, 1), (16, 9)]:
        x = torch.randn(2, h * w, 6)
        assert torch.equal(filt(x, h, w), x)  # gate 0: exact no-op
        with torch.no_grad():
            filt.gate.fill_(1.0)
        torch.testing.assert_close(filt(x, h, w), 2 * x, atol=1e-5, rtol=1e-5)  # all-pass gain at init
        with torch.no_grad():
            filt.gate.zero_()
    # a learned gain really filters: a gain of 1 at DC only (row fy = 0, column fx = 0 of the 17 x 9 map)
    # keeps only each channel's mean over the grid; no other rfft frequency of a 3 x 5 grid is near DC
    with torch.no_grad():
        filt.gain.zero_()
        filt.gain[:, :6, 8, 0] = 1.0
        filt.gate.fill_(1.0)
    x = torch.randn(2, 15, 6)
    torch.testing.assert_close(filt(x, 3, 5) - x, x.mean(1, keepdim=True).expand_as(x), atol=1e-5, rtol=1e-5)
    model = SingleStreamDiT(tiny(fourier_final_depth=2))
    assert model.fourier_gate_stats() == {"noise_refiner.0": 0.0, "final_stack.0": 0.0, "final_stack.1": 0.0}
    assert SingleStreamDiT(tiny(fourier_refiner=False, fourier_final_depth=0)).fourier_gate_stats() == {}


def test_fourier_gain_interpolation_equals_bilinear_grid_sample():
    """The separable-matmul gain lookup gives grid_sample's bilinear values (its old implementation)."""
    torch.manual_seed(0)
    filt = GlobalFourierFilter(5)
    with torch.no_grad():
        filt.gain.normal_()
    for h, w in [(1, 1), (3, 5), (7, 2), (16, 9), (56, 56), (40, 72)]:
        fy, fx = torch.fft.fftfreq(h), torch.fft.rfftfreq(w)
        grid = torch.stack(torch.meshgrid(4 * fx - 1, 2 * fy, indexing="xy"), -1)  # x: columns, y: rows
        ref = F.grid_sample(filt.gain, grid[None], mode="bilinear", align_corners=True)[0].permute(1, 2, 0)
        re, im = filt.gain_for(h, w)
        assert re.shape == im.shape == (h, w // 2 + 1, 5)
        torch.testing.assert_close(torch.cat([re, im], -1), ref, atol=1e-6, rtol=1e-6)


def test_autocast_bf16_matches_fp32_loosely():
    model = perturbed(tiny())
    x, t, text, mask = inputs()
    ref = model(x, t, text, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, text, mask)
    assert out.dtype == torch.float32
    assert any(k[-1] == torch.bfloat16 for k in model._rope_cache)  # RoPE table kept in the compute dtype
    assert (out - ref).abs().mean() < 0.05 * ref.abs().mean()


def test_from_config_and_cli(monkeypatch, capsys):
    cfg = get_config("tiny")
    dc = DiTConfig.from_config(cfg)
    assert (dc.in_channels, dc.hidden_size, dc.depth, dc.text_dim) == (3, 32, 1, 384)
    model = SingleStreamDiT(dc)
    counts = model.parameter_counts()
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total")
    run = subprocess.run([sys.executable, "model.py", "tiny", "depth=2"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "total" in run.stdout and "GFLOP" in run.stdout and "-> out (2, 3, 16, 16)" in run.stdout
    monkeypatch.setattr(sys, "argv", ["model.py", "tiny", "depht=2"])
    with pytest.raises(SystemExit) as exit_info:
        main_guard(model_cli)  # what `python model.py tiny depht=2` runs
    assert exit_info.value.code == 2 and "did you mean depth" in capsys.readouterr().err


def test_rope_table_built_while_sampling_serves_training():
    model = perturbed(tiny())
    x, t, text, mask = inputs()
    with torch.inference_mode():
        model(x, t, text, mask)
    model(x, t, text, mask).square().mean().backward()  # would fail on an inference-mode table
    assert model.joint_blocks[0].attn.qkv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kw", [{}, {"grad_checkpointing": True, "local_bias": False, "refiner_depth": 0}])
def test_the_forward_compiles_as_one_graph(kw):
    """torch.compile traces the whole forward (Fourier filters, RoPE, local bias, null caption, masked and
    unmasked attention, checkpointed blocks) without a graph break: one graph, no host-device sync."""
    model = perturbed(tiny(**kw)).train()
    x, t, text, mask = inputs()
    drop = torch.tensor([False, True])
    for padded in (True, False, None):
        torch._dynamo.reset()
        explained = torch._dynamo.explain(model)(x, t, text, mask, drop, text_padded=padded)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
