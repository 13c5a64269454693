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

from lfqa.config import ConfigError, GenerationConfig, load_job


class InputError(ValueError):
    """Unusable input to answer (empty question, unreadable document); one line naming the file."""


@dataclass
class Answer:
    question: str
    answer: str
    input_tokens: int
    """Tokens of the full input before any cut."""
    truncated: bool
    max_input_tokens: int


def read_document(path: str | Path) -> str:
    """Text of a .pdf (with pypdf), or of any text file (.txt, .md, ...)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    if path.suffix.lower() == ".pdf":
        from pypdf import PdfReader
        from pypdf.errors import PdfReadError

        try:
            reader = PdfReader(path)
            text = "\n".join((page.extract_text() or "") for page in reader.pages)
        except (PdfReadError, OSError, ValueError) as err:
            raise InputError(f"{path}: not a readable PDF ({err.__class__.__name__})") from None
        if not text.strip():
            raise InputError(f"{path}: the PDF has no extractable text (a scanned PDF needs OCR first)")
        return text
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a UTF-8 text file (use .txt, .md or .pdf)") from None
    except OSError as err:
        raise InputError(f"{path}: cannot read ({err.strerror})") from None
    if not text.strip():
        raise InputError(f"{path}: the document is empty")
    return text


def saved_job(model_path: str):
    """The job a model was trained with (its ``job.yaml``), or None for models trained elsewhere."""
    job_file = Path(model_path) / "job.yaml"
    if not job_file.is_file():
        return None
    try:
        return load_job(job_file)
    except ConfigError as err:
        print(f"lfqa: warning: ignoring {job_file} ({err}); using default decoding", file=sys.stderr)
        return None


class Answerer:
    """A loaded model and tokenizer that answer questions about passages or documents."""

    def __init__(self, model: str, *, generation: GenerationConfig | None = None, max_input_tokens: int | None = None,
                 global_attention: str | None = None, device: str | None = None):
        from lfqa.data import Seq2SeqCollator
        from lfqa.modeling import attention_window, load_model, load_tokenizer

        self.model_path = str(model)
        self.tokenizer = load_tokenizer(self.model_path)
        self.model = load_model(self.model_path).eval()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device)
        limit = self.model.config.max_encoder_position_embeddings
        self.max_input_tokens = min(max_input_tokens or limit, limit)
        # Decoding and input layout as in training, when the model folder says how it was trained.
        job = saved_job(self.model_path) if generation is None or global_attention is None else None
        self.generation = generation or (job.eval.generation if job else GenerationConfig())
        self.global_attention = global_attention or (job.data.global_attention if job else "question")
        self.collator = Seq2SeqCollator(self.tokenizer.pad_token_id, attention_window(self.model))

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


def _read_jsonl_questions(path: Path) -> list[tuple[str, list[str]]]:
    """Rows ``{"question": ..., "document": FILE}`` or ``{"question": ..., "context": str | [str]}``."""
    items = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise InputError(f"{path}: cannot read ({err.strerror})") from None
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise InputError(f"{path}:{n}: line is not valid JSON") from None
        if not isinstance(row, dict) or not isinstance(row.get("question"), str) or not row["question"].strip():
            raise InputError(f"{path}:{n}: needs a non-empty 'question' string")
        if isinstance(row.get("document"), str):
            doc = Path(row["document"])
            passages = [read_document(doc if doc.is_absolute() else path.parent / doc)]
        elif isinstance(row.get("context"), str):
            passages = [row["context"]]
        elif isinstance(row.get("context"), list) and all(isinstance(c, str) for c in row["context"]):
            passages = row["context"]
        else:
            raise InputError(f"{path}:{n}: needs 'document' (a file) or 'context' (a string or list of strings)")
        items.append((row["question"], passages))
    if not items:
        raise InputError(f"{path}: no questions")
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
        epilog="Example: lfqa answer --model runs/tiny-cpu/model --question 'Why is Zalrimum famous?' "
               "--document notes.pdf",
    )
    parser.add_argument("--model", required=True, help="model folder (save_pretrained layout) or hub id")
    parser.add_argument("--question", help="the question")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--document", help="a .txt, .md or .pdf file to answer from")
    source.add_argument("--context", nargs="+", help="one or more passages to answer from")
    parser.add_argument("--jsonl", help="many questions: one JSON object per line with 'question' and "
                                        "'document' or 'context'")
    parser.add_argument("--out", help="with --jsonl: write answers here as JSONL (default: standard output)")
    parser.add_argument("--max-input-tokens", type=positive_int, help="cut inputs to this many tokens "
                                                                         "(default: the model's maximum)")
    parser.add_argument("--num-beams", type=positive_int, help="override the model's decoding setting")
    parser.add_argument("--max-new-tokens", type=positive_int, help="override the model's decoding setting")
    parser.add_argument("--batch-size", type=positive_int, default=4)
    return parser


def main(argv: list[str] | None = None) -> int:
    from lfqa.modeling import ModelLoadError

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.jsonl and (args.question or args.document or args.context):
        parser.error("--jsonl takes its questions from the file: drop --question, --document and --context")
    if not args.jsonl and not (args.question is not None and (args.document or args.context)):
        parser.error("give --question with --document or --context, or --jsonl")
    try:
        if args.jsonl:
            items = _read_jsonl_questions(Path(args.jsonl))
        else:
            if not args.question.strip():
                raise InputError("the question is empty")
            items = [(args.question, [read_document(args.document)] if args.document else args.context)]
        answerer = Answerer(args.model, max_input_tokens=args.max_input_tokens)
        overrides = {k: v for k, v in (("num_beams", args.num_beams), ("max_new_tokens", args.max_new_tokens))
                     if v is not None}
        if overrides:
            answerer.generation = GenerationConfig(**{**asdict(answerer.generation), **overrides})
        answers = answerer.answer_many(items, batch_size=args.batch_size, progress=len(items) > 1)
    except (InputError, ModelLoadError, ConfigError) as err:
        print(f"lfqa: error: {err}", file=sys.stderr)
        return 1
    for a in answers:
        if a.truncated:
            print(f"note: the input for '{a.question[:60]}' has {a.input_tokens} tokens and was cut to the model's "
                  f"maximum of {a.max_input_tokens}: the answer only uses the first part", file=sys.stderr)
    if args.jsonl:
        lines = "".join(json.dumps(asdict(a)) + "\n" for a in answers)
        if args.out:
            Path(args.out).write_text(lines)
            print(f"{len(answers)} answers written to {args.out}", file=sys.stderr)
        else:
            sys.stdout.write(lines)
    else:
        print(answers[0].answer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
