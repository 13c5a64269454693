"""ROUGE with Google's ``rouge_score`` (offline; ``evaluate.load("rouge")`` needs the hub)."""

from __future__ import annotations

import re

from rouge_score import rouge_scorer

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str) -> str:
    # rougeLsum scores sentence by sentence, with sentences separated by newlines. rouge_score would
    # use NLTK's punkt for that, whose data cannot be downloaded here; a punctuation split is enough.
    return "\n".join(s for s in _SENTENCE_END.split(text.strip()) if s)


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L/Lsum F-measures (0..1) over aligned prediction / reference pairs."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        return {k: 0.0 for k in ROUGE_TYPES}
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for pred, ref in zip(predictions, references):
        scores = scorer.score(split_sentences(ref), split_sentences(pred))
        for k in ROUGE_TYPES:
            totals[k] += scores[k].fmeasure
    return {k: v / len(predictions) for k, v in totals.items()}
