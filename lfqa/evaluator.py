"""Evaluation during training: when it is due, and where its results go (console, trackers, eval-step*.json).

What an evaluation computes (validation loss, generated answers, their metrics) is :func:`lfqa.evaluation.evaluate`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lfqa.config import EvalConfig

FULL = "full"
LOSS_ONLY = "loss"


@dataclass
class EvalData:
    """The tokenised validation rows with the texts that scoring and printing need."""

    dataset: object
    questions: list[str]
    references: list[str]
    facts: list[list[str]] | None = None
    """Each row's facts (an empty list for a row without); None: no row has any."""


class Evaluator:
    """Runs :func:`lfqa.evaluation.evaluate` at its cadence; every rank calls :meth:`run` at the same steps."""

    def __init__(self, cfg: EvalConfig, accelerator, data: EvalData, collator, run_dir: Path, log=print):
        self.cfg = cfg
        self.accelerator = accelerator
        self.data = data
        self.collator = collator
        self.run_dir = Path(run_dir)
        self.log = log

    def due_at_start(self, resumed: bool) -> bool:
        """The untrained model's figures, once per run (a resumed run already has them)."""
        return self.cfg.at_start and not resumed

    def due(self, step: int, total_steps: int) -> str | None:
        """``full`` (loss and generation), ``loss`` (the loss alone) or None; the last step is evaluated by the
        end of the run, not here."""
        if step >= total_steps:
            return None
        if self.cfg.every_steps and step % self.cfg.every_steps == 0:
            return FULL
        if self.cfg.loss_every_steps and step % self.cfg.loss_every_steps == 0:
            return LOSS_ONLY
        return None

    def run(self, model, tokenizer, tracker, step: int, label: str, kind: str = FULL) -> dict:
        """Evaluate, report, and return the record that the summary and checkpoints keep."""
        from lfqa.evaluation import evaluate

        result = evaluate(model, tokenizer, self.data, self.cfg, self.accelerator, self.collator,
                          generate=kind == FULL)
        tracker.log(result.metrics(), step)
        if kind == LOSS_ONLY:
            if self.accelerator.is_main_process:
                self.log(f"{label}: eval loss {result.loss:.4f}")
            return {"step": step, "loss": result.loss, "metrics": result.metrics()}
        tracker.log_samples(result.samples, step)
        if self.accelerator.is_main_process:
            self._report(result, step, label)
        return {"step": step, "loss": result.loss, "rouge": result.rouge, "other": result.other,
                "facts": result.facts, "sample": result.samples[0] if result.samples else None,
                "metrics": result.metrics()}

    def _report(self, result, step: int, label: str) -> None:
        scores = {**result.rouge, **result.other}  # every metric of eval.metrics
        numbers = [f"{k} {v:.4f}" for k, v in scores.items() if isinstance(v, (int, float))]
        if result.facts:
            numbers.insert(0, fact_recall_text(result.facts))
        self.log(f"{label}: eval loss {result.loss:.4f} | " + " | ".join(numbers))
        for sample in result.samples[: self.cfg.num_examples_to_print]:
            self.log(f"  question:  {sample['question']}\n  generated: {sample['generated']}\n"
                     f"  reference: {sample['reference']}")
        (self.run_dir / f"eval-step{step}.json").write_text(json.dumps(
            {"step": step, "loss": result.loss, "rouge": result.rouge, "other": result.other,
             "facts": result.facts, "samples": result.samples}, indent=1))


def fact_recall_text(facts: dict) -> str:
    """``fact_recall 0.7120 [0.6650, 0.7580] (100 rows)`` for the console."""
    interval = (f" [{facts['fact_recall_ci_low']:.4f}, {facts['fact_recall_ci_high']:.4f}]"
                if "fact_recall_ci_low" in facts else "")
    return f"fact_recall {facts['fact_recall']:.4f}{interval} ({facts['fact_rows']} rows)"
