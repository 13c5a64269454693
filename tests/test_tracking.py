"""Trackers and W&B: real wandb in offline mode in a tmp folder, read back from its .wandb files; no network.

    python -m pytest tests/test_tracking.py -q
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from wandb_records import offline_runs

from lfqa.config import JobConfig, WandbConfig, job_to_dict
from lfqa.tracking import (
    REDACTED,
    ConsoleTracker,
    NullTracker,
    Trackers,
    WandbTracker,
    make_wandb_tracker,
    peak_memory_gb,
    redact,
    resolve_wandb_mode,
    wandb_api_key_configured,
    wandb_sync_command,
)

SAMPLES = [
    {"question": "Why is the sky blue?", "generated": "Rayleigh scattering.", "reference": "Scattering of light."},
    {"question": "What is LED?", "generated": "A model.", "reference": "Longformer Encoder-Decoder."},
]


def wandb_service_processes() -> list[str]:
    """Command lines of wandb-core services started for this test process (it passes ``--pid <ours>``)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            args = cmdline.read_bytes().split(b"\0")
            if any(a.endswith(b"wandb-core") for a in args) and str(os.getpid()).encode() in args:
                found.append(b" ".join(args).decode(errors="replace"))
    return found


def isolate_wandb(mp: pytest.MonkeyPatch, tmp: Path) -> None:
    """No WANDB_* from the caller's shell, no credentials, wandb's caches in tmp, and a dead server URL."""
    for name in list(os.environ):
        if name.startswith("WANDB_"):
            mp.delenv(name)
    mp.setenv("NETRC", str(tmp / "no-netrc"))
    for name in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        mp.setenv(name, str(tmp / name.lower()))
    mp.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # the discard port: any attempt to go online fails at once
    mp.setenv("WANDB_ERROR_REPORTING", "false")
    mp.setenv("WANDB_CONSOLE", "off")  # our own hint lines go to stdout; keep wandb from wrapping it


@pytest.fixture
def wandb_env(monkeypatch, tmp_path):
    isolate_wandb(monkeypatch, tmp_path)
    return tmp_path


def job_config() -> dict:
    config = job_to_dict(JobConfig())
    # A planted secret, a URL with a password, and a value long enough to span two 32 KiB log blocks.
    config["output"]["hf_token"] = "hf_plantedsecret"
    config["output"]["mirror_url"] = "https://user:hunter2@example.com/runs"
    config["notes"] = "x" * 40_000
    return config


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
    """An offline run logged in two parts: steps 1..3 and a table, then resumed with its id for steps 4..6."""
    tmp = tmp_path_factory.mktemp("wandb")
    run_dir = tmp / "run-a"
    cfg = WandbConfig(tags=["test", "tiny"])
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        isolate_wandb(mp, tmp)
        first = make_wandb_tracker(cfg, run_dir, job_config())
        assert isinstance(first, WandbTracker) and first.mode == "offline"
        for step in (1, 2, 3):
            first.log({"train/loss": 1.0 / step, "train/lr": 1e-4 * step}, step)
        first.log({"eval/loss": 0.5}, 3)
        first.log_samples(SAMPLES, 3)
        first.close()
        first.close()  # closing twice is harmless

        second = make_wandb_tracker(cfg, run_dir, job_config(), resume_id=first.run_id)
        for step in (4, 5, 6):
            second.log({"train/loss": 1.0 / step}, step)
        second.close()
        left = wandb_service_processes()
    return {"run_dir": run_dir, "first": first, "second": second, "stdout": out.getvalue(), "services_left": left}


def test_offline_run_holds_metrics_config_and_samples(resumed_run):
    first_run, _ = offline_runs(resumed_run["run_dir"])
    assert first_run.run_id == resumed_run["first"].run_id
    assert first_run.exited
    assert (first_run.project, first_run.name, first_run.tags) == ("lfqa", "run-a", ["test", "tiny"])
    assert first_run.metric("train/loss") == pytest.approx({1: 1.0, 2: 0.5, 3: 1 / 3})
    assert first_run.metric("train/lr") == pytest.approx({1: 1e-4, 2: 2e-4, 3: 3e-4})
    assert first_run.metric("eval/loss") == {3: 0.5}  # logged at the same step: one row

    config = first_run.config
    assert config["output"]["hf_token"] == REDACTED
    assert config["output"]["mirror_url"] == f"https://user:{REDACTED}@example.com/runs"
    assert config["data"]["max_input_tokens"] == JobConfig().data.max_input_tokens  # not a secret
    assert config["notes"] == "x" * 40_000  # a record split over log blocks joins back

    rows = first_run.table("eval/samples", 3)
    assert rows == [{"step": 3, **s} for s in SAMPLES]


def test_resume_continues_the_same_run_id_and_step_axis(resumed_run):
    first_run, second_run = offline_runs(resumed_run["run_dir"])
    # Offline, wandb cannot look the id up: the continuation is a second folder with the same id.
    assert second_run.folder != first_run.folder
    assert second_run.run_id == first_run.run_id == resumed_run["second"].run_id
    assert [row["_step"] for row in second_run.history] == [4, 5, 6]
    assert second_run.metric("train/loss") == pytest.approx({4: 1 / 4, 5: 1 / 5, 6: 1 / 6})


def test_offline_runs_print_a_sync_hint_that_finds_both_parts(resumed_run):
    run_dir = resumed_run["run_dir"]
    hint = wandb_sync_command(run_dir)
    out = resumed_run["stdout"]
    lines = [line for line in out.splitlines() if hint in line]
    # Per part: at the start, why it is offline (auto without an API key); at close(), the run id.
    assert len(lines) == 4 and "no API key" in lines[0] and resumed_run["first"].run_id in lines[1]
    with pytest.MonkeyPatch.context() as mp:
        isolate_wandb(mp, run_dir.parent)
        proc = subprocess.run(f"{Path(sys.executable).parent / 'wandb'} sync --dry-run {hint.split()[-1]}",
                              shell=True, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (proc.stdout + proc.stderr).count(".wandb") == 2


def test_the_files_that_travel_with_a_checkpoint_are_both_parts_of_the_offline_run(resumed_run):
    run_dir = resumed_run["run_dir"]
    other = run_dir / "wandb" / "offline-run-20000101_000000-someotherid"  # another run in the same folder
    (other / "files").mkdir(parents=True)
    (other / "run-someotherid.wandb").write_bytes(b"")
    try:
        files = resumed_run["second"].files_to_checkpoint()
    finally:
        import shutil

        shutil.rmtree(other)
    assert {target.split("/")[1] for target in files} == {run.folder.name for run in offline_runs(run_dir)}
    assert sum(target.endswith(".wandb") for target in files) == 2
    assert not [target for target in files if "/logs/" in target]
    assert all(path == run_dir / target and path.is_file() for target, path in files.items())
    assert any(target.endswith(".table.json") for target in files)  # the samples table travels too


def test_no_wandb_service_outlives_the_run(resumed_run):
    assert resumed_run["services_left"] == []
    assert wandb_service_processes() == []


def test_wandb_mode_env_disabled_starts_nothing(wandb_env, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    tracker = make_wandb_tracker(WandbConfig(mode="online"), wandb_env / "run", {"a": 1})
    assert isinstance(tracker, NullTracker) and tracker.run_id is None
    tracker.log({"train/loss": 1.0}, 1)
    tracker.log_samples(SAMPLES, 1)
    tracker.close()
    assert not (wandb_env / "run").exists()
    assert wandb_service_processes() == []


def test_mode_resolution(tmp_path):
    no_netrc = {"NETRC": str(tmp_path / "absent")}
    assert resolve_wandb_mode("auto", no_netrc) == "offline"
    assert resolve_wandb_mode("auto", {**no_netrc, "WANDB_API_KEY": "k" * 40}) == "online"
    assert resolve_wandb_mode("offline", {**no_netrc, "WANDB_API_KEY": "k" * 40}) == "offline"
    assert resolve_wandb_mode("online", no_netrc) == "online"
    # WANDB_MODE wins over the config, in wandb's spellings too.
    assert resolve_wandb_mode("online", {**no_netrc, "WANDB_MODE": "disabled"}) == "disabled"
    assert resolve_wandb_mode("auto", {**no_netrc, "WANDB_MODE": "dryrun", "WANDB_API_KEY": "k"}) == "offline"
    with pytest.raises(ValueError, match="WANDB_MODE"):
        resolve_wandb_mode("auto", {**no_netrc, "WANDB_MODE": "sometimes"})

    # `wandb login` writes a netrc entry for the W&B host (WANDB_BASE_URL for a private server).
    netrc_file = tmp_path / "netrc"
    netrc_file.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    netrc_file.chmod(0o600)
    assert wandb_api_key_configured({"NETRC": str(netrc_file)})
    assert resolve_wandb_mode("auto", {"NETRC": str(netrc_file)}) == "online"
    assert not wandb_api_key_configured({"NETRC": str(netrc_file), "WANDB_BASE_URL": "https://wandb.example.com"})
    assert not wandb_api_key_configured({"HOME": str(tmp_path / "nobody")})


def test_redact():
    config = {
        "model": {"name_or_path": "allenai/led-base-16384", "max_input_tokens": 2048, "tokenizer": "x"},
        "storage": {"AWS_SECRET_ACCESS_KEY": "abc", "apiKey": "abc", "hfToken": "abc", "password": 123,
                    "credentials": {"user": "u", "pw": "p"}, "api_key": None, "s3_endpoint_url": "http://s3:9000"},
        "urls": ["https://alice:pw@host:8080/path?x=1", "https://host/p?X-Amz-Security-Token=abc&part=2",
                 "s3://bucket/key", "not a url"],
        "data": {"passage_title": "title", "key_count": 3},
    }
    out = redact(config)
    assert out["model"] == config["model"]
    storage = out["storage"]
    assert all(storage[k] == REDACTED for k in ("AWS_SECRET_ACCESS_KEY", "apiKey", "hfToken", "password",
                                                 "credentials"))
    assert storage["api_key"] is None  # an unset secret stays visibly unset
    assert storage["s3_endpoint_url"] == "http://s3:9000"
    assert out["urls"] == [f"https://alice:{REDACTED}@host:8080/path?x=1",
                           f"https://host/p?X-Amz-Security-Token={REDACTED}&part=2", "s3://bucket/key", "not a url"]
    assert out["data"] == {"passage_title": "title", "key_count": REDACTED}  # whole words: key_count looks secret
    assert config["storage"]["apiKey"] == "abc"  # the input is left alone


def test_trackers_fan_out_samples_and_run_id():
    class Recorder:
        run_id = "abc123"

        def __init__(self):
            self.samples = []

        def log(self, metrics, step):
            pass

        def log_samples(self, samples, step):
            self.samples.append((step, samples))

        def close(self):
            pass

    recorder = Recorder()
    trackers = Trackers(ConsoleTracker(), NullTracker(), recorder)
    trackers.log_samples(SAMPLES, 7)  # ConsoleTracker has no log_samples: skipped
    assert recorder.samples == [(7, SAMPLES)]
    assert trackers.run_id == "abc123"
    assert Trackers(ConsoleTracker(), NullTracker()).run_id is None


def test_peak_memory_on_cpu():
    assert 0.001 < peak_memory_gb("cpu") < 1024
