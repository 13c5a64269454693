"""`lfqa answer`, its Python API, and `lfqa eval` on the model trained by the shared `trained` fixture."""

import json

import numpy as np
import pytest

from lfqa.answer import Answerer, InputError, read_document
from lfqa.answer import main as answer_main
from lfqa.metrics import bootstrap_ci, fact_found, rouge
from lfqa.model_eval import main as eval_main
from lfqa.modeling import BUNDLED_VALIDATION

VAL = [json.loads(line) for line in BUNDLED_VALIDATION.read_text().splitlines()]


@pytest.fixture(scope="module")
def model_dir(trained):
    return str(trained[1] / "model")


@pytest.fixture(scope="module")
def answerer(model_dir):
    return Answerer(model_dir)


def test_python_api_answers_passages_and_documents(answerer):
    row = VAL[0]
    result = answerer.answer(row["question"], contexts=row["context"])
    assert len(result.answer.split()) >= 10 and not result.truncated
    # An entity never seen in training: its name and most of its facts come from the passages.
    found = [f for f in row["facts"] if fact_found(f, result.answer)]
    assert row["facts"][0] in found and len(found) >= len(row["facts"]) / 2, (result.answer, row["facts"])
    assert result.input_tokens > 50 and result.max_input_tokens == 1024  # model.tiny.max_input_tokens
    # The decoding settings the model was trained with (its job.yaml): greedy, no repeated trigrams.
    assert answerer.generation.num_beams == 1 and answerer.generation.no_repeat_ngram_size == 3
    again = answerer.answer(row["question"], document=" ".join(row["context"]))
    assert again.answer == result.answer  # passages are joined with spaces either way
    with pytest.raises(InputError, match="question 1 is empty"):
        answerer.answer("  ", document="text")
    with pytest.raises(InputError, match="has an empty context"):
        answerer.answer("Why?", contexts=["", " "])
    assert answerer.answer_many([]) == []  # an empty share of a small multi-process evaluation
    assert answerer.global_attention == "question"  # from the model's job.yaml


def test_long_documents_are_cut_and_say_so(model_dir):
    small = Answerer(model_dir, max_input_tokens=64)
    result = small.answer(VAL[0]["question"], contexts=VAL[0]["context"])
    assert result.truncated and result.input_tokens > 64 and result.max_input_tokens == 64
    assert result.answer


def test_cli_answers_a_pdf(tmp_path, model_dir, capsys):
    from reportlab.lib.pagesizes import A4
    from reportlab.pdfgen import canvas

    pdf = tmp_path / "notes.pdf"
    c = canvas.Canvas(str(pdf), pagesize=A4)
    y = 800
    for passage in VAL[3]["context"]:
        for i in range(0, len(passage), 90):
            c.drawString(40, y, passage[i:i + 90])
            y -= 14
    c.save()
    text = read_document(pdf)
    assert VAL[3]["context"][0][:40] in text.replace("\n", "")
    assert answer_main(["--model", model_dir, "--question", VAL[3]["question"], "--document", str(pdf)]) == 0
    out = capsys.readouterr()
    assert len(out.out.strip().split()) >= 10 and "note:" not in out.err


def test_cli_says_when_the_document_was_cut(tmp_path, model_dir, capsys):
    doc = tmp_path / "doc.md"
    doc.write_text("# Notes\n\n" + " ".join(VAL[1]["context"]))
    assert answer_main(["--model", model_dir, "--question", VAL[1]["question"], "--document", str(doc),
                        "--max-input-tokens", "40"]) == 0
    err = capsys.readouterr().err
    assert "was cut to the model's maximum of 40" in err


def test_cli_jsonl_many_questions(tmp_path, model_dir):
    (tmp_path / "doc.txt").write_text(" ".join(VAL[2]["context"]))
    questions = tmp_path / "q.jsonl"
    passages = [{"title": "Notes", "text": c} for c in VAL[5]["context"]]
    # A byte-order mark (Windows editors write one) must not cost the first row.
    questions.write_text("\ufeff" + json.dumps({"question": VAL[2]["question"], "document_file": "doc.txt"}) + "\n"
                         + json.dumps({"question": VAL[4]["question"], "context": VAL[4]["context"]}) + "\n"
                         + json.dumps({"question": VAL[5]["question"], "context": passages}) + "\n"
                         + json.dumps({"question": VAL[6]["question"], "context": " ".join(VAL[6]["context"])})
                         + "\n", encoding="utf-8")
    out = tmp_path / "answers.jsonl"
    assert answer_main(["--model", model_dir, "--jsonl", str(questions), "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["question"] for r in rows] == [VAL[i]["question"] for i in (2, 4, 5, 6)]
    assert all(len(r["answer"].split()) >= 10 and r["truncated"] is False for r in rows)


def test_cli_jsonl_rows_of_other_data_through_data_fields(tmp_path, model_dir, capsys):
    # ELI5's shape: the document's text under "document"; the question under "title".
    rows = tmp_path / "eli5.jsonl"
    rows.write_text(json.dumps({"title": VAL[2]["question"], "document": " ".join(VAL[2]["context"])}) + "\n")
    assert answer_main(["--model", model_dir, "--jsonl", str(rows)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"lfqa: error: {rows}:1: missing question field 'question'"]
    code = answer_main(["--model", model_dir, "data.fields.question=title", "--jsonl", str(rows),
                        "data.fields.context=document"])
    out = capsys.readouterr()
    assert code == 0 and json.loads(out.out)["question"] == VAL[2]["question"]
    code = answer_main(["--model", model_dir, "--jsonl", str(rows), "data.fields.question=title"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err == [f"lfqa: error: {rows}:1: missing context field 'context' (the row has 'document': "
                                 "data.fields.context=document reads it as the context); or give 'document_file': "
                                 "a .txt, .md or .pdf file"]


def test_answer_help_tells_text_from_files(capsys):
    with pytest.raises(SystemExit):
        answer_main(["--help"])
    text = capsys.readouterr().out
    assert "a .txt, .md or .pdf FILE" in text and "passages (TEXT)" in text
    assert '"document_file": "notes.pdf"' in text and "data.fields.context=document" in text


def test_an_empty_answer_is_visible(capsys):
    from argparse import Namespace

    from lfqa.answer import Answer, _print_answers

    _print_answers(Namespace(jsonl=None, out=None), [Answer("Why?", "", 10, False, 1024)])
    assert capsys.readouterr().out.startswith("(empty answer: the model generated no text")


@pytest.mark.parametrize("args, message", [
    (["--question", "Why?", "--document", "{tmp}/missing.txt"], "missing.txt: no such file"),
    (["--question", "Why?", "--document", "{tmp}/empty.txt"], "empty.txt: the document is empty"),
    (["--question", "Why?", "--document", "{tmp}/blank.pdf"], "blank.pdf: the PDF has no extractable text"),
    (["--question", "Why?", "--document", "{tmp}/fake.pdf"], "fake.pdf: not a readable PDF"),
    (["--question", " ", "--context", "text"], "the question is empty"),
])
def test_cli_bad_input_is_a_one_line_error(tmp_path, model_dir, capsys, args, message):
    from reportlab.pdfgen import canvas

    (tmp_path / "empty.txt").write_text("  \n")
    blank = canvas.Canvas(str(tmp_path / "blank.pdf"))
    blank.showPage()
    blank.save()
    (tmp_path / "fake.pdf").write_text("not a pdf")
    code = answer_main(["--model", model_dir, *[a.format(tmp=tmp_path) for a in args]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith("lfqa: error: ") and message in err[0]


def test_a_folder_without_a_seq2seq_model_is_an_error(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert answer_main(["--model", str(tmp_path), "--question", "Why?", "--context", "x"]) == 1
    assert "holds a bert model, not a sequence-to-sequence" in capsys.readouterr().err


def test_bootstrap_interval_brackets_the_mean():
    values = np.random.default_rng(0).uniform(0, 1, 200)
    low, high = bootstrap_ci(values, samples=2000)
    assert low < values.mean() < high and 0.05 < high - low < 0.2
    assert bootstrap_ci(np.full(10, 0.5)) == (0.5, 0.5)


def test_rouge_of_identical_and_disjoint_texts():
    assert rouge(["The cat sat. It slept."], ["The cat sat. It slept."])["rougeLsum"] == pytest.approx(1.0)
    assert rouge(["dogs bark"], ["cats sleep"])["rouge1"] == 0.0


def test_eval_compares_the_fine_tuned_model_with_the_base_model(trained, tmp_path, capsys):
    from lfqa.config import load_job
    from lfqa.modeling import tiny_model_dir

    _, run_dir, _ = trained
    base = tiny_model_dir(load_job(run_dir / "model" / "job.yaml").model)  # the untrained model it started from
    out = tmp_path / "eval"
    code = eval_main(["--model", str(run_dir / "model"), "--compare", str(base), "--limit", "20", "--out", str(out),
                      "--bootstrap", "500"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    tuned, untrained = report["models"][str(run_dir / "model")], report["models"][str(base)]
    assert report["data"]["examples"] == 20 and report["data"]["source"].endswith("tiny_validation.jsonl")
    for k in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        r = tuned["rouge"][k]
        assert r["ci_low"] <= r["mean"] <= r["ci_high"]
    assert tuned["rouge"]["rougeL"]["ci_low"] > untrained["rouge"]["rougeL"]["ci_high"]
    assert tuned["facts"]["fact_recall_ci_low"] > untrained["facts"]["fact_recall_ci_high"]
    assert tuned["facts"]["fact_rows"] == 20 and untrained["facts"]["fact_recall"] < 0.05
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 20 and predictions[0]["question"] == VAL[0]["question"]
    generated = [p["generated"][str(run_dir / "model")] for p in predictions]
    references = [p["reference"] for p in predictions]
    assert rouge(generated, references)["rougeL"] == pytest.approx(tuned["rouge"]["rougeL"]["mean"])
    md = (out / "report.md").read_text()
    assert f"`{run_dir / 'model'}`" in md and "## Sample answers" in md and VAL[0]["question"] in md
    assert "| model | fact_recall (95% CI) | rouge1 (95% CI) |" in md
    assert predictions[0]["facts"] == VAL[0]["facts"] and 0 <= predictions[0]["fact_recall"][str(base)] <= 1
    assert "predictions and report written to" in capsys.readouterr().out


def test_eval_reads_other_files_and_reports_malformed_rows(trained, tmp_path):
    _, run_dir, _ = trained
    data = tmp_path / "rows.jsonl"
    rows = [{"q": r["question"], "answers": [r["answer"]], "document": " ".join(r["context"])} for r in VAL[:3]]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{broken\n")
    out = tmp_path / "eval"
    code = eval_main(["--model", str(run_dir / "model"), "--data", str(data), "--out", str(out), "--bootstrap", "100",
                      "data.fields.question=q", "data.fields.answer=answers.0", "data.fields.context=document"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["examples"] == 3 and report["data"]["malformed"] == 1
    assert report["data"]["problems"] == [f"{data}:4: line is not valid JSON"]


def test_eval_errors(trained, tmp_path, capsys):
    _, run_dir, _ = trained
    with pytest.raises(SystemExit) as info:
        eval_main(["--model", str(run_dir / "model"), "--batch-size", "0"])
    assert info.value.code == 2 and "--batch-size: must be > 0, got 0" in capsys.readouterr().err
    assert eval_main(["--model", str(run_dir / "model"), "--data", str(tmp_path / "none.jsonl")]) == 1
    assert "none.jsonl: no such file" in capsys.readouterr().err
    assert eval_main(["--model", str(run_dir / "model"), "data.fields.questio=q"]) == 2
    assert "unknown key 'data.fields.questio'" in capsys.readouterr().err


def test_eval_scores_the_rows_of_trainings_evaluation(trained, tmp_path, capsys):
    _, run_dir, _ = trained
    out = tmp_path / "eval"
    assert eval_main(["--model", str(run_dir / "model"), "--out", str(out), "--bootstrap", "50"]) == 0
    report = json.loads((out / "report.json").read_text())
    trained_eval = json.loads(sorted(run_dir.glob("eval-step*.json"))[-1].read_text())
    # data.max_eval_samples=49 of the run: the same rows, in the same order, as the run's own evaluation.
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [p["question"] for p in predictions] == [s["question"] for s in trained_eval["samples"]]
    assert report["data"]["examples"] == 49 and report["data"]["limits"] == ["data.max_eval_samples=49"]
    stdout = capsys.readouterr().out
    assert "rows: 49 of 100 usable rows, selected as training's evaluation selects them (limited by " \
           "data.max_eval_samples=49; --all-rows scores all)" in stdout


def test_eval_all_rows_overrides_anywhere_and_truncation_shown(trained, tmp_path, capsys):
    _, run_dir, _ = trained
    out = tmp_path / "eval"
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"q": r["question"], "answer": r["answer"], "context": r["context"]}) + "\n"
                            for r in VAL[:6]))
    code = eval_main(["--model", str(run_dir / "model"), "data.max_input_tokens=64", "--data", str(data),
                      "data.fields.question=q", "--all-rows", "--limit", "3", "--out", str(out), "--bootstrap", "20"])
    assert code == 0
    stdout = capsys.readouterr().out
    assert "rows: 3 of 6 usable rows (--all-rows: no filter) (limited by --limit 3)" in stdout
    assert "3 inputs truncated to 64 tokens" in stdout
    assert "3 inputs truncated to 64 tokens" in (out / "report.md").read_text()
    report = json.loads((out / "report.json").read_text())
    assert report["models"][str(run_dir / "model")]["truncated_inputs"] == 3 and report["max_input_tokens"] == 64


def test_eval_drops_long_answers_as_training_does(trained, tmp_path):
    from lfqa.modeling import load_tokenizer

    _, run_dir, _ = trained
    tokenizer = load_tokenizer(str(run_dir / "model"))
    out = tmp_path / "eval"
    assert eval_main(["--model", str(run_dir / "model"), "--limit", "2", "--out", str(out), "--bootstrap", "20",
                      "data.max_answer_tokens=40"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["filtered_long_answer"] > 0 and report["data"]["examples"] == 2
    lengths = [len(tokenizer(text_target=json.loads(line)["reference"])["input_ids"])
               for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert max(lengths) <= 40


def test_eval_help_shows_a_plain_percent(capsys):
    with pytest.raises(SystemExit):
        eval_main(["--help"])
    text = capsys.readouterr().out
    assert "95% intervals" in text and "%%" not in text and "--all-rows" in text


@pytest.mark.distributed
def test_eval_splits_the_work_between_two_processes(trained, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from conftest import ROOT, free_port, lfqa_env

    _, run_dir, _ = trained
    single, double = tmp_path / "one", tmp_path / "two"
    assert eval_main(["--model", str(run_dir / "model"), "--limit", "9", "--out", str(single),
                      "--bootstrap", "100"]) == 0
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", "accelerate_configs/cpu.yaml",
           "--main_process_port", str(free_port()), "-m", "lfqa.model_eval", "--model", str(run_dir / "model"),
           "--limit", "9", "--out", str(double), "--bootstrap", "100"]
    proc = subprocess.run(cmd, cwd=ROOT, env=lfqa_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = [json.loads(x) for x in (single / "predictions.jsonl").read_text().splitlines()]
    two = [json.loads(x) for x in (double / "predictions.jsonl").read_text().splitlines()]
    # An odd count split 5 / 4, gathered back in order: the same answers as one process.
    assert [r["question"] for r in two] == [r["question"] for r in one] and len(two) == 9
    assert [r["generated"] for r in two] == [r["generated"] for r in one]
    assert proc.stdout.count("predictions and report written to") == 1  # only the main process writes
