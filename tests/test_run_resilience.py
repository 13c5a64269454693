"""`python -m lfqa.train` end to end when things go wrong on a cluster: the bucket goes away for good, the pod is
SIGKILLed and replaced (W&B offline history and metrics.jsonl must survive), and the log is read through a pipe.

    pytest tests/test_run_resilience.py
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

from conftest import ROOT, cache_overrides, lfqa_env
from test_checkpoints import PYTHON, SINGLE_JOB, kill_tree, s3_env_for, single_cmd
from wandb_records import offline_runs

FAST = ["eval.every_steps=0", "checkpoint.keep_best=0"]

def jsonl_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def bucket_keys(moto_server, bucket: str, prefix: str) -> set[str]:
    """Keys only (retention may delete an object between a listing and a read of it)."""
    pages = moto_server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {obj["Key"][len(prefix):] for page in pages for obj in page.get("Contents", [])}


def steps_with(rows: list[dict], key: str) -> list[int]:
    return [r["step"] for r in rows if key in r]


def test_a_bucket_gone_for_good_ends_the_run_with_one_line_saying_where_the_newest_checkpoint_is(
        moto_server, fault_proxy, tmp_path):
    bucket = moto_server.make_bucket()
    uri, run_dir = f"s3://{bucket}/run", tmp_path / "run"
    cmd = single_cmd(run_dir, tmp_path, uri, fault_proxy.endpoint, "train.max_steps=16", "checkpoint.every_steps=2",
                     "checkpoint.keep_last=1", *FAST, "checkpoint.upload_alarm_after=2",
                     "checkpoint.upload_retry_seconds=0.5", "checkpoint.upload_wait_seconds=0.5",
                     "checkpoint.s3_max_attempts=1", "checkpoint.s3_timeout_seconds=1")
    out_path, err_path = tmp_path / "stdout.log", tmp_path / "stderr.log"
    with out_path.open("w") as out, err_path.open("w") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=s3_env_for(moto_server, tmp_path), stdout=out, stderr=err)
    try:
        deadline = time.monotonic() + 300
        while "step-00000002/COMPLETE" not in bucket_keys(moto_server, bucket, "run/checkpoints/"):
            assert proc.poll() is None and time.monotonic() < deadline, err_path.read_text()[-3000:]
            time.sleep(0.02)
        fault_proxy.fail_after(0, "503")  # from here on the bucket answers nothing but errors
        started = time.monotonic()
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    stdout, stderr = out_path.read_text(), err_path.read_text()
    assert rc == 1, stdout[-3000:] + stderr[-3000:]
    assert time.monotonic() - started < 240, "the run took minutes to give up on a dead bucket"  # training too
    assert "Traceback" not in stdout + stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("lfqa: error:")]
    assert len(errors) == 1, stderr[-3000:]
    assert errors[0].startswith("lfqa: error: output.uri: "), errors[0]
    assert (run_dir / "checkpoints" / "step-00000016" / "COMPLETE").exists()
    assert "ALARM" in stdout + stderr

    status = json.loads((run_dir / "summary.json").read_text())["checkpoint_uploads"]
    assert status["alarm"] is True and status["newest_uploaded"] is False, status
    assert status["newest_local_step"] == 16 and status["failed_in_a_row"] >= 2, status
    in_bucket = status["newest_in_bucket_step"]
    assert in_bucket is not None and 2 <= in_bucket < 16, status
    assert fault_proxy.injected(), "no request failed: the test proved nothing"
    # The one line says what is where (last: the known bug above fails here).
    assert "checkpoint step 16" in errors[0] and str(run_dir / "checkpoints") in errors[0], errors[0]
    assert f"the newest in {uri}" in errors[0] and f"step {in_bucket}" in errors[0], errors[0]


def test_offline_wandb_and_metrics_survive_a_sigkill_and_a_new_pod(moto_server, tmp_path):
    bucket = moto_server.make_bucket()
    uri, run_dir = f"s3://{bucket}/run", tmp_path / "pod"
    env = s3_env_for(moto_server, tmp_path, wandb_mode="offline")
    env["WANDB_CONSOLE"] = "off"
    total = 30  # the kill lands a few steps after the first checkpoint (step 5)
    cmd = single_cmd(run_dir, tmp_path, uri, moto_server.endpoint, f"train.max_steps={total}",
                     "checkpoint.every_steps=5", "checkpoint.keep_last=2", *FAST)
    with (tmp_path / "part1.log").open("w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not any(k.endswith("/COMPLETE") for k in bucket_keys(moto_server, bucket, "run/checkpoints/")):
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "part1.log").read_text()[-3000:]
            time.sleep(0.05)
    finally:
        kill_tree(proc)  # a node lost: no flush, no finish
    assert proc.returncode == -9, "the run ended before the kill: make it longer"
    killed_at = max(steps_with(jsonl_rows(run_dir), "train/loss"))
    assert killed_at < total
    shutil.rmtree(run_dir)  # a new pod: an empty disk

    resumed = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, out[-4000:]
    assert f"resuming from {uri}/checkpoints/step-" in out, out[-3000:]
    resumed_step = json.loads((run_dir / "summary.json").read_text())["resumed_from"]["step"]
    assert 5 <= resumed_step < total and resumed_step % 5 == 0

    parts = offline_runs(run_dir)
    assert len(parts) == 2, [p.folder for p in parts]  # the first came back from the checkpoint
    assert parts[0].run_id == parts[1].run_id and parts[1].exited
    assert set(range(1, resumed_step + 1)) <= set(parts[0].metric("train/loss")), sorted(parts[0].metric("train/loss"))
    logged = set().union(*(p.metric("train/loss") for p in parts))
    assert logged == set(range(1, total + 1)), sorted(set(range(1, total + 1)) - logged)

    assert_each_step_once(jsonl_rows(run_dir), total)
    rows = jsonl_rows(run_dir)
    jsonl_loss = {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
    assert all(abs(parts[1].metric("train/loss")[s] - jsonl_loss[s]) < 1e-9 for s in range(resumed_step + 1, total + 1))

    # The finished job run again, as a restarted pod would: on the same disk, then on an empty one.
    for disk in ("the same disk", "an empty disk"):
        if disk == "an empty disk":
            shutil.rmtree(run_dir)
        again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert "Traceback" not in again.stderr, again.stderr[-3000:]
        assert_each_step_once(jsonl_rows(run_dir), total, f"after a rerun of the finished job on {disk}")


def assert_each_step_once(rows: list[dict], total: int, when: str = "") -> None:
    train, evals = steps_with(rows, "train/loss"), steps_with(rows, "eval/loss")
    assert sorted(train) == list(range(1, total + 1)), f"train rows {when}: {train}"
    assert evals == [total], f"eval rows {when}: steps {evals}"  # eval.at_start is false: the end only


def console(tmp_path: Path, *extra: str) -> str:
    """The job's whole console output read through a pipe, as kubectl logs or CI see it."""
    cmd = [PYTHON, "-m", "lfqa.train", "jobs/tiny-cpu.yaml", f"output.dir={tmp_path / 'run'}", *SINGLE_JOB,
           *cache_overrides(tmp_path), "train.max_steps=40", "tracking.log_every_steps=10", *FAST,
           "checkpoint.every_steps=20", "output.overwrite=true", "checkpoint.resume=never", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=lfqa_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          stdin=subprocess.DEVNULL, timeout=600)
    text = proc.stdout.decode()
    assert proc.returncode == 0, text[-3000:]
    return text


def test_a_log_read_through_a_pipe_has_no_progress_bar_frames(tmp_path):
    # SINGLE_JOB turns the bar off; the last setting wins, so "auto" (the default) is what this run uses.
    text = console(tmp_path, "tracking.progress_bar=auto")
    lines = text.splitlines()
    assert len(lines) < 300, f"{len(lines)} lines for a 40-step run:\n" + "\n".join(lines[:40])
    assert [line for line in lines if line.startswith("step ") and "train/loss" in line][-1].startswith("step 40:")

    drawn = console(tmp_path, "tracking.progress_bar=true")  # asked for: the bar is drawn even into a pipe
    frames = [f for f in drawn.split("\r") if f.startswith("train:") and "/40" in f]
    assert len(frames) >= 2, drawn[-2000:]
    # Last: the known bug above fails here.
    assert "\r" not in text, [line for line in text.split("\n") if "\r" in line][:3]
