"""Fact recall as an ``evaluate`` module: the share of each row's facts that its generated answer contains.

    import evaluate
    recall = evaluate.load("<lfqa package>/metric_modules/fact_recall", keep_in_memory=True)
    recall.compute(predictions=["The Gilten is made of tin."], references=[["Gilten", "tin", "1648"]])

A fact is a short string a correct answer must contain (a name, a number, a key phrase). It is found when it
occurs in the answer as whole words, ignoring case and runs of white space ("8" is not found in "1812").
Rows without facts are left out of the mean. ``lfqa.metrics`` holds the computation, so this module,
training's evaluation and ``lfqa eval`` give the same numbers.
"""

import datasets
import evaluate

from lfqa.metrics import fact_recall_scores

_DESCRIPTION = "Mean share (0..1) of each row's facts found in its generated answer, with a bootstrap interval."
_KWARGS_DESCRIPTION = """
Args:
    predictions: generated texts.
    references: one list of facts per prediction (an empty list: the row is not scored).
    bootstrap: resamples for the percentile-bootstrap interval of the mean (0: no interval).
    confidence: the interval's coverage (default 0.95).
    seed: seed of the resampling.
    per_example: also return each scored row's share (``fact_recall_per_example``, None for unscored rows).
Returns:
    fact_recall: the mean over rows with facts; fact_rows: how many rows had facts; with bootstrap,
    fact_recall_ci_low and fact_recall_ci_high.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class FactRecall(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Sequence(datasets.Value("string"))}),
        )

    def _compute(self, predictions, references, bootstrap=0, confidence=0.95, seed=0, per_example=False):
        return fact_recall_scores(list(predictions), [list(r) for r in references], bootstrap=bootstrap,
                                  confidence=confidence, seed=seed, per_example=per_example)
