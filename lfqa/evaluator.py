"""Evaluation during training: when it is due, and where its results go (console, trackers, eval-step*.json).

What an evaluation computes (validation loss, generated answers, their metrics) is :func:`lfqa.evaluation.evaluate`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lfqa.config import EvalConfig


@dataclass
class EvalData:
    """The tokenised validation rows with the texts that scoring and printing need."""

    dataset: object
    questions: list[str]
    references: list[str]


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

    def due(self, step: int, total_steps: int) -> bool:
        """Periodic evaluation; the last step is evaluated by the end of the run, not here."""
        return bool(self.cfg.every_steps) and step % self.cfg.every_steps == 0 and step < total_steps

    def run(self, model, tokenizer, tracker, step: int, label: str) -> dict:
        """Evaluate, report, and return the record that the summary and checkpoints keep."""
        from lfqa.evaluation import evaluate

        data = self.data
        result = evaluate(model, tokenizer, data.dataset, data.questions, data.references, self.cfg,
                          self.accelerator, self.collator)
        tracker.log(result.metrics(), step)
        tracker.log_samples(result.samples, step)
        if self.accelerator.is_main_process:
            self._report(result, step, label)
        return {"step": step, "loss": result.loss, "rouge": result.rouge, "other": result.other,
                "sample": result.samples[0] if result.samples else None, "metrics": result.metrics()}

    def _report(self, result, step: int, label: str) -> None:
        scores = {**result.rouge, **result.other}  # every metric of eval.metrics
        self.log(f"{label}: eval loss {result.loss:.4f} | "
                 + " | ".join(f"{k} {v:.4f}" for k, v in scores.items() if isinstance(v, (int, float))))
        for sample in result.samples[: self.cfg.num_examples_to_print]:
            self.log(f"  question:  {sample['question']}\n  generated: {sample['generated']}\n"
                     f"  reference: {sample['reference']}")
        (self.run_dir / f"eval-step{step}.json").write_text(json.dumps(
            {"step": step, "loss": result.loss, "rouge": result.rouge, "other": result.other,
             "samples": result.samples}, indent=1))
