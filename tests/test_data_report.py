"""``lfqa data-report``: the numbers it writes are recomputed here from the raw files and the tokenizer."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lfqa.config import load_job
from lfqa.data import DataReport, format_input, read_split, tokenize_examples
from lfqa.data_report import MEASURES, main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_ANSWER = 55  # the bundled answers are 33-65 tiny-tokenizer tokens: this filters some, not all
MAX_INPUT = 250  # and the inputs 126-353: some are truncated
TRAIN_ROWS = 400  # the generator's rows, fewer than the 12,000 of set-up: counted one by one below


def check_png(path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path.name} is not a PNG"
    assert 5_000 < len(data) < 500_000, f"{path.name} has an odd size: {len(data)} bytes"


def run_main(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def bundled(tiny_model_path, repo_root, tmp_path_factory):
    """One report of the bundled data through the CLI (shared by the tests below: it takes seconds)."""
    from lfqa import bundled_data

    out_dir = tmp_path_factory.mktemp("data-report")
    train_file, _ = bundled_data.write(tmp_path_factory.mktemp("data"), n_train=TRAIN_ROWS)
    overrides = [f"model.name_or_path={tiny_model_path}", f"data.max_answer_tokens={MAX_ANSWER}",
                 f"data.max_input_tokens={MAX_INPUT}", f"data.train_files=[{train_file}]"]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(repo_root)  # the job names its files relative to the repository
        rc, stdout, stderr = run_main(["--job", "jobs/tiny-cpu.yaml", "--out", out_dir, *overrides])
        job = load_job("jobs/tiny-cpu.yaml", overrides)
        job.data.train_files = [str(repo_root / f) for f in job.data.train_files]
        job.data.validation_files = [str(repo_root / f) for f in job.data.validation_files]
    return {"rc": rc, "stdout": stdout, "stderr": stderr, "out": out_dir, "job": job,
            "report": json.loads((out_dir / "report.json").read_text()),
            "md": (out_dir / "report.md").read_text()}


def raw_lengths(path, tokenizer) -> dict[str, np.ndarray]:
    """Token and character lengths computed straight from a bundled JSONL file."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    inputs = [format_input(r["question"], r["context"]) for r in rows]
    answers = [r["answer"] for r in rows]
    return {
        "answer_tokens": np.array([len(tokenizer(text_target=a)["input_ids"]) for a in answers]),
        "input_tokens": np.array([len(tokenizer(t)["input_ids"]) for t in inputs]),
        "answer_chars": np.array([len(a) for a in answers]),
        "input_chars": np.array([len(t) for t in inputs]),
    }


# --- the bundled data ----------------------------------------------------------------------------------


def test_bundled_counts_match_an_independent_count(bundled, tokenizer, repo_root):
    assert bundled["rc"] == 0, bundled["stderr"]
    report = bundled["report"]
    assert report["max_answer_tokens"] == MAX_ANSWER and report["max_input_tokens"] == MAX_INPUT
    assert list(report["splits"]) == ["train", "validation"]
    job = bundled["job"]
    for split, rows, path in (("train", TRAIN_ROWS, job.data.train_files[0]),
                              ("validation", 100, job.data.validation_files[0])):
        s = report["splits"][split]
        lengths = raw_lengths(Path(path), tokenizer)
        keep = lengths["answer_tokens"] <= MAX_ANSWER
        assert s["rows_read"] == rows and s["usable"] == rows
        assert s["malformed"] == {"total": 0, "by_reason": {}} and s["problems"] == []
        assert 0 < s["filtered_long_answer"] < rows
        assert s["filtered_long_answer"] == int((~keep).sum())
        assert s["kept"] == s["usable"] - s["filtered_long_answer"]
        assert s["truncated_inputs"] == int((lengths["input_tokens"][keep] > MAX_INPUT).sum()) > 0
        for name in MEASURES:
            for when, values in (("before_filtering", lengths[name]), ("after_filtering", lengths[name][keep])):
                stats = s["stats"][when][name]
                assert stats["min"] == values.min() and stats["max"] == values.max(), (split, when, name)
                assert stats["mean"] == pytest.approx(values.mean(), abs=0.01)
                assert stats["median"] == pytest.approx(np.median(values), abs=0.01)
                assert stats["p90"] == pytest.approx(np.percentile(values, 90), abs=0.01)
        assert s["stats"]["after_filtering"]["answer_tokens"]["max"] <= MAX_ANSWER


def test_counts_agree_with_the_training_pipeline(bundled, tokenizer, tmp_path):
    """The point of counting like training: its filter and truncation counts are the same numbers."""
    job = bundled["job"]
    cfg = dataclasses.replace(job.data, cache_dir=str(tmp_path))
    for split in ("train", "validation"):
        examples, data_report, fingerprint = read_split(cfg, split)
        training = DataReport(source=data_report.source)
        tokenize_examples(examples, tokenizer, cfg, training, fingerprint, max_input_tokens=MAX_INPUT,
                          max_answer_tokens=MAX_ANSWER, limit=None, log=lambda _: None)
        s = bundled["report"]["splits"][split]
        assert (s["filtered_long_answer"], s["truncated_inputs"], s["kept"]) == (
            training.dropped_long_answer, training.truncated_inputs, training.kept)


def test_bundled_markdown_and_plots(bundled):
    out, md = bundled["out"], bundled["md"]
    for split in ("train", "validation"):
        s = bundled["report"]["splits"][split]
        row = (f"| {s['rows_read']} | 0 | {s['usable']} | {s['filtered_long_answer']} | {s['kept']} | "
               f"{s['truncated_inputs']} |")
        assert f"## {split}" in md and row in md
        stats = s["stats"]["before_filtering"]["answer_tokens"]
        assert f"| answer tokens (before) | {stats['min']} | {stats['mean']:g} |" in md
        for name in MEASURES:
            filename = f"{split}_{name}.png"
            assert s["plots"][name] == filename
            assert f"]({filename})" in md  # embedded with a relative link
            check_png(out / filename)
    pngs = [f"{split}_{name}.png" for split in ("train", "validation") for name in MEASURES]
    assert sorted(p.name for p in out.iterdir()) == sorted(["report.json", "report.md", *pngs])
    assert f"answer is longer than **{MAX_ANSWER}** tokens" in md


def test_bundled_prints_where_the_report_went(bundled):
    stdout = bundled["stdout"]
    assert f"{bundled['out'] / 'report.md'}" in stdout
    train = bundled["report"]["splits"]["train"]
    assert f"train: {TRAIN_ROWS} rows read, 0 malformed, {train['filtered_long_answer']} filtered" in stdout
    assert f"{train['kept']} kept" in stdout


# --- a mapped layout with malformed rows ---------------------------------------------------------------


def write_mapped(path, n_good: int = 6):
    good = [{"question": f"Why is town {i} known for bells?",
             "answers": [{"text": "Because its bell towers ring. " * (i + 1)}],
             "passages": [{"title": f"Town {i}", "text": "It has bell towers."}, {"text": "No title here."}]}
            for i in range(n_good)]
    lines = [json.dumps(r) for r in good[:3]]
    lines.append("{not json")                                    # line 4
    lines.append(json.dumps({"answers": [{"text": "x"}], "passages": []}))  # line 5: no question
    lines += [json.dumps(r) for r in good[3:]]
    path.write_text("\n".join(lines) + "\n")
    return path


MAPPING = ["data.fields.context=passages", "data.fields.answer=answers.0.text"]


def test_mapped_layout_reports_malformed_rows(tiny_model_path, repo_root, tmp_path, tokenizer):
    data = write_mapped(tmp_path / "mapped.jsonl")
    out = tmp_path / "report"
    rc, stdout, stderr = run_main(["--job", repo_root / "jobs/tiny-cpu.yaml", "--data", data, "--out", out,
                                   f"model.name_or_path={tiny_model_path}", "data.max_answer_tokens=20", *MAPPING])
    assert rc == 0, stderr
    report = json.loads((out / "report.json").read_text())
    assert list(report["splits"]) == ["data"]
    s = report["splits"]["data"]
    assert s["source"] == str(data)
    assert s["rows_read"] == 8 and s["usable"] == 6
    assert s["malformed"] == {"total": 2, "by_reason": {"line is not valid JSON": 1,
                                                         "missing question field 'question'": 1}}
    problems = [f"{data}:4: line is not valid JSON", f"{data}:5: missing question field 'question'"]
    assert s["problems"] == problems
    # Titles are joined into the passages, as training's input has them.
    inputs = [format_input(f"Why is town {i} known for bells?", [f"Town {i}: It has bell towers.", "No title here."])
              for i in range(6)]
    answers = [("Because its bell towers ring. " * (i + 1)).strip() for i in range(6)]
    answer_tokens = [len(tokenizer(text_target=a)["input_ids"]) for a in answers]
    assert s["stats"]["before_filtering"]["input_chars"]["max"] == max(len(t) for t in inputs)
    assert s["stats"]["before_filtering"]["answer_tokens"]["max"] == max(answer_tokens)
    assert s["filtered_long_answer"] == sum(n > 20 for n in answer_tokens) > 0
    md = (out / "report.md").read_text()
    assert "## data" in md and "### Malformed rows" in md
    assert "| line is not valid JSON | 1 |" in md
    for problem in problems:
        assert f"- `{problem}`" in md
    for name in MEASURES:
        check_png(out / f"data_{name}.png")
    assert "data: 8 rows read, 2 malformed" in stdout


def test_overrides_after_data_files_are_overrides(tiny_model_path, repo_root, tmp_path):
    """``--data FILE key=value``: argparse would take the override for a file name; it must not."""
    data = write_mapped(tmp_path / "mapped.jsonl")
    out = tmp_path / "report"
    rc, _, stderr = run_main(["--job", repo_root / "jobs/tiny-cpu.yaml", "--out", out, "--data", data,
                              f"model.name_or_path={tiny_model_path}", *MAPPING])
    assert rc == 0, stderr
    s = json.loads((out / "report.json").read_text())["splits"]["data"]
    assert s["source"] == str(data) and s["usable"] == 6


def test_every_row_filtered_still_writes_a_report(tiny_model_path, repo_root, tmp_path):
    """A limit that drops everything is what this command should reveal, not crash on."""
    data = write_mapped(tmp_path / "mapped.jsonl")
    out = tmp_path / "report"
    rc, stdout, stderr = run_main(["--job", repo_root / "jobs/tiny-cpu.yaml", "--data", data, "--out", out,
                                   f"model.name_or_path={tiny_model_path}", "data.max_answer_tokens=1", *MAPPING])
    assert rc == 0, stderr
    s = json.loads((out / "report.json").read_text())["splits"]["data"]
    assert s["kept"] == 0 and s["filtered_long_answer"] == 6
    assert all(v is None for v in s["stats"]["after_filtering"].values())
    assert "no rows left after filtering" in stdout
    assert "| answer tokens (after) | - | - | - | - | - | - |" in (out / "report.md").read_text()
    check_png(out / "data_answer_tokens.png")


# --- command line errors -------------------------------------------------------------------------------


def test_bad_override_key_is_a_config_error(repo_root, tmp_path):
    rc, stdout, stderr = run_main(["--job", repo_root / "jobs/tiny-cpu.yaml", "--out", tmp_path / "r",
                                   "data.max_answer_tokenz=5"])
    assert rc == 2
    assert stderr.startswith("lfqa: error: ") and stderr.count("\n") == 1
    assert "data.max_answer_tokenz" in stderr
    assert not (tmp_path / "r").exists()


def test_missing_data_file_is_a_data_error(tiny_model_path, repo_root, tmp_path):
    missing = tmp_path / "nope.jsonl"
    rc, stdout, stderr = run_main(["--job", repo_root / "jobs/tiny-cpu.yaml", "--data", missing,
                                   "--out", tmp_path / "r", f"model.name_or_path={tiny_model_path}"])
    assert rc == 1
    assert stderr == f"lfqa: error: {missing}: no such file\n"
    assert not (tmp_path / "r").exists()


def test_missing_model_is_a_model_error(repo_root, tmp_path):
    data = write_mapped(tmp_path / "mapped.jsonl")
    rc, _, stderr = run_main(["--job", repo_root / "jobs/tiny-cpu.yaml", "--data", data, "--out", tmp_path / "r",
                              f"model.name_or_path={tmp_path / 'no-model'}", *MAPPING])
    assert rc == 1
    assert stderr == f"lfqa: error: {tmp_path / 'no-model'}: no such model folder\n"


def test_data_and_split_are_exclusive(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--data", "x.jsonl", "--split", "train"])
    assert exc.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_module_help_runs(repo_root):
    result = subprocess.run([sys.executable, "-m", "lfqa.data_report", "--help"], cwd=repo_root,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "--data FILE" in result.stdout and "--split {train,validation,both}" in result.stdout
