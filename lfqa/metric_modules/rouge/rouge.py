"""ROUGE-1/2/L/Lsum as an ``evaluate`` module, with percentile-bootstrap confidence intervals; works offline.

    import evaluate
    rouge = evaluate.load("<lfqa package>/metric_modules/rouge", keep_in_memory=True)
    rouge.compute(predictions=["..."], references=["..."], bootstrap=1000)

Scores are rouge_score's F-measures with the Porter stemmer; rougeLsum splits sentences on punctuation
(rouge_score would use NLTK's punkt, whose data is a download). ``lfqa.metrics`` holds the computation, so
this module, training's evaluation and ``lfqa eval`` give the same numbers.
"""

import datasets
import evaluate
import numpy as np

from lfqa.metrics import ROUGE_TYPES, bootstrap_ci, rouge_per_example

_DESCRIPTION = "ROUGE-1/2/L/Lsum F-measures (0..1), means over examples, with optional bootstrap intervals."
_KWARGS_DESCRIPTION = """
Args:
    predictions: generated texts.
    references: one reference text per prediction.
    bootstrap: resamples for the percentile-bootstrap interval of each mean (0: no intervals).
    confidence: the interval's coverage (default 0.95).
    seed: seed of the resampling.
    per_example: also return each example's scores (``<type>_per_example``).
Returns:
    rouge1, rouge2, rougeL, rougeLsum: means; with bootstrap, ``<type>_ci_low`` and ``<type>_ci_high``.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Rouge(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Lin, C.-Y. (2004). ROUGE: A Package for Automatic Evaluation of Summaries.",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references, bootstrap=0, confidence=0.95, seed=0, per_example=False):
        scores = rouge_per_example(list(predictions), list(references))
        out = {}
        for k in ROUGE_TYPES:
            values = np.asarray(scores[k], dtype=float)
            out[k] = float(values.mean()) if len(values) else 0.0
            if bootstrap:
                out[f"{k}_ci_low"], out[f"{k}_ci_high"] = bootstrap_ci(values, samples=bootstrap,
                                                                     confidence=confidence, seed=seed)
            if per_example:
                out[f"{k}_per_example"] = values.tolist()
        return out
