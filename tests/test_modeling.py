import json

import pytest
import torch

from lfqa.config import ModelConfig, TinyModelConfig
from lfqa.modeling import (
    ModelLoadError,
    attention_window,
    check_decoder_start,
    ensure_tiny_model,
    load_model,
    load_model_and_tokenizer,
    load_tokenizer,
    resolve_model_path,
)


def test_tiny_builder_saves_and_reloads_through_the_auto_classes(tiny_model_path):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, LEDForConditionalGeneration

    files = {p.name for p in tiny_model_path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_model_path)
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    assert isinstance(model, LEDForConditionalGeneration)
    # BART / LED special tokens and ids.
    assert [tok.bos_token, tok.pad_token, tok.eos_token, tok.unk_token, tok.mask_token] == [
        "<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    assert [tok.bos_token_id, tok.pad_token_id, tok.eos_token_id] == [0, 1, 2]
    assert model.config.vocab_size == len(tok)
    ids = tok("question: Why is Zalrimum famous?").input_ids
    assert ids[0] == 0 and ids[-1] == 2
    assert tok.decode(ids, skip_special_tokens=True) == "question: Why is Zalrimum famous?"
    # The tokenizer was trained on the bundled data: common words are single tokens.
    assert len(tok(" famous").input_ids) == 3


def test_tiny_model_is_cached_and_deterministic(tmp_path):
    cfg = ModelConfig(name_or_path="tiny-led", cache_dir=str(tmp_path), tiny=TinyModelConfig(d_model=32, ffn_dim=64))
    first = ensure_tiny_model(cfg)
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_model(cfg) == first and (first / "model.safetensors").stat().st_mtime_ns == mtime
    assert resolve_model_path(cfg) == str(first)
    other = ensure_tiny_model(ModelConfig(name_or_path="tiny-led", cache_dir=str(tmp_path / "b"),
                                          tiny=TinyModelConfig(d_model=32, ffn_dim=64)))
    a, b = load_model(str(first)), load_model(str(other))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    model, tok = load_model_and_tokenizer(cfg)
    assert model.config.d_model == 32 and len(tok) == model.config.vocab_size


def test_decoder_start_token_is_the_same_for_training_and_generation(tiny_model_path, tmp_path):
    model = load_model(str(tiny_model_path))
    tok = load_tokenizer(str(tiny_model_path))
    # LED's convention: the decoder starts with </s>, then <s>, then the answer.
    assert model.config.decoder_start_token_id == tok.eos_token_id
    assert model.generation_config.decoder_start_token_id == model.config.decoder_start_token_id
    # Training shifts labels right behind config.decoder_start_token_id ...
    from transformers.models.led.modeling_led import shift_tokens_right

    labels = torch.tensor([[0, 50, 51, 2]])
    shifted = shift_tokens_right(labels, model.config.pad_token_id, model.config.decoder_start_token_id)
    # ... and generation starts from the very same token.
    enc = tok(["question: Why? context: Because."], return_tensors="pt")
    out = model.generate(**enc, global_attention_mask=torch.ones_like(enc.input_ids), max_new_tokens=3,
                         num_beams=1)
    assert out[0, 0].item() == shifted[0, 0].item() == tok.eos_token_id

    # A checkpoint whose generation config disagrees (the seed's <s> at generation) is corrected on load.
    cfg_path = tiny_model_path.parent / "mismatch"
    model.generation_config.decoder_start_token_id = tok.bos_token_id
    model.save_pretrained(cfg_path)
    assert json.loads((cfg_path / "generation_config.json").read_text())["decoder_start_token_id"] == 0
    tok.save_pretrained(cfg_path)
    reloaded = load_model(str(cfg_path))
    assert reloaded.generation_config.decoder_start_token_id == reloaded.config.decoder_start_token_id == 2
    assert check_decoder_start(reloaded) == 2


def test_generation_with_global_attention(tiny_model_path):
    model = load_model(str(tiny_model_path)).eval()
    tok = load_tokenizer(str(tiny_model_path))
    enc = tok(["question: Why is Zalrimum famous? context: Zalrimum has stone windmills.",
               "question: Where? context: Here."], return_tensors="pt", padding=True)
    gam = torch.zeros_like(enc.input_ids)
    gam[:, :4] = 1
    out = model.generate(**enc, global_attention_mask=gam, max_new_tokens=8, num_beams=2)
    assert out.shape[0] == 2 and 2 < out.shape[1] <= 10
    assert attention_window(model) == 16


def test_gradient_checkpointing_switch(tiny_model_path):
    from lfqa.modeling import enable_gradient_checkpointing

    model = load_model(str(tiny_model_path))
    enable_gradient_checkpointing(model)
    assert model.is_activation_checkpointing and model.config.use_cache is False
    model.train()
    enc = torch.randint(5, 100, (1, 32))
    loss = model(input_ids=enc, labels=enc[:, :8]).loss
    loss.backward()
    assert model.get_input_embeddings().weight.grad is not None


def test_bad_model_paths_are_clear_errors(tmp_path):
    with pytest.raises(ModelLoadError, match=f"^{tmp_path}: not a model folder \\(no config.json"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=f"^{tmp_path}: cannot load the model config"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ModelLoadError, match="holds a gpt2 model, not a sequence-to-sequence"):
        load_model(str(tmp_path))
    with pytest.raises(ModelLoadError, match=f"^{tmp_path}: no tokenizer files"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(ModelLoadError, match="nowhere: no such model folder$"):
        load_tokenizer(str(tmp_path / "nowhere"))
    with pytest.raises(ModelLoadError, match="is a file, expected a model folder"):
        load_model(str(tmp_path / "config.json"))


def test_cli_build_tiny_knows_every_family():
    from lfqa.cli import TINY_FAMILY_NAMES
    from lfqa.modeling import TINY_FAMILIES

    assert sorted(TINY_FAMILY_NAMES) == sorted(TINY_FAMILIES.values())
