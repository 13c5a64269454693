"""``lfqa data-report``: how long are the questions' inputs and answers, and what will training drop?

The seed blog post plotted the answer lengths of its data in tokens, found a long tail (up to ~6000
tokens) and dropped answers longer than 512 tokens. This command gives that view of any job's data,
counted with the job's own tokenizer and exactly as the training pipeline counts (special tokens
included), so the numbers here are the numbers training will print::

    lfqa data-report                                          # jobs/tiny-cpu.yaml, both splits
    lfqa data-report --job jobs/led-base-lfqa.yaml --split train --out runs/lfqa-data
    lfqa data-report --data my_rows.jsonl data.fields.context=passages data.fields.answer=answers.0.text
    lfqa data-report data.max_answer_tokens=256               # what would a tighter limit drop?
    python -m lfqa.data_report --help                         # the same, without the entry point

The output folder (``--out``, default ``runs/data-report``) receives ``report.json`` (every number),
``report.md`` (the same as tables, with the plots embedded) and, per split, four PNG histograms:
``<split>_answer_tokens.png``, ``<split>_input_tokens.png``, ``<split>_answer_chars.png`` and
``<split>_input_chars.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lfqa.config import JobConfig

DEFAULT_JOB = "jobs/tiny-cpu.yaml"
DEFAULT_OUT = "runs/data-report"
FILES_SPLIT = "data"
"""The split name used for ``--data FILE ...``."""
TOKENIZE_BATCH = 1000
"""Rows per tokenizer call: large batches are much faster with a fast (Rust) tokenizer."""
HISTOGRAM_BINS = 50

MEASURES = ("answer_tokens", "input_tokens", "answer_chars", "input_chars")
"""The four length measures, in report order; also the PNG name suffixes."""
_TITLES = {
    "answer_tokens": "Answer length (tokens)",
    "input_tokens": "Input length (tokens)",
    "answer_chars": "Answer length (characters)",
    "input_chars": "Input length (characters)",
}


# --- measuring -----------------------------------------------------------------------------------------


@dataclass
class Lengths:
    """Per-row lengths of the usable rows of one split (aligned arrays, one entry per row)."""

    answer_tokens: np.ndarray
    input_tokens: np.ndarray
    answer_chars: np.ndarray
    input_chars: np.ndarray

    def select(self, mask: np.ndarray) -> Lengths:
        return Lengths(*(getattr(self, m)[mask] for m in MEASURES))


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence "sequence length is longer than the specified maximum" while counting.

    Long inputs are exactly what this report measures (and counts as truncated), so the warning that
    running them through the model would fail is noise here: training truncates them first.
    """
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a dependency
        yield
        return
    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)


def measure(examples, tokenizer, *, desc: str = "Tokenising") -> Lengths:
    """Token and character lengths of each example's model input and answer.

    Counts the way ``lfqa.data.tokenize_examples`` does: the input is ``format_input(question, contexts)``
    and the answer is tokenised as a target, both with special tokens, so "longer than
    ``data.max_answer_tokens``" means the same thing here as in training.
    """
    from tqdm.auto import tqdm

    from lfqa.data import format_input

    n = len(examples)
    lengths = Lengths(*(np.zeros(n, dtype=np.int64) for _ in MEASURES))
    with _quiet_transformers(), tqdm(total=n, desc=desc, unit="rows", disable=n <= TOKENIZE_BATCH) as bar:
        for start in range(0, n, TOKENIZE_BATCH):
            batch = examples[start:start + TOKENIZE_BATCH]
            end = start + len(batch)
            inputs = [format_input(e.question, e.contexts) for e in batch]
            answers = [e.answer for e in batch]
            input_ids = tokenizer(inputs, add_special_tokens=True)["input_ids"]
            label_ids = tokenizer(text_target=answers, add_special_tokens=True)["input_ids"]
            lengths.input_tokens[start:end] = [len(ids) for ids in input_ids]
            lengths.answer_tokens[start:end] = [len(ids) for ids in label_ids]
            lengths.input_chars[start:end] = [len(text) for text in inputs]
            lengths.answer_chars[start:end] = [len(text) for text in answers]
            bar.update(len(batch))
    return lengths


def summary_stats(values: np.ndarray) -> dict | None:
    """min, mean, median, p90, p99 and max (None when there are no values, e.g. every row was filtered)."""
    if len(values) == 0:
        return None
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {"min": int(values.min()), "mean": round(float(values.mean()), 2), "median": round(float(p50), 2),
            "p90": round(float(p90), 2), "p99": round(float(p99), 2), "max": int(values.max())}


# --- plotting ------------------------------------------------------------------------------------------


def _bin_edges(values: np.ndarray, max_bins: int = HISTOGRAM_BINS) -> np.ndarray:
    """Equal bins with integer edges: lengths are integers, so a bin never splits a value.

    About ``2 * sqrt(n)`` bins, between 10 and ``max_bins``: 50 bins for 50 rows would be mostly noise.
    """
    bins = min(max_bins, max(10, 2 * math.ceil(math.sqrt(len(values)))))
    lo, hi = int(values.min()), int(values.max())
    width = max(1, math.ceil((hi - lo + 1) / bins))
    return np.arange(lo, hi + width + 1, width)


def _long_tail(values: np.ndarray) -> bool:
    """True when the longest 1% of rows stretches over more than half the x axis.

    A linear count axis then shows the tail as empty space (the blog post's 6000-token answers among
    mostly short ones), so such plots use a logarithmic count axis instead.
    """
    lo, hi = float(values.min()), float(values.max())
    return hi > lo and (hi - float(np.percentile(values, 99))) > 0.5 * (hi - lo)


def plot_histogram(path: Path, split: str, measure_name: str, before: np.ndarray, after: np.ndarray,
                   *, limit: int | None = None, limit_label: str = "") -> None:
    """One histogram: all usable rows, the rows training keeps on top, and a dashed line at ``limit``.

    The limit line is drawn only when it falls inside the data's range: a 16384-token input limit on
    data that never exceeds 2000 tokens would squeeze the whole distribution into the left edge, so
    the legend says it is off the scale instead.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    edges = _bin_edges(before)
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    try:
        ax.hist(before, bins=edges, color="#b8c7dc", label=f"all usable rows (n={len(before)})")
        if len(after):
            ax.hist(after, bins=edges, color="#2f6db3", alpha=0.85, label=f"kept by training (n={len(after)})")
        if limit is not None:
            if edges[0] <= limit <= edges[-1]:
                ax.axvline(limit, color="#c0392b", linestyle="--", linewidth=1.5, label=f"{limit_label} = {limit}")
            else:
                # An invisible entry so the legend still states the limit.
                ax.plot([], [], color="#c0392b", linestyle="--", label=f"{limit_label} = {limit} (off scale)")
        if _long_tail(before):
            ax.set_yscale("log")
            ax.set_ylabel("rows (log scale)")
        else:
            ax.set_ylabel("rows")
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        # The numbers under the axis, where they can never hide a bar.
        stats = summary_stats(before)
        ax.set_xlabel(f"{_TITLES[measure_name].lower()}\nall usable rows: median {stats['median']:g}, "
                      f"p90 {stats['p90']:g}, p99 {stats['p99']:g}, max {stats['max']}")
        ax.set_title(f"{split}: {_TITLES[measure_name].lower()}")
        ax.legend(loc="upper right", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)


# --- the report ----------------------------------------------------------------------------------------


def _split_report(split: str, examples, data_report, lengths: Lengths, job: JobConfig, out_dir: Path) -> dict:
    """Counts, statistics and plots of one split; the returned dict is that split's part of report.json."""
    max_answer, max_input = job.data.max_answer_tokens, job.data.max_input_tokens
    keep = lengths.answer_tokens <= max_answer
    kept = lengths.select(keep)
    plots = {}
    for name in MEASURES:
        limit, label = {"answer_tokens": (max_answer, "max_answer_tokens"),
                        "input_tokens": (max_input, "max_input_tokens")}.get(name, (None, ""))
        filename = f"{split}_{name}.png"
        plot_histogram(out_dir / filename, split, name, getattr(lengths, name), getattr(kept, name),
                       limit=limit, limit_label=label)
        plots[name] = filename
    return {
        "source": data_report.source,
        "rows_read": data_report.rows_read,
        "malformed": {"total": data_report.malformed_total, "by_reason": dict(data_report.malformed.most_common())},
        "problems": list(data_report.problems),
        "usable": len(examples),
        "filtered_long_answer": int((~keep).sum()),
        # Among the kept rows, as training counts them: a filtered row is never truncated.
        "truncated_inputs": int((kept.input_tokens > max_input).sum()),
        "kept": int(keep.sum()),
        "stats": {
            "before_filtering": {name: summary_stats(getattr(lengths, name)) for name in MEASURES},
            "after_filtering": {name: summary_stats(getattr(kept, name)) for name in MEASURES},
        },
        "plots": plots,
    }


def build_report(job: JobConfig, out_dir, *, splits: Sequence[str] = ("train", "validation"), tokenizer=None,
                 files: Sequence[str] | None = None, log: Callable[[str], object] = print) -> dict:
    """Measure the job's data and write ``report.json``, ``report.md`` and the histograms to ``out_dir``.

    ``splits`` are read with ``lfqa.data.read_split`` (local files or a hub data set, as training reads
    them). ``files``, when given, replaces them: those files are reported as one split named ``data``,
    read with the job's field mapping. The tokenizer is the job model's unless one is passed.
    Returns what ``report.json`` holds. Raises ``DataError`` / ``ModelLoadError`` as training would.
    """
    from lfqa.data import read_files, read_split, stage_data_files, stage_s3_file
    from lfqa.errors import output_folder

    endpoint, region = job.output.s3_endpoint_url, job.output.s3_region
    if files:
        local = [str(stage_s3_file(f, job.data.cache_dir, endpoint, region)) if f.startswith("s3://") else f
                 for f in files]
        sources = {FILES_SPLIT: lambda: read_files(local, job.data.fields)}
    else:
        from lfqa.bundled_data import ensure_training_file

        ensure_training_file(job.data.train_files)  # the bundled rows, as training would write them
        data_cfg = stage_data_files(job.data, endpoint, region)
        sources = {split: (lambda s=split: read_split(data_cfg, s)) for split in splits}
    # Read everything before writing anything (and before the tokenizer loads): a bad file fails at once and
    # leaves no half report behind.
    read = {}
    for split, reader in sources.items():
        examples, data_report, _ = reader()
        log(f"{split}: read {data_report.rows_read} rows from {data_report.source} "
            f"({data_report.malformed_total} malformed)")
        read[split] = (examples, data_report)
    if tokenizer is None:
        from lfqa.modeling import load_tokenizer, resolve_model_path

        tokenizer = load_tokenizer(resolve_model_path(job.model, endpoint, region), job.model.revision)
    out_dir = output_folder(out_dir)
    report = {
        "tokenizer": str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__),
        "max_answer_tokens": job.data.max_answer_tokens,
        "max_input_tokens": job.data.max_input_tokens,
        "fields": {k: getattr(job.data.fields, k) for k in ("question", "answer", "context")},
        "splits": {},
    }
    for split, (examples, data_report) in read.items():
        lengths = measure(examples, tokenizer, desc=f"Tokenising {split}")
        report["splits"][split] = _split_report(split, examples, data_report, lengths, job, out_dir)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "report.md").write_text(render_markdown(report))
    return report


# --- Markdown ------------------------------------------------------------------------------------------


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in
                                                                 range(len(header))) + "|"]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return lines


def render_markdown(report: dict) -> str:
    """``report.md``: the numbers of ``report.json`` as tables, with the histograms linked relatively."""
    max_answer, max_input = report["max_answer_tokens"], report["max_input_tokens"]
    out = ["# Data report", "",
           f"Tokenizer: `{report['tokenizer']}`. Rows whose answer is longer than **{max_answer}** tokens "
           f"(`data.max_answer_tokens`) are dropped by training; inputs longer than **{max_input}** tokens "
           "(`data.max_input_tokens`) are truncated. Token counts include special tokens, as in training.", ""]
    for split, s in report["splits"].items():
        out += [f"## {split}", "", f"Source: `{s['source']}`", ""]
        out += _table(["rows read", "malformed", "usable", f"filtered (answer > {max_answer} tokens)", "kept",
                       f"inputs truncated to {max_input} tokens (kept rows)"],
                      [[s["rows_read"], s["malformed"]["total"], s["usable"], s["filtered_long_answer"], s["kept"],
                        s["truncated_inputs"]]])
        out.append("")
        if s["malformed"]["total"]:
            out += ["### Malformed rows", ""]
            out += _table(["reason", "rows"], [[r, n] for r, n in s["malformed"]["by_reason"].items()])
            out += ["", "First problems (`file:row: reason`):", ""]
            out += [f"- `{p}`" for p in s["problems"]]
            hidden = s["malformed"]["total"] - len(s["problems"])
            if hidden > 0:
                out.append(f"- ... and {hidden} more")
            out.append("")
        out += ["### Lengths", "", "Before filtering: all usable rows; after: the rows training keeps.", ""]
        rows = []
        for name in MEASURES:
            for when in ("before_filtering", "after_filtering"):
                stats = s["stats"][when][name] or {}
                rows.append([f"{name.replace('_', ' ')} ({when.split('_')[0]})"]
                            + [stats.get(k) for k in ("min", "mean", "median", "p90", "p99", "max")])
        out += _table(["", "min", "mean", "median", "p90", "p99", "max"], rows)
        out.append("")
        for name, filename in s["plots"].items():
            out += [f"![{split}: {_TITLES[name].lower()}]({filename})", ""]
    return "\n".join(out)


# --- command line --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lfqa data-report",
        description="Measure a job's data with its tokenizer: answer and input lengths, what training filters "
                    "and truncates, malformed rows. Writes report.json, report.md and PNG histograms.",
        epilog="Examples:\n"
               "  lfqa data-report --job jobs/led-base-lfqa.yaml --split train\n"
               "  lfqa data-report --data rows.jsonl data.fields.context=passages data.fields.answer=answers.0.text\n"
               "  lfqa data-report data.max_answer_tokens=128",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--job", default=DEFAULT_JOB, help=f"job YAML file (default: {DEFAULT_JOB})")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--data", nargs="+", metavar="FILE",
                       help=f"report these JSON/JSONL/Parquet files (globs allowed) as one split named "
                            f"'{FILES_SPLIT}', using the job's data.fields and tokenizer")
    which.add_argument("--split", choices=["train", "validation", "both"], default="both",
                       help="which of the job's splits to report (default: both)")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides of the job file, e.g. data.max_answer_tokens=256")
    return parser


def _summary_line(split: str, s: dict, max_answer: int) -> str:
    after = s["stats"]["after_filtering"]["answer_tokens"]
    before = s["stats"]["before_filtering"]["answer_tokens"]
    truncated = s["truncated_inputs"]
    line = (f"  {split}: {s['rows_read']} rows read, {s['malformed']['total']} malformed, "
            f"{s['filtered_long_answer']} filtered (answer > {max_answer} tokens), {s['kept']} kept, "
            f"{truncated} input{'' if truncated == 1 else 's'} truncated; "
            f"answer tokens median {before['median']:g}, p99 {before['p99']:g}, max {before['max']}")
    return line + ("" if after else "; no rows left after filtering")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with job overrides taken from anywhere on it (also after ``--data FILE ...``)."""
    from lfqa.cli import split_overrides

    rest, overrides = split_overrides(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(rest)
    args.overrides = overrides + args.overrides
    return args


def _run(argv: list[str]) -> int:
    from lfqa.cli import read_job

    args = parse_args(argv)
    job = read_job(args.job, args.overrides)
    splits = ("train", "validation") if args.split == "both" else (args.split,)
    report = build_report(job, args.out, splits=splits, files=args.data)
    print(f"Data report written to {Path(args.out) / 'report.md'} (numbers in report.json, plots beside them)")
    for split, s in report["splits"].items():
        print(_summary_line(split, s, report["max_answer_tokens"]))
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command; every failure is one line on stderr and a non-zero exit (see lfqa.errors)."""
    from lfqa.errors import run_command

    return run_command(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
