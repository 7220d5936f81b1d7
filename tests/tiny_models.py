"""Tiny models built in code and saved with save_pretrained, so tests load them through the same
from_pretrained paths a hub id takes, without a network. Reusable by any test:

    from tiny_models import save_tiny_vae, save_tiny_t5gemma2, save_tiny_t5, save_tiny_clip, save_tiny_qwen3,
                             make_image_folder
"""
import os

import numpy as np
import torch
from PIL import Image

WORDS = ("a an the red green blue yellow purple orange white black circle square triangle star small "
         "large big tiny on in at of and left right top bottom center background shape photo").split()


def make_tokenizer(vocab_words=WORDS, add_eos=True, bos=False, padding_side="right"):
    """A word-level tokenizer from the `tokenizers` library wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "</s>", "<bos>", "<unk>"]
    vocab = {w: i for i, w in enumerate(special + list(vocab_words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    template = ("<bos> " if bos else "") + "$A" + (" </s>" if add_eos else "")
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[("</s>", 1), ("<bos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", bos_token="<bos>", padding_side=padding_side)


def _perturb(model, seed=0, std=0.05):
    """Random offsets on every weight, so zero-initialised norms/embeddings also differ from a fresh init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def save_tiny_vae(path, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, blocks=4):
    """FLUX-layout AutoencoderKL (no quant convs); `blocks` encoder blocks -> 2**(blocks-1) downsampling."""
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * blocks,
                        up_block_types=["UpDecoderBlock2D"] * blocks, block_out_channels=[8] * blocks,
                        layers_per_block=1, latent_channels=latent_channels, norm_num_groups=4,
                        sample_size=32, scaling_factor=scaling_factor, shift_factor=shift_factor,
                        use_quant_conv=False, use_post_quant_conv=False)
    vae.save_pretrained(path)
    return vae.eval()


def save_tiny_t5gemma2(path, hidden=32, full=True):
    """A tiny T5Gemma 2 encoder-decoder (with its SigLIP vision tower) + tokenizer.

    full=True saves T5Gemma2ForConditionalGeneration (keys "model.encoder..."), as on the hub.
    """
    from transformers import T5Gemma2Config, T5Gemma2ForConditionalGeneration, T5Gemma2Model
    n = len(WORDS) + 4
    text = dict(vocab_size=n + 4, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=4,
                layer_types=["sliding_attention", "full_attention"])
    vision = dict(model_type="siglip_vision_model", hidden_size=16, intermediate_size=32,
                  num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=8)
    config = T5Gemma2Config(encoder=dict(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                         boi_token_index=n, eoi_token_index=n + 1, image_token_index=n + 2),
                            decoder=dict(text), image_token_index=n + 2)
    torch.manual_seed(0)
    model = (T5Gemma2ForConditionalGeneration if full else T5Gemma2Model)(config)
    _perturb(model).eval()
    model.save_pretrained(path)
    make_tokenizer(bos=True, add_eos=True).save_pretrained(path)
    return model


def save_tiny_t5(path, hidden=32):
    """A tiny full T5 (encoder + decoder) checkpoint + tokenizer; T5EncoderModel takes the encoder."""
    from transformers import T5Config, T5ForConditionalGeneration
    config = T5Config(vocab_size=len(WORDS) + 4, d_model=hidden, d_kv=8, d_ff=2 * hidden, num_layers=2,
                      num_decoder_layers=1, num_heads=2, pad_token_id=0, eos_token_id=1,
                      decoder_start_token_id=0, feed_forward_proj="gated-gelu")
    torch.manual_seed(0)
    model = _perturb(T5ForConditionalGeneration(config)).eval()
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return model


def save_tiny_clip(path, hidden=32, max_positions=16):
    """A tiny full CLIPModel (text + vision) checkpoint + tokenizer; CLIPTextModel takes the text tower."""
    from transformers import CLIPConfig, CLIPModel
    text = dict(vocab_size=len(WORDS) + 4, hidden_size=hidden, intermediate_size=2 * hidden,
                num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=max_positions,
                pad_token_id=0, bos_token_id=2, eos_token_id=1)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  image_size=16, patch_size=8)
    torch.manual_seed(0)
    model = _perturb(CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))).eval()
    model.save_pretrained(path)
    make_tokenizer(bos=True).save_pretrained(path)
    return model


def save_tiny_qwen3(path, hidden=32):
    """A tiny decoder-only Qwen3ForCausalLM (as Z-Image's text encoder) + tokenizer; AutoModel takes its
    base model (no LM head)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    config = Qwen3Config(vocab_size=len(WORDS) + 4, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                         pad_token_id=0, eos_token_id=1, bos_token_id=2)
    torch.manual_seed(0)
    model = _perturb(Qwen3ForCausalLM(config)).eval()
    model.save_pretrained(path)
    # left padding, as many LLM tokenizers ship (Gemma); text_encoder.py pads right
    make_tokenizer(bos=True, add_eos=False, padding_side="left").save_pretrained(path)
    return model


COLORS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}


def make_image(width, height, color="red", seed=0):
    """A small RGB test image: a coloured square on a noisy background (deterministic per seed)."""
    rng = np.random.default_rng(seed)
    a = rng.integers(180, 255, size=(height, width, 3), dtype=np.uint8)
    y0, x0 = height // 4, width // 4
    a[y0:y0 + height // 2, x0:x0 + width // 2] = COLORS[color]
    return Image.fromarray(a)


def make_image_folder(root, sizes, ext="png"):
    """Writes img_000.png ... with captions; sizes is a list of (W, H). Returns the relative paths."""
    os.makedirs(root, exist_ok=True)
    names = []
    for i, (w, h) in enumerate(sizes):
        color = list(COLORS)[i % len(COLORS)]
        name = f"img_{i:03d}.{ext}"
        make_image(w, h, color, seed=i).save(os.path.join(root, name))
        with open(os.path.join(root, f"img_{i:03d}.txt"), "w", encoding="utf-8") as f:
            f.write(f"a {color} square on a white background")
        names.append(name)
    return names
