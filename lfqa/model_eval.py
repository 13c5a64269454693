"""``lfqa eval``: score a model's generated answers with ROUGE, with bootstrap confidence intervals.

    lfqa eval --model runs/tiny-cpu/model                       # the job's validation split
    lfqa eval --model runs/tiny-cpu/model --data more.jsonl --limit 100 --out runs/eval
    lfqa eval --model runs/tiny-cpu/model --compare .cache/lfqa/models/tiny-led-...   # side by side
    accelerate launch --config_file accelerate_configs/cpu.yaml -m lfqa.model_eval --model ...  # split

The data comes from ``--data`` (files read with the job's field mapping) or else from the job's validation
split; the job is ``--job`` or the ``job.yaml`` saved beside the model. Decoding follows the job's
``eval.generation`` (beam search, length limits, no-repeat n-grams). ``--out`` receives
``predictions.jsonl``, ``report.json`` and ``report.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from lfqa.answer import positive_int
from lfqa.config import ConfigError, JobConfig, load_job
from lfqa.metrics import ROUGE_TYPES, bootstrap_ci, rouge_per_example

DEFAULT_JOB = "jobs/tiny-cpu.yaml"


def resolve_job(model: str, job_path: str | None, overrides: list[str]) -> tuple[JobConfig, str]:
    """The job whose data, fields and decoding settings apply: --job, else the model's job.yaml."""
    if job_path is None:
        saved = Path(model) / "job.yaml"
        job_path = str(saved) if saved.is_file() else DEFAULT_JOB
    return load_job(job_path, overrides), job_path


def score(predictions: list[str], references: list[str], *, bootstrap: int = 1000, seed: int = 0) -> dict:
    """Mean ROUGE-1/2/L/Lsum with percentile-bootstrap 95% intervals, plus each example's scores."""
    per_example = rouge_per_example(predictions, references)
    out = {}
    for k in ROUGE_TYPES:
        low, high = bootstrap_ci(per_example[k], samples=bootstrap, seed=seed)
        out[k] = {"mean": float(per_example[k].mean()), "ci_low": low, "ci_high": high}
    return {"rouge": out, "per_example": {k: v.tolist() for k, v in per_example.items()}}


def _state():
    from accelerate import PartialState

    cpu = not torch.cuda.is_available()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # The same CPU pitfall as in training: without cpu=True and gloo, ranks run alone (see lfqa.train).
    return PartialState(cpu=cpu, **({"backend": "gloo"} if cpu and world > 1 else {}))


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


def render_markdown(report: dict) -> str:
    lines = [f"# lfqa eval: {report['data']['source']}", "",
             f"{report['data']['examples']} examples ({report['data']['malformed']} malformed rows skipped); "
             f"decoding: {', '.join(f'{k}={v}' for k, v in report['generation'].items())}.", "",
             "| model | " + " | ".join(f"{k} (95% CI)" for k in ROUGE_TYPES) + " |",
             "| --- | " + " | ".join("---" for _ in ROUGE_TYPES) + " |"]
    for label, result in report["models"].items():
        cells = [f"{r['mean']:.4f} ({r['ci_low']:.4f}-{r['ci_high']:.4f})" for r in
                 (result["rouge"][k] for k in ROUGE_TYPES)]
        lines.append(f"| `{label}` | " + " | ".join(cells) + " |")
    lines += ["", "## Sample answers", ""]
    for sample in report["samples"]:
        lines += [f"**Question:** {sample['question']}", "", f"- *reference:* {sample['reference']}"]
        lines += [f"- *`{label}`:* {text}" for label, text in sample["generated"].items()]
        lines.append("")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lfqa eval",
        description="Generate answers with a model and score them with ROUGE (bootstrap 95%% intervals).",
        epilog="Example: lfqa eval --model runs/tiny-cpu/model --compare <base model> --limit 50",
    )
    parser.add_argument("--model", required=True, help="model folder (save_pretrained layout) or hub id")
    parser.add_argument("--compare", help="a second model to score on the same examples, side by side")
    parser.add_argument("--data", nargs="+", help="JSON/JSONL/Parquet files (default: the job's validation split)")
    parser.add_argument("--job", help="job file for fields, limits and decoding (default: the model's job.yaml)")
    parser.add_argument("--limit", type=positive_int, help="score only the first N usable rows")
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--bootstrap", type=positive_int, default=1000, help="bootstrap resamples for the intervals")
    parser.add_argument("--samples", type=int, default=5, help="sample answers in the report")
    parser.add_argument("--out", default="runs/eval", help="folder for predictions.jsonl, report.json, report.md")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="job overrides, e.g. eval.generation.num_beams=1")
    return parser


def main(argv: list[str] | None = None) -> int:
    from lfqa.answer import InputError
    from lfqa.data import DataError, read_files, read_split
    from lfqa.modeling import ModelLoadError

    args = build_parser().parse_args(argv)
    try:
        job, job_path = resolve_job(args.model, args.job, args.overrides)
    except ConfigError as err:
        print(f"lfqa: error: {err}", file=sys.stderr)
        return 2
    state = _state()
    try:
        if args.data:
            examples, data_report, _ = read_files(args.data, job.data.fields)
        else:
            examples, data_report, _ = read_split(job.data, "validation")
        examples = examples[: args.limit] if args.limit else examples
        items = [(e.question, e.contexts) for e in examples]
        references = [e.answer for e in examples]
        models = {args.model: None}
        if args.compare:
            models[args.compare] = None
        for label in models:
            predictions, truncated = generate_answers(label, items, job, batch_size=args.batch_size, state=state)
            models[label] = {"predictions": predictions, "truncated_inputs": truncated,
                             **score(predictions, references, bootstrap=args.bootstrap)}
    except (DataError, ModelLoadError, InputError) as err:
        print(f"lfqa: error: {err}", file=sys.stderr)
        return 1
    if not state.is_main_process:
        return 0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "predictions.jsonl").open("w", encoding="utf-8") as f:
        for i, e in enumerate(examples):
            f.write(json.dumps({"question": e.question, "reference": e.answer,
                                "generated": {label: r["predictions"][i] for label, r in models.items()},
                                "rougeL": {label: r["per_example"]["rougeL"][i] for label, r in models.items()}})
                    + "\n")
    report = {
        "job": job_path,
        "data": {"source": data_report.source, "rows_read": data_report.rows_read, "examples": len(examples),
                 "malformed": data_report.malformed_total, "problems": data_report.problems},
        "generation": asdict(job.eval.generation),
        "models": {label: {"rouge": r["rouge"], "truncated_inputs": r["truncated_inputs"]}
                   for label, r in models.items()},
        "samples": [{"question": examples[i].question, "reference": examples[i].answer,
                     "generated": {label: r["predictions"][i] for label, r in models.items()}}
                    for i in range(min(args.samples, len(examples)))],
    }
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(render_markdown(report))
    for label, r in models.items():
        print(f"{label}: " + " | ".join(f"{k} {r['rouge'][k]['mean']:.4f} "
                                        f"[{r['rouge'][k]['ci_low']:.4f}, {r['rouge'][k]['ci_high']:.4f}]"
                                        for k in ROUGE_TYPES))
    print(f"{len(examples)} examples; predictions and report written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
