"""Models and tokenizers: load through the Auto classes, or build a tiny model locally.

``model.name_or_path`` is a hub id (``allenai/led-base-16384``), a local folder written by
``save_pretrained``, or ``tiny-led`` / ``tiny-bart`` / ``tiny-t5`` / ``tiny-longt5``: a small random model of
that family with a byte-level BPE tokenizer trained on the bundled data, in the family's conventions
(LED and BART: RoBERTa's <s> ... </s>; T5 and LongT5: <pad>=0, </s> only, the decoder starts from <pad>).
The tiny model is saved with ``save_pretrained`` and then loaded through the very same Auto-class path as a
real model, so CI exercises the real loading code. What differs between families (position limits,
padding, LED's global attention) is decided here from the model's config: ``position_limits``,
``pad_multiple``, ``takes_global_attention``.

    python -m lfqa.modeling --out /tmp/tiny-led                   # build one by hand
    python -m lfqa.modeling --out /tmp/tiny-t5 --family t5
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from lfqa.config import ModelConfig, TinyModelConfig
from lfqa.errors import LfqaError

TINY_MODEL_NAME = "tiny-led"
TINY_FAMILIES = {"tiny-led": "led", "tiny-bart": "bart", "tiny-t5": "t5", "tiny-longt5": "longt5"}
"""``model.name_or_path`` values that build a tiny random model of that family locally."""
BUNDLED_DATA_DIR = Path(__file__).parent / "data"
BUNDLED_TRAIN = BUNDLED_DATA_DIR / "tiny_train.jsonl"
BUNDLED_VALIDATION = BUNDLED_DATA_DIR / "tiny_validation.jsonl"
# BART / LED special tokens, in their usual id order (<s>=0, <pad>=1, </s>=2, <unk>=3, <mask>=4).
SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
# T5's, in its id order (<pad>=0, </s>=1, <unk>=2): no <s>, the decoder starts from <pad>.
T5_SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]
RELATIVE_POSITION_TYPES = ("t5", "mt5", "umt5", "longt5", "switch_transformers")
"""Families whose attention takes relative positions: no position table, so no hard input or answer limit."""


class ModelLoadError(LfqaError, RuntimeError):
    """The model or tokenizer could not be loaded; the message names the path or id."""


def _bundled_texts() -> list[str]:
    """What the tiny tokenizer is trained on: the bundled training rows, made by the generator.

    Never the validation rows: their invented names would become tokens of their own whose embeddings
    training never updates, so a model could not write them even when it finds them in the context.
    """
    from lfqa.bundled_data import tokenizer_rows

    texts = []
    for row in tokenizer_rows():
        texts.append(row["question"])
        texts.append(row["answer"])
        texts.extend(row["context"])
    return texts


def build_tiny_model(tiny: TinyModelConfig, out_dir: str | Path, family: str = "led") -> Path:
    """Train a byte-level BPE tokenizer on the bundled data, make a random model of ``family`` (``led``,
    ``bart``, ``t5``, ``longt5``) with it, save both to ``out_dir``."""
    from transformers import (
        BartForConditionalGeneration,
        LEDForConditionalGeneration,
        LongT5ForConditionalGeneration,
        T5ForConditionalGeneration,
    )

    if family not in TINY_FAMILIES.values():
        raise ValueError(f"no tiny builder for the {family!r} family (one of {', '.join(TINY_FAMILIES.values())})")
    out_dir = Path(out_dir)
    vocab, merges = _train_tiny_bpe(tiny)
    tokenizer = _tiny_tokenizer(family, vocab, merges, tiny.max_input_tokens)
    config = _tiny_config(family, tiny, tokenizer)
    model_class = {"led": LEDForConditionalGeneration, "bart": BartForConditionalGeneration,
                   "t5": T5ForConditionalGeneration, "longt5": LongT5ForConditionalGeneration}[family]
    with torch.random.fork_rng():
        torch.manual_seed(tiny.seed)
        model = model_class(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    _save_on_any_rank(model, out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _train_tiny_bpe(tiny: TinyModelConfig) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocabulary, merges) of a byte-level BPE trained on the bundled data, with BART's special tokens."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator(_bundled_texts(), vocab_size=tiny.vocab_size, min_frequency=2,
                            special_tokens=SPECIAL_TOKENS, show_progress=False)
    bpe_model = json.loads(bpe._tokenizer.to_str())["model"]
    return bpe_model["vocab"], [tuple(m) for m in bpe_model["merges"]]


def _tiny_tokenizer(family: str, vocab: dict[str, int], merges: list[tuple[str, str]], max_length: int):
    """The trained BPE in the family's tokenizer conventions, so nothing downstream special-cases a tiny model."""
    from transformers import BartTokenizer, LEDTokenizer

    if family in ("led", "bart"):
        # RoBERTa's byte-level BPE (<s> ... </s>): the class and special-token behaviour of
        # allenai/led-base-16384's and facebook/bart-large's tokenizers.
        tokenizer_class = LEDTokenizer if family == "led" else BartTokenizer
        return tokenizer_class(vocab=vocab, merges=merges, model_max_length=max_length)
    return _t5_style_tokenizer(vocab, merges, max_length)


def _t5_style_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]], max_length: int):
    """T5's conventions on the same BPE: <pad>=0, </s>=1, <unk>=2, no <s>, inputs and labels end with </s>.

    T5's own tokenizer class is a SentencePiece unigram model, so the byte-level BPE travels as a plain
    ``tokenizer.json`` (AutoTokenizer loads it as the tokenizers backend)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    # BART's special tokens out, T5's in front; the learned tokens keep their order and merges.
    learned = [token for token, _ in sorted(vocab.items(), key=lambda kv: kv[1]) if token not in SPECIAL_TOKENS]
    t5_vocab = {token: i for i, token in enumerate(T5_SPECIAL_TOKENS + learned)}
    backend = Tokenizer(models.BPE(vocab=t5_vocab, merges=merges, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(T5_SPECIAL_TOKENS)
    eos = t5_vocab["</s>"]
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                           special_tokens=[("</s>", eos)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=max_length)


def _tiny_config(family: str, tiny: TinyModelConfig, tokenizer):
    """The family's config at the tiny shape; special tokens and the decoder start as its public models have."""
    from transformers import BartConfig, LEDConfig, LongT5Config, T5Config

    tokens = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    if family in ("t5", "longt5"):
        # Flan-T5's and long-t5-tglobal's gated-GELU feed-forward; the decoder starts from <pad>. The decoder
        # output is scaled by d_model**-0.5 as in the first T5 (tie_word_embeddings true): without it a random
        # model's logits are so large that it starts at a loss of ~24 instead of ln(vocabulary).
        shape = dict(vocab_size=len(tokenizer), d_model=tiny.d_model, d_kv=tiny.d_model // tiny.attention_heads,
                     d_ff=tiny.ffn_dim, num_layers=tiny.encoder_layers, num_decoder_layers=tiny.decoder_layers,
                     num_heads=tiny.attention_heads, feed_forward_proj="gated-gelu", tie_word_embeddings=True,
                     decoder_start_token_id=tokenizer.pad_token_id, dropout_rate=tiny.dropout, **tokens)
        if family == "t5":
            return T5Config(**shape)
        # Transient-global attention: a local band of attention_window / 2 tokens on either side, plus one
        # summary token per block of attention_window tokens.
        return LongT5Config(encoder_attention_type="transient-global", local_radius=tiny.attention_window // 2,
                            global_block_size=tiny.attention_window, **shape)
    shape = dict(vocab_size=len(tokenizer), d_model=tiny.d_model, encoder_layers=tiny.encoder_layers,
                 decoder_layers=tiny.decoder_layers, encoder_attention_heads=tiny.attention_heads,
                 decoder_attention_heads=tiny.attention_heads, encoder_ffn_dim=tiny.ffn_dim,
                 decoder_ffn_dim=tiny.ffn_dim, bos_token_id=tokenizer.bos_token_id, init_std=tiny.init_std,
                 dropout=tiny.dropout,
                 # LED's and BART's own convention (allenai/led-base-16384, facebook/bart-large): the decoder
                 # starts from </s>.
                 decoder_start_token_id=tokenizer.eos_token_id, **tokens)
    if family == "bart":
        # One position table size for both sides: room for the longer of inputs and answers.
        return BartConfig(max_position_embeddings=max(tiny.max_input_tokens, tiny.max_answer_tokens),
                          forced_eos_token_id=tokenizer.eos_token_id, **shape)
    return LEDConfig(attention_window=tiny.attention_window, max_encoder_position_embeddings=tiny.max_input_tokens,
                     max_decoder_position_embeddings=tiny.max_answer_tokens, **shape)


def _save_on_any_rank(model, out_dir: Path) -> None:
    """``save_pretrained`` without its distributed gate.

    Once torch.distributed is up, transformers writes model files on global rank 0 only; on a second machine the
    tiny model is built by that machine's first process (its own disk), which must write them too. The same
    files: config, generation config, and the weights as safetensors without the tied copies.
    """
    from safetensors.torch import save_model

    model.config.save_pretrained(out_dir)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out_dir)
    save_model(model, str(out_dir / "model.safetensors"), metadata={"format": "pt"})


def tiny_model_dir(model_cfg: ModelConfig) -> Path:
    """The cache folder for a tiny model: keyed by its shape and the bundled data it was trained on."""
    from lfqa import bundled_data

    key = hashlib.sha256(json.dumps(dataclasses.asdict(model_cfg.tiny), sort_keys=True).encode())
    key.update(Path(bundled_data.__file__).read_bytes())  # the generator makes the tokenizer's text
    return Path(model_cfg.cache_dir) / f"{TINY_MODEL_NAME}-{key.hexdigest()[:12]}"


def tiny_family_dir(model_cfg: ModelConfig) -> Path:
    """The cache folder of ``model.name_or_path`` (``tiny-led``, ``tiny-bart``, ...): ``tiny_model_dir``'s key
    under the family's name, so that each family of one shape has a folder of its own."""
    base = tiny_model_dir(model_cfg)
    if model_cfg.name_or_path == TINY_MODEL_NAME:
        return base
    return base.with_name(model_cfg.name_or_path + base.name.removeprefix(TINY_MODEL_NAME))


def ensure_tiny_model(model_cfg: ModelConfig) -> Path:
    """Build the tiny model once; later calls (and other processes) reuse the folder."""
    target = tiny_family_dir(model_cfg)
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build in a temporary folder and rename: a process that dies half-way never leaves a broken model,
    # and two processes building at once both end with a complete folder.
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build_tiny_model(model_cfg.tiny, tmp, TINY_FAMILIES[model_cfg.name_or_path])
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(model_cfg: ModelConfig, s3_endpoint_url: str | None = None,
                       s3_region: str | None = None) -> str:
    """What to pass to ``from_pretrained``: a hub id or a local folder.

    ``s3://bucket/prefix`` (clusters without hub access stage weights in a bucket) is downloaded once into
    ``model.cache_dir`` and reused by later runs.
    """
    if model_cfg.name_or_path in TINY_FAMILIES:
        return str(ensure_tiny_model(model_cfg))
    if model_cfg.name_or_path.startswith("s3://"):
        from lfqa.storage import StorageError, stage_s3_uri

        try:
            return str(stage_s3_uri(model_cfg.name_or_path, Path(model_cfg.cache_dir) / "s3",
                                    endpoint_url=s3_endpoint_url, region=s3_region))
        except StorageError as err:
            raise ModelLoadError(f"model.name_or_path: {err}") from None
    return model_cfg.name_or_path


TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "spiece.model", "sentencepiece.bpe.model", "vocab.txt")
"""Any of these in a model folder holds a vocabulary that AutoTokenizer can load."""


def looks_like_path(name_or_path: str) -> bool:
    """True for what can only be a local folder (a hub id is ``name`` or ``owner/name``)."""
    return (name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1 or "\\" in name_or_path
            or Path(name_or_path).exists())


def check_model_folder(name_or_path: str, *, tokenizer: bool = False) -> None:
    """A clear ModelLoadError when a local ``name_or_path`` is not a model folder (transformers' own messages
    are long, or cut off, for a missing folder, a file, an empty folder or one without a vocabulary)."""
    if not looks_like_path(name_or_path):
        return
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise ModelLoadError(f"{name_or_path}: no such model folder")
    if not path.is_dir():
        raise ModelLoadError(f"{name_or_path}: is a file, expected a model folder (save_pretrained layout)")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{name_or_path}: not a model folder (no config.json; save_pretrained writes one)")
    if tokenizer and not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ModelLoadError(f"{name_or_path}: no tokenizer files (one of {', '.join(TOKENIZER_FILES)})")


def _load_error(what: str, name_or_path: str, err: BaseException) -> ModelLoadError:
    return ModelLoadError(f"{name_or_path}: cannot load the {what} ({_first_line(err)})")


def load_tokenizer(name_or_path: str, revision: str | None = None):
    from transformers import AutoTokenizer

    check_model_folder(name_or_path, tokenizer=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=revision)
    except Exception as err:  # noqa: BLE001 - transformers and tokenizers raise many types for a bad folder
        raise _load_error("tokenizer", name_or_path, err) from None
    from lfqa.data import silence_length_warning

    silence_length_warning(tokenizer)
    return tokenizer


@contextlib.contextmanager
def _no_loading_bar():
    """Without transformers' "Loading weights" bar: it takes a second on a large model, and it is the only
    output of a command before a damaged file's one-line error."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def load_model(name_or_path: str, revision: str | None = None, encoder_attention: str = "sdpa"):
    """The model through ``AutoModelForSeq2SeqLM``; LED's encoder attention per ``encoder_attention``
    (``sdpa``: lfqa.led_attention, ``eager``: transformers')."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    from lfqa.led_attention import set_encoder_attention

    check_model_folder(name_or_path)
    try:
        config = AutoConfig.from_pretrained(name_or_path, revision=revision)
    except Exception as err:  # noqa: BLE001 - a damaged config.json gives OSError, ValueError, KeyError...
        raise _load_error("model config", name_or_path, err) from None
    if not getattr(config, "is_encoder_decoder", False):
        raise ModelLoadError(f"'{name_or_path}' holds a {config.model_type} model, not a sequence-to-sequence "
                             "(encoder-decoder) model such as LED")
    try:
        with _no_loading_bar():
            model = AutoModelForSeq2SeqLM.from_pretrained(name_or_path, revision=revision)
    except Exception as err:  # noqa: BLE001 - damaged weights give safetensors, torch and OS errors
        raise _load_error("model", name_or_path, err) from None
    check_decoder_start(model)
    set_encoder_attention(model, encoder_attention)
    return model


def model_limits(name_or_path: str, max_input_tokens: int, max_answer_tokens: int) -> tuple[int, int]:
    """The job's input and answer limits, cut to the model's position embeddings as training cuts them."""
    from transformers import AutoConfig

    check_model_folder(name_or_path)
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except Exception as err:  # noqa: BLE001 - as in load_model
        raise _load_error("model config", name_or_path, err) from None
    return fit_limits(config, max_input_tokens, max_answer_tokens)


def position_limits(config) -> tuple[int | None, int | None]:
    """(input, answer) tokens the model's position embeddings hold; None where the family has no such limit.

    LED has a table for each side; BART (and other absolute-position models) one size for both; T5 and
    LongT5 attend by relative position, so only the job's limits apply."""
    if config.model_type in RELATIVE_POSITION_TYPES:
        return None, None
    shared = getattr(config, "max_position_embeddings", None)
    encoder = getattr(config, "max_encoder_position_embeddings", None) or shared
    decoder = getattr(config, "max_decoder_position_embeddings", None) or shared
    return encoder, decoder


def fit_limits(config, max_input_tokens: int, max_answer_tokens: int) -> tuple[int, int]:
    """The job's (input, answer) limits, cut to the model's :func:`position_limits`."""
    encoder, decoder = position_limits(config)
    return min(max_input_tokens, encoder or max_input_tokens), min(max_answer_tokens, decoder or max_answer_tokens)


def takes_global_attention(model) -> bool:
    """Whether the model's forward takes a ``global_attention_mask`` (LED); other families get none."""
    import inspect

    return "global_attention_mask" in inspect.signature(model.forward).parameters


def pad_multiple(model) -> int:
    """What inputs are padded to a multiple of: LED's attention window (it pads to it anyway), else 8
    (aligned shapes for GPU kernels, at most 7 padding tokens a row)."""
    return attention_window(model) if takes_global_attention(model) else 8


def model_collator(model, tokenizer):
    """The batch collator for this model: its padding multiple, global attention only where it takes it."""
    from lfqa.data import Seq2SeqCollator

    return Seq2SeqCollator(pad_token_id=tokenizer.pad_token_id, pad_to_multiple_of=pad_multiple(model),
                           global_attention=takes_global_attention(model))


def load_model_and_tokenizer(model_cfg: ModelConfig):
    path = resolve_model_path(model_cfg)
    tokenizer = load_tokenizer(path, model_cfg.revision)
    model = load_model(path, model_cfg.revision, model_cfg.encoder_attention)
    return model, tokenizer


def check_decoder_start(model) -> int:
    """Make generation start the decoder with the same token that training used.

    Training builds decoder inputs by shifting labels right and inserting ``config.decoder_start_token_id``;
    ``generate`` uses ``generation_config.decoder_start_token_id``. The seed script passed ``<s>`` at
    generation while LED trains with ``</s>``: a silent quality loss. Here the model config wins.
    """
    start = model.config.decoder_start_token_id
    if start is None:
        raise ModelLoadError(f"{model.config.name_or_path or 'model'}: config has no decoder_start_token_id")
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.decoder_start_token_id != start:
        gen.decoder_start_token_id = start
    return start


def apply_generation_config(model, gen) -> None:
    """Write the job's decoding settings (``eval.generation``) into ``model.generation_config``.

    ``save_pretrained`` stores it as ``generation_config.json``, so that a plain transformers
    ``from_pretrained(...).generate(...)`` decodes as lfqa's evaluation and ``lfqa answer`` do, instead
    of falling back to transformers' defaults (21 tokens, greedy).
    """
    config = model.generation_config
    for key, value in generation_settings(gen).items():
        setattr(config, key, value)
    config.decoder_start_token_id = model.config.decoder_start_token_id


def generation_settings(gen) -> dict:
    """``eval.generation`` as ``generate()`` keyword arguments."""
    from dataclasses import asdict

    kwargs = asdict(gen)
    if gen.num_beams == 1:
        kwargs.pop("early_stopping")  # a beam-search flag; transformers warns when it is set for greedy
    return kwargs


def attention_window(model) -> int:
    """The encoder's attention window (LED pads inputs to a multiple of it); 1 for models without one."""
    window = getattr(model.config, "attention_window", None)
    if window is None:
        return 1
    if isinstance(window, (list, tuple)):
        return max(window)
    return int(window)


def enable_gradient_checkpointing(model) -> None:
    # transformers 5 renamed gradient_checkpointing_enable to activation_checkpointing_enable.
    # Non-reentrant checkpointing works with inputs that do not require grad and with DDP.
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


def _first_line(err: BaseException) -> str:
    """The first line of an error message; with the next one when the first ends in ':' (a list follows)."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if not lines:
        return err.__class__.__name__
    text = lines[0] if not lines[0].endswith(":") or len(lines) == 1 else f"{lines[0]} {lines[1]}"
    return text if len(text) <= 300 else text[:297] + "..."


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build a tiny model and its tokenizer (no download).")
    parser.add_argument("--out", required=True, help="folder to write (save_pretrained layout)")
    parser.add_argument("--family", default="led", choices=sorted(TINY_FAMILIES.values()))
    args = parser.parse_args(argv)
    path = build_tiny_model(TinyModelConfig(), args.out, args.family)
    print(f"tiny {args.family} written to {path}")


if __name__ == "__main__":
    main()
