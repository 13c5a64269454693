"""The bundled data set: deterministic, facts that the relevant passages state, validation names never trained on."""

import json
import re

import pytest

from lfqa import bundled_data
from lfqa.config import FieldsConfig
from lfqa.data import normalise_row
from lfqa.metrics import fact_found
from lfqa.modeling import BUNDLED_VALIDATION


@pytest.fixture(scope="module")
def rows():
    return bundled_data.generate(n_train=1500, n_validation=bundled_data.VALIDATION_ROWS)


def test_the_shipped_validation_file_is_what_the_generator_writes(tmp_path, rows):
    _, validation = bundled_data.write(tmp_path, n_train=5)
    assert validation.read_bytes() == BUNDLED_VALIDATION.read_bytes()
    # The validation rows do not depend on the number of training rows.
    assert [json.loads(line) for line in validation.read_text().splitlines()] == rows[1]


def test_every_fact_is_in_the_answer_and_in_a_passage_naming_the_entity(rows):
    for row in rows[0][:300] + rows[1]:
        name = row["facts"][0]
        assert row["question"].count(name) == 1 and len(row["facts"]) >= 4
        relevant = [p for p in row["context"] if re.search(rf"\b{name}\b", p)]
        assert 1 <= len(relevant) <= 2 and len(row["context"]) > len(relevant)  # distractors name others
        for fact in row["facts"]:
            assert fact_found(fact, row["answer"]), (fact, row["answer"])
            assert fact_found(fact, " ".join(relevant)), (fact, relevant)


def test_validation_names_never_occur_in_training_rows(rows):
    pools = bundled_data._name_pools(0)
    train_text = " ".join(json.dumps(r) for r in rows[0])
    names = pools["validation"]["entity"] + pools["validation"]["place"] + pools["validation"]["person"]
    for name in names:
        assert name not in train_text
    asked = {r["facts"][0] for r in rows[1]}
    assert asked <= set(pools["validation"]["entity"]) and len(asked) == len(rows[1])  # each asked once


def test_rows_read_with_their_facts(rows):
    example = normalise_row(rows[1][0], FieldsConfig())
    assert example.facts == rows[1][0]["facts"]
    mapped = normalise_row({"q": "Q?", "a": "A.", "c": ["x"], "meta": {"keys": ["A", " "]}},
                           FieldsConfig(question="q", answer="a", context="c", facts="meta.keys"))
    assert mapped.facts == ["A"]
    assert normalise_row({"question": "Q?", "answer": "A.", "context": ["x"]}, FieldsConfig()).facts == []
    assert normalise_row({"question": "Q?", "answer": "A.", "context": ["x"], "facts": "A"},
                         FieldsConfig()) == "facts field 'facts' is not a list of strings"


def test_the_training_file_is_written_once_when_a_job_names_it(tmp_path, monkeypatch):
    monkeypatch.setattr(bundled_data, "DATA_DIR", tmp_path)
    monkeypatch.setattr(bundled_data, "TRAIN_ROWS", 30)
    target = tmp_path / bundled_data.TRAIN_FILE
    assert bundled_data.ensure_training_file([str(tmp_path / "other.jsonl")]) is None and not target.exists()
    assert bundled_data.ensure_training_file([str(target)]) == target
    first = target.read_bytes()
    assert len(first.splitlines()) == 30 and bundled_data.ensure_training_file([str(target)]) is None
    assert first == (bundled_data.write(tmp_path / "again", n_train=30)[0]).read_bytes()
