"""``lfqa plot RUN``: training and evaluation curves of a run folder, as a PNG (no W&B needed).

    lfqa plot runs/tiny-cpu                  # writes runs/tiny-cpu/curves.png
    lfqa plot runs/tiny-cpu --out curves.png

Reads the run's ``metrics.jsonl`` (written by the main process at every log step and evaluation) and draws
four panels: train loss, learning rate, eval loss, and ROUGE; throughput is given in the title.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


class PlotError(ValueError):
    """No usable metrics; the message names the file."""


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"{path}: no such file (is {run_dir} a run folder?)")
    records = []
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise PlotError(f"{path}: not a metrics file (not UTF-8 text)") from None
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise PlotError(f"{path}:{n}: line is not valid JSON") from None
    if not records:
        raise PlotError(f"{path}: no records")
    return records


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if key in r]
    return [p[0] for p in points], [p[1] for p in points]


def _interval(ax, records: list[dict], key: str) -> None:
    """Shade ``key``'s bootstrap interval where the records carry one (``<key>_ci_low`` / ``_ci_high``)."""
    points = [(r["step"], r[f"{key}_ci_low"], r[f"{key}_ci_high"]) for r in records
              if f"{key}_ci_low" in r and f"{key}_ci_high" in r]
    if points:
        steps, low, high = zip(*points)
        ax.fill_between(steps, low, high, alpha=0.2)


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw the curves of ``run_dir`` into ``out`` (default ``RUN/curves.png``); returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    out = Path(out) if out else Path(run_dir) / "curves.png"
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    # Training and validation loss share a panel: the gap between them is what shows memorisation.
    panels = [
        (axes[0, 0], "loss", ["train/loss", "eval/loss"]),
        (axes[0, 1], "learning rate", ["train/lr"]),
        (axes[1, 0], "eval fact recall (95% CI)", ["eval/fact_recall"]),
        (axes[1, 1], "eval ROUGE (F1)", ["eval/rouge1", "eval/rouge2", "eval/rougeL", "eval/rougeLsum"]),
    ]
    for ax, title, keys in panels:
        drawn = False
        for key in keys:
            steps, values = series(records, key)
            if steps:
                ax.plot(steps, values, marker="o" if len(steps) < 20 else None, label=key)
                _interval(ax, records, key)
                drawn = True
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if key.endswith("fact_recall"):
            ax.set_ylim(0, 1)
        if len(keys) > 1 and drawn:
            ax.legend()
        if not drawn:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")
    _, speed = series(records, "train/samples_per_s")
    subtitle = f" - {sum(speed) / len(speed):.1f} samples/s on average" if speed else ""
    fig.suptitle(f"{run_dir}{subtitle}")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lfqa plot", description="Draw a run's training and evaluation curves.")
    parser.add_argument("run", help="run folder (output.dir of a job), holding metrics.jsonl")
    parser.add_argument("--out", help="PNG to write (default: RUN/curves.png)")
    args = parser.parse_args(argv)
    try:
        path = plot_run(args.run, args.out)
    except PlotError as err:
        print(f"lfqa: error: {err}", file=sys.stderr)
        return 1
    print(f"curves written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
