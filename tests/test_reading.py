"""The trained tiny model reads: its answers state the facts of the row's own passages, wherever they stand,
and lose them when those passages are another row's (the distractors staying where they were)."""

import json
import random
import re

import pytest

from lfqa.metrics import fact_found
from lfqa.model_eval import main as lfqa_eval
from lfqa.modeling import BUNDLED_VALIDATION


def relevant(row: dict) -> list[int]:
    """Indices of the passages that name the row's entity (its first fact)."""
    return [i for i, p in enumerate(row["context"]) if re.search(rf"\b{re.escape(row['facts'][0])}\b", p)]


def swapped(rows: list[dict]) -> list[dict]:
    """Each row's relevant passages replaced by the next row's, in the same places; distractors unchanged."""
    out = []
    for i, row in enumerate(rows):
        other = rows[(i + 1) % len(rows)]
        mine, theirs = relevant(row), [other["context"][j] for j in relevant(other)]
        context = [p for j, p in enumerate(row["context"]) if j not in mine]
        for k, j in enumerate(mine):
            context.insert(min(j, len(context)), theirs[k % len(theirs)])
        out.append({**row, "context": context})
    return out


def shuffled(rows: list[dict]) -> list[dict]:
    rng = random.Random(0)
    return [{**row, "context": rng.sample(row["context"], len(row["context"]))} for row in rows]


def context_facts(rows: list[dict]) -> list[dict]:
    """Scored on the facts that only the passages give (the asked name is in the question, so not those)."""
    return [{**row, "facts": [f for f in row["facts"] if not fact_found(f, row["question"])]} for row in rows]


def fact_recall(model, rows: list[dict], tmp_path, name: str) -> float:
    data = tmp_path / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in context_facts(rows)))
    out = tmp_path / name
    assert lfqa_eval(["--model", str(model), "--data", str(data), "--all-rows", "--batch-size", "25",
                      "--bootstrap", "200", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    return report["models"][str(model)]["facts"]["fact_recall"]


@pytest.mark.distributed
def test_the_trained_model_copies_facts_from_the_passages_that_name_the_entity(trained, tmp_path):
    _, run_dir, _ = trained
    rows = [json.loads(line) for line in BUNDLED_VALIDATION.read_text().splitlines()]
    assert all(relevant(r) and len(relevant(r)) < len(r["context"]) for r in rows)
    model = run_dir / "model"
    own = fact_recall(model, rows, tmp_path, "own")
    moved = fact_recall(model, shuffled(rows), tmp_path, "shuffled")
    others = fact_recall(model, swapped(rows), tmp_path, "swapped")
    assert own >= 0.4, own
    assert moved >= own - 0.1, (own, moved)
    # What is left is chance: an attribute drawn from a list of ten matches another entity's one time in ten.
    assert others <= 0.2 and others < own / 3, (own, others)
