"""Models and tokenizers: load through the Auto classes, or build a tiny LED locally.

``model.name_or_path`` is a hub id (``allenai/led-base-16384``), a local folder written by
``save_pretrained``, or ``tiny-led``: a small random LED with a byte-level BPE tokenizer (BART's special
tokens) trained on the bundled data. The tiny model is saved with ``save_pretrained`` and then loaded
through the very same Auto-class path as a real model, so CI exercises the real loading code.

    python -m lfqa.modeling --out /tmp/tiny-led      # build one by hand
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
BUNDLED_DATA_DIR = Path(__file__).parent / "data"
BUNDLED_TRAIN = BUNDLED_DATA_DIR / "tiny_train.jsonl"
BUNDLED_VALIDATION = BUNDLED_DATA_DIR / "tiny_validation.jsonl"
# BART / LED special tokens, in their usual id order (<s>=0, <pad>=1, </s>=2, <unk>=3, <mask>=4).
SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


class ModelLoadError(LfqaError, RuntimeError):
    """The model or tokenizer could not be loaded; the message names the path or id."""


def _bundled_texts() -> list[str]:
    texts = []
    for path in (BUNDLED_TRAIN, BUNDLED_VALIDATION):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            texts.append(row["question"])
            texts.append(row["answer"])
            texts.extend(row["context"])
    return texts


def build_tiny_model(tiny: TinyModelConfig, out_dir: str | Path) -> Path:
    """Train a byte-level BPE tokenizer on the bundled data, make a random LED, save both to ``out_dir``."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LEDConfig, LEDForConditionalGeneration, LEDTokenizer

    out_dir = Path(out_dir)
    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator(_bundled_texts(), vocab_size=tiny.vocab_size, min_frequency=2,
                            special_tokens=SPECIAL_TOKENS, show_progress=False)
    bpe_model = json.loads(bpe._tokenizer.to_str())["model"]
    # LEDTokenizer (RoBERTa's byte-level BPE) with our vocabulary: the same class and special-token
    # behaviour as allenai/led-base-16384's tokenizer, so nothing downstream special-cases the tiny model.
    tokenizer = LEDTokenizer(vocab=bpe_model["vocab"], merges=[tuple(m) for m in bpe_model["merges"]],
                             model_max_length=tiny.max_input_tokens)
    config = LEDConfig(
        vocab_size=len(tokenizer),
        d_model=tiny.d_model,
        encoder_layers=tiny.encoder_layers,
        decoder_layers=tiny.decoder_layers,
        encoder_attention_heads=tiny.attention_heads,
        decoder_attention_heads=tiny.attention_heads,
        encoder_ffn_dim=tiny.ffn_dim,
        decoder_ffn_dim=tiny.ffn_dim,
        attention_window=tiny.attention_window,
        max_encoder_position_embeddings=tiny.max_input_tokens,
        max_decoder_position_embeddings=tiny.max_answer_tokens,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        # LED's own convention (allenai/led-base-16384): the decoder starts from </s>.
        decoder_start_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(tiny.seed)
        model = LEDForConditionalGeneration(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    _save_on_any_rank(model, out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


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
    key = hashlib.sha256(json.dumps(dataclasses.asdict(model_cfg.tiny), sort_keys=True).encode())
    for path in (BUNDLED_TRAIN, BUNDLED_VALIDATION):
        key.update(path.read_bytes())
    return Path(model_cfg.cache_dir) / f"{TINY_MODEL_NAME}-{key.hexdigest()[:12]}"


def ensure_tiny_model(model_cfg: ModelConfig) -> Path:
    """Build the tiny model once; later calls (and other processes) reuse the folder."""
    target = tiny_model_dir(model_cfg)
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build in a temporary folder and rename: a process that dies half-way never leaves a broken model,
    # and two processes building at once both end with a complete folder.
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build_tiny_model(model_cfg.tiny, tmp)
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
    if model_cfg.name_or_path == TINY_MODEL_NAME:
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
    encoder = getattr(config, "max_encoder_position_embeddings", None) or max_input_tokens
    decoder = getattr(config, "max_decoder_position_embeddings", None) or max_answer_tokens
    return min(max_input_tokens, encoder), min(max_answer_tokens, decoder)


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
    parser = argparse.ArgumentParser(description="Build the tiny LED model and tokenizer (no download).")
    parser.add_argument("--out", required=True, help="folder to write (save_pretrained layout)")
    args = parser.parse_args(argv)
    path = build_tiny_model(TinyModelConfig(), args.out)
    print(f"tiny LED written to {path}")


if __name__ == "__main__":
    main()
