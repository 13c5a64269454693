"""Checkpoint uploads when the bucket fails: nothing lost, no long stall, a loud alarm, and recovery.

The CheckpointManager of one CPU process (an in-process Accelerator, a stand-in model) saves into a run folder
whose bucket sits behind the fault-injecting proxy (tests/s3_server.py): every request failing for a while, or
a server that accepts requests and never answers.

    pytest tests/test_upload_failures.py
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from lfqa.checkpoint import CheckpointInfo, CheckpointManager, list_checkpoints, retained
from lfqa.config import load_job
from lfqa.storage import S3Store


class _Config:
    def __init__(self, name: str):
        self.name = name

    def save_pretrained(self, folder) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / f"{self.name}.json").write_text("{}")


class TinyModel(torch.nn.Linear):
    """What CheckpointManager.save asks of a model: save_state's weights, a config and a generation config."""

    def __init__(self):
        super().__init__(4, 4)
        self.config, self.generation_config = _Config("config"), _Config("generation_config")


class TinyTokenizer:
    def save_pretrained(self, folder) -> None:
        (Path(folder) / "tokenizer.json").write_text("{}")


def manager(tmp_path: Path, remote, lines: list[str], *overrides: str) -> CheckpointManager:
    from accelerate import Accelerator

    job = load_job(ROOT / "jobs" / "tiny-cpu.yaml", [f"output.dir={tmp_path / 'run'}", "checkpoint.keep_last=1",
                                                     "checkpoint.keep_best=0", "checkpoint.upload_wait_seconds=0.5",
                                                     "checkpoint.upload_retry_seconds=0.3",
                                                     "checkpoint.upload_alarm_after=2",
                                                     "checkpoint.s3_max_attempts=2",
                                                     "checkpoint.s3_timeout_seconds=1", *overrides])
    return CheckpointManager(Accelerator(cpu=True), job, tmp_path / "run", remote=remote, log=lines.append)


def save(m: CheckpointManager, step: int) -> float:
    started = time.monotonic()
    m.save(step, {"step": step, "metrics": {}}, TinyTokenizer(), TinyModel())
    return time.monotonic() - started


def wait_for(condition, timeout: float, what: str, lines: list[str]) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {timeout}s; log: {lines[-12:]}"
        time.sleep(0.05)


def names(store, complete: bool = True) -> list[str]:
    return [c.name for c in list_checkpoints(store, with_metrics=False) if c.complete or not complete]


def local_names(m: CheckpointManager) -> list[str]:
    return sorted(p.name for p in (m.run_dir / "checkpoints").iterdir())


@pytest.fixture
def bucket_store(moto_server, s3_env):
    return S3Store(f"s3://{moto_server.make_bucket()}/run", endpoint_url=moto_server.endpoint)


def test_retention_keeps_every_checkpoint_newer_than_the_one_in_the_bucket():
    infos = [CheckpointInfo(f"step-{s:08d}", s, True) for s in (10, 20, 30, 40)]
    assert retained(infos, 1, 0, "eval/loss", "min") == {"step-00000040"}
    assert retained(infos, 1, 0, "eval/loss", "min", keep_newer_than=10) == {"step-00000020", "step-00000030",
                                                                              "step-00000040"}
    assert retained(infos, 1, 0, "eval/loss", "min", keep_newer_than=-1) == {c.name for c in infos}


def test_a_bucket_outage_loses_no_checkpoint_raises_an_alarm_and_the_newest_gets_there(
        bucket_store, fault_proxy, s3_env, tmp_path):
    proxied = S3Store(bucket_store.uri, endpoint_url=fault_proxy.endpoint)
    lines: list[str] = []
    m = manager(tmp_path, proxied, lines, "checkpoint.upload_wait_seconds=5")
    assert m.remote.max_attempts == 2 and m.remote.timeout == 1.0  # checkpoint.s3_* reach the uploads
    save(m, 1)
    wait_for(lambda: m.upload_status()["newest_in_bucket_step"] == 1, 120, "step 1 in the bucket", lines)

    fault_proxy.fail_after(0, "503")  # the bucket is down: every request fails
    save(m, 2)
    wait_for(lambda: m.upload_status()["failed_in_a_row"] >= 1, 120, "a failed upload", lines)
    for step in (3, 4):
        assert save(m, step) < 2, "a save waited for an upload while uploads fail"
    wait_for(lambda: m.upload_status()["alarm"], 120, "the alarm", lines)
    status = m.upload_status()
    json.dumps(status)
    assert status["newest_in_bucket_step"] == 1 and status["newest_local_step"] == 4
    assert status["failed_in_a_row"] >= 2 and status["failures_total"] >= 2 and not status["newest_uploaded"]
    assert "ServiceUnavailable" in status["last_error"] and s3_env["AWS_SECRET_ACCESS_KEY"] not in json.dumps(status)
    alarms = [line for line in lines if line.startswith("ALARM")]
    assert len(alarms) == 1, lines
    assert "failed 2 times in a row" in alarms[0] and "newest there: step 1" in alarms[0], alarms[0]
    assert "newest on this disk: step 4" in alarms[0]
    # keep_last=1, yet nothing newer than the bucket's step 1 left the disk; step 1 itself is safe there.
    assert local_names(m) == ["step-00000002", "step-00000003", "step-00000004"]
    assert names(bucket_store) == ["step-00000001"]

    fault_proxy.heal()  # the bucket answers again: the newest checkpoint is tried again and gets there
    wait_for(lambda: m.upload_status()["newest_in_bucket_step"] == 4, 120, "step 4 in the bucket", lines)
    wait_for(lambda: local_names(m) == ["step-00000004"], 10, "local retention after the upload", lines)
    assert names(bucket_store) == ["step-00000004"]
    status = m.upload_status()
    assert not status["alarm"] and status["failed_in_a_row"] == 0 and status["newest_uploaded"]
    assert any(line.startswith("checkpoint uploads work again") for line in lines), lines
    assert m.close(timeout=30) is True


def test_a_frozen_bucket_holds_a_save_for_at_most_upload_wait_seconds(bucket_store, fault_proxy, tmp_path):
    proxied = S3Store(bucket_store.uri, endpoint_url=fault_proxy.endpoint)
    lines: list[str] = []
    m = manager(tmp_path, proxied, lines, "checkpoint.upload_wait_seconds=1")
    save(m, 1)
    wait_for(lambda: m.upload_status()["newest_in_bucket_step"] == 1, 120, "step 1 in the bucket", lines)

    fault_proxy.fail_after(0, "hang")  # connections accepted, requests read, never an answer
    save(m, 2)
    wait_for(lambda: any(r.outcome == "hang" for r in fault_proxy.records), 30, "the upload to hang", lines)
    seconds = save(m, 3)
    assert 0.9 < seconds < 1 + 2, seconds  # it waited upload_wait_seconds for the stuck upload, not longer
    # The stuck upload fails on the client's own limits (2 tries of 1 s per wait), not after minutes.
    wait_for(lambda: m.upload_status()["failures_total"] >= 1, 30, "the hung upload to fail", lines)
    assert "did not answer in time" in m.upload_status()["last_error"]
    assert {"step-00000002", "step-00000003"} <= set(local_names(m))

    fault_proxy.heal()
    wait_for(lambda: m.upload_status()["newest_in_bucket_step"] == 3, 120, "step 3 in the bucket", lines)
    wait_for(lambda: names(bucket_store) == ["step-00000003"], 10, "retention in the bucket", lines)
    assert m.close(timeout=30) is True


def test_close_says_when_the_newest_checkpoint_never_reached_the_bucket(bucket_store, fault_proxy, tmp_path):
    proxied = S3Store(bucket_store.uri, endpoint_url=fault_proxy.endpoint)
    lines: list[str] = []
    m = manager(tmp_path, proxied, lines, "checkpoint.upload_retry_seconds=0.2")
    save(m, 1)
    wait_for(lambda: m.upload_status()["newest_in_bucket_step"] == 1, 120, "step 1 in the bucket", lines)
    fault_proxy.fail_after(0, "hang")
    save(m, 2)
    started = time.monotonic()
    assert m.close(timeout=3) is False
    assert time.monotonic() - started < 3 + 6
    status = m.upload_status()
    assert (status["newest_in_bucket_step"], status["newest_local_step"], status["newest_uploaded"]) == (1, 2, False)
    assert any("checkpoint step 2 is only on this disk" in line and "the newest in s3://" in line
               and "is step 1" in line for line in lines), lines
    assert local_names(m) == ["step-00000002"] or "step-00000002" in local_names(m)
    fault_proxy.heal()


def test_a_restarted_pod_uploads_the_newest_checkpoint_its_disk_kept(bucket_store, fault_proxy, tmp_path):
    """The bucket was down when the previous pod saved steps 1 and 2 and stopped; the same disk comes back with
    the bucket healthy: after resume, the newest local checkpoint is uploaded before any new one is saved."""
    lines: list[str] = []
    fault_proxy.fail_after(0, "503")
    down = manager(tmp_path, S3Store(bucket_store.uri, endpoint_url=fault_proxy.endpoint), lines)
    save(down, 1)
    save(down, 2)
    assert down.close(timeout=2) is False
    assert names(bucket_store) == [] and local_names(down) == ["step-00000001", "step-00000002"]

    back = manager(tmp_path, bucket_store, lines)
    assert back.upload_status()["newest_uploaded"] is False
    assert back.upload_newest_local() == "step-00000002"
    wait_for(lambda: back.upload_status()["newest_in_bucket_step"] == 2, 60, "step 2 in the bucket", lines)
    assert back.upload_newest_local() is None  # nothing newer than the bucket's any more
    assert back.close(timeout=30) is True
    assert names(bucket_store) == ["step-00000002"]
    wait_for(lambda: local_names(back) == ["step-00000002"], 10, "local retention after the upload", lines)


def test_training_through_a_bucket_outage_alarms_and_ends_with_the_newest_checkpoint_in_the_bucket(
        moto_server, fault_proxy, tmp_path):
    """`python -m lfqa.train` with the bucket failing every request from its first checkpoint until the alarm:
    the run goes on, says so on a line of its own, and once the bucket is back its newest checkpoint gets there."""
    from test_checkpoints import bucket_files, checkpoint_names, s3_env_for, single_cmd, start_and_wait_for

    bucket = moto_server.make_bucket()
    uri = f"s3://{bucket}/run"
    log = tmp_path / "train.log"
    cmd = single_cmd(tmp_path / "run", tmp_path, uri, fault_proxy.endpoint, "train.max_steps=24",
                     "checkpoint.every_steps=2", "checkpoint.keep_last=1", "checkpoint.keep_best=0",
                     "eval.every_steps=0", "checkpoint.upload_alarm_after=2", "checkpoint.upload_retry_seconds=1",
                     "checkpoint.upload_wait_seconds=1", "checkpoint.s3_max_attempts=2",
                     "checkpoint.s3_timeout_seconds=2")
    proc = start_and_wait_for(cmd, tmp_path / "run" / "checkpoints" / "step-00000002" / "COMPLETE", log,
                              env=s3_env_for(moto_server, tmp_path))
    try:
        fault_proxy.fail_after(0, "503")
        deadline = time.monotonic() + 240
        while "ALARM" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.1)
        fault_proxy.heal()
        assert proc.wait(timeout=600) == 0, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    alarms = [line for line in text.splitlines() if "ALARM" in line]
    assert len(alarms) == 1 and alarms[0].startswith(f"ALARM: checkpoint uploads to {uri}/checkpoints failed 2 "
                                                     f"times in a row"), alarms
    assert "checkpoint uploads work again" in text
    files = bucket_files(moto_server, bucket, "run/")
    assert checkpoint_names(files) == {"step-00000024"} and "checkpoints/step-00000024/COMPLETE" in files
    assert "model/model.safetensors" in files
