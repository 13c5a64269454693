"""Metrics through `evaluate`: lfqa's ROUGE module loads offline and gives rouge_score's numbers; other modules too."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from rouge_score import rouge_scorer

from lfqa.errors import MetricError
from lfqa.evaluation import EvalResult
from lfqa.metrics import (
    METRIC_MODULES,
    ROUGE_TYPES,
    bootstrap_ci,
    compute_metrics,
    fact_found,
    load_metric,
    split_sentences,
)

PREDICTIONS = ["The cat sat on the mat. It slept all day.", "Bridges hum because the wind shakes their cables.",
               "dogs bark", "Running runners ran. Then they rested!"]
REFERENCES = ["A cat sat on a mat. Then it slept.", "The wind makes the cables of a bridge vibrate, so it hums.",
              "cats sleep", "The runners were running. They rested?"]

# A user's own metric module, as eval.metrics may name it by path.
LENGTH_RATIO = '''
import datasets
import evaluate


class LengthRatio(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(description="words of the prediction per word of the reference", citation="",
                                   features=datasets.Features({"predictions": datasets.Value("string"),
                                                               "references": datasets.Value("string")}))

    def _compute(self, predictions, references):
        ratios = [len(p.split()) / len(r.split()) for p, r in zip(predictions, references)]
        return {"ratio": sum(ratios) / len(ratios), "per_example": ratios}
'''


def rouge_score_directly() -> dict[str, np.ndarray]:
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    scores = [scorer.score(split_sentences(r), split_sentences(p)) for p, r in zip(PREDICTIONS, REFERENCES)]
    return {k: np.array([s[k].fmeasure for s in scores]) for k in ROUGE_TYPES}


def compute_in_fresh_interpreter(name: str, tmp_path, **kwargs) -> dict:
    """``evaluate.load(<lfqa's module folder>).compute(**kwargs)`` in a fresh interpreter with the hub unreachable
    by configuration: the module alone, without lfqa's loader."""
    script = (f"import evaluate, json\nm = evaluate.load({str(METRIC_MODULES / name)!r}, keep_in_memory=True)\n"
              f"print(json.dumps(m.compute(**{kwargs!r})))")
    env = {**os.environ, "HF_EVALUATE_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "m"),
           "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_rouge_module_loads_offline_with_plain_evaluate(tmp_path):
    result = compute_in_fresh_interpreter("rouge", tmp_path, predictions=PREDICTIONS, references=REFERENCES,
                                          bootstrap=200)
    direct = rouge_score_directly()
    for k in ROUGE_TYPES:
        assert result[k] == pytest.approx(direct[k].mean(), abs=1e-12)
        assert (result[f"{k}_ci_low"], result[f"{k}_ci_high"]) == pytest.approx(bootstrap_ci(direct[k], samples=200))


def test_compute_metrics_gives_rouge_scores_numbers_with_intervals():
    scores = compute_metrics(["rouge"], PREDICTIONS, REFERENCES, bootstrap=300, seed=1, per_example=True)
    direct = rouge_score_directly()
    assert 0 < scores.rouge["rougeLsum"] < 1 and scores.other == {}
    for k in ROUGE_TYPES:
        assert scores.rouge[k] == pytest.approx(direct[k].mean(), abs=1e-12)
        assert scores.per_example[k] == pytest.approx(direct[k].tolist())
        assert scores.intervals[k] == pytest.approx(bootstrap_ci(direct[k], samples=300, seed=1))
    assert compute_metrics(["rouge"], [], []).rouge == {k: 0.0 for k in ROUGE_TYPES}


def test_other_metrics_by_path_reach_the_training_metrics(tmp_path):
    module = tmp_path / "length_ratio"
    module.mkdir()
    (module / "length_ratio.py").write_text(LENGTH_RATIO)
    scores = compute_metrics(["rouge", str(module)], PREDICTIONS, REFERENCES)
    ratios = [len(p.split()) / len(r.split()) for p, r in zip(PREDICTIONS, REFERENCES)]
    assert scores.other == {f"{module}/ratio": pytest.approx(np.mean(ratios)),
                            f"{module}/per_example": pytest.approx(np.mean(ratios))}
    result = EvalResult(loss=1.5, rouge=scores.rouge, other=scores.other)
    assert result.metrics()[f"eval/{module}/ratio"] == pytest.approx(np.mean(ratios))
    assert result.metrics()["eval/rougeL"] == scores.rouge["rougeL"]


def test_a_metric_that_cannot_be_loaded_is_one_line(monkeypatch, tmp_path):
    import evaluate

    monkeypatch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True)
    with pytest.raises(MetricError) as info:
        load_metric("no-such-metric-anywhere")
    message = str(info.value)
    assert message.startswith("eval.metrics: cannot load metric 'no-such-metric-anywhere' (")
    assert "hub access" in message and "\n" not in message
    with pytest.raises(MetricError, match=r"^eval.metrics: cannot load metric '.*missing-module'"):
        load_metric(str(tmp_path / "missing-module"))


def test_eval_metrics_is_checked_before_any_model_loads(tmp_path, capsys, monkeypatch):
    import evaluate

    from lfqa.cli import main as lfqa_main

    monkeypatch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True)
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"question": "Why?", "answer": "Because.", "context": "Text."}) + "\n")
    code = lfqa_main(["eval", "--model", str(tmp_path / "no-model-needed"), "--data", str(data),
                      "eval.metrics=[rouge, bertscore]", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith("lfqa: error: eval.metrics: cannot load metric "
                                                             "'bertscore'")


def test_eval_metrics_is_validated_as_config():
    from lfqa.config import ConfigError, EvalConfig

    assert EvalConfig().metrics == ["rouge"]
    with pytest.raises(ConfigError, match="eval.metrics: names a metric twice"):
        EvalConfig(metrics=["rouge", "rouge"])


def test_fact_recall_finds_whole_words_in_any_case_and_spacing():
    assert fact_found("Hathi  Zersel", "invented by hathi\nzersel in 1648")
    assert fact_found("a falling weight", "It runs on A Falling Weight.")
    assert not fact_found("8", "since 1812") and fact_found("8", "it lasts 8 days")
    assert not fact_found("tin", "a tinted glass") and fact_found("tin", "made of tin.")


def test_fact_recall_module_scores_rows_with_facts_and_gives_an_interval(tmp_path):
    predictions = ["The Gilten is made of tin in 1648.", "Nothing about it.", "The Fumves lasts 8 days in Goles."]
    facts = [["Gilten", "tin", "1648", "Hathi Zersel"], [], ["Fumves", "8", "October"]]
    result = compute_in_fresh_interpreter("fact_recall", tmp_path, predictions=predictions, references=facts,
                                          bootstrap=200, per_example=True)
    assert result["fact_rows"] == 2 and result["fact_recall"] == pytest.approx((3 / 4 + 2 / 3) / 2)
    assert result["fact_recall_per_example"] == [0.75, None, pytest.approx(2 / 3)]
    assert result["fact_recall_ci_low"] == pytest.approx(2 / 3) and result["fact_recall_ci_high"] == 0.75


def test_compute_metrics_adds_fact_recall_only_when_rows_have_facts():
    with_facts = compute_metrics(["rouge"], PREDICTIONS, REFERENCES, facts=[["cat", "mat"], ["wind"], [], ["dogs"]])
    assert with_facts.facts["fact_recall"] == pytest.approx((1 + 1 + 0) / 3) and with_facts.facts["fact_rows"] == 3
    assert compute_metrics(["rouge"], PREDICTIONS, REFERENCES, facts=[[], [], [], []]).facts == {}
    assert compute_metrics(["rouge"], PREDICTIONS, REFERENCES).facts == {}
    result = EvalResult(loss=1.0, rouge=with_facts.rouge, facts=with_facts.facts)
    assert result.metrics()["eval/fact_recall"] == with_facts.facts["fact_recall"]
