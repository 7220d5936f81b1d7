"""Single-stream Diffusion Transformer (DiT) for text-to-image rectified flow.

    text (B, L, text_dim) -> caption embed -> context refiner (text only, no t) ------------+
    latents (B, C, H, W) -> patches -> noise refiner (image only, modulated) ---------------+-> [text; image]
        -> `depth` joint single-stream blocks (modulated, one attention over both)
        -> image tokens -> Fourier final stack -> final AdaLN + linear -> unpatchify -> (B, C, H, W)

Refiners before one joint stream follow Lumina-Image 2.0 / Z-Image; one sequence for text and image
follows SD3/FLUX single-stream blocks. The model knows nothing of the noise schedule: it maps
(x_t, t, text) to a velocity, a clean sample or an EDM-preconditioned output (cfg.prediction: v | x | edm),
the caller decides which. "Modulated": AdaLN from t (+ the pooled caption, SD3). Here H, W are the latent's size
and h, w its patch grid (H/p, W/p); L text tokens.

The blocks it is built from (RoPE, attention, Fourier filter, block, final layer) are in layers.py.

    python model.py [preset] [key=value ...]   # parameter counts, FLOPs and a shape check
"""
import json
import os
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from checkpoint import write_atomic, write_json
from layers import (TIME_FREQ_DIM, Block, FinalLayer, GlobalFourierFilter, RMSNorm, fractional_position_embedding,
                    joint_positions, rope_angles, timestep_features)

WEIGHTS_NAME, CONFIG_NAME = "model.safetensors", "config.json"


@dataclass
class DiTConfig:
    """The model's shape. from_config(cfg) fills every field from config.py, the one source of the values a run
    uses; these defaults serve only a DiTConfig() built by hand."""
    in_channels: int = 3              # latent channels (3 in pixel space)
    patch_size: int = 2               # latent pixels per patch side
    hidden_size: int = 192            # transformer width D
    num_heads: int = 4                # head dim = D / num_heads, divisible by 4 (2D RoPE)
    depth: int = 4                    # joint single-stream blocks
    refiner_depth: int = 1            # blocks in each of the noise and context refiners
    text_dim: int = 384               # width of the text encoder's token embeddings
    mlp_ratio: float = 2.75           # SwiGLU hidden = mlp_ratio * D (rounded to a multiple of 8)
    fourier_refiner: bool = True      # global Fourier filter in the noise refiner blocks
    fourier_final_depth: int = 1      # Fourier-filter blocks on image tokens after the joint stack
    local_bias: bool = True           # depthwise 3x3 conv on image tokens in every image block
    abs_pos: bool = True              # fixed sin-cos of fractional (r/h, c/w) coordinates on image tokens
    pooled_text: bool = True          # masked mean of the refined caption added to the AdaLN vector (SD3)
    grad_checkpointing: bool = False  # recompute block activations in backward

    def __post_init__(self):
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
            raise ValueError(f"hidden_size={self.hidden_size} / num_heads={self.num_heads} must give a "
                             "head dim divisible by 4 (2D RoPE)")

    @classmethod
    def from_config(cls, cfg) -> "DiTConfig":
        """The model part of a config.Config."""
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls) if f.name != "in_channels"},
                   in_channels=cfg.latent_channels)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return max(8, round(self.mlp_ratio * self.hidden_size / 8) * 8)  # multiple of 8 for tensor cores


# --- the model ---------------------------------------------------------------------------------------

class SingleStreamDiT(nn.Module):
    """Text-to-image DiT: refiners for each modality, then one joint stream over [text; image] tokens."""

    def __init__(self, dc: DiTConfig):
        super().__init__()
        self.dc = dc
        D, p, C = dc.hidden_size, dc.patch_size, dc.in_channels
        self.patch_embed = nn.Linear(p * p * C, D)
        self.caption_embed = nn.Sequential(RMSNorm(dc.text_dim, eps=1e-6), nn.Linear(dc.text_dim, D))
        self.null_caption = nn.Parameter(torch.randn(D) * 0.02)  # learned "no caption" token (CFG, dropout)
        self.time_embed = nn.Sequential(nn.Linear(TIME_FREQ_DIM, D), nn.SiLU(), nn.Linear(D, D))
        if dc.pooled_text:  # SD3 / FLUX feed a pooled caption vector into the modulation next to t
            self.pooled_embed = nn.Sequential(nn.Linear(D, D), nn.SiLU(), nn.Linear(D, D))
        # Noise refiner sees t; the context refiner does not (as in Lumina-Image 2.0), so its output for a
        # prompt is the same at every sampling step and text tokens enter the joint stream t-independent.
        self.noise_refiner = nn.ModuleList(Block(dc, fourier=dc.fourier_refiner, local_bias=dc.local_bias)
                                           for _ in range(dc.refiner_depth))
        self.context_refiner = nn.ModuleList(Block(dc, modulated=False) for _ in range(dc.refiner_depth))
        self.joint_blocks = nn.ModuleList(Block(dc, local_bias=dc.local_bias) for _ in range(dc.depth))
        self.final_stack = nn.ModuleList(Block(dc, attention=False, fourier=True, local_bias=dc.local_bias)
                                         for _ in range(dc.fourier_final_depth))
        self.final_layer = FinalLayer(D, p * p * C)
        self._rope_cache = {}  # (h, w, text_len, device, dtype) -> (cos, sin); plain dict, not in state_dict
        self.init_weights()

    def init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):  # DiT: Xavier-uniform matrices, zero biases
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for m in self.time_embed[::2]:  # the timestep MLP's two Linears: N(0, 0.02) as in DiT
            nn.init.normal_(m.weight, std=0.02)
        # AdaLN-zero: shift = scale = gate = 0 makes every block the identity, and the zero final linear
        # makes an untrained model output exactly zero (DiT, section 3.2).
        for block in [*self.noise_refiner, *self.joint_blocks, *self.final_stack, self.final_layer]:
            nn.init.zeros_(block.adaLN.weight)
            nn.init.zeros_(block.adaLN.bias)
            if getattr(block, "local", None) is not None:
                nn.init.zeros_(block.local.weight)
                nn.init.zeros_(block.local.bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def rope_tables(self, h: int, w: int, text_len: int, device, dtype):
        """cos, sin (text_len + h*w, head_dim/2) in the compute dtype, built once per bucket shape."""
        def build():
            rows, cols = joint_positions(h, w, text_len, device)
            return tuple(a.to(dtype) for a in rope_angles(rows, cols, self.dc.head_dim))
        if torch.compiler.is_compiling():  # traced into the graph (one per shape) instead of a python cache
            return build()
        key = (h, w, text_len, torch.device(device), dtype)
        if key not in self._rope_cache:
            with torch.inference_mode(False):  # a table first built while sampling must serve training too
                self._rope_cache[key] = build()
        return self._rope_cache[key]

    def run_block(self, block, *args):
        """block(*args), its activations recomputed in backward when grad_checkpointing is on."""
        if self.dc.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(self, x, t, text, text_mask, drop=None, text_padded=None):
        """x (B, C, H, W), t (B,), text (B, L, text_dim), text_mask (B, L) bool (True = real token),
        drop (B,) bool or None (True = null caption). Returns (B, C, H, W).

        text_padded: whether any caption is padded (or dropped). None works it out with one host sync
        (or, under torch.compile, always masks); pass False when no sample is padded and none dropped
        to get the unmasked (flash) attention kernel without a sync.
        """
        dc, p = self.dc, self.dc.patch_size
        B, C, H, W = x.shape
        if H % p or W % p:
            raise ValueError(f"latent size {H}x{W} is not a multiple of patch_size={p}")
        if C != dc.in_channels or text.shape[-1] != dc.text_dim:
            raise ValueError(f"got {C} latent channels and text_dim {text.shape[-1]}; "
                             f"the model expects in_channels={dc.in_channels}, text_dim={dc.text_dim}")
        h, w, L = H // p, W // p, text.shape[1]
        N = h * w
        dtype = self.patch_embed.weight.dtype
        compute_dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else dtype

        patches = x.view(B, C, h, p, w, p).permute(0, 2, 4, 3, 5, 1).reshape(B, N, p * p * C)  # (B, N, p*p*C)
        img = self.patch_embed(patches.to(dtype))                                        # (B, N, D)
        if dc.abs_pos:
            img = img + fractional_position_embedding(h, w, dc.hidden_size, x.device).to(img.dtype)  # + (N, D)
        t_emb = self.time_embed(timestep_features(t).to(dtype))                         # (B, D)
        cond = F.silu(t_emb)
        txt = self.caption_embed(text.to(dtype))                                         # (B, L, D)

        # Null caption (CFG / caption dropout): token 0 = learned null embedding, the rest masked out. A
        # caption with no real token at all is treated as dropped, so every sample attends to something.
        text_mask = text_mask.bool()
        empty = ~text_mask.any(1)                                                        # (B,)
        dropped = empty if drop is None else drop.bool() | empty
        only_first = torch.arange(L, device=x.device) == 0                               # (L,)
        text_mask = torch.where(dropped[:, None], only_first, text_mask)                 # (B, L)
        txt = torch.where(dropped[:, None, None], self.null_caption.to(txt.dtype), txt)  # (B, L, D): (D,) null
        txt = txt.masked_fill(~text_mask[..., None], 0.0)  # padding content can never leak in (not even NaN)

        if text_padded is None:
            text_padded = True if torch.compiler.is_compiling() else bool((~text_mask).any())
        # a given flag is trusted: the caller counts dropped captions as padded (runtime.to_device does)
        text_attn_mask = joint_attn_mask = None  # None: no padding, SDPA may use its unmasked kernels
        if text_padded:
            text_attn_mask = text_mask[:, None, None, :]                                 # (B, 1, 1, L)
            joint_attn_mask = F.pad(text_mask, (0, N), value=True)[:, None, None, :]     # (B, 1, 1, L+N)

        cos, sin = self.rope_tables(h, w, L, x.device, compute_dtype)                    # (L+N, hd/2) each
        for block in self.context_refiner:
            txt = self.run_block(block, txt, None, (cos[:L], sin[:L]), text_attn_mask, (0, 0))  # (B, L, D)
        if self.dc.pooled_text:
            # Global caption summary into every block's AdaLN: attributes that hold for the whole image
            # (colours, layout words) reach all tokens directly instead of through attention alone.
            weights = text_mask[..., None].to(txt.dtype)                                 # (B, L, 1)
            pooled = (txt * weights).sum(1) / weights.sum(1).clamp_min(1)                # (B, D)
            cond = F.silu(t_emb + self.pooled_embed(pooled))                             # (B, D)
        for block in self.noise_refiner:
            img = self.run_block(block, img, cond, (cos[L:], sin[L:]), None, (h, w))          # (B, N, D); tables (N, hd/2)
        tokens = torch.cat([txt, img], 1)                                                # (B, L+N, D)
        for block in self.joint_blocks:
            tokens = self.run_block(block, tokens, cond, (cos, sin), joint_attn_mask, (h, w))
        img = tokens[:, L:]                                                              # (B, N, D)
        for block in self.final_stack:
            img = self.run_block(block, img, cond, None, None, (h, w))
        out = self.final_layer(img, cond)                                                # (B, N, p*p*C)
        out = out.view(B, h, w, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, H, W)   # (B, C, H, W)
        return out.to(x.dtype)

    # --- training helpers ---

    def param_groups(self, weight_decay: float) -> list:
        """AdamW groups: decay on weight matrices only; none on norms, biases, gates, the null caption,
        the time embedding and the Fourier gain maps (decay would pull them towards 0, not towards init)."""
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            embedding = name.startswith(("null_caption", "time_embed.")) or name.endswith(".gain")
            (no_decay if param.ndim < 2 or embedding else decay).append(param)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def fourier_gate_stats(self) -> dict:
        """Mean |gate| of each Fourier filter, e.g. {"noise_refiner.0": 0.01, "final_stack.0": 0.2}."""
        filters = {n.removesuffix(".fourier"): m for n, m in self.named_modules() if isinstance(m, GlobalFourierFilter)}
        if not filters:
            return {}
        return dict(zip(filters, torch.stack([m.gate.detach().abs().mean() for m in filters.values()]).tolist()))

    def parameter_counts(self) -> dict:
        """Parameters per component (the null caption counts as caption embedding), plus the total."""
        parts = ["patch_embed", "caption_embed", "time_embed", "noise_refiner", "context_refiner",
                 "joint_blocks", "final_stack", "final_layer"]
        counts = {name: sum(p.numel() for p in getattr(self, name).parameters()) for name in parts}
        counts["caption_embed"] += self.null_caption.numel()
        if self.dc.pooled_text:
            counts["pooled_embed"] = sum(p.numel() for p in self.pooled_embed.parameters())
        return {**counts, "total": sum(p.numel() for p in self.parameters())}

    # --- export ---

    def save_pretrained(self, path: str, step: int = None):
        """Write path/model.safetensors and path/config.json (the DiTConfig), each atomically; step (the
        training step of these weights) goes into the safetensors metadata (see exported_step)."""
        from safetensors.torch import save_file
        os.makedirs(path, exist_ok=True)
        weights, cfg = os.path.join(path, WEIGHTS_NAME), os.path.join(path, CONFIG_NAME)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        metadata = None if step is None else {"step": str(step)}
        write_atomic(weights, lambda tmp: save_file(state, tmp, metadata=metadata), what="model ")  # full disk: 1 line
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(weights, 0o666 & ~umask)  # safetensors writes 0600; others may share the run
        write_json(cfg, asdict(self.dc))

    @classmethod
    def from_pretrained(cls, path: str, device="cpu") -> "SingleStreamDiT":
        """Load a folder written by save_pretrained; a missing or mismatching file is a one-line error."""
        from safetensors.torch import load_file
        cfg_path, weights_path = os.path.join(path, CONFIG_NAME), os.path.join(path, WEIGHTS_NAME)
        for f in (cfg_path, weights_path):
            if not os.path.isfile(f):
                raise FileNotFoundError(f"{f}: not found (expected a folder written by save_pretrained)")
        try:
            with open(cfg_path) as f:
                dc = DiTConfig(**json.load(f))
        except (ValueError, TypeError) as e:
            raise ValueError(f"{cfg_path}: not a valid DiTConfig ({e})") from None
        try:
            state = load_file(weights_path)
        except Exception as e:
            raise ValueError(f"{weights_path}: cannot read ({e})") from None
        model = cls(dc)
        expected = model.state_dict()
        problems = [f"missing {k}" for k in expected if k not in state]
        problems += [f"unexpected {k}" for k in state if k not in expected]
        problems += [f"{k} has shape {tuple(state[k].shape)}, expected {tuple(v.shape)}"
                     for k, v in expected.items() if k in state and state[k].shape != v.shape]
        if problems:
            more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
            raise ValueError(f"{weights_path}: weights do not match {cfg_path}: {'; '.join(problems[:3])}{more}")
        model.load_state_dict(state)
        return model.to(device)


def exported_step(path: str):
    """The training step save_pretrained recorded in path/model.safetensors, or None (no such file, an
    unreadable one, or an export from before steps were recorded)."""
    from safetensors import safe_open
    try:
        with safe_open(os.path.join(path, WEIGHTS_NAME), framework="pt") as f:
            return int((f.metadata() or {})["step"])
    except Exception:  # missing, truncated, no or a foreign step entry
        return None


# --- FLOPs (for MFU) ---------------------------------------------------------------------------------

def flops_breakdown(dc: DiTConfig, height: int, width: int, text_len: int) -> dict:
    """Forward FLOPs (2 x multiply-accumulates) of one image by kind, for a height x width latent.

    Counts every matmul: embeddings, QKV/out/SwiGLU/AdaLN projections ("linear"), attention scores and
    values over the full (masked or not) sequence ("attention"), and the final layer. Ignores elementwise
    work: norms, RoPE, activations, the depthwise conv (9 MACs per value) and the FFTs.
    """
    p, D, Fh = dc.patch_size, dc.hidden_size, dc.mlp_hidden
    if height % p or width % p:
        raise ValueError(f"latent size {height}x{width} is not a multiple of patch_size={p}")
    N, T = (height // p) * (width // p), text_len

    def linear(L, attention=True, modulated=True):  # one block over L tokens
        return L * ((4 * D * D if attention else 0) + 3 * D * Fh) + (6 * D * D if modulated else 0)

    def attention(L):
        return 2 * L * L * D  # Q K^T and (softmax) V, all heads together

    blocks = [(N, True, True)] * dc.refiner_depth + [(T, True, False)] * dc.refiner_depth \
        + [(T + N, True, True)] * dc.depth + [(N, False, True)] * dc.fourier_final_depth
    macs = {
        "embed": N * p * p * dc.in_channels * D + T * dc.text_dim * D + TIME_FREQ_DIM * D + D * D
        + (2 * D * D if dc.pooled_text else 0),
        "linear": sum(linear(L, a, m) for L, a, m in blocks),
        "attention": sum(attention(L) for L, a, _ in blocks if a),
        "final": N * D * p * p * dc.in_channels + 2 * D * D,
    }
    return {k: 2.0 * v for k, v in macs.items()}


def flops_per_image(dc: DiTConfig, height: int, width: int, text_len: int) -> float:
    """Forward FLOPs for one image (see flops_breakdown). A training step costs ~3x: backward is ~2x forward
    (gradients w.r.t. inputs and weights), plus one more forward per block with grad_checkpointing."""
    return sum(flops_breakdown(dc, height, width, text_len).values())


def main():
    from config import parse_args
    cfg = parse_args()
    dc = DiTConfig.from_config(cfg)
    torch.manual_seed(cfg.seed)
    model = SingleStreamDiT(dc).eval()
    print(f"SingleStreamDiT: D={dc.hidden_size}, heads={dc.num_heads}, depth={dc.depth}, "
          f"refiners={dc.refiner_depth}+{dc.refiner_depth}, Fourier final={dc.fourier_final_depth}")
    for name, n in model.parameter_counts().items():
        print(f"  {name + (' (Fourier)' if name == 'final_stack' else ''):22s} {n:>13,}")
    side, L = cfg.target_resolution // cfg.vae_downsample, cfg.max_token_length
    side -= side % dc.patch_size
    fwd = flops_per_image(dc, side, side, L)
    print(f"FLOPs per image at latent {side}x{side} ({(side // dc.patch_size) ** 2} image + {L} text tokens): "
          f"forward {fwd / 1e9:.3f} GFLOP, training (3x forward) {3 * fwd / 1e9:.3f} GFLOP")
    x, t, text = torch.randn(2, dc.in_channels, side, side), torch.rand(2), torch.randn(2, L, dc.text_dim)
    mask = torch.arange(L)[None] < torch.tensor([[L], [max(1, L // 2)]])  # the second caption padded
    with torch.no_grad():
        out = model(x, t, text, mask, drop=torch.tensor([False, True]))
    assert out.shape == x.shape
    print(f"shape check: x {tuple(x.shape)} + text {tuple(text.shape)} -> out {tuple(out.shape)}")


if __name__ == "__main__":
    from config import main_guard
    main_guard(main)
