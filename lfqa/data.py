"""Data pipeline: read rows, map them to the LFQA schema, filter, tokenise (cached), batch.

Rows come from a hub data set (``data.dataset``, read with ``datasets.load_dataset``) or from local
JSON / JSONL / Parquet files (``data.train_files``). Each row is mapped to ``question``, ``answer`` and a
list of context passages (see :class:`lfqa.config.FieldsConfig`); malformed rows are counted, reported
with their file and row number, and skipped. The model input is ``question: ... context: ...``.

Batching pads inputs only to a multiple of the model's attention window (LED pads to it anyway) and
groups examples of similar input and answer lengths, so little compute goes to padding; with a token budget
(``data.max_tokens_per_batch``) each batch holds as many rows as fit it instead of a fixed number.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from lfqa.config import DataConfig, FieldsConfig
from lfqa.errors import LfqaError

# Bump when the tokenised layout changes, so old cache files are not reused.
PIPELINE_VERSION = "3"
MAX_REPORTED_PROBLEMS = 10


class DataError(LfqaError, RuntimeError):
    """Unusable data: the message names the file, data set or row."""


@dataclass
class Example:
    question: str
    answer: str
    contexts: list[str]
    facts: list[str] = field(default_factory=list)
    """Short strings a correct answer contains (scored as fact recall); empty when the row has none."""


@dataclass
class DataReport:
    """What happened to the rows of one split, printed at start-up and kept in the run folder."""

    source: str
    rows_read: int = 0
    malformed: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    """The first few malformed rows as ``file:row: reason``."""
    dropped_long_answer: int = 0
    truncated_inputs: int = 0
    kept: int = 0
    limited_to: int | None = None

    def add_problem(self, where: str, reason: str) -> None:
        self.malformed[reason] += 1
        if len(self.problems) < MAX_REPORTED_PROBLEMS:
            self.problems.append(f"{where}: {reason}")

    @property
    def malformed_total(self) -> int:
        return sum(self.malformed.values())

    def lines(self, max_answer_tokens: int, max_input_tokens: int) -> list[str]:
        out = [f"{self.source}: {self.rows_read} rows read, {self.kept} used"]
        if self.malformed_total:
            reasons = ", ".join(f"{n} {r}" for r, n in self.malformed.most_common())
            out.append(f"  skipped {self.malformed_total} malformed rows ({reasons})")
            out.extend(f"    {p}" for p in self.problems)
            if self.malformed_total > len(self.problems):
                out.append(f"    ... and {self.malformed_total - len(self.problems)} more")
        if self.dropped_long_answer:
            n = self.dropped_long_answer
            out.append(f"  dropped {n} row{'' if n == 1 else 's'} whose answer is longer than "
                       f"{max_answer_tokens} tokens")
        if self.truncated_inputs:
            n = self.truncated_inputs
            out.append(f"  truncated {n} input{'' if n == 1 else 's'} to {max_input_tokens} tokens")
        if self.limited_to is not None:
            out.append(f"  limited to the first {self.limited_to} usable rows")
        return out

    def to_dict(self) -> dict:
        d = asdict(self)
        d["malformed"] = dict(self.malformed)
        return d


# --- reading and schema mapping ---------------------------------------------------------------------


def get_path(row: Any, dotted: str) -> Any:
    """``get_path({"answers": [{"text": "x"}]}, "answers.0.text") == "x"``; KeyError when absent."""
    value = row
    for part in dotted.split("."):
        if isinstance(value, dict):
            if part not in value:
                raise KeyError(dotted)
            value = value[part]
        elif isinstance(value, (list, tuple)) and part.lstrip("-").isdigit():
            index = int(part)
            if not -len(value) <= index < len(value):
                raise KeyError(dotted)
            value = value[index]
        else:
            raise KeyError(dotted)
    return value


def _passages(value: Any, fields: FieldsConfig) -> list[str] | None:
    """Context as a list of passage strings, or None when its type is not one we understand."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, (list, tuple)):
        return None
    out = []
    for item in value:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, dict) and isinstance(item.get(fields.passage_text), str):
            title = item.get(fields.passage_title)
            text = item[fields.passage_text]
            out.append(f"{title}: {text}" if isinstance(title, str) and title.strip() else text)
        else:
            return None
    return out


def text_field(row: dict, fields: FieldsConfig, name: str) -> str:
    """The stripped text of field ``name`` (``question`` or ``answer``) of a row; ValueError says why not."""
    path = getattr(fields, name)
    try:
        value = get_path(row, path)
    except KeyError:
        value = None
    if value is None:  # Arrow-backed data sets fill absent fields with null
        raise ValueError(f"missing {name} field '{path}'")
    if not isinstance(value, str):
        raise ValueError(f"{name} field '{path}' is not a string")
    if not value.strip():
        raise ValueError(f"empty {name}")
    return value.strip()


def row_contexts(row: dict, fields: FieldsConfig) -> list[str] | str:
    """The non-empty context passages of a row, or the reason it has none."""
    try:
        raw_context = get_path(row, fields.context)
    except KeyError:
        raw_context = None
    if raw_context is None:
        return f"missing context field '{fields.context}'"
    contexts = _passages(raw_context, fields)
    if contexts is None:
        return (f"context field '{fields.context}' is a {type(raw_context).__name__}, expected a string, "
                f"a list of strings or a list of objects with '{fields.passage_text}'")
    contexts = [c.strip() for c in contexts if c.strip()]
    return contexts or "empty context"


def row_facts(row: dict, fields: FieldsConfig) -> list[str] | str:
    """The row's facts (optional: absent or null is none), or the reason they are malformed."""
    try:
        value = get_path(row, fields.facts)
    except KeyError:
        return []
    if value is None:
        return []
    if not isinstance(value, (list, tuple)) or not all(isinstance(f, str) for f in value):
        return f"facts field '{fields.facts}' is not a list of strings"
    return [f.strip() for f in value if f.strip()]


def normalise_row(row: Any, fields: FieldsConfig) -> Example | str:
    """Map one raw row to an :class:`Example`, or return the reason it is malformed."""
    if not isinstance(row, dict):
        return "row is not an object"
    try:
        question, answer = text_field(row, fields, "question"), text_field(row, fields, "answer")
    except ValueError as err:
        return str(err)
    contexts = row_contexts(row, fields)
    if isinstance(contexts, str):
        return contexts
    facts = row_facts(row, fields)
    if isinstance(facts, str):
        return facts
    return Example(question, answer, contexts, facts)


def expand_files(patterns: list[str]) -> list[Path]:
    files: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise DataError(f"{pattern}: no file matches")
        for match in matches:
            path = Path(match)
            if path.is_dir():
                raise DataError(f"{path}: is a folder, expected a .jsonl, .json or .parquet file")
            if not path.is_file():
                raise DataError(f"{path}: no such file")
            files.append(path)
    return files


def iter_file_rows(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """Yield ``(row_number, row, problem)``; rows are numbered from 1 (JSONL: the line number)."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with path.open("rb") as f:
            for line_no, raw in enumerate(f, start=1):
                try:
                    # utf-8-sig on the first line: a byte-order mark is not part of the first row.
                    line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
                except UnicodeDecodeError as err:
                    yield line_no, None, f"line is not UTF-8 text (byte {err.start})"
                    continue
                if not line.strip():
                    continue
                try:
                    yield line_no, json.loads(line), None
                except json.JSONDecodeError:
                    yield line_no, None, "line is not valid JSON"
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataError(f"{path}: not valid JSON ({err.__class__.__name__}); "
                            "use .jsonl for one object per line") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of rows (or {{\"data\": [...]}})")
        for i, row in enumerate(data, start=1):
            yield i, row, None
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as err:  # pyarrow raises several unrelated types for a bad file
            raise DataError(f"{path}: not a readable Parquet file ({err.__class__.__name__})") from None
        for i, row in enumerate(table.to_pylist(), start=1):
            yield i, row, None
    else:
        raise DataError(f"{path}: unsupported file type '{suffix}' (use .jsonl, .json or .parquet)")


def read_files(patterns: list[str], fields: FieldsConfig) -> tuple[list[Example], DataReport, str]:
    """Read and normalise local files. Returns the examples, the report and a content fingerprint."""
    files = expand_files(patterns)
    report = DataReport(source=", ".join(str(f) for f in files))
    digest = hashlib.sha256()
    examples: list[Example] = []
    for path in files:
        digest.update(str(path.name).encode())
        digest.update(path.read_bytes())
        before = len(examples)
        for row_no, row, problem in iter_file_rows(path):
            report.rows_read += 1
            result = problem or normalise_row(row, fields)
            if isinstance(result, str):
                report.add_problem(f"{path}:{row_no}", result)
            else:
                examples.append(result)
        if len(examples) == before:
            raise DataError(f"{path}: no usable rows ({report.malformed_total} malformed"
                            + (f"; first: {report.problems[0]}" if report.problems else "") + ")")
    return examples, report, digest.hexdigest()


def read_hub_split(dataset: str, split: str, fields: FieldsConfig) -> tuple[list[Example], DataReport, str]:
    """Read a split of a hub data set (or a local data set folder) through ``datasets.load_dataset``."""
    import datasets

    try:
        ds = datasets.load_dataset(dataset, split=split)
    except Exception as err:  # datasets raises many types (connection, missing split, bad repo id)
        first = (str(err).strip().splitlines() or [err.__class__.__name__])[0]
        raise DataError(f"cannot load data set '{dataset}' split '{split}': {first}") from None
    report = DataReport(source=f"{dataset}[{split}]")
    examples = []
    for i, row in enumerate(ds):
        report.rows_read += 1
        result = normalise_row(row, fields)
        if isinstance(result, str):
            report.add_problem(f"{dataset}[{split}] row {i}", result)
        else:
            examples.append(result)
    if not examples:
        raise DataError(f"{dataset}[{split}]: no usable rows ({report.malformed_total} malformed)")
    return examples, report, ds._fingerprint


def read_split(cfg: DataConfig, split: str) -> tuple[list[Example], DataReport, str]:
    if cfg.dataset:
        hub_split = cfg.train_split if split == "train" else cfg.validation_split
        return read_hub_split(cfg.dataset, hub_split, cfg.fields)
    return read_files(cfg.train_files if split == "train" else cfg.validation_files, cfg.fields)


def stage_data_files(cfg: DataConfig, endpoint_url: str | None = None, region: str | None = None) -> DataConfig:
    """``cfg`` with its ``s3://`` data files replaced by local copies (downloaded once into ``cfg.cache_dir/s3``,
    refreshed when the object changes), through the given S3 endpoint and region (the job's ``output.s3_*``)."""
    import dataclasses

    def local(paths: list[str]) -> list[str]:
        return [str(stage_s3_file(p, cfg.cache_dir, endpoint_url, region)) if p.startswith("s3://") else p
                for p in paths]

    return dataclasses.replace(cfg, train_files=local(cfg.train_files), validation_files=local(cfg.validation_files))


def stage_s3_file(uri: str, cache_dir: str, endpoint_url: str | None = None, region: str | None = None) -> Path:
    """A local copy of the data file at ``uri`` (``s3://bucket/key``); DataError naming the URI when it fails."""
    from lfqa.storage import StorageError, stage_s3_uri

    try:
        return stage_s3_uri(uri, Path(cache_dir) / "s3", endpoint_url=endpoint_url, region=region)
    except StorageError as err:
        raise DataError(f"{uri}: {err}") from None


# --- tokenisation -------------------------------------------------------------------------------------


def format_input(question: str, contexts: list[str]) -> str:
    """The model input, as the seed and the LFQA data set's authors wrote it."""
    return f"question: {question} context: {' '.join(contexts)}"


def _tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()


def silence_length_warning(tokenizer) -> None:
    """Mark transformers' "Token indices sequence length is longer than the specified maximum" as said.

    lfqa tokenises whole inputs to count them and then cuts them itself (``encode_inputs``), so the
    warning that the uncut ids would fail in the model never applies.
    """
    warned = getattr(tokenizer, "deprecation_warnings", None)
    if isinstance(warned, dict):
        warned["sequence-length-is-longer-than-the-specified-maximum"] = True


def encode_inputs(tokenizer, questions: list[str], contexts: list[list[str]], max_input_tokens: int,
                  global_attention: str = "question") -> dict[str, list]:
    """Token ids of the model inputs, cut to ``max_input_tokens``, and the global attention span.

    Shared by training, evaluation and ``lfqa answer`` so that a model always sees inputs built one way.
    Returns ``input_ids``, ``num_global`` (leading tokens with global attention), ``truncated`` and
    ``full_length`` (tokens before the cut).
    """
    silence_length_warning(tokenizer)
    closing = closing_tokens(tokenizer)
    inputs = [format_input(q, c) for q, c in zip(questions, contexts)]
    input_ids = tokenizer(inputs, add_special_tokens=True)["input_ids"]
    full_length = [len(ids) for ids in input_ids]
    truncated = [n > max_input_tokens for n in full_length]
    # Keep the closing special tokens (</s>) when cutting, as tokenizer truncation would.
    keep = max_input_tokens - len(closing)
    input_ids = [ids[:keep] + closing if cut else ids for ids, cut in zip(input_ids, truncated)]
    if global_attention == "question":
        prefixes = tokenizer([f"question: {q}" for q in questions], add_special_tokens=True)["input_ids"]
        # Without the prefix's closing tokens: the opening ones (BART's <s>, none for T5) and the question's.
        num_global = [min(len(p) - len(closing), len(ids)) for p, ids in zip(prefixes, input_ids)]
    else:
        num_global = [1] * len(input_ids)
    return {"input_ids": input_ids, "num_global": num_global, "truncated": truncated, "full_length": full_length}


def closing_tokens(tokenizer) -> list[int]:
    """The special tokens the tokenizer appends to a text: ``[</s>]`` for BART, LED and T5."""
    bare = tokenizer("question", add_special_tokens=False)["input_ids"]
    full = tokenizer("question", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start:start + len(bare)] == bare:
            return full[start + len(bare):]
    return []  # a tokenizer that changes the text's own tokens: nothing known to keep


def tokenize_examples(
    examples: list[Example],
    tokenizer,
    cfg: DataConfig,
    report: DataReport,
    data_fingerprint: str,
    *,
    max_input_tokens: int,
    max_answer_tokens: int,
    limit: int | None,
    log=print,
):
    """Tokenise with ``datasets.map`` into a cache file keyed by data, tokenizer and settings.

    Returns a ``datasets.Dataset`` with ``input_ids``, ``labels``, ``num_global`` (the number of leading
    tokens that get global attention), ``input_length``, ``label_length`` and ``row_id`` (the row's position
    in ``examples``), already filtered; updates ``report`` with the counts.
    """
    import datasets

    key = hashlib.sha256(json.dumps({
        "v": PIPELINE_VERSION, "data": data_fingerprint, "fields": asdict(cfg.fields),
        "tokenizer": _tokenizer_fingerprint(tokenizer), "max_input_tokens": max_input_tokens,
        "global_attention": cfg.global_attention,
    }, sort_keys=True).encode()).hexdigest()[:16]
    cache_file = Path(cfg.cache_dir) / f"tokenised-{key}.arrow"
    cache_file.parent.mkdir(parents=True, exist_ok=True)

    def encode(batch, indices):
        encoded = encode_inputs(tokenizer, batch["question"], batch["context"], max_input_tokens,
                                cfg.global_attention)
        labels = tokenizer(text_target=batch["answer"], add_special_tokens=True)["input_ids"]
        # Lengths as their own columns: batching reads them without loading every token list.
        return {**encoded, "labels": labels, "row_id": indices,
                "input_length": [len(ids) for ids in encoded["input_ids"]],
                "label_length": [len(ids) for ids in labels]}

    raw = datasets.Dataset.from_dict({
        "question": [e.question for e in examples],
        "answer": [e.answer for e in examples],
        "context": [e.contexts for e in examples],
    })
    cached = cache_file.exists()
    tokenised = raw.map(encode, batched=True, with_indices=True, batch_size=256, remove_columns=raw.column_names,
                        cache_file_name=str(cache_file), load_from_cache_file=True,
                        desc=f"Tokenising {report.source}")
    log(f"{report.source}: {'loaded tokenised rows from cache' if cached else 'tokenised'} {cache_file}")

    label_lengths = np.array(tokenised["label_length"])
    keep = np.flatnonzero(label_lengths <= max_answer_tokens)
    report.dropped_long_answer = int(len(label_lengths) - len(keep))
    truncated = np.array(tokenised["truncated"], dtype=bool)
    report.truncated_inputs = int(truncated[keep].sum())
    if limit is not None and len(keep) > limit:
        keep = keep[:limit]
        report.limited_to = limit
    report.kept = int(len(keep))
    if report.kept == 0:
        raise DataError(f"{report.source}: no rows left after filtering answers longer than "
                        f"{max_answer_tokens} tokens")
    # row_id: the row's position in ``examples``, to find its question and reference text again.
    return tokenised.select(keep.tolist()).remove_columns(["truncated", "full_length"])


# --- batching -----------------------------------------------------------------------------------------


@dataclass
class Seq2SeqCollator:
    """Pads a list of tokenised rows into a batch for the model (``lfqa.modeling.model_collator`` sets it up).

    Inputs are padded to the longest input rounded up to ``pad_to_multiple_of`` (LED's attention
    window), never to a fixed maximum. LED pads to the window inside the encoder anyway; doing it here
    gives every rank the same shapes (ZeRO-3 needs that) and exact padding statistics. Labels (absent
    when answering) are padded with -100 so that padding is ignored by the loss. ``global_attention``:
    a ``global_attention_mask`` over each row's ``num_global`` leading tokens (LED only; other families
    refuse the key).
    """

    pad_token_id: int
    pad_to_multiple_of: int = 1
    global_attention: bool = True

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(r["input_ids"]) for r in rows)
        width = math.ceil(longest / self.pad_to_multiple_of) * self.pad_to_multiple_of
        has_labels = "labels" in rows[0]
        label_width = max(len(r["labels"]) for r in rows) if has_labels else 0
        n = len(rows)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((n, width), dtype=torch.long)
        global_attention_mask = torch.zeros((n, width), dtype=torch.long) if self.global_attention else None
        labels = torch.full((n, label_width), -100, dtype=torch.long)
        for i, row in enumerate(rows):
            ids = row["input_ids"]
            input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[i, : len(ids)] = 1
            if global_attention_mask is not None:
                global_attention_mask[i, : max(1, int(row["num_global"]))] = 1
            if has_labels:
                labels[i, : len(row["labels"])] = torch.tensor(row["labels"], dtype=torch.long)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if global_attention_mask is not None:
            batch["global_attention_mask"] = global_attention_mask
        if has_labels:
            batch["labels"] = labels
        return batch


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Deterministic, length-grouped batches (all of them: accelerate deals them out to the ranks).

    Each epoch: shuffle all indices with ``(seed, epoch)``, cut them into groups of ``group_size``
    batches, sort each group by (input length rounded up to the window, answer length), cut it into
    batches and shuffle the batch order. Rounding inputs to the window first matters: LED pads inputs to
    the window anyway, so ordering by answer length within a window bucket removes decoder padding for
    free.

    Batches hold ``batch_size`` rows, or, with ``max_tokens``, as many rows (at most ``batch_size``) as fit
    a token budget: a batch costs (longest input rounded up to the window + longest answer) x rows, the
    tokens the model really processes. Token batches never mix two window buckets (that would pad every
    input of the batch to the larger one); a row that alone costs more than the budget gets a batch of its own.

    The epoch's batches depend only on ``(seed, epoch)`` and ``len()`` is the exact number of batches of the
    epoch set with :meth:`set_epoch` (with ``max_tokens`` it may differ slightly between epochs), so a resumed
    run can skip the first k batches. Each row appears exactly once per epoch.

    accelerate's BatchSamplerShard gives rank ``r`` batches ``r, r + w, ...`` and reads ``batch_size``: with a
    fixed size it yields a round only when its last batch is full, so the one short batch (row count not a
    multiple of the batch size) always comes last, else a whole round would be silently dropped. With
    ``max_tokens``, ``batch_size`` reads None (accelerate's "batches of varying size"): every round is kept and
    a last incomplete round is completed with the epoch's first batches.
    """

    def __init__(self, input_lengths, label_lengths, batch_size: int, *, window: int = 1, group_size: int = 64,
                 group_by_length: bool = True, shuffle: bool = True, seed: int = 0, max_tokens: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1 or None, got {max_tokens}")
        self.input_lengths = np.asarray(input_lengths, dtype=np.int64)
        self.label_lengths = np.asarray(label_lengths, dtype=np.int64)
        if self.input_lengths.shape != self.label_lengths.shape:
            raise ValueError(f"{len(self.input_lengths)} input lengths for {len(self.label_lengths)} label lengths")
        self.max_batch_size = batch_size
        self.max_tokens = max_tokens
        # What accelerate's BatchSamplerShard reads: a fixed size, or None for batches of varying size.
        self.batch_size = batch_size if max_tokens is None else None
        self.window = max(1, window)
        self.group_size = group_size
        self.group_by_length = group_by_length
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self._padded_inputs = -(-self.input_lengths // self.window) * self.window
        self._planned: tuple[tuple[int, int], list[list[int]]] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batch_tokens(self, batch: list[int]) -> int:
        """Tokens the model processes for ``batch``: (longest padded input + longest answer) x rows."""
        return int((self._padded_inputs[batch].max() + self.label_lengths[batch].max()) * len(batch))

    def _plan(self) -> list[list[int]]:
        key = (self.seed, self.epoch)
        if self._planned is not None and self._planned[0] == key:
            return self._planned[1]
        n = len(self.input_lengths)
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        batches: list[list[int]] = []
        chunk = self.max_batch_size * self.group_size if self.group_by_length else max(n, 1)
        for start in range(0, n, chunk):
            group = order[start:start + chunk]
            if self.group_by_length:
                group = group[np.lexsort((self.label_lengths[group], self._padded_inputs[group]))]
            if self.max_tokens is None:
                batches.extend(group[i:i + self.max_batch_size].tolist()
                               for i in range(0, len(group), self.max_batch_size))
            else:
                batches.extend(self._fill(group))
        if self.max_tokens is None:
            short = batches.pop() if batches and len(batches[-1]) < self.max_batch_size else None
            if self.shuffle and self.group_by_length:
                batches = [batches[i] for i in rng.permutation(len(batches))]
            if short:
                batches.append(short)
        elif self.shuffle and self.group_by_length:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        self._planned = (key, batches)
        return batches

    def _fill(self, rows: np.ndarray) -> list[list[int]]:
        """Greedy token-budget batches over ``rows`` in their given order."""
        budget, most = self.max_tokens, self.max_batch_size
        padded, labels = self._padded_inputs[rows].tolist(), self.label_lengths[rows].tolist()
        batches: list[list[int]] = []
        batch: list[int] = []
        width_in = width_out = 0
        for row, p, a in zip(rows.tolist(), padded, labels):
            if batch:
                new_in, new_out = max(width_in, p), max(width_out, a)
                if (len(batch) == most or (new_in + new_out) * (len(batch) + 1) > budget
                        or (self.group_by_length and p != width_in)):
                    batches.append(batch)
                    batch, width_in, width_out = [], 0, 0
            batch.append(row)
            width_in, width_out = max(width_in, p), max(width_out, a)
        if batch:
            batches.append(batch)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        # Copies: accelerate's BatchSamplerShard extends the last batch it gets in place, which must not
        # change the epoch's plan that len() and a second pass (a resume) read.
        yield from (list(batch) for batch in self._plan())

    def __len__(self) -> int:
        return len(self._plan())
