"""``lfqa answer``: answer questions about a document with a trained model.

    lfqa answer --model runs/tiny-cpu/model --question "Why is Zalrimum famous?" --document notes.pdf
    lfqa answer --model runs/tiny-cpu/model --question "Why?" --context "first passage" "second passage"
    lfqa answer --model runs/tiny-cpu/model --jsonl questions.jsonl --out answers.jsonl

The same from Python::

    from lfqa.answer import Answerer
    answerer = Answerer("runs/tiny-cpu/model")
    print(answerer.answer("Why is Zalrimum famous?", document="Zalrimum has stone windmills.").answer)

Inputs are built exactly as in training (``question: ... context: ...``, global attention on the
question). A document longer than the model's maximum input is cut, and the result says so.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lfqa.config import ConfigError, FieldsConfig, GenerationConfig, JobConfig
from lfqa.errors import InputError, one_line, output_file

DOCUMENT_FILE_KEY = "document_file"
"""The key of a ``--jsonl`` row that names a document file (.txt, .md, .pdf) to answer from."""


@dataclass
class Answer:
    question: str
    answer: str
    input_tokens: int
    """Tokens of the full input before any cut."""
    truncated: bool
    max_input_tokens: int


def read_document(path: str | Path) -> str:
    """Text of a .pdf (with pypdf), or of any UTF-8 text file (.txt, .md, ...); InputError naming the file."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a folder, expected a .txt, .md or .pdf file")
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    if path.suffix.lower() == ".pdf":
        text = _read_pdf(path)
        if not text.strip():
            raise InputError(f"{path}: the PDF has no extractable text (a scanned PDF needs OCR first)")
        return text
    try:
        data = path.read_bytes()
    except OSError as err:
        raise InputError(f"{path}: cannot read ({err.strerror})") from None
    if data.startswith(b"%PDF-"):
        raise InputError(f"{path}: is a PDF; name it .pdf to have its text extracted")
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark is not text
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not a UTF-8 text file (byte {err.start}); use .txt, .md or .pdf") from None
    if "\x00" in text:
        raise InputError(f"{path}: binary data, not a text file (use .txt, .md or .pdf)")
    if not text.strip():
        raise InputError(f"{path}: the document is empty")
    return text


def _read_pdf(path: Path) -> str:
    import logging

    from pypdf import PdfReader

    # pypdf logs repairs of damaged files as warnings; the outcome is reported here in one line instead.
    pypdf_log = logging.getLogger("pypdf")
    level, pypdf_log.level = pypdf_log.level, logging.ERROR
    try:
        reader = PdfReader(path)
        return "\n".join((page.extract_text() or "") for page in reader.pages)
    except Exception as err:  # noqa: BLE001 - pypdf raises many types for damaged files
        raise InputError(f"{path}: not a readable PDF ({type(err).__name__}: {one_line(err, 120)})") from None
    finally:
        pypdf_log.setLevel(level)


def saved_job(model_path: str) -> JobConfig | None:
    """The job a model was trained with (its ``job.yaml``), or None for models trained elsewhere."""
    from lfqa.cli import read_job

    job_file = Path(model_path) / "job.yaml"
    return read_job(job_file) if job_file.is_file() else None


def default_job(overrides: list[str] = ()) -> JobConfig:
    """The built-in defaults with ``overrides`` (for a model folder without a job.yaml)."""
    from lfqa.config import _build, _set_dotted, parse_override

    tree: dict = {}
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value, f"override '{text}'")
    data = tree.setdefault("data", {})
    if isinstance(data, dict) and "dataset" not in data and "train_files" not in data:
        data["dataset"] = JobConfig().data.dataset  # what JobConfig() itself reads
    try:
        return _build(JobConfig, tree)
    except ConfigError as err:
        raise ConfigError(f"overrides: {err}") from None


@dataclass
class ModelAndJob:
    """A command's model, as a local folder (or hub id), and the job whose settings apply to it."""

    model: str
    job: JobConfig
    job_source: str
    """--job's file, the model's job.yaml, or "defaults"."""


def resolve_model_and_job(model: str, job_path: str | None, overrides: list[str]) -> ModelAndJob:
    """The job (``--job``, else the model's ``job.yaml``, else the defaults, each with ``overrides``) and the
    model as a local folder: an ``s3://`` model is downloaded once into ``model.cache_dir`` through the S3
    endpoint and region of ``--job`` or the overrides (``output.s3_endpoint_url``), else ``AWS_ENDPOINT_URL``."""
    import dataclasses

    from lfqa.cli import read_job
    from lfqa.modeling import resolve_model_path

    given = read_job(job_path, overrides) if job_path else default_job(overrides)
    local = resolve_model_path(dataclasses.replace(given.model, name_or_path=model),
                               given.output.s3_endpoint_url, given.output.s3_region)
    if job_path:
        return ModelAndJob(local, given, job_path)
    job_file = Path(local) / "job.yaml"
    if job_file.is_file():
        return ModelAndJob(local, read_job(job_file, overrides), str(job_file))
    return ModelAndJob(local, given, "defaults")


def _fit_decoder(gen: GenerationConfig, config) -> GenerationConfig:
    """``gen`` with at most as many new tokens as the decoder has positions (more would index past them)."""
    from lfqa.modeling import position_limits

    positions = position_limits(config)[1]
    if positions is None or gen.max_new_tokens < positions:
        return gen
    most = positions - 1  # the decoder start token takes the first position
    return GenerationConfig(**{**asdict(gen), "max_new_tokens": most, "min_new_tokens": min(gen.min_new_tokens, most)})


class Answerer:
    """A loaded model and tokenizer that answer questions about passages or documents."""

    def __init__(self, model: str, *, generation: GenerationConfig | None = None, max_input_tokens: int | None = None,
                 global_attention: str | None = None, device: str | None = None):
        from lfqa.modeling import load_model, load_tokenizer, model_collator, position_limits

        self.model_path = str(model)
        # The model first: its config says best what a folder holds ("a bert model, not a sequence-to-sequence").
        self.model = load_model(self.model_path).eval()
        self.tokenizer = load_tokenizer(self.model_path)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device)
        limit = position_limits(self.model.config)[0]
        # Decoding and input layout as in training, when the model folder says how it was trained; the input
        # limit too, for a family without position limit (T5, LongT5).
        needs_job = generation is None or global_attention is None or (max_input_tokens is None and limit is None)
        job = saved_job(self.model_path) if needs_job else None
        wanted = max_input_tokens or limit or (job or default_job()).data.max_input_tokens
        self.max_input_tokens = min(wanted, limit or wanted)
        self.generation = _fit_decoder(generation or (job.eval.generation if job else GenerationConfig()),
                                       self.model.config)
        self.global_attention = global_attention or (job.data.global_attention if job else "question")
        self.collator = model_collator(self.model, self.tokenizer)

    def answer(self, question: str, *, document: str | None = None, contexts: list[str] | None = None) -> Answer:
        if (document is None) == (contexts is None):
            raise InputError("give exactly one of document and contexts")
        return self.answer_many([(question, [document] if document is not None else contexts)])[0]

    @torch.no_grad()
    def answer_many(self, items: list[tuple[str, list[str]]], *, batch_size: int = 4,
                    progress: bool = False) -> list[Answer]:
        """Answer ``(question, passages)`` pairs in batches (sorted by length, returned in input order)."""
        from tqdm.auto import tqdm

        from lfqa.data import encode_inputs
        from lfqa.evaluation import generation_kwargs

        if not items:  # a rank whose share of a small evaluation is empty
            return []
        for i, (question, passages) in enumerate(items):
            if not question or not question.strip():
                raise InputError(f"question {i + 1} is empty")
            if not any(p.strip() for p in passages):
                raise InputError(f"question {i + 1} ('{question[:60]}') has an empty context")
        questions = [q.strip() for q, _ in items]
        encoded = encode_inputs(self.tokenizer, questions, [[p.strip() for p in c] for _, c in items],
                                self.max_input_tokens, self.global_attention)
        rows = [{"input_ids": ids, "num_global": g} for ids, g in zip(encoded["input_ids"], encoded["num_global"])]
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
        texts: dict[int, str] = {}
        kwargs = generation_kwargs(self.generation)
        bar = tqdm(total=len(rows), desc="answering", disable=not progress, unit="q")
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = {k: v.to(self.device) for k, v in self.collator([rows[i] for i in idx]).items()}
            out = self.model.generate(**batch, **kwargs)
            for i, text in zip(idx, self.tokenizer.batch_decode(out, skip_special_tokens=True)):
                texts[i] = text.strip()
            bar.update(len(idx))
        bar.close()
        return [Answer(questions[i], texts[i], encoded["full_length"][i], encoded["truncated"][i],
                       self.max_input_tokens) for i in range(len(rows))]


def _jsonl_row(row, where: str, base: Path, fields: FieldsConfig) -> tuple[str, list[str]]:
    """One ``--jsonl`` row as ``(question, passages)``: the training schema through ``fields``, or a file."""
    from lfqa.data import row_contexts, text_field

    if not isinstance(row, dict):
        raise InputError(f"{where}: the row is not a JSON object")
    try:
        question = text_field(row, fields, "question")
    except ValueError as err:
        raise InputError(f"{where}: {err}") from None
    if DOCUMENT_FILE_KEY in row:
        name = row[DOCUMENT_FILE_KEY]
        if not isinstance(name, str) or not name.strip():
            raise InputError(f"{where}: '{DOCUMENT_FILE_KEY}' must be a file name")
        doc = Path(name)
        return question, [read_document(doc if doc.is_absolute() else base / doc)]
    contexts = row_contexts(row, fields)
    if isinstance(contexts, str):
        hint = ""
        others = [k for k in ("document", "passages", "context", "ctxs") if k in row and k != fields.context]
        if others:
            hint = f" (the row has '{others[0]}': data.fields.context={others[0]} reads it as the context)"
        raise InputError(f"{where}: {contexts}{hint}; or give '{DOCUMENT_FILE_KEY}': a .txt, .md or .pdf file")
    return question, contexts


def read_jsonl_questions(path: str | Path, fields: FieldsConfig | None = None) -> list[tuple[str, list[str]]]:
    """``--jsonl`` rows: the question and context through ``fields`` (``data.fields``, as in training: the
    context a string, a list of strings or a list of ``{title, text}`` objects), or the question and
    ``document_file``, a file to read (relative to the JSONL file's folder)."""
    path = Path(path)
    fields = fields or FieldsConfig()
    if path.is_dir():
        raise InputError(f"{path}: is a folder, expected a .jsonl file")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except OSError as err:
        raise InputError(f"{path}: cannot read ({err.strerror})") from None
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not a UTF-8 text file (byte {err.start})") from None
    items = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise InputError(f"{path}:{n}: line is not valid JSON") from None
        items.append(_jsonl_row(row, f"{path}:{n}", path.parent, fields))
    if not items:
        raise InputError(f"{path}: no questions (the file is empty)")
    return items


def positive_int(text: str) -> int:
    """argparse type: an integer > 0 (argparse turns the ValueError into a one-line usage error)."""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lfqa answer",
        description="Answer a question about a document (text, Markdown or PDF) or about given passages.",
        epilog=f"""--jsonl rows (one JSON object per line) use the training schema through data.fields:
  {{"question": "...", "context": "one text"}}
  {{"question": "...", "context": ["passage", "passage"]}}
  {{"question": "...", "context": [{{"title": "...", "text": "..."}}]}}
or name a document FILE (.txt, .md, .pdf; relative to the JSONL file's folder):
  {{"question": "...", "{DOCUMENT_FILE_KEY}": "notes.pdf"}}
The keys are those of the model's job.yaml (data.fields); override them for other data, e.g. ELI5's
  lfqa answer --model M --jsonl eli5.jsonl data.fields.context=document
Examples:
  lfqa answer --model runs/tiny-cpu/model --question 'Why is Zalrimum famous?' --document notes.pdf
  lfqa answer --model s3://bucket/run/model --jsonl q.jsonl --out answers.jsonl output.s3_endpoint_url=URL""",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True,
                        help="model folder (save_pretrained layout), its s3:// URI, or a hub id")
    parser.add_argument("--question", help="the question")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--document", help="a .txt, .md or .pdf FILE to answer from")
    source.add_argument("--context", nargs="+", help="one or more passages (TEXT) to answer from")
    parser.add_argument("--jsonl", help="many questions from a JSONL file: rows in the training schema "
                                        f"(data.fields) or with '{DOCUMENT_FILE_KEY}' (see below)")
    parser.add_argument("--out", help="with --jsonl: write answers here as JSONL (default: standard output)")
    parser.add_argument("--job", help="job file for data.fields, decoding and S3 settings "
                                      "(default: the model's job.yaml)")
    parser.add_argument("--max-input-tokens", type=positive_int, help="cut inputs to this many tokens "
                                                                         "(default: the model's maximum)")
    parser.add_argument("--num-beams", type=positive_int, help="override the model's decoding setting")
    parser.add_argument("--max-new-tokens", type=positive_int, help="override the model's decoding setting")
    parser.add_argument("--batch-size", type=positive_int, default=4)
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="job overrides anywhere on the line: data.fields.question=query, "
                             "output.s3_endpoint_url=http://..., eval.generation.num_beams=2")
    return parser


def _items(args, job: JobConfig | None) -> list[tuple[str, list[str]]]:
    if args.jsonl:
        return read_jsonl_questions(args.jsonl, job.data.fields)
    if not args.question.strip():
        raise InputError("--question: the question is empty")
    return [(args.question, [read_document(args.document)] if args.document else args.context)]


def _print_answers(args, answers: list[Answer]) -> None:
    for a in answers:
        if a.truncated:
            print(f"note: the input for '{a.question[:60]}' has {a.input_tokens} tokens and was cut to the model's "
                  f"maximum of {a.max_input_tokens}: the answer only uses the first part", file=sys.stderr)
    if not args.jsonl:
        # A blank line would look like a hang or a crash.
        print(answers[0].answer or "(empty answer: the model generated no text before its end-of-sequence token)")
        return
    empty = sum(not a.answer for a in answers)
    if empty:
        print(f"note: {empty} of {len(answers)} generated answers are empty", file=sys.stderr)
    lines = "".join(json.dumps(asdict(a)) + "\n" for a in answers)
    if args.out:
        Path(args.out).write_text(lines, encoding="utf-8")
        print(f"{len(answers)} answer{'s' if len(answers) != 1 else ''} written to {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(lines)


def _run(argv: list[str]) -> int:
    from lfqa.cli import split_overrides

    parser = build_parser()
    rest, overrides = split_overrides(argv)
    args = parser.parse_args(rest)
    if args.jsonl and (args.question or args.document or args.context):
        parser.error("--jsonl takes its questions from the file: drop --question, --document and --context")
    if not args.jsonl and not (args.question is not None and (args.document or args.context)):
        parser.error("give --question with --document or --context, or --jsonl")
    if args.out:
        output_file(args.out)
    # Inputs are read before the model loads: a bad file fails in a second, not after the model's start-up.
    items = None if args.jsonl else _items(args, None)
    resolved = resolve_model_and_job(args.model, args.job, overrides)
    items = items or _items(args, resolved.job)
    generation = resolved.job.eval.generation
    changes = {k: v for k, v in (("num_beams", args.num_beams), ("max_new_tokens", args.max_new_tokens))
               if v is not None}
    if changes:
        generation = GenerationConfig(**{**asdict(generation), **changes})
    answerer = Answerer(resolved.model, generation=generation, max_input_tokens=args.max_input_tokens,
                        global_attention=resolved.job.data.global_attention)
    answers = answerer.answer_many(items, batch_size=args.batch_size, progress=len(items) > 1)
    _print_answers(args, answers)
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command; every failure is one line on stderr and a non-zero exit (see lfqa.errors)."""
    from lfqa.errors import run_command

    return run_command(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
