"""Every command, fed damaged inputs of each kind it reads, ends with one line on stderr and a non-zero exit."""

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lfqa.cli import main as lfqa_main

ROOT = Path(__file__).resolve().parent.parent
JOB = str(ROOT / "jobs" / "tiny-cpu.yaml")
ROW = {"question": "Why do bridges sing?", "answer": "Because the wind makes their cables vibrate.",
       "context": ["Cables vibrate in the wind.", "Some bridges hum."]}


def _pdf(path: Path) -> bytes:
    from reportlab.pdfgen import canvas

    c = canvas.Canvas(str(path))
    c.drawString(40, 800, "Bridges hum when the wind makes their cables vibrate.")
    c.save()
    return path.read_bytes()


@pytest.fixture(scope="module")
def bad(tmp_path_factory, tiny_model_path):
    """A folder of damaged inputs: files of every kind the commands read, each broken in its own way."""
    d = tmp_path_factory.mktemp("damaged")
    good_pdf = _pdf(d / "good.pdf")
    (d / "truncated.pdf").write_bytes(good_pdf[: len(good_pdf) // 2])
    # The page's compressed content stream overwritten: the file parses, its text does not.
    start = good_pdf.index(b"stream", good_pdf.index(b"/Filter")) + len(b"stream\n")
    junk = bytes(random.Random(0).randrange(256) for _ in range(40))
    (d / "corrupted.pdf").write_bytes(good_pdf[:start] + junk + good_pdf[start + len(junk):])
    (d / "junk.pdf").write_bytes(os.urandom(3000))
    (d / "text.pdf").write_text("not a pdf at all")
    for name in ("junk.bin", "junk.txt", "junk.jsonl", "junk.json", "junk.parquet", "junk.yaml"):
        (d / name).write_bytes(b"\x00\xff\xfe" + os.urandom(2000))
    (d / "latin1.txt").write_bytes("Caf\xe9 cr\xe8me: why?".encode("latin-1"))
    (d / "latin1.jsonl").write_bytes(json.dumps({**ROW, "question": "Caf\xe9?"}, ensure_ascii=False)
                                     .encode("latin-1") + b"\n")
    (d / "utf16.jsonl").write_text(json.dumps(ROW) + "\n", encoding="utf-16")
    for name in ("empty.txt", "empty.jsonl", "empty.json", "empty.parquet", "empty.yaml", "empty.md"):
        (d / name).write_bytes(b"")
    (d / "list.yaml").write_text("- just\n- a list\n")
    (d / "truncated.yaml").write_text("model:\n  name_or_path: [tiny-led\n")
    (d / "good.jsonl").write_text(json.dumps(ROW) + "\n")
    (d / "folder.jsonl").mkdir()
    (d / "folder.txt").mkdir()
    (d / "a-file").write_text("x")
    # Model folders: empty, junk config, a non-seq2seq config, damaged weights, no tokenizer.
    (d / "model-empty").mkdir()
    (d / "model-junk-config").mkdir()
    (d / "model-junk-config" / "config.json").write_bytes(os.urandom(500))
    (d / "model-bert").mkdir()
    (d / "model-bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    shutil.copytree(tiny_model_path, d / "model-bad-weights")
    (d / "model-bad-weights" / "model.safetensors").write_bytes(os.urandom(4000))
    shutil.copytree(tiny_model_path, d / "model-no-tokenizer")
    for f in (d / "model-no-tokenizer").iterdir():
        if f.name not in ("config.json", "model.safetensors", "generation_config.json"):
            f.unlink()
    shutil.copytree(tiny_model_path, d / "model-bad-job")
    (d / "model-bad-job" / "job.yaml").write_bytes(os.urandom(300))
    # Checkpoint folders for export: incomplete, without hf/, damaged config, damaged weights.
    (d / "ckpt-incomplete").mkdir()
    for name in ("ckpt-no-hf", "ckpt-junk-config", "ckpt-junk-weights"):
        (d / name).mkdir()
        (d / name / "COMPLETE").write_text("")
    shutil.copytree(tiny_model_path, d / "ckpt-junk-config" / "hf")
    (d / "ckpt-junk-config" / "hf" / "config.json").write_text("{broken")
    shutil.copytree(tiny_model_path, d / "ckpt-junk-weights" / "hf")
    (d / "ckpt-junk-weights" / "model.safetensors").write_bytes(os.urandom(4000))
    (d / "run-empty").mkdir()
    (d / "run-junk").mkdir()
    (d / "run-junk" / "metrics.jsonl").write_bytes(os.urandom(1000))
    return d


DOCUMENTS = ["truncated.pdf", "corrupted.pdf", "junk.pdf", "text.pdf", "junk.txt", "junk.bin", "latin1.txt",
             "empty.txt", "empty.md", "folder.txt", "missing.txt"]
DATA_FILES = ["junk.jsonl", "junk.json", "junk.parquet", "latin1.jsonl", "utf16.jsonl", "empty.jsonl", "empty.json",
              "empty.parquet", "folder.jsonl", "missing.jsonl", "a-file", "good.pdf"]
JOB_FILES = ["junk.yaml", "list.yaml", "truncated.yaml", "run-empty", "missing.yaml", "good.pdf"]
MODELS = ["model-empty", "model-junk-config", "model-bert", "model-bad-weights", "model-no-tokenizer", "model-bad-job",
          "a-file", "missing-model", "good.jsonl"]


def cases():
    """(id, argv) with {d} for the damaged folder and {model} for a good tiny model."""
    out = []
    for doc in DOCUMENTS:
        out.append((f"answer-document-{doc}", ["answer", "--model", "{model}", "--question", "Why?",
                                                "--document", "{d}/" + doc]))
    for f in DATA_FILES:
        out.append((f"answer-jsonl-{f}", ["answer", "--model", "{model}", "--jsonl", "{d}/" + f]))
        out.append((f"eval-data-{f}", ["eval", "--model", "{model}", "--data", "{d}/" + f, "--out", "{tmp}/eval"]))
        out.append((f"data-report-{f}", ["data-report", "--job", JOB, "--data", "{d}/" + f, "--out", "{tmp}/r",
                                         "model.name_or_path={model}"]))
    for m in MODELS:
        out.append((f"answer-model-{m}", ["answer", "--model", "{d}/" + m, "--question", "Why?", "--context", "x"]))
        out.append((f"eval-model-{m}", ["eval", "--model", "{d}/" + m, "--data", "{d}/good.jsonl",
                                        "--out", "{tmp}/eval"]))
        if m not in ("model-bad-weights", "model-bad-job"):  # the data report reads the tokenizer only
            out.append((f"data-report-model-{m}", ["data-report", "--job", JOB, "--data", "{d}/good.jsonl",
                                                   "--out", "{tmp}/r", "model.name_or_path={d}/" + m]))
    for j in JOB_FILES:
        out += [(f"{cmd}-job-{j}", [cmd, "{d}/" + j]) for cmd in ("train", "check-job")]
        out.append((f"plan-job-{j}", ["plan", "{d}/" + j, "--gpus", "1", "--gpu-memory", "80"]))
        out.append((f"data-report-job-{j}", ["data-report", "--job", "{d}/" + j]))
        out.append((f"eval-job-{j}", ["eval", "--model", "{model}", "--job", "{d}/" + j, "--data", "{d}/good.jsonl"]))
    for c in ["ckpt-incomplete", "ckpt-no-hf", "ckpt-junk-config", "ckpt-junk-weights", "a-file", "missing-ckpt"]:
        out.append((f"export-{c}", ["export", "{d}/" + c, "--out", "{tmp}/exported"]))
    # An empty job file is the defaults: training them reads the default hub data set, which is offline here.
    out.append(("train-job-empty.yaml", ["train", "{d}/empty.yaml", "output.dir={tmp}/run"]))
    out.append(("data-report-job-empty.yaml", ["data-report", "--job", "{d}/empty.yaml"]))
    for r in ["run-empty", "a-file", "missing-run"]:
        out.append((f"plot-{r}", ["plot", "{d}/" + r, "--out", "{tmp}/curves.png"]))
    out.append(("plot-run-junk", ["plot", "{d}/run-junk", "--out", "{tmp}/curves.png"]))
    out.append(("checkpoints-pull-missing-run", ["checkpoints", "pull", "{d}/missing-run", "--out", "{tmp}/c"]))
    out.append(("checkpoints-list-missing-run", ["checkpoints", "list", "{d}/missing-run"]))
    # Output paths of the wrong kind: a file where a folder is written, a folder where a file is.
    out += [
        ("eval-out-is-a-file", ["eval", "--model", "{model}", "--data", "{d}/good.jsonl", "--out", "{d}/a-file"]),
        ("data-report-out-is-a-file", ["data-report", "--job", JOB, "--data", "{d}/good.jsonl", "--out", "{d}/a-file",
                                       "model.name_or_path={model}"]),
        ("answer-out-is-a-folder", ["answer", "--model", "{model}", "--jsonl", "{d}/good.jsonl",
                                    "--out", "{d}/run-empty"]),
        ("export-out-is-a-file", ["export", "{d}/ckpt-junk-weights", "--out", "{d}/a-file"]),
        ("build-tiny-out-is-a-file", ["build-tiny", "--out", "{d}/a-file"]),
        ("eval-s3-model-no-bucket", ["eval", "--model", "s3://", "--data", "{d}/good.jsonl"]),
    ]
    return out


CASES = [c if hasattr(c, "marks") else pytest.param(*c) for c in cases()]


@pytest.mark.parametrize("case_id, argv", CASES, ids=[c.values[0] for c in CASES])
def test_damaged_input_is_one_line_and_a_nonzero_exit(case_id, argv, bad, tiny_model_path, tmp_path, capsys,
                                                      monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative cache folders of the default job land here, not in the repository
    argv = [a.format(d=bad, model=tiny_model_path, tmp=tmp_path) for a in argv]
    code = lfqa_main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code != 0, err
    assert len(lines) == 1, err
    assert "Traceback" not in err and "error: unexpected " not in err, err
    prefix = "lfqa: error: "
    assert lines[0].startswith(prefix), err


def test_messages_name_the_file_and_the_problem(bad, tiny_model_path, capsys):
    expected = {
        ("answer", "--document", "truncated.pdf"): "truncated.pdf: not a readable PDF",
        ("answer", "--document", "latin1.txt"): "latin1.txt: not a UTF-8 text file",
        ("answer", "--document", "folder.txt"): "folder.txt: is a folder, expected a .txt, .md or .pdf file",
        ("answer", "--jsonl", "empty.jsonl"): "empty.jsonl: no questions (the file is empty)",
        ("answer", "--jsonl", "utf16.jsonl"): "utf16.jsonl: not a UTF-8 text file",
    }
    for (cmd, option, name), message in expected.items():
        args = [cmd, "--model", str(tiny_model_path), option, str(bad / name)]
        if option == "--document":
            args += ["--question", "Why?"]
        assert lfqa_main(args) == 1
        assert message in capsys.readouterr().err
    assert lfqa_main(["answer", "--model", str(bad / "model-empty"), "--question", "Why?", "--context", "x"]) == 1
    assert capsys.readouterr().err == (f"lfqa: error: {bad / 'model-empty'}: not a model folder (no config.json; "
                                       "save_pretrained writes one)\n")


def test_a_bug_is_one_line_with_the_traceback_in_a_file(monkeypatch, tmp_path, capsys, tiny_model_path):
    import lfqa.answer

    def broken(path):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(lfqa.answer, "read_document", broken)
    monkeypatch.setenv("LFQA_TRACEBACK_DIR", str(tmp_path))
    argv = ["answer", "--model", str(tiny_model_path), "--question", "Why?", "--document", "x.txt"]
    assert lfqa_main(argv) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lfqa: error: unexpected ZeroDivisionError: division by zero")
    saved = next(tmp_path.glob("lfqa-traceback-*.txt"))
    assert str(saved) in lines[0] and "--debug prints it" in lines[0]
    assert "Traceback (most recent call last)" in saved.read_text() and "in broken" in saved.read_text()
    # --debug anywhere on the line: the traceback itself, also through a nested handler (lfqa -> lfqa.answer).
    assert lfqa_main(["--debug", *argv]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "ZeroDivisionError: division by zero" in err


def run_entry(args, tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
           "LFQA_TRACEBACK_DIR": str(tmp_path)}
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.parametrize("args", [
    ["-m", "lfqa.cli", "answer", "--model", "{d}/model-junk-config", "--question", "Why?", "--context", "x"],
    ["-m", "lfqa.cli", "eval", "--model", "{model}", "--data", "{d}/junk.parquet"],
    ["-m", "lfqa.data_report", "--job", "{d}/junk.yaml"],
    ["-m", "lfqa.export", "{d}/ckpt-junk-weights", "--out", "{tmp}/out"],
    ["-m", "lfqa.train", "{d}/truncated.yaml"],
    ["-m", "lfqa.train", JOB, "data.train_files=[{d}/junk.jsonl]", "output.dir={tmp}/run",
     "model.name_or_path={model}", "data.cache_dir={tmp}/datasets"],
], ids=["lfqa-answer", "lfqa-eval", "data-report", "export", "train-job", "train-data"])
def test_real_entry_points(args, bad, tiny_model_path, tmp_path):
    proc = run_entry([a.format(d=bad, model=tiny_model_path, tmp=tmp_path) for a in args], tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[-1].startswith("lfqa: error: ") and "error: unexpected " not in lines[-1], proc.stderr[-3000:]
    if "train" not in args[1]:  # training prints its start-up lines before it reads the data
        assert len(lines) == 1, proc.stderr[-3000:]
