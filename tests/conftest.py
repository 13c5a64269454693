"""Shared fixtures: everything is built locally; nothing is downloaded."""

from __future__ import annotations

import os
import socket
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
