"""The tiny job as `make train` runs it logs to W&B offline; the run file holds what metrics.jsonl holds."""

from __future__ import annotations

import json

import pytest
from conftest import TRAINED_STEPS
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
                "eval/loss", "eval/rougeL", "eval/fact_recall", "eval/fact_recall_ci_high"):
        jsonl = {r["step"]: r[key] for r in records if key in r}
        assert jsonl, key
        assert run.metric(key) == pytest.approx(jsonl, rel=1e-9), key
    assert sorted(run.metric("eval/loss")) == list(range(0, TRAINED_STEPS + 1, 250))  # eval.loss_every_steps
    assert sorted(run.metric("eval/fact_recall")) == [0, 1000, TRAINED_STEPS]  # eval.every_steps and the end

    # The resolved config, as job.yaml holds it.
    assert run.config["model"]["name_or_path"] == "tiny-led"
    assert run.config["train"]["learning_rate"] == pytest.approx(1e-3)
    assert run.name == run_dir.name and run.project == "lfqa"

    # A table of sample answers at each evaluation, the same as the eval report.
    report = json.loads((run_dir / f"eval-step{TRAINED_STEPS}.json").read_text())
    rows = run.table("eval/samples", TRAINED_STEPS)
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


# --- W&B history across a SIGKILL and a new pod -------------------------------------------------------------------

# One part of a run, as the training loop drives its tracker: log steps, and at the checkpoint step flush W&B and
# copy the files that travel with a checkpoint into it (as CheckpointManager.save copies its extra_files).
PART = r"""
import os, shutil, signal, sys
from pathlib import Path
from lfqa.config import WandbConfig
from lfqa.tracking import WandbTracker

run_dir, first, last, checkpoint_step, checkpoint, resume_id, end = sys.argv[1:8]
tracker = WandbTracker(WandbConfig(), run_dir, {"train": {"learning_rate": 1e-3}}, resume_id=resume_id or None)
print("run id", tracker.run_id, flush=True)
for step in range(int(first), int(last) + 1):
    tracker.log({"train/loss": 1.0 / step}, step)
    if step == int(checkpoint_step):
        assert tracker.flush(timeout=30), "flush timed out"
        files = tracker.files_to_checkpoint()
        assert any(target.endswith(".wandb") for target in files), files
        assert not [t for t in files if "/logs/" in t], files
        for target, source in files.items():
            (Path(checkpoint) / target).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, Path(checkpoint) / target)
if end == "kill":
    os.kill(os.getpid(), signal.SIGKILL)  # no finish, no flush: a node lost
tracker.close()
"""


def run_part(tmp_path, run_dir, steps, checkpoint_step, checkpoint, resume_id="", end="close"):
    import subprocess
    import sys

    from conftest import ROOT, lfqa_env

    env = lfqa_env(wandb_mode="offline", wandb_dir=tmp_path / "wandb-home")
    env["WANDB_CONSOLE"] = "off"
    proc = subprocess.run([sys.executable, "-c", PART, str(run_dir), str(steps[0]), str(steps[-1]),
                           str(checkpoint_step), str(checkpoint), resume_id, end], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    return proc


def test_every_step_up_to_a_checkpoint_survives_a_sigkill_and_a_new_pod(tmp_path):
    """Part 1 is killed 10 steps after its checkpoint at step 20; part 2 starts on an empty disk from that
    checkpoint. The checkpoint's copy and the new pod's files hold every step, in two parts of one run."""
    from lfqa.tracking import WandbTracker

    pod1, pod2, checkpoint = tmp_path / "pod1", tmp_path / "pod2", tmp_path / "step-00000020"
    first = run_part(tmp_path, pod1, range(1, 31), 20, checkpoint, end="kill")
    assert first.returncode == -9, first.stdout[-2000:] + first.stderr[-3000:]
    run_id = first.stdout.split("run id ", 1)[1].split()[0]
    (killed,) = offline_runs(pod1)
    assert not killed.exited and set(range(1, 21)) <= set(killed.metric("train/loss"))  # flushed before the kill
    (copied,) = offline_runs(checkpoint)
    assert copied.run_id == run_id and sorted(copied.metric("train/loss")) == list(range(1, 21))

    # A new pod: nothing on its disk but what the checkpoint brings.
    restored = WandbTracker.restore_files(checkpoint, pod2)
    assert any(p.suffix == ".wandb" for p in restored) and all(p.is_relative_to(pod2 / "wandb") for p in restored)
    assert WandbTracker.restore_files(checkpoint, pod2) == []  # what is there already stays
    second = run_part(tmp_path, pod2, range(21, 41), 30, tmp_path / "step-00000030", resume_id=run_id)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-3000:]

    part1, part2 = offline_runs(pod2)
    assert part1.run_id == part2.run_id == run_id and part2.exited
    assert sorted(part1.metric("train/loss")) == list(range(1, 21))
    assert sorted(part2.metric("train/loss")) == list(range(21, 41))
    assert part2.metric("train/loss")[40] == pytest.approx(1 / 40)
    # The next checkpoint carries both parts, so a third pod would still hold the whole history.
    assert len(offline_runs(tmp_path / "step-00000030")) == 2
