"""Shared fixtures: everything is built locally; nothing is downloaded."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> Path:
    """A tiny LED + tokenizer written with save_pretrained (the default tiny shape)."""
    from lfqa.config import TinyModelConfig
    from lfqa.modeling import build_tiny_model

    return build_tiny_model(TinyModelConfig(), tmp_path_factory.mktemp("tiny-led"))


@pytest.fixture(scope="session")
def tokenizer(tiny_model_path):
    from lfqa.modeling import load_tokenizer

    return load_tokenizer(str(tiny_model_path))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lfqa_env(wandb_mode: str = "disabled", wandb_dir: Path | None = None) -> dict:
    """Environment for a training subprocess: offline hub, no stray WANDB_* settings.

    W&B is disabled unless a test asks for it (its service costs seconds per run); then wandb's caches go to
    ``wandb_dir`` and its server URL is a dead loopback port, so nothing can go online.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1", WANDB_MODE=wandb_mode)
    env.pop("WORLD_SIZE", None)
    if wandb_dir is not None:
        for name in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
            env[name] = str(wandb_dir / name.lower())
        env.update(WANDB_BASE_URL="http://127.0.0.1:9", WANDB_ERROR_REPORTING="false", NETRC=str(wandb_dir / "netrc"))
    return env


_SHARED_CACHE: Path | None = None


def pytest_configure(config):
    global _SHARED_CACHE
    _SHARED_CACHE = Path(tempfile.mkdtemp(prefix="lfqa-test-cache-"))


def pytest_unconfigure(config):
    if _SHARED_CACHE is not None:
        shutil.rmtree(_SHARED_CACHE, ignore_errors=True)


def cache_overrides(tmp: Path) -> list[str]:
    """Tiny models and tokenised rows in one folder for the whole session, outside the repository's .cache.

    Both are keyed by what they are made from, so tests share them safely; building the tokenizer and
    tokenising the 12,000 bundled training rows once, not in every test, saves minutes."""
    return [f"model.cache_dir={_SHARED_CACHE / 'models'}", f"data.cache_dir={_SHARED_CACHE / 'datasets'}"]


TRAINED_STEPS = 1500
"""The shared training run's length: the default job, cut to one pass over the bundled training rows."""


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """The tiny job trained once on 2 CPU processes through `accelerate launch`, as `make train` runs it.

    Returns (tmp folder, run folder, console output). Shared by the training, eval and answer tests.
    """
    tmp = tmp_path_factory.mktemp("train2")
    run_dir = tmp / "run"
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", "accelerate_configs/cpu.yaml",
           "--main_process_port", str(free_port()), "-m", "lfqa.train", "jobs/tiny-cpu.yaml",
           f"output.dir={run_dir}", f"train.max_steps={TRAINED_STEPS}", "tracking.progress_bar=false",
           # 49 rows in batches of 24: rank 0 evaluates 2 batches, rank 1 one; evaluation must not hang.
           "data.max_eval_samples=49", "eval.batch_size=24", *cache_overrides(tmp)]
    # W&B as `make train` runs it with no API key: offline, files in the run folder.
    env = lfqa_env(wandb_mode="offline", wandb_dir=tmp / "wandb-home")
    env["AWS_SECRET_ACCESS_KEY"] = "fake-secret-key-for-tests"  # must not reach any log (test_wandb_run)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return tmp, run_dir, proc.stdout + proc.stderr


# S3 on loopback (moto server, fault-injecting proxy): fixtures for any test file; helpers via `from s3_server import`.
from s3_server import fault_proxy, moto_server, object_store, s3_bucket, s3_env, seaweedfs_server  # noqa: E402, F401
