"""Job configuration: one typed dataclass per concern, nested in :class:`JobConfig`.

A job is a YAML file in ``jobs/`` plus dotted ``key=value`` overrides from the command line::

    python -m lfqa.train jobs/tiny-cpu.yaml train.learning_rate=3e-4 eval.every_steps=0

Every key is checked against the dataclasses below before any model, data set or process group is
created: an unknown key, a wrong type or an impossible value raises :class:`ConfigError` with one line
that names the file and the dotted key.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A job configuration problem; ``str(err)`` is one line naming the file and the key."""


def _check(condition: bool, key: str, message: str) -> None:
    # Raised from __post_init__; load_job() prefixes the file name.
    if not condition:
        raise ConfigError(f"{key}: {message}")


@dataclass
class TinyModelConfig:
    """Shape of the tiny random model that ``model.name_or_path: tiny-led`` (``tiny-bart``, ``tiny-t5``,
    ``tiny-longt5``) builds locally with a tokenizer trained on the bundled data (no download)."""

    d_model: int = 128
    """Hidden size."""
    encoder_layers: int = 2
    decoder_layers: int = 2
    attention_heads: int = 4
    """Heads in every encoder and decoder layer."""
    ffn_dim: int = 256
    attention_window: int = 16
    """Local attention window of the encoder (even; LED pads inputs to a multiple of it). LongT5: a local
    radius of half of it and one global token per block of it; BART and T5 attend to every token."""
    max_input_tokens: int = 2048
    """Encoder position embeddings (BART: the larger of this and ``max_answer_tokens``, one size for both;
    T5 and LongT5 attend by relative position: no table, only the tokenizer's model_max_length)."""
    max_answer_tokens: int = 256
    """Decoder position embeddings."""
    vocab_size: int = 2000
    """Target vocabulary of the byte-level BPE tokenizer trained on the bundled data."""
    init_std: float = 0.06
    """Standard deviation of the random weights (LED, BART). Wider than transformers' 0.02: at 0.02 a model this
    small learns the answers' templates within minutes but not yet to copy names and numbers from the context."""
    dropout: float = 0.0
    """Dropout of the tiny model (the bundled data has too many invented names to memorise)."""
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("d_model", "encoder_layers", "decoder_layers", "attention_heads", "ffn_dim",
                     "max_input_tokens", "max_answer_tokens"):
            _check(getattr(self, name) > 0, f"model.tiny.{name}", "must be > 0")
        _check(self.d_model % self.attention_heads == 0, "model.tiny.d_model",
               "must be divisible by model.tiny.attention_heads")
        _check(self.attention_window >= 2 and self.attention_window % 2 == 0, "model.tiny.attention_window",
               "must be an even number >= 2")
        _check(self.vocab_size >= 300, "model.tiny.vocab_size", "must be >= 300 (256 bytes + special tokens)")
        _check(self.init_std > 0, "model.tiny.init_std", "must be > 0")
        _check(0 <= self.dropout < 1, "model.tiny.dropout", "must be >= 0 and < 1")


ENCODER_ATTENTIONS = ("sdpa", "eager")
"""``model.encoder_attention``: lfqa's SDPA attention (``lfqa.led_attention``), transformers' own."""


@dataclass
class ModelConfig:
    """Which model and tokenizer to fine-tune."""

    name_or_path: str = "allenai/led-base-16384"
    """A hub id, a local folder written by save_pretrained, or a tiny random model built from ``model.tiny``:
    ``tiny-led``, ``tiny-bart``, ``tiny-t5`` (Flan-T5's layout) or ``tiny-longt5`` (transient-global).
    Any encoder-decoder family loads; the model decides the input and answer limits (its position tables),
    the padding multiple (LED's window, else 8), global attention (LED only) and the decoder start token."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) when ``name_or_path`` is a hub id."""
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    cache_dir: str = ".cache/lfqa/models"
    """Where the tiny model is built (once per shape and data)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about 20-30% more compute."""
    encoder_attention: str = "sdpa"
    """LED's encoder self-attention: ``sdpa`` (lfqa's blocks of torch's fused attention kernel: the same
    weights and results, ~2x faster attention, no stored probabilities unless attention dropout is on, which
    sends CPU runs to PyTorch's unfused path) or ``eager`` (transformers' own sliding chunks). Other families
    ignore it and ``data.global_attention`` (training logs a note) and keep transformers' attention."""

    def __post_init__(self) -> None:
        _check(bool(self.name_or_path.strip()), "model.name_or_path", "must not be empty")
        _check(self.encoder_attention in ENCODER_ATTENTIONS, "model.encoder_attention",
               f"must be sdpa or eager, not {self.encoder_attention!r}")


@dataclass
class FieldsConfig:
    """Where the question, answer and context live in a row; dotted paths reach into nested values.

    ``answer: answers.0`` takes the first element of a list, ``answer: answer.text`` a key of an object.
    The context may be a list of strings (LFQA), one string (a ``document``), or a list of objects
    (``passages`` with ``{title, text}``): see ``passage_title`` and ``passage_text``.
    """

    question: str = "question"
    answer: str = "answer"
    context: str = "context"
    passage_title: str = "title"
    """Key of a passage's title when the context is a list of objects (missing titles are fine)."""
    passage_text: str = "text"
    """Key of a passage's text when the context is a list of objects."""
    facts: str = "facts"
    """Optional list of short strings a correct answer must contain (names, numbers, key phrases): evaluation
    reports the share found in each generated answer as ``fact_recall``. Rows without it are not scored."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check(bool(getattr(self, f.name).strip()), f"data.fields.{f.name}", "must not be empty")


@dataclass
class DataConfig:
    """Training and validation data, filtering and batching."""

    dataset: str | None = None
    """A hub data set id or a local data set folder, read with ``datasets.load_dataset``."""
    train_split: str = "train"
    validation_split: str = "validation"
    train_files: list[str] = field(default_factory=list)
    """Local JSON / JSONL / Parquet files (globs allowed); used instead of ``dataset``."""
    validation_files: list[str] = field(default_factory=list)
    fields: FieldsConfig = field(default_factory=FieldsConfig)
    max_answer_tokens: int = 512
    """Rows whose answer is longer (in model tokens, special tokens included) are dropped and counted."""
    max_input_tokens: int = 16384
    """Inputs are truncated to this many tokens; truncated rows are counted."""
    max_train_samples: int | None = None
    """Use only the first N usable training rows (after filtering)."""
    max_eval_samples: int | None = None
    """Use only the first N usable validation rows (after filtering)."""
    global_attention: Literal["question", "first_token"] = "question"
    """Global attention on every question token, or on the first token only (the seed's choice)."""
    batch_size: int = 2
    """Examples per batch on each process (the micro batch)."""
    max_tokens_per_batch: int | None = None
    """Token budget: fill each batch with examples until (longest padded input + longest answer) x examples
    would pass this many tokens, instead of a fixed ``batch_size`` (which then is the most examples per batch).
    null: fixed batch_size."""
    group_by_length: bool = True
    """Batch examples of similar input and answer lengths together (less padding)."""
    length_group_size: int = 64
    """Batches per sorted group: larger means less padding, but less randomness."""
    cache_dir: str = ".cache/lfqa/datasets"
    """Tokenised data is cached here; a second run with the same data and settings skips tokenisation."""

    def __post_init__(self) -> None:
        has_files = bool(self.train_files)
        _check(has_files != bool(self.dataset), "data.dataset",
               "set exactly one of data.dataset and data.train_files")
        if has_files:
            _check(bool(self.validation_files), "data.validation_files",
                   "must be set when data.train_files is set")
        _check(self.max_answer_tokens > 0, "data.max_answer_tokens", "must be > 0")
        _check(self.max_input_tokens > 0, "data.max_input_tokens", "must be > 0")
        _check(self.batch_size > 0, "data.batch_size", "must be > 0")
        _check(self.max_tokens_per_batch is None or self.max_tokens_per_batch > 0, "data.max_tokens_per_batch",
               "must be > 0 or null")
        _check(self.length_group_size > 0, "data.length_group_size", "must be > 0")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            _check(value is None or value > 0, f"data.{name}", "must be > 0 or null")


@dataclass
class TrainConfig:
    """The optimisation loop."""

    seed: int = 42
    """Seeds weights of new models, dropout and the data order: the same seed gives the same run."""
    epochs: int = 1
    max_steps: int | None = None
    """Stop after this many optimizer steps (overrides ``epochs`` when set)."""
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    warmup_steps: int = 0
    """Linear warm-up from 0 to ``learning_rate``, then linear decay to 0 at the last step."""
    gradient_accumulation_steps: int = 1
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this value; null disables clipping."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Mixed precision through accelerate (bf16 works on CPUs and Ampere+ GPUs)."""
    fused_optimizer: bool = True
    """AdamW's fused kernel (``torch.optim.AdamW(fused=True)``) on CPU and CUDA: one pass over all
    parameters instead of a loop of small operations per parameter. Not under DeepSpeed (its own optimizer,
    or the for-loop AdamW, which resumes bit-exactly inside ZeRO)."""
    cpu_keep_freed_memory: bool = True
    """On CPU (glibc), keep freed memory in the process instead of handing it back to the kernel after
    every step (``mallopt``): steps ~10% faster, resident memory higher (the heap keeps its high-water mark).
    Not under DeepSpeed, whose large, barely touched buffers would make the heap's address space grow."""

    def __post_init__(self) -> None:
        _check(self.epochs > 0, "train.epochs", "must be > 0")
        _check(self.max_steps is None or self.max_steps > 0, "train.max_steps", "must be > 0 or null")
        _check(self.learning_rate > 0, "train.learning_rate", "must be > 0")
        _check(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        _check(0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1, "train.adam_beta1",
               "Adam betas must be in [0, 1)")
        _check(self.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
        _check(self.gradient_accumulation_steps > 0, "train.gradient_accumulation_steps", "must be > 0")
        _check(self.max_grad_norm is None or self.max_grad_norm > 0, "train.max_grad_norm", "must be > 0 or null")


@dataclass
class GenerationConfig:
    """Decoding settings for evaluation and answering (passed to ``model.generate``).

    The decoder start token is deliberately not configurable: it always comes from the model's own
    config, the same token that training used (see ``lfqa.modeling.check_decoder_start``).
    """

    num_beams: int = 4
    max_new_tokens: int = 512
    min_new_tokens: int = 0
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    early_stopping: bool = True
    """Stop beam search when every beam has finished (only used with num_beams > 1)."""

    def __post_init__(self) -> None:
        _check(self.num_beams > 0, "eval.generation.num_beams", "must be > 0")
        _check(self.max_new_tokens > 0, "eval.generation.max_new_tokens", "must be > 0")
        _check(0 <= self.min_new_tokens <= self.max_new_tokens, "eval.generation.min_new_tokens",
               "must be between 0 and eval.generation.max_new_tokens")
        _check(self.no_repeat_ngram_size >= 0, "eval.generation.no_repeat_ngram_size", "must be >= 0")


@dataclass
class EvalConfig:
    """Periodic evaluation: validation loss plus ROUGE on generated answers."""

    every_steps: int = 0
    """Evaluate every N optimizer steps: loss and generated answers (0: only at the end)."""
    loss_every_steps: int = 0
    """Also the validation loss alone every N steps (no generation, so it is cheap; 0: off)."""
    at_start: bool = False
    """Also evaluate before the first step, to show what the untrained model does."""
    batch_size: int = 4
    max_generate_samples: int | None = 64
    """Generate answers for at most N validation rows (generation is the slow part); null: all."""
    num_examples_to_print: int = 2
    """Question / generated / reference triples printed at each evaluation."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    metrics: list[str] = field(default_factory=lambda: ["rouge"])
    """Metrics of the generated answers, loaded with ``evaluate.load``: ``rouge`` is lfqa's own module (offline,
    with bootstrap intervals in ``lfqa eval``); any other name is a hub metric (``bertscore``, ``meteor``; needs
    hub access) or the path of a local evaluate module."""

    def __post_init__(self) -> None:
        _check(self.every_steps >= 0, "eval.every_steps", "must be >= 0")
        _check(self.loss_every_steps >= 0, "eval.loss_every_steps", "must be >= 0")
        _check(all(m.strip() for m in self.metrics), "eval.metrics", "names must not be empty")
        _check(len(set(self.metrics)) == len(self.metrics), "eval.metrics", "names a metric twice")
        _check(self.batch_size > 0, "eval.batch_size", "must be > 0")
        _check(self.max_generate_samples is None or self.max_generate_samples >= 0, "eval.max_generate_samples",
               "must be >= 0 or null")
        _check(self.num_examples_to_print >= 0, "eval.num_examples_to_print", "must be >= 0")


@dataclass
class OutputConfig:
    """Where a run writes its files."""

    dir: str = "runs/default"
    """Local run folder: metrics.jsonl, eval reports, checkpoints/ and model/ (the final model, tokenizer and
    job.yaml). Checkpoints are always written here first."""
    uri: str | None = None
    """Remote copy of the run: ``s3://bucket/prefix`` (AWS or any S3-compatible store). Checkpoints, the final
    model and the run's reports are uploaded there in the background; ``resume: auto`` also looks there.
    Credentials come from the usual AWS environment variables, profile or instance role, never from this file."""
    s3_endpoint_url: str | None = None
    """Endpoint of an S3-compatible store (MinIO, SeaweedFS, Ceph...); null: AWS, or ``AWS_ENDPOINT_URL``."""
    s3_region: str | None = None
    """Region of the bucket; null: ``AWS_REGION`` / ``AWS_DEFAULT_REGION`` / the profile's."""
    overwrite: bool = True
    """Replace a finished model in ``dir``; false makes a run fail if ``dir/model`` exists."""

    def __post_init__(self) -> None:
        _check(bool(self.dir.strip()), "output.dir", "must not be empty")
        _check(self.dir.strip().find("://") < 0, "output.dir",
               "must be a local folder; put s3:// URIs in output.uri")
        _check(self.uri is None or self.uri.startswith("s3://") and len(self.uri) > len("s3://"), "output.uri",
               f"must be s3://bucket[/prefix] or null, got {self.uri!r}")


@dataclass
class CheckpointConfig:
    """Checkpoints through accelerate's ``save_state`` (sharded under ZeRO), retention and resume."""

    every_steps: int = 0
    """Checkpoint every N optimizer steps (0: not by steps)."""
    every_minutes: float = 0.0
    """Checkpoint when M minutes passed since the last one (0: not by time). Both may be set."""
    keep_last: int = 2
    """Keep the newest K complete checkpoints (>= 1); older ones are deleted locally and remotely."""
    keep_best: int = 1
    """Also keep the K best by ``best_metric`` (a checkpoint taken right after an evaluation has one); 0: none."""
    best_metric: str = "eval/loss"
    """A metric of the evaluation, e.g. eval/loss or eval/rougeL."""
    best_mode: Literal["min", "max"] = "min"
    resume: str = "auto"
    """auto: continue from the newest complete checkpoint (local folder or output.uri) if there is one;
    never: always start fresh; or a checkpoint folder path or s3:// URI to start from."""
    preemption_grace_seconds: float = 25.0
    """On SIGTERM: finish the step, checkpoint, and wait at most this long for the upload before exiting
    (Kubernetes kills the pod terminationGracePeriodSeconds after SIGTERM: keep this below that)."""
    upload_workers: int = 8
    """Parallel multipart transfers per file (boto3's transfer manager)."""
    upload_wait_seconds: float = 10.0
    """At a checkpoint, wait at most this long for the previous upload to finish (not at all while uploads fail);
    then training goes on and the new checkpoint waits its turn (a newer one replaces it: when the bucket is slow
    or down, the newest goes next)."""
    upload_retry_seconds: float = 30.0
    """A failed upload of the newest checkpoint is tried again after this long, until the bucket answers. Until
    then no local checkpoint newer than the newest one in the bucket is deleted."""
    upload_alarm_after: int = 3
    """After this many failed uploads in a row, say so on a log line of its own (and in the upload status)."""
    s3_max_attempts: int = 6
    """Tries per S3 request (the first one included) before an upload counts as failed."""
    s3_timeout_seconds: float = 5.0
    """Seconds per try to connect and to wait for an answer: a server that stops answering fails a request in
    about ``s3_max_attempts`` x this (a write in twice that), not in minutes."""

    def __post_init__(self) -> None:
        _check(self.every_steps >= 0, "checkpoint.every_steps", "must be >= 0")
        _check(self.every_minutes >= 0, "checkpoint.every_minutes", "must be >= 0")
        _check(self.keep_last >= 1, "checkpoint.keep_last", "must be >= 1 (resume needs the newest one)")
        _check(self.keep_best >= 0, "checkpoint.keep_best", "must be >= 0")
        _check(bool(self.best_metric.strip()), "checkpoint.best_metric", "must not be empty")
        _check(bool(self.resume.strip()), "checkpoint.resume", "must be auto, never, a path or an s3:// URI")
        _check(self.preemption_grace_seconds >= 0, "checkpoint.preemption_grace_seconds", "must be >= 0")
        _check(self.upload_workers > 0, "checkpoint.upload_workers", "must be > 0")
        _check(self.upload_wait_seconds >= 0, "checkpoint.upload_wait_seconds", "must be >= 0")
        _check(self.upload_retry_seconds > 0, "checkpoint.upload_retry_seconds", "must be > 0")
        _check(self.upload_alarm_after >= 1, "checkpoint.upload_alarm_after", "must be >= 1")
        _check(self.s3_max_attempts >= 1, "checkpoint.s3_max_attempts", "must be >= 1")
        _check(self.s3_timeout_seconds > 0, "checkpoint.s3_timeout_seconds", "must be > 0")


@dataclass
class WandbConfig:
    """Weights & Biases. The API key comes from ``WANDB_API_KEY`` or ``wandb login``, never from this file."""

    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    """auto: online when an API key is configured, offline otherwise (sync later with ``wandb sync``)."""
    project: str = "lfqa"
    """Overridden by ``WANDB_PROJECT``."""
    entity: str | None = None
    """Team or user; null: ``WANDB_ENTITY`` or the key's default."""
    run_name: str | None = None
    """null: ``WANDB_NAME`` or the run folder's name."""
    tags: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check(bool(self.project.strip()), "tracking.wandb.project", "must not be empty")


@dataclass
class TrackingConfig:
    """Metrics logging: console, metrics.jsonl in the run folder (always) and Weights & Biases."""

    log_every_steps: int = 10
    """A log line (and a metrics.jsonl record) every N optimizer steps."""
    progress_bar: bool | Literal["auto"] = "auto"
    """A tqdm bar with loss, learning rate and samples/s on the main process; ``auto``: only when the console
    is a terminal (under ``kubectl logs``, CI or a pipe the bar's frames would fill the log)."""
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def __post_init__(self) -> None:
        _check(self.log_every_steps > 0, "tracking.log_every_steps", "must be > 0")


@dataclass
class JobConfig:
    """A whole training job."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(dataset="LLukas22/lfqa_preprocessed"))
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


# --- loading -------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _describe(value: Any) -> str:
    kind = "null" if value is None else type(value).__name__
    return f"{kind} {value!r}" if len(repr(value)) <= 40 else kind


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_describe(value)}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{key}: expected one of {_type_name(tp)}, got {_describe(value)}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_describe(value)}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} keys, got {_describe(value)}")
        return _build(tp, value, key)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # PyYAML (YAML 1.1) reads "3e-4" as a string; that is how people write learning rates.
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is bool or tp is str:
        if isinstance(value, tp):
            return value
    else:  # pragma: no cover - a new annotation type in this module
        raise TypeError(f"unsupported config annotation {tp!r} for {key}")
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_describe(value)}")


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix + '.' if prefix else ''}{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown key '{dotted}'{hint}")
        kwargs[key] = _coerce(value, hints[key], dotted)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any, source: str) -> None:
    parts = dotted.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: '{'.'.join(parts[: i + 1])}' is not a section, cannot set '{dotted}'")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``train.learning_rate=3e-4`` -> ``("train.learning_rate", 3e-4)``; the value is read as YAML."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override '{text}': expected dotted.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{text}': value is not valid YAML ({err.__class__.__name__})") from None
    return key, value


def load_job(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """Read a job YAML, apply ``key=value`` overrides and validate everything.

    Raises :class:`ConfigError` whose message starts with the file name (or ``override``).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as err:
        raise ConfigError(f"{path}: cannot read job file ({err.strerror or err})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a job file (not UTF-8 text)") from None
    try:
        tree = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {_describe(tree)}")
    source = str(path)
    for text_override in overrides:
        key, value = parse_override(text_override)
        _set_dotted(tree, key, value, f"{path} (override '{text_override}')")
        source = f"{path} (with overrides)"
    try:
        return _build(JobConfig, tree)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    except TypeError as err:  # pragma: no cover - defensive: a dataclass rejected its arguments
        raise ConfigError(f"{source}: {err}") from None


def job_to_dict(job: JobConfig) -> dict:
    """The resolved configuration as plain data (what ``job.yaml`` in a run folder holds)."""
    return dataclasses.asdict(job)


def dump_job(job: JobConfig) -> str:
    return yaml.safe_dump(job_to_dict(job), sort_keys=False)
