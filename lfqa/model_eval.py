"""``lfqa eval``: score a model's generated answers with ``eval.metrics`` (ROUGE with bootstrap intervals), optionally
side by side with another model.

    lfqa eval --model runs/tiny-cpu/model                       # the rows of training's evaluation
    lfqa eval --model runs/tiny-cpu/model --all-rows            # every usable row of the validation split
    lfqa eval --model runs/tiny-cpu/model --data more.jsonl data.fields.context=document --out runs/eval
    lfqa eval --model runs/tiny-cpu/model --compare .cache/lfqa/models/tiny-led-...   # side by side
    accelerate launch --config_file accelerate_configs/cpu.yaml -m lfqa.model_eval --model ...  # split

The data comes from ``--data`` (files or ``s3://`` objects, read with the job's field mapping) or else from the
job's validation split; the job is ``--job`` or the ``job.yaml`` saved beside the model, with ``key=value``
overrides anywhere on the line. By default the rows are those training's evaluation scores: answers longer
than ``data.max_answer_tokens`` dropped, then ``data.max_eval_samples`` and ``eval.max_generate_samples``
(for ``--data``: the answer filter only), so the numbers compare with the run's ``eval/rougeL``;
``--all-rows`` scores every usable row. Decoding follows the job's ``eval.generation``. ``--out`` receives
``predictions.jsonl``, ``report.json`` and ``report.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lfqa.answer import positive_int, resolve_model_and_job
from lfqa.config import JobConfig
from lfqa.errors import output_folder
from lfqa.evaluator import fact_recall_text
from lfqa.metrics import ROUGE_TYPES, compute_metrics


def score(predictions: list[str], references: list[str], *, bootstrap: int = 1000, seed: int = 0,
          metrics: list[str] = ("rouge",), facts: list[list[str]] | None = None) -> dict:
    """Mean ROUGE-1/2/L/Lsum with percentile-bootstrap 95% intervals, each example's scores, the numbers
    of every other metric named in ``metrics``, and fact recall (with its interval) when rows have facts."""
    scores = compute_metrics(list(metrics), predictions, references, bootstrap=bootstrap, seed=seed,
                             per_example=True, facts=facts)
    rouge = {k: {"mean": scores.rouge[k], "ci_low": scores.intervals[k][0], "ci_high": scores.intervals[k][1]}
             for k in scores.rouge}
    return {"rouge": rouge, "per_example": scores.per_example, "other": scores.other, "facts": scores.facts}


def _state():
    from accelerate import PartialState

    cpu = not torch.cuda.is_available()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # The same CPU pitfall as in training: without cpu=True and gloo, ranks run alone (see lfqa.train).
    return PartialState(cpu=cpu, **({"backend": "gloo"} if cpu and world > 1 else {}))


@dataclass
class Selection:
    """Which rows are scored, and why the others are not."""

    examples: list
    data_report: object
    usable: int
    filtered_long_answer: int = 0
    limits: list[str] = field(default_factory=list)
    """The limits that cut the rows, e.g. ``data.max_eval_samples=49``."""
    all_rows: bool = False

    def describe(self) -> str:
        if self.all_rows:
            text = f"{len(self.examples)} of {self.usable} usable rows (--all-rows: no filter)"
        else:
            text = f"{len(self.examples)} of {self.usable} usable rows, selected as training's evaluation selects them"
        details = ([f"{self.filtered_long_answer} with answers longer than data.max_answer_tokens dropped"]
                   if self.filtered_long_answer else []) + [f"limited by {x}" for x in self.limits]
        hint = "" if self.all_rows else "; --all-rows scores all"
        return text + (f" ({'; '.join(details)}{hint})" if details else "")


def _read_rows(job: JobConfig, files: list[str] | None):
    from lfqa.data import read_files, read_split, stage_data_files, stage_s3_file

    endpoint, region = job.output.s3_endpoint_url, job.output.s3_region
    if files:
        local = [str(stage_s3_file(f, job.data.cache_dir, endpoint, region)) if f.startswith("s3://") else f
                 for f in files]
        return read_files(local, job.data.fields)
    return read_split(stage_data_files(job.data, endpoint, region), "validation")


@contextlib.contextmanager
def _no_datasets_bar():
    """Tokenising a few hundred rows takes a blink; its bar would only stand before the scores or an error."""
    from datasets.utils import logging as ds_logging

    enabled = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            ds_logging.enable_progress_bar()


def select_rows(job: JobConfig, model: str, args, state) -> Selection:
    """The rows to score: training's evaluation rows unless ``--all-rows``, then ``--limit``."""
    from lfqa.data import tokenize_examples
    from lfqa.modeling import load_tokenizer, model_limits

    with state.local_main_process_first(), _no_datasets_bar():  # the tokenised cache is written once per machine
        examples, data_report, fingerprint = _read_rows(job, args.data)
        selection = Selection(examples, data_report, usable=len(examples), all_rows=args.all_rows)
        if not args.all_rows:
            max_input, max_answer = model_limits(model, job.data.max_input_tokens, job.data.max_answer_tokens)
            limit = None if args.data else job.data.max_eval_samples
            counts = dataclasses.replace(data_report)  # tokenize_examples counts into it
            kept = tokenize_examples(examples, load_tokenizer(model), job.data, counts, fingerprint,
                                     max_input_tokens=max_input, max_answer_tokens=max_answer, limit=limit,
                                     log=lambda _: None)
            rows = list(kept["row_id"])
            selection.filtered_long_answer = counts.dropped_long_answer
            if counts.limited_to is not None:
                selection.limits.append(f"data.max_eval_samples={counts.limited_to}")
            generate = None if args.data else job.eval.max_generate_samples
            if generate is not None and len(rows) > generate:
                rows = rows[:generate]
                selection.limits.append(f"eval.max_generate_samples={generate}")
            selection.examples = [examples[i] for i in rows]
    if args.limit and len(selection.examples) > args.limit:
        selection.examples = selection.examples[: args.limit]
        selection.limits.append(f"--limit {args.limit}")
    return selection
def generate_answers(model: str, items: list[tuple[str, list[str]]], job: JobConfig, *, batch_size: int,
                     state, progress: bool = True) -> tuple[list[str], int]:
    """Answers for every item, the work split between processes; returns (answers, truncated inputs)."""
    from accelerate.utils import gather_object

    from lfqa.answer import Answerer

    answerer = Answerer(model, generation=job.eval.generation, max_input_tokens=job.data.max_input_tokens,
                        global_attention=job.data.global_attention, device=str(state.device))
    indices = list(range(len(items)))
    with state.split_between_processes(indices) as mine:
        answers = answerer.answer_many([items[i] for i in mine], batch_size=batch_size,
                                       progress=progress and state.is_main_process)
        local = [(i, a.answer, a.truncated) for i, a in zip(mine, answers)]
    gathered = gather_object(local) if state.num_processes > 1 else local
    # Each index once (split_between_processes does not pad), in input order.
    by_index = {i: (text, cut) for i, text, cut in gathered}
    return [by_index[i][0] for i in indices], sum(cut for _, cut in by_index.values())


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def truncation_line(truncated: int, max_input_tokens: int) -> str:
    return f"{_count(truncated, 'input')} truncated to {max_input_tokens} tokens (the answer saw only their start)"


def render_markdown(report: dict) -> str:
    data = report["data"]
    lines = [f"# lfqa eval: {data['source']}", "",
             f"{data['examples']} examples: {data['selection']} ({data['malformed']} malformed rows skipped); "
             f"decoding: {', '.join(f'{k}={v}' for k, v in report['generation'].items())}.", ""]
    rouge_types = [k for k in ROUGE_TYPES if all(k in r["rouge"] for r in report["models"].values())]
    others = sorted({k for r in report["models"].values() for k in r.get("other", {})})
    with_facts = all(r.get("facts") for r in report["models"].values())
    header = (["fact_recall (95% CI)"] if with_facts else []) + [f"{k} (95% CI)" for k in rouge_types] + others
    header.append("truncated inputs")
    lines += ["| model | " + " | ".join(header) + " |", "| --- | " + " | ".join("---" for _ in header) + " |"]
    for label, result in report["models"].items():
        facts = result.get("facts") or {}
        cells = ([f"{facts['fact_recall']:.4f} ({facts['fact_recall_ci_low']:.4f}-{facts['fact_recall_ci_high']:.4f})"]
                 if with_facts else [])
        cells += [f"{r['mean']:.4f} ({r['ci_low']:.4f}-{r['ci_high']:.4f})" for r in
                  (result["rouge"][k] for k in rouge_types)]
        cells += [f"{result['other'][k]:.4f}" if k in result.get("other", {}) else "-" for k in others]
        cells.append(str(result["truncated_inputs"]))
        lines.append(f"| `{label}` | " + " | ".join(cells) + " |")
    truncated = max(r["truncated_inputs"] for r in report["models"].values())
    if truncated:
        lines += ["", truncation_line(truncated, report["max_input_tokens"]) + "."]
    if with_facts:
        rows = next(iter(report["models"].values()))["facts"]["fact_rows"]
        lines += ["", f"fact_recall: the mean share of a row's facts found in its answer (whole words, any case), "
                      f"over the {rows} rows that have facts."]
    lines += ["", "## Sample answers", ""]
    for sample in report["samples"]:
        lines += [f"**Question:** {sample['question']}", "", f"- *reference:* {sample['reference']}"]
        lines += [f"- *`{label}`:* {text or '*(empty answer)*'}" for label, text in sample["generated"].items()]
        lines.append("")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lfqa eval",
        description="Generate answers with a model and score them with eval.metrics (ROUGE with bootstrap "
                    "95% intervals). By default the rows are those of training's evaluation.",
        epilog="Examples:\n  lfqa eval --model runs/tiny-cpu/model --compare <base model> --limit 50\n"
               "  lfqa eval --model M --data rows.jsonl data.fields.question=input data.fields.answer=output.0.answer",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True,
                        help="model folder (save_pretrained layout), its s3:// URI, or a hub id")
    parser.add_argument("--compare", help="a second model to score on the same examples, side by side")
    parser.add_argument("--data", nargs="+", metavar="FILE",
                        help="JSON/JSONL/Parquet files or s3:// objects (default: the job's validation split)")
    parser.add_argument("--job", help="job file for fields, limits, decoding and S3 settings "
                                      "(default: the model's job.yaml)")
    parser.add_argument("--all-rows", action="store_true",
                        help="score every usable row, not only those training's evaluation scores "
                             "(no answer-length filter, no data.max_eval_samples / eval.max_generate_samples)")
    parser.add_argument("--limit", type=positive_int, help="score only the first N selected rows")
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--bootstrap", type=positive_int, default=1000, help="bootstrap resamples for the intervals")
    parser.add_argument("--samples", type=int, default=5, help="sample answers in the report")
    parser.add_argument("--out", default="runs/eval", help="folder for predictions.jsonl, report.json, report.md")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="job overrides, anywhere on the line, e.g. eval.generation.num_beams=1")
    return parser


def _score_models(labels: dict[str, str], selection: Selection, job: JobConfig, args, state) -> dict:
    items = [(e.question, e.contexts) for e in selection.examples]
    references = [e.answer for e in selection.examples]
    facts = [e.facts for e in selection.examples]
    models = {}
    for label, path in labels.items():
        predictions, truncated = generate_answers(path, items, job, batch_size=args.batch_size, state=state)
        models[label] = {"predictions": predictions, "truncated_inputs": truncated,
                         **score(predictions, references, bootstrap=args.bootstrap, metrics=job.eval.metrics,
                                 facts=facts)}
    return models


def _write_outputs(out: Path, report: dict, selection: Selection, models: dict) -> None:
    with (out / "predictions.jsonl").open("w", encoding="utf-8") as f:
        for i, e in enumerate(selection.examples):
            row = {"question": e.question, "reference": e.answer,
                   "generated": {label: r["predictions"][i] for label, r in models.items()}}
            for key in ("rougeL", "fact_recall"):
                if all(key in r["per_example"] for r in models.values()):
                    row[key] = {label: r["per_example"][key][i] for label, r in models.items()}
            if e.facts:
                row["facts"] = e.facts
            f.write(json.dumps(row) + "\n")
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(render_markdown(report))


def _run(argv: list[str]) -> int:
    from lfqa.cli import split_overrides
    from lfqa.metrics import check_metrics
    from lfqa.modeling import model_limits, resolve_model_path

    rest, overrides = split_overrides(argv)
    args = build_parser().parse_args(rest)
    resolved = resolve_model_and_job(args.model, args.job, overrides)
    job = resolved.job
    check_metrics(job.eval.metrics)
    out = output_folder(args.out)
    labels = {args.model: resolved.model}
    if args.compare:
        labels[args.compare] = resolve_model_path(dataclasses.replace(job.model, name_or_path=args.compare),
                                                  job.output.s3_endpoint_url, job.output.s3_region)
    state = _state()
    selection = select_rows(job, resolved.model, args, state)
    models = _score_models(labels, selection, job, args, state)
    if not state.is_main_process:
        return 0
    max_input = model_limits(resolved.model, job.data.max_input_tokens, job.data.max_answer_tokens)[0]
    examples, data_report = selection.examples, selection.data_report
    report = {
        "job": resolved.job_source,
        "data": {"source": data_report.source, "rows_read": data_report.rows_read, "examples": len(examples),
                 "usable": selection.usable, "filtered_long_answer": selection.filtered_long_answer,
                 "limits": selection.limits, "selection": selection.describe(),
                 "malformed": data_report.malformed_total, "problems": data_report.problems},
        "generation": asdict(job.eval.generation),
        "metrics": list(job.eval.metrics),
        "max_input_tokens": max_input,
        "models": {label: {"rouge": r["rouge"], "facts": r["facts"], "other": r["other"],
                           "truncated_inputs": r["truncated_inputs"]} for label, r in models.items()},
        "samples": [{"question": examples[i].question, "reference": examples[i].answer,
                     "generated": {label: r["predictions"][i] for label, r in models.items()}}
                    for i in range(min(args.samples, len(examples)))],
    }
    _write_outputs(out, report, selection, models)
    print(f"rows: {selection.describe()}")
    for label, r in models.items():
        numbers = [fact_recall_text(r["facts"])] if r["facts"] else []
        numbers += [f"{k} {v['mean']:.4f} [{v['ci_low']:.4f}, {v['ci_high']:.4f}]" for k, v in r["rouge"].items()]
        numbers += [f"{k} {v:.4f}" for k, v in r["other"].items()]
        print(f"{label}: " + " | ".join(numbers))
        if r["truncated_inputs"]:
            print(f"  {truncation_line(r['truncated_inputs'], max_input)}")
    print(f"{len(examples)} examples; predictions and report written to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command; every failure is one line on stderr and a non-zero exit (see lfqa.errors)."""
    from lfqa.errors import run_command

    return run_command(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
