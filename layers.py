"""Building blocks of the DiT in model.py: 2D RoPE positions, timestep features, AdaLN modulation,
RMSNorm, SwiGLU, attention with QK-RMSNorm, the global Fourier filter, the transformer block (attention,
Fourier filter and local spatial bias, each switchable) and the final layer.

Shapes (this file): B batch, L the length of the sequence a block sees (text, image or both), T its leading
text tokens, N image tokens (h x w patches), D width, nh heads, hd head dim.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

ROPE_THETA = 10000.0    # RoPE base (RoFormer)
TIME_FREQ_DIM = 256     # sinusoidal timestep features before the MLP (DiT)
FOURIER_GAIN_STEPS = 8  # learned filter gain every 1/16 cycle: a 17 x 9 map over (row, column) frequency


# --- positions: 2D RoPE with text on the diagonal (Qwen-Image MSRoPE) -------------------------------

def joint_positions(h: int, w: int, text_len: int, device=None):
    """(rows, cols), each (text_len + h*w,), of the [text; image] sequence.

    Image token (r, c) sits on its grid cell; text token i sits at (m + i, m + i) with m = max(h, w), on
    the diagonal just outside the grid (Qwen-Image MSRoPE), so text and image never share a position and
    text-to-text offsets are the same for every bucket shape.
    """
    m = max(h, w)
    text = torch.arange(text_len, device=device) + m              # (text_len,)
    rows = torch.arange(h, device=device).repeat_interleave(w)   # (h*w,) row-major like the patches
    cols = torch.arange(w, device=device).repeat(h)
    return torch.cat([text, rows]), torch.cat([text, cols])


def fractional_position_embedding(h: int, w: int, dim: int, device=None):
    """(h*w, dim) fixed sin-cos of each patch centre as a fraction of the grid: (r+0.5)/h, (c+0.5)/w.

    RoPE only tells tokens their offsets from each other, but captions name places relative to the
    canvas ("top left" = 27% of W and H, whatever the aspect ratio). Fractional coordinates give every
    bucket shape the same absolute frame (cf. resolution-aware embeddings in PixArt-alpha / Lumina-Next).
    """
    n = dim // 4
    freqs = math.pi * torch.logspace(0, math.log10(32), n, device=device)              # (n,) pi .. 32 pi
    rows = ((torch.arange(h, device=device) + 0.5) / h).repeat_interleave(w)[:, None] * freqs  # (N, n)
    cols = ((torch.arange(w, device=device) + 0.5) / w).repeat(h)[:, None] * freqs            # (N, n)
    emb = torch.cat([rows.sin(), rows.cos(), cols.sin(), cols.cos()], 1)                       # (N, 4n)
    return F.pad(emb, (0, dim - emb.shape[1]))                                                 # (N, dim)


def rope_angles(rows: torch.Tensor, cols: torch.Tensor, head_dim: int):
    """cos, sin (L, head_dim/2): the first half of each head rotates with the row, the second with the column."""
    n = head_dim // 4  # rotation pairs per axis
    freqs = ROPE_THETA ** (-torch.arange(n, device=rows.device, dtype=torch.float32) / n)    # (n,)
    angles = torch.cat([rows.float()[:, None] * freqs, cols.float()[:, None] * freqs], 1)  # (L, head_dim/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (x[2k], x[2k+1]) of x (..., L, head_dim) by the angles of cos/sin (L, head_dim/2)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)                                        # (..., L, hd/2) each
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).flatten(-2)     # (..., L, hd)


def timestep_features(t: torch.Tensor, dim: int = TIME_FREQ_DIM, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of 1000 t (DDPM/DiT): t in [0, 1] spans the familiar 0..1000 range."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000 * t.float()[:, None] * freqs                                            # (B, dim/2)
    return torch.cat([args.cos(), args.sin()], -1)                                      # (B, dim)


def modulate(x, shift, scale):
    return x if shift is None else x * (1 + scale) + shift


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm with its weight cast to the input's dtype, so bf16 activations get the fused kernel."""

    def forward(self, x):
        weight = None if self.weight is None else self.weight.to(x.dtype)
        return F.rms_norm(x, self.normalized_shape, weight, self.eps)


# --- building blocks ---------------------------------------------------------------------------------

class SwiGLU(nn.Module):
    """Gated feed-forward (Shazeer 2020, as in LLaMA / Lumina); both input matrices fused into one Linear."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden, bias=False)
        self.w3 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        a, b = self.w12(x).chunk(2, -1)                                         # (B, L, mlp_hidden) each
        return self.w3(F.silu(a) * b)                                                    # (B, L, D)


class Attention(nn.Module):
    """Multi-head self-attention: fused QKV, QK-RMSNorm (SD3 / ViT-22B, keeps logits bounded), 2D RoPE, SDPA."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_norm = RMSNorm(dim // num_heads, eps=1e-6)
        self.k_norm = RMSNorm(dim // num_heads, eps=1e-6)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x, rope, mask):
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # (B, nh, L, hd) each
        q = apply_rope(self.q_norm(q), *rope).to(v.dtype)
        k = apply_rope(self.k_norm(k), *rope).to(v.dtype)
        # mask (B, 1, 1, L) bool, True = may be attended to; None lets SDPA pick its fastest (flash) kernel
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)                      # (B, nh, L, hd)
        return self.proj(x.transpose(1, 2).reshape(B, L, D))                             # (B, L, D)


def interpolation_matrix(pos: torch.Tensor, size: int) -> torch.Tensor:
    """(len(pos), size) weights of 1D linear interpolation at fractional indices pos in [0, size-1]."""
    lo = pos.floor().clamp(0, size - 2)                                 # (P,)
    frac = (pos - lo)[:, None]                                          # (P, 1)
    idx = torch.arange(size, device=pos.device)                         # (size,)
    return (idx == lo[:, None]) * (1 - frac) + (idx == lo[:, None] + 1) * frac


class GlobalFourierFilter(nn.Module):
    """GFNet global filter (Rao et al. 2021): x + gate * irfft2(G * rfft2(x)) over the image-token grid.

    G is a learned complex gain per channel, stored as a fixed 17 x 9 map over (row, column) frequency
    and sampled bilinearly at each grid's own rfft frequencies, so one filter serves every bucket shape.
    G starts all-pass and the gate at zero: the filter starts as an exact no-op and learns to mix globally.
    The FFT runs in fp32 (bf16 FFTs are inaccurate and limited to power-of-two sizes).
    """

    def __init__(self, dim: int):
        super().__init__()
        K = FOURIER_GAIN_STEPS  # rows: fy = -0.5 .. 0.5, columns: fx = 0 .. 0.5, in steps of 1 / (2K)
        gain = torch.zeros(1, 2 * dim, 2 * K + 1, K + 1)                     # [real; imaginary] channels
        gain[:, :dim] = 1.0
        self.gain = nn.Parameter(gain)
        self.gate = nn.Parameter(torch.zeros(dim))

    def gain_for(self, h: int, w: int):
        """Real and imaginary gain, (h, w//2+1, D) each, at the frequencies of an h x w rfft2.

        Bilinear sampling of the 17 x 9 map is separable, so it is two small matmuls with 1D linear
        interpolation matrices (same values as grid_sample with align_corners=True, whose backward
        is a slow atomic scatter on GPU).
        """
        K = FOURIER_GAIN_STEPS
        rows = interpolation_matrix((torch.fft.fftfreq(h, device=self.gain.device) + 0.5) * 2 * K, 2 * K + 1)  # (h, 2K+1)
        cols = interpolation_matrix(torch.fft.rfftfreq(w, device=self.gain.device) * 2 * K, K + 1)  # (w//2+1, K+1)
        g = rows @ self.gain[0].float() @ cols.T                          # (2D, h, w//2+1)
        return g.permute(1, 2, 0).chunk(2, -1)                           # (h, w//2+1, D) each

    def forward(self, x, h: int, w: int):
        B, N, D = x.shape
        spec = torch.fft.rfft2(x.float().view(B, h, w, D), dim=(1, 2), norm="ortho")      # (B, h, w//2+1, D)
        re, im = torch.view_as_real(spec).unbind(-1)  # (B, h, w//2+1, D) each: complex product in real arithmetic
        g_re, g_im = self.gain_for(h, w)
        spec = torch.view_as_complex(torch.stack([re * g_re - im * g_im, re * g_im + im * g_re], -1))
        y = torch.fft.irfft2(spec, s=(h, w), dim=(1, 2), norm="ortho")                  # (B, h, w, D)
        return x + self.gate.to(x.dtype) * y.reshape(B, N, D).to(x.dtype)                # (B, N, D)


class Block(nn.Module):
    """Pre-norm transformer block; AdaLN-zero modulation (DiT, Peebles & Xie 2023) from cond = SiLU(t embedding
    [+ pooled caption]) unless unmodulated.

    Token mixer: attention, optionally after a global Fourier filter (image-only blocks), or the Fourier
    filter alone (attention=False). A zero-initialised depthwise 3x3 conv on the image tokens adds a local
    spatial bias that attention would otherwise have to learn from RoPE. Image tokens are the last h*w.
    dc is a model.DiTConfig (width, heads, MLP width).
    """

    def __init__(self, dc, modulated=True, attention=True, fourier=False, local_bias=False):
        super().__init__()
        D = dc.hidden_size
        self.norm1 = RMSNorm(D, eps=1e-6, elementwise_affine=not modulated)
        self.norm2 = RMSNorm(D, eps=1e-6, elementwise_affine=not modulated)
        self.attn = Attention(D, dc.num_heads) if attention else None
        self.fourier = GlobalFourierFilter(D) if fourier else None
        self.local = nn.Conv2d(D, D, 3, padding=1, groups=D) if local_bias else None
        self.mlp = SwiGLU(D, dc.mlp_hidden)
        self.adaLN = nn.Linear(D, 6 * D) if modulated else None  # one fused projection for all six

    def forward(self, x, cond, rope, mask, grid):
        h, w = grid
        T = x.shape[1] - h * w  # leading text tokens
        mods = [None] * 6
        if self.adaLN is not None:
            mods = self.adaLN(cond)[:, None].chunk(6, -1)                               # (B, 1, D) each
        shift1, scale1, gate1, shift2, scale2, gate2 = mods
        y = modulate(self.norm1(x), shift1, scale1)                                      # (B, L, D)
        if self.fourier is not None:
            assert T == 0, "the Fourier filter sees image tokens only"
            y = self.fourier(y, h, w)
        mixed = self.attn(y, rope, mask) if self.attn is not None else y
        if self.local is not None:
            img = y[:, T:].transpose(1, 2).unflatten(2, (h, w))                          # (B, D, h, w)
            local = self.local(img).flatten(2).transpose(1, 2)                           # (B, h*w, D)
            mixed = mixed + F.pad(local, (0, 0, T, 0))                                   # (B, L, D)
        x = x + (mixed if gate1 is None else gate1 * mixed)
        y = self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x + (y if gate2 is None else gate2 * y)                                   # (B, L, D)


class FinalLayer(nn.Module):
    """AdaLN (shift, scale) + zero-initialised linear to patch pixels (DiT)."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, eps=1e-6, elementwise_affine=False)
        self.adaLN = nn.Linear(dim, 2 * dim)
        self.linear = nn.Linear(dim, out_dim)

    def forward(self, x, cond):
        shift, scale = self.adaLN(cond)[:, None].chunk(2, -1)                            # (B, 1, D) each
        return self.linear(modulate(self.norm(x), shift, scale))                         # (B, N, p*p*C)
