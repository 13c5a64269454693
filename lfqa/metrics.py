"""ROUGE with Google's ``rouge_score`` (offline; ``evaluate.load("rouge")`` needs the hub)."""

from __future__ import annotations

import re

import numpy as np
from rouge_score import rouge_scorer

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str) -> str:
    # rougeLsum scores sentence by sentence, with sentences separated by newlines. rouge_score would
    # use NLTK's punkt for that, whose data cannot be downloaded here; a punctuation split is enough.
    return "\n".join(s for s in _SENTENCE_END.split(text.strip()) if s)


def rouge_per_example(predictions: list[str], references: list[str]) -> dict[str, np.ndarray]:
    """ROUGE-1/2/L/Lsum F-measures (0..1) of each aligned prediction / reference pair."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    out = {k: np.zeros(len(predictions)) for k in ROUGE_TYPES}
    for i, (pred, ref) in enumerate(zip(predictions, references)):
        scores = scorer.score(split_sentences(ref), split_sentences(pred))
        for k in ROUGE_TYPES:
            out[k][i] = scores[k].fmeasure
    return out


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L/Lsum F-measures (0..1) over aligned prediction / reference pairs."""
    per_example = rouge_per_example(predictions, references)
    return {k: float(v.mean()) if len(v) else 0.0 for k, v in per_example.items()}


def bootstrap_ci(values: np.ndarray, *, samples: int = 1000, confidence: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean (resampling examples with replacement)."""
    values = np.asarray(values, dtype=float)
    if len(values) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(samples, len(values)))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)
