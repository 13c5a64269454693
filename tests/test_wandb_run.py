"""The tiny job as `make train` runs it logs to W&B offline; the run file holds what metrics.jsonl holds."""

from __future__ import annotations

import json

import pytest
from wandb_records import offline_runs


def test_offline_wandb_run_matches_the_jsonl_and_holds_config_and_samples(trained):
    _, run_dir, output = trained
    (run,) = offline_runs(run_dir)
    assert run.exited
    assert "wandb sync" in output  # how to upload the offline run later
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    # Every number of metrics.jsonl is in W&B at the same step, and the other way round.
    for key in ("train/loss", "train/lr", "train/grad_norm", "train/samples_per_s", "train/tokens_per_s",
                "train/input_padding_efficiency", "train/answer_padding_efficiency", "train/peak_memory_gb",
                "eval/loss", "eval/rougeL"):
        jsonl = {r["step"]: r[key] for r in records if key in r}
        assert jsonl, key
        assert run.metric(key) == pytest.approx(jsonl, rel=1e-9), key
    assert sorted(run.metric("eval/loss")) == [0, 600]  # untrained and trained: eval.every_steps is 0

    # The resolved config, as job.yaml holds it.
    assert run.config["model"]["name_or_path"] == "tiny-led"
    assert run.config["train"]["learning_rate"] == pytest.approx(1e-3)
    assert run.name == run_dir.name and run.project == "lfqa"

    # A table of sample answers at each evaluation, the same as the eval report.
    report = json.loads((run_dir / "eval-step600.json").read_text())
    rows = run.table("eval/samples", 600)
    assert [(r["question"], r["generated"], r["reference"]) for r in rows] == [
        (s["question"], s["generated"], s["reference"]) for s in report["samples"]]
    assert len(rows) == len(report["samples"]) > 0
    assert len(run.table("eval/samples", 0)) == len(rows)

    # For users without W&B: the same numbers drawn from metrics.jsonl.
    from lfqa.plot import read_metrics, series

    steps, losses = series(read_metrics(run_dir), "train/loss")
    assert dict(zip(steps, losses)) == pytest.approx(run.metric("train/loss"), rel=1e-9)
    assert (run_dir / "curves.png").stat().st_size > 10_000


def test_no_secret_reaches_the_wandb_files(trained):
    _, run_dir, _ = trained
    blobs = b"".join(p.read_bytes() for p in (run_dir / "wandb").rglob("*") if p.is_file())
    assert b"fake-secret-key-for-tests" not in blobs
    assert blobs  # the files were read
