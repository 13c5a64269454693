"""Checkpoints: retention, exact resume after SIGKILL / SIGTERM under ZeRO-2, S3 sync, cut uploads, bad buckets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, cache_overrides, free_port, lfqa_env

from lfqa.checkpoint import CheckpointInfo, retained

ACCELERATE = str(Path(sys.executable).parent / "accelerate")
# 96 rows in batches of 4 on 2 ranks: 12 steps an epoch, so 60 steps cross four epoch boundaries. Tiny steps
# take ~20 ms: the run is long enough that a kill after the first checkpoint lands before the end.
RESUME_JOB = ["train.max_steps=60", "train.warmup_steps=5", "data.max_train_samples=96", "eval.at_start=false",
              "eval.every_steps=0", "eval.max_generate_samples=4", "data.max_eval_samples=8",
              "eval.generation.max_new_tokens=8", "tracking.progress_bar=false", "tracking.log_every_steps=1",
              "checkpoint.every_steps=7", "checkpoint.keep_last=2", "checkpoint.keep_best=0"]


def test_retention_keeps_newest_and_best_and_in_flight():
    infos = [CheckpointInfo("step-00000010", 10, True, {"eval/loss": 3.0}),
             CheckpointInfo("step-00000020", 20, True, {"eval/loss": 2.0}),
             CheckpointInfo("step-00000030", 30, True, {"eval/loss": 2.5}),
             CheckpointInfo("step-00000035", 35, False),  # a crash leftover, older than the newest complete
             CheckpointInfo("step-00000040", 40, True, {}),
             CheckpointInfo("step-00000050", 50, True, {"eval/loss": 2.6}),
             CheckpointInfo("step-00000060", 60, False)]  # being saved or uploaded right now
    assert retained(infos, 2, 1, "eval/loss", "min") == {"step-00000040", "step-00000050", "step-00000020",
                                                         "step-00000060"}
    assert retained(infos, 1, 0, "eval/loss", "min") == {"step-00000050", "step-00000060"}
    assert retained(infos, 1, 2, "eval/loss", "max") == {"step-00000050", "step-00000010", "step-00000060"}
    assert retained(infos, 1, 1, "eval/rougeL", "max") == {"step-00000050", "step-00000060"}  # nobody has it


def launch_cmd(config: str, run_dir: Path, tmp: Path, *extra: str) -> list[str]:
    return [ACCELERATE, "launch", "--config_file", f"accelerate_configs/{config}.yaml", "--main_process_port",
            str(free_port()), "-m", "lfqa.train", "jobs/tiny-cpu.yaml", f"output.dir={run_dir}", *RESUME_JOB,
            *cache_overrides(tmp), *extra]


def run_to_end(cmd: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=env or lfqa_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def start_and_wait_for(cmd: list[str], marker: Path, log: Path, env: dict | None = None, timeout: float = 300):
    """Start a run (output to ``log``) and return it once ``marker`` exists."""
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env or lfqa_env(), stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"run ended (rc {proc.returncode}) before {marker}:\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            kill_tree(proc)
            raise AssertionError(f"{marker} did not appear within {timeout}s")
        time.sleep(0.02)
    return proc


def descendants(pid: int) -> list[int]:
    """All processes below ``pid`` (torch elastic starts its workers in sessions of their own)."""
    out, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            out += children
            todo += children
    return out


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every worker at once, as when a node is lost."""
    pids = [proc.pid, *descendants(proc.pid)]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() and "zombie" not in _state(pid) for pid in pids):
        assert time.monotonic() < deadline, "processes survived SIGKILL"
        time.sleep(0.05)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0].lower()
    except (OSError, IndexError):
        return "zombie"


def final_weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "model" / "model.safetensors"))


def train_curve(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "train/loss" in r]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def assert_same_training(a: Path, b: Path) -> None:
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    diff = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert diff <= 1e-6, f"resumed weights differ by {diff}"
    ca, cb = train_curve(a), train_curve(b)
    assert ca.keys() == cb.keys() == set(range(1, 61))
    for step in ca:
        assert cb[step] == pytest.approx(ca[step], abs=1e-6), f"loss differs at step {step}"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference: the resume job under ZeRO-2, 2 processes, never stopped."""
    tmp = tmp_path_factory.mktemp("reference")
    run_to_end(launch_cmd("zero2-cpu", tmp / "run", tmp))
    return tmp / "run"


@pytest.mark.distributed
def test_zero2_resume_after_sigkill_matches_an_uninterrupted_run(uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    cmd = launch_cmd("zero2-cpu", run_dir, tmp_path)
    proc = start_and_wait_for(cmd, run_dir / "checkpoints" / "step-00000007" / "COMPLETE", tmp_path / "first.log")
    kill_tree(proc)  # no warning, no cleanup: a node lost
    assert not (run_dir / "model").exists()
    resumed = run_to_end(cmd)
    out = resumed.stdout + resumed.stderr
    assert "resuming from" in out and "resumed at step" in out, out[-3000:]
    step = json.loads((run_dir / "summary.json").read_text())["resumed_from"]["step"]
    assert step in range(7, 60, 7)
    assert_same_training(uninterrupted, run_dir)
    # Retention: the newest two complete checkpoints (56 and the final 60), nothing else.
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-00000056", "step-00000060"]


# --- S3: a real server on loopback (moto), a fault-injecting proxy in front of it ----------------------------

PYTHON = sys.executable
SINGLE_JOB = ["train.warmup_steps=2", "data.max_train_samples=48", "eval.at_start=false",
              "eval.max_generate_samples=2", "data.max_eval_samples=4", "eval.generation.max_new_tokens=8",
              "tracking.progress_bar=false", "tracking.log_every_steps=1"]


def single_cmd(run_dir: Path, tmp: Path, uri: str, endpoint: str, *extra: str) -> list[str]:
    return [PYTHON, "-m", "lfqa.train", "jobs/tiny-cpu.yaml", f"output.dir={run_dir}", f"output.uri={uri}",
            f"output.s3_endpoint_url={endpoint}", *SINGLE_JOB, *cache_overrides(tmp), *extra]


def s3_env_for(moto_server, tmp: Path, wandb_mode: str = "disabled") -> dict:
    from s3_server import s3_env_vars

    return {**lfqa_env(wandb_mode, tmp / "wandb-home"), **s3_env_vars(moto_server.endpoint)}


def bucket_files(moto_server, bucket: str, prefix: str) -> dict[str, bytes]:
    s3 = moto_server.client()
    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            out[obj["Key"][len(prefix):]] = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
    return out


def checkpoint_names(files: dict[str, bytes]) -> set[str]:
    return {k.split("/")[1] for k in files if k.startswith("checkpoints/")}


def test_a_cut_upload_is_never_resumed(moto_server, tmp_path):
    from s3_server import FaultProxy

    bucket = moto_server.make_bucket()
    uri = f"s3://{bucket}/run"
    env = s3_env_for(moto_server, tmp_path)
    with FaultProxy(moto_server.endpoint) as proxy:
        # The last checkpoint's optimizer state never gets through (the store is gone for it); the rest does.
        proxy.fail_matching("step-00000010/optimizer", "slowdown")
        cmd = single_cmd(tmp_path / "pod1", tmp_path, uri, proxy.endpoint, "train.max_steps=10",
                         "checkpoint.every_steps=5", "eval.every_steps=0")
        proc = start_and_wait_for(cmd, tmp_path / "pod1" / "checkpoints" / "step-00000010" / "COMPLETE",
                                  tmp_path / "pod1.log", env=env)
        deadline = time.monotonic() + 120
        while not (any("step-00000010/optimizer" in r.path for r in proxy.injected())
                   and "checkpoints/step-00000010/model.safetensors" in bucket_files(moto_server, bucket, "run/")):
            assert time.monotonic() < deadline, (tmp_path / "pod1.log").read_text()[-3000:]
            time.sleep(0.1)
        kill_tree(proc)  # the pod dies while its last upload is half done
    files = bucket_files(moto_server, bucket, "run/")
    assert "checkpoints/step-00000005/COMPLETE" in files
    assert "checkpoints/step-00000010/model.safetensors" in files
    assert "checkpoints/step-00000010/COMPLETE" not in files

    listing = subprocess.run([PYTHON, "-m", "lfqa.cli", "checkpoints", "list", uri, "--s3-endpoint-url",
                              moto_server.endpoint], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0, listing.stderr
    lines = {line.split()[0]: line for line in listing.stdout.splitlines() if line.startswith("step-")}
    assert "incomplete" in lines["step-00000010"] and "<- resume" in lines["step-00000005"]

    # A new pod (empty disk) with the same command resumes from the last complete checkpoint in the bucket.
    resumed = run_to_end(single_cmd(tmp_path / "pod2", tmp_path, uri, moto_server.endpoint, "train.max_steps=10",
                                    "checkpoint.every_steps=5", "eval.every_steps=0"), env=env)
    assert f"resuming from {uri}/checkpoints/step-00000005" in resumed.stdout + resumed.stderr
    files = bucket_files(moto_server, bucket, "run/")
    assert "checkpoints/step-00000010/COMPLETE" in files and "summary.json" in files
    assert "model/model.safetensors" in files


def test_training_through_a_faulty_store_keeps_every_checkpoint_intact_and_retains_newest_and_best(
        moto_server, tmp_path):
    from s3_server import FaultProxy

    bucket = moto_server.make_bucket()
    uri = f"s3://{bucket}/run"
    env = s3_env_for(moto_server, tmp_path)
    run_dir = tmp_path / "run"
    with FaultProxy(moto_server.endpoint, fault_rate=0.2, seed=4) as proxy:
        # "Best" by the highest eval loss, so that an old checkpoint (step 5) must survive among the newest.
        run_to_end(single_cmd(run_dir, tmp_path, uri, proxy.endpoint, "train.max_steps=20",
                              "checkpoint.every_steps=5", "eval.every_steps=5", "checkpoint.keep_last=2",
                              "checkpoint.keep_best=1", "checkpoint.best_metric=eval/loss",
                              "checkpoint.best_mode=max"), env=env)
        faults = proxy.injected()
    assert len(faults) >= 5, "the proxy injected too few faults to prove anything"
    losses = {s: json.loads((run_dir / f"eval-step{s}.json").read_text())["loss"] for s in (5, 10, 15)}
    worst = max(losses, key=losses.get)
    expected = {f"step-{s:08d}" for s in (worst, 15, 20)}
    files = bucket_files(moto_server, bucket, "run/")
    assert checkpoint_names(files) == expected
    assert {p.name for p in (run_dir / "checkpoints").iterdir()} == expected
    for name in expected:  # every retained checkpoint is complete and byte-identical to the local one
        local = {p.relative_to(run_dir).as_posix(): p.read_bytes()
                 for p in (run_dir / "checkpoints" / name).rglob("*") if p.is_file()}
        remote = {k: v for k, v in files.items() if k.startswith(f"checkpoints/{name}/")}
        assert remote == local
        assert f"checkpoints/{name}/COMPLETE" in remote


@pytest.mark.parametrize("problem", ["missing bucket", "bad credentials", "unreachable endpoint", "no credentials"])
def test_storage_problems_stop_the_run_before_training(problem, moto_server, tmp_path):
    from s3_server import free_port as s3_free_port

    bucket = moto_server.make_bucket()
    env = s3_env_for(moto_server, tmp_path)
    endpoint = moto_server.endpoint
    uri = f"s3://{bucket}/run"
    secret = "wrong-secret-for-a-test-0123456789"
    if problem == "missing bucket":
        uri = "s3://no-such-bucket-here/run"
    elif problem == "unreachable endpoint":
        endpoint = f"http://127.0.0.1:{s3_free_port()}"
    elif problem == "no credentials":
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
            env.pop(name, None)
    cmd = single_cmd(tmp_path / "run", tmp_path, uri, endpoint, "train.max_steps=2")
    if problem == "bad credentials":
        env.update(AWS_ACCESS_KEY_ID="AKIAUNKNOWNKEY123456", AWS_SECRET_ACCESS_KEY=secret)
        with moto_server.iam_auth():
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    else:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("lfqa: error:")]
    assert len(errors) == 1 and "output.uri" in errors[0], proc.stderr[-2000:]
    expected = {"missing bucket": "does not exist", "bad credentials": "InvalidAccessKeyId",
                "unreachable endpoint": "cannot connect", "no credentials": "credentials"}[problem]
    assert expected in errors[0]
    assert secret not in proc.stdout + proc.stderr
    assert "train:" not in proc.stdout and not (tmp_path / "run" / "checkpoints").exists()  # nothing trained


def test_model_and_data_from_a_bucket(moto_server, s3_env, tiny_model_path, tmp_path):
    """Clusters without hub access stage weights and data in a bucket: model.name_or_path and data files as s3://."""
    from lfqa.storage import S3Store

    bucket = moto_server.make_bucket()
    env = s3_env_for(moto_server, tmp_path)
    store = S3Store(f"s3://{bucket}/staged", endpoint_url=moto_server.endpoint)
    store.upload_dir(tiny_model_path, "tiny")
    for name in ("tiny_train.jsonl", "tiny_validation.jsonl"):
        store.upload_file(ROOT / "lfqa" / "data" / name, f"data/{name}")
    cmd = [PYTHON, "-m", "lfqa.train", "jobs/tiny-cpu.yaml", f"output.dir={tmp_path / 'run'}",
           f"model.name_or_path=s3://{bucket}/staged/tiny", f"output.s3_endpoint_url={moto_server.endpoint}",
           f"data.train_files=[s3://{bucket}/staged/data/tiny_train.jsonl]",
           f"data.validation_files=[s3://{bucket}/staged/data/tiny_validation.jsonl]",
           "train.max_steps=2", "eval.every_steps=0", *SINGLE_JOB, *cache_overrides(tmp_path)]
    out = run_to_end(cmd, env=env)
    text = out.stdout + out.stderr
    assert f"model s3://{bucket}/staged/tiny" in text
    assert "tiny_train.jsonl: 12000 rows read" in text and "tiny_validation.jsonl: 100 rows read" in text
    from transformers import AutoModelForSeq2SeqLM

    trained = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "run" / "model")
    assert sum(p.numel() for p in trained.parameters()) == sum(
        p.numel() for p in AutoModelForSeq2SeqLM.from_pretrained(tiny_model_path).parameters())
    missing = run_single_error(cmd[:-len(cache_overrides(tmp_path))] + cache_overrides(tmp_path) +
                               [f"data.train_files=[s3://{bucket}/staged/data/nope.jsonl]"], env)
    assert "nope.jsonl" in missing and missing.startswith("lfqa: error: s3://")


def run_single_error(cmd: list[str], env: dict) -> str:
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stderr.strip().splitlines()[-1]


@pytest.mark.distributed
def test_zero2_sigterm_checkpoints_uploads_and_a_new_pod_resumes_from_the_bucket(uninterrupted, moto_server,
                                                                                  tmp_path):
    """Kubernetes' preemption: SIGTERM to the launcher, which passes it to its workers; then a new pod."""
    from wandb_records import offline_runs

    bucket = moto_server.make_bucket()
    uri = f"s3://{bucket}/run"
    env = s3_env_for(moto_server, tmp_path, wandb_mode="offline")
    remote = [f"output.uri={uri}", f"output.s3_endpoint_url={moto_server.endpoint}"]
    pod1, pod2 = tmp_path / "pod1", tmp_path / "pod2"
    proc = start_and_wait_for(launch_cmd("zero2-cpu", pod1, tmp_path, *remote),
                              pod1 / "checkpoints" / "step-00000007" / "COMPLETE", tmp_path / "pod1.log", env=env)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    log = (tmp_path / "pod1.log").read_text()
    assert "SIGTERM received" in log, log[-3000:]
    preempted = json.loads((pod1 / "preempted.json").read_text())
    step = preempted["step"]
    assert preempted["uploaded"] and 7 <= step < 60
    # torch's launcher reports its workers' 75 as 1 (k8s/entrypoint.sh maps it back: tests/test_k8s.py).
    assert proc.returncode != 0
    name = f"step-{step:08d}"
    assert (pod1 / "checkpoints" / name / "COMPLETE").exists()  # a checkpoint at the step where it stopped
    files = bucket_files(moto_server, bucket, "run/")
    assert f"checkpoints/{name}/COMPLETE" in files and "model/model.safetensors" not in files

    resumed = run_to_end(launch_cmd("zero2-cpu", pod2, tmp_path, *remote), env=env)
    assert f"resuming from {uri}/checkpoints/{name}" in resumed.stdout + resumed.stderr
    assert_same_training(uninterrupted, pod2)
    files = bucket_files(moto_server, bucket, "run/")
    assert checkpoint_names(files) == {"step-00000056", "step-00000060"}
    assert "model/model.safetensors" in files and "summary.json" in files

    # One W&B run across the restart: the same id, and the second part continues the step axis. The new pod
    # also holds the first part (it travelled with the checkpoint), so its disk has the whole offline history.
    (first,), (restored, second) = offline_runs(pod1), offline_runs(pod2)
    assert first.run_id == restored.run_id == second.run_id
    assert max(first.metric("train/loss")) == step and max(restored.metric("train/loss")) == step
    assert min(second.metric("train/loss")) == step + 1 and max(second.metric("train/loss")) == 60


def test_sigterm_in_one_process_exits_75_after_a_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [PYTHON, "-m", "lfqa.train", "jobs/tiny-cpu.yaml", f"output.dir={run_dir}", *SINGLE_JOB,
           *cache_overrides(tmp_path), "train.max_steps=100000", "checkpoint.every_steps=5", "eval.every_steps=0"]
    proc = start_and_wait_for(cmd, run_dir / "checkpoints" / "step-00000005" / "COMPLETE", tmp_path / "log")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 75, (tmp_path / "log").read_text()[-3000:]
    step = json.loads((run_dir / "preempted.json").read_text())["step"]
    assert (run_dir / "checkpoints" / f"step-{step:08d}" / "COMPLETE").exists()
    assert not (run_dir / "model").exists()


def fake_checkpoint(run_dir: Path, step: int, loss: float | None, complete: bool = True) -> None:
    folder = run_dir / "checkpoints" / f"step-{step:08d}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights %d" % step)
    (folder / "trainer_state.json").write_text(json.dumps({"step": step, "metrics": {"eval/loss": loss}
                                                           if loss is not None else {}}))
    if complete:
        (folder / "COMPLETE").write_text("{}")


def test_checkpoints_cli_lists_pulls_and_prunes_a_run(tmp_path, capsys):
    from lfqa.checkpoints_cli import main

    run = tmp_path / "run"
    for step, loss in ((5, 3.0), (10, 2.0), (15, 2.5)):
        fake_checkpoint(run, step, loss)
    fake_checkpoint(run, 20, None, complete=False)

    assert main(["list", str(run)]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("step-")}
    assert "eval/loss 2.0000" in lines["step-00000010"] and "<- resume" in lines["step-00000015"]
    assert "incomplete" in lines["step-00000020"] and "1 incomplete" in out

    assert main(["pull", str(run), "--out", str(tmp_path / "pulled")]) == 0
    assert (tmp_path / "pulled" / "model.safetensors").read_bytes() == b"weights 15"
    assert main(["pull", str(run), "--step", "20", "--out", str(tmp_path / "x")]) == 1
    assert "incomplete" in capsys.readouterr().err

    assert main(["prune", str(run), "--keep-last", "1", "--keep-best", "1", "--dry-run"]) == 0
    plan = capsys.readouterr().out.split("\n")
    assert "delete step-00000005" in plan and "keep   step-00000010" in plan and "keep   step-00000015" in plan
    assert len(list((run / "checkpoints").iterdir())) == 4  # a dry run deletes nothing
    assert main(["prune", str(run), "--keep-last", "1", "--keep-best", "1"]) == 0
    # The incomplete step 20 is newer than every complete one: it may be a save in progress, so it stays.
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step-00000010", "step-00000015", "step-00000020"]
    assert main(["prune", str(run), "--keep-last", "0"]) == 2


def test_resume_refuses_a_checkpoint_of_other_settings(tmp_path):
    from lfqa.checkpoint import changed_settings
    from lfqa.config import dump_job, load_job

    saved = tmp_path / "job.yaml"
    saved.write_text(dump_job(load_job(ROOT / "jobs" / "tiny-cpu.yaml")))
    # Longer training, another folder, other checkpoint and eval settings: still the same run.
    same = load_job(ROOT / "jobs" / "tiny-cpu.yaml", ["train.max_steps=5000", "output.dir=elsewhere",
                                                      "checkpoint.every_steps=9", "eval.every_steps=7"])
    assert changed_settings(saved, same) == []
    other = load_job(ROOT / "jobs" / "tiny-cpu.yaml", ["train.learning_rate=3e-4", "data.batch_size=2"])
    assert changed_settings(saved, other) == ["data.batch_size: 4 -> 2", "train.learning_rate: 0.001 -> 0.0003"]
    # The speed settings may change; a checkpoint of an older lfqa (without today's keys) still resumes.
    faster = load_job(ROOT / "jobs" / "tiny-cpu.yaml", ["model.encoder_attention=eager", "train.fused_optimizer=false",
                                                       "train.cpu_keep_freed_memory=false"])
    assert changed_settings(saved, faster) == []
    import yaml

    older = yaml.safe_load(saved.read_text())
    del older["model"]["encoder_attention"], older["train"]["fused_optimizer"], older["data"]["max_tokens_per_batch"]
    saved.write_text(yaml.safe_dump(older))
    assert changed_settings(saved, load_job(ROOT / "jobs" / "tiny-cpu.yaml")) == []
    assert changed_settings(saved, load_job(ROOT / "jobs" / "tiny-cpu.yaml", ["data.batch_size=2"])) == [
        "data.batch_size: 4 -> 2"]
