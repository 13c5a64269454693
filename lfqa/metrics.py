"""Metrics: ROUGE with Google's ``rouge_score``, and every metric of ``eval.metrics`` through ``evaluate``.

The metrics shipped with lfqa are local ``evaluate`` modules (``lfqa/metric_modules/<name>/<name>.py``), loaded
with ``evaluate.load(<folder>)``, which needs no hub (``evaluate.load("rouge")`` would fetch the hub's script).
Any other name in ``eval.metrics`` is handed to ``evaluate.load`` as it is: a hub metric (``bertscore``,
``evaluate-metric/rouge``) or a path to a module of your own.
"""

from __future__ import annotations

import functools
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rouge_score import rouge_scorer

from lfqa.errors import MetricError, one_line

METRIC_MODULES = Path(__file__).parent / "metric_modules"
LOCAL_METRICS = ("rouge", "fact_recall")
"""Names in ``eval.metrics`` that mean lfqa's own modules (in ``METRIC_MODULES``)."""

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


def _words(text: str) -> str:
    return " ".join(text.lower().split())


def fact_found(fact: str, text: str) -> bool:
    """``fact`` occurs in ``text`` as whole words, ignoring case and white space."""
    return re.search(rf"(?<!\w){re.escape(_words(fact))}(?!\w)", _words(text)) is not None


def fact_recall_scores(predictions: list[str], facts: list[list[str]], *, bootstrap: int = 0,
                       confidence: float = 0.95, seed: int = 0, per_example: bool = False) -> dict:
    """The mean share of each row's facts found in its prediction, over the rows that have facts."""
    if len(predictions) != len(facts):
        raise ValueError(f"{len(predictions)} predictions for {len(facts)} lists of facts")
    shares = [sum(fact_found(f, p) for f in row) / len(row) if row else None for p, row in zip(predictions, facts)]
    scored = np.array([s for s in shares if s is not None], dtype=float)
    out: dict = {"fact_recall": float(scored.mean()) if len(scored) else float("nan"), "fact_rows": len(scored)}
    if bootstrap:
        out["fact_recall_ci_low"], out["fact_recall_ci_high"] = bootstrap_ci(
            scored, samples=bootstrap, confidence=confidence, seed=seed)
    if per_example:
        out["fact_recall_per_example"] = shares
    return out


def local_metric_path(name: str) -> Path | None:
    """The folder of the shipped module called ``name``, or None for a hub metric or a path."""
    return METRIC_MODULES / name if name in LOCAL_METRICS else None


def _prepare_evaluate_env(offline: bool) -> None:
    """Before ``evaluate`` is first imported (it reads these once): offline when only local modules are asked
    for, and a writable folder for the copies of module scripts it imports from."""
    if offline:
        os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")
    if "HF_MODULES_CACHE" in os.environ:
        return
    home = Path(os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "huggingface")
    modules = home.expanduser() / "modules"
    probe = modules if modules.exists() else next((p for p in modules.parents if p.exists()), Path("/"))
    if not os.access(probe, os.W_OK):
        os.environ["HF_MODULES_CACHE"] = str(Path(tempfile.gettempdir()) / "lfqa-hf-modules")


@functools.cache
def load_metric(name: str):
    """The ``evaluate`` module called ``name`` (one of LOCAL_METRICS, a hub name or a path), loaded once."""
    local = local_metric_path(name)
    _prepare_evaluate_env(offline=local is not None)
    import evaluate

    try:
        return evaluate.load(str(local or name), keep_in_memory=True)
    except Exception as err:  # noqa: BLE001 - the loader raises many types (hub, import, file errors)
        hint = "" if local else "; a hub metric needs hub access (HF_EVALUATE_OFFLINE unset)"
        raise MetricError(f"eval.metrics: cannot load metric '{name}' ({one_line(err, 200)}){hint}") from None


def check_metrics(names: list[str]) -> None:
    """Load the metrics of ``eval.metrics`` that are not lfqa's own now: a typo or a hub that cannot be reached
    should fail before a model is trained or run (the shipped modules always load)."""
    for name in names:
        if local_metric_path(name) is None:
            load_metric(name)


@dataclass
class MetricScores:
    """What ``eval.metrics`` gave for one set of predictions."""

    rouge: dict[str, float] = field(default_factory=dict)
    """rouge1, rouge2, rougeL, rougeLsum means (when ``rouge`` is among the metrics)."""
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Bootstrap intervals of the ROUGE means, when asked for."""
    per_example: dict[str, list[float]] = field(default_factory=dict)
    other: dict[str, float] = field(default_factory=dict)
    """Every other metric's numbers, as ``name/key`` (a list of per-example numbers is averaged)."""
    facts: dict[str, float] = field(default_factory=dict)
    """fact_recall, fact_rows and (with ``bootstrap``) its interval, when some rows have facts."""


def _numbers(name: str, result: dict) -> dict[str, float]:
    out = {}
    for key, value in (result or {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{name}/{key}"] = float(value)
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, (int, float)) for v in value):
            out[f"{name}/{key}"] = float(np.mean(value))
    return out


def _fact_recall(scores: MetricScores, predictions: list[str], facts: list[list[str]], bootstrap: int,
                 seed: int, per_example: bool) -> None:
    """Fact recall through its ``evaluate`` module, when any row has facts."""
    if not any(facts):
        return
    result = load_metric("fact_recall").compute(predictions=predictions, references=facts, bootstrap=bootstrap,
                                                seed=seed, per_example=per_example)
    if per_example:
        scores.per_example["fact_recall"] = result.pop("fact_recall_per_example")
    scores.facts = result


def compute_metrics(names: list[str], predictions: list[str], references: list[str], *, bootstrap: int = 0,
                    seed: int = 0, per_example: bool = False, facts: list[list[str]] | None = None) -> MetricScores:
    """Every metric of ``names`` on aligned predictions and references (ROUGE with intervals when ``bootstrap``),
    and fact recall when ``facts`` (one list per prediction, empty for a row without) has any."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    scores = MetricScores()
    if not predictions:  # an evaluation with eval.max_generate_samples 0
        scores.rouge = {k: 0.0 for k in ROUGE_TYPES} if "rouge" in names else {}
        return scores
    if facts is not None:
        _fact_recall(scores, predictions, facts, bootstrap, seed, per_example)
    for name in names:
        metric = load_metric(name)
        try:
            if name == "rouge":
                result = metric.compute(predictions=predictions, references=references, bootstrap=bootstrap,
                                        seed=seed, per_example=per_example)
            else:
                result = metric.compute(predictions=predictions, references=references)
        except Exception as err:  # noqa: BLE001 - any metric's own failure, named
            raise MetricError(f"eval.metrics: metric '{name}' failed ({one_line(err, 200)})") from None
        if name != "rouge":
            scores.other.update(_numbers(name, result))
            continue
        for k in ROUGE_TYPES:
            scores.rouge[k] = result[k]
            if bootstrap:
                scores.intervals[k] = (result[f"{k}_ci_low"], result[f"{k}_ci_high"])
            if per_example:
                scores.per_example[k] = result[f"{k}_per_example"]
    return scores
