"""Where metrics go: one small interface, several sinks (console, a JSONL file, Weights & Biases).

Only the main process creates real trackers; the others get :class:`NullTracker`. Every tracker has
``log(metrics, step)`` and ``close()``; ``log_samples(samples, step)`` and ``run_id`` are optional (W&B has
them, :class:`NullTracker` and :class:`Trackers` answer them for any mix).

W&B (``tracking.wandb`` in the job) runs online when an API key is configured, else offline under
``<run folder>/wandb/``; upload an offline run later with ``wandb sync <run folder>/wandb/offline-run-*``.
``WANDB_MODE=disabled make train`` turns it off for one run. Tests: ``python -m pytest tests/test_tracking.py``.
"""

from __future__ import annotations

import copy
import json
import math
import netrc
import os
import re
import resource
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from tqdm.auto import tqdm

if TYPE_CHECKING:
    import torch

    from lfqa.config import WandbConfig


class Tracker(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class NullTracker:
    """Takes every call and does nothing: for ranks other than the main one, and for W&B when it is disabled."""

    run_id: str | None = None

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_samples(self, samples: list[dict], step: int) -> None:
        pass

    def flush(self) -> bool:
        return True

    def files_to_checkpoint(self) -> dict:
        return {}

    def close(self) -> None:
        pass


def _fmt(value: float) -> str:
    if isinstance(value, float) and (abs(value) < 1e-3 or abs(value) >= 1e4) and value != 0 and math.isfinite(value):
        return f"{value:.3e}"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class ConsoleTracker:
    """One line per log call, written through tqdm so that it does not break the progress bar.

    ``prefixes`` limits it to some metrics (evaluation prints its own, richer summary).
    """

    def __init__(self, prefixes: tuple[str, ...] = ("",)):
        self.prefixes = prefixes

    def log(self, metrics: dict[str, float], step: int) -> None:
        shown = {k: v for k, v in metrics.items() if k.startswith(self.prefixes)}
        if shown:
            tqdm.write(f"step {step}: " + " | ".join(f"{k} {_fmt(v)}" for k, v in shown.items()))

    def close(self) -> None:
        pass


class JsonlTracker:
    """Appends ``{"step": ..., "time": ..., **metrics}`` to a JSONL file (``metrics.jsonl`` in the run)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._file.write(json.dumps({"step": step, "time": round(time.time(), 3), **metrics}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class Trackers:
    """Fans one log call out to several trackers."""

    def __init__(self, *trackers: Tracker):
        self.trackers = list(trackers)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for t in self.trackers:
            t.log(metrics, step)

    def log_samples(self, samples: list[dict], step: int) -> None:
        """Generated answers for the trackers that keep them (W&B); the others do not have the method."""
        for t in self.trackers:
            if hasattr(t, "log_samples"):
                t.log_samples(samples, step)

    @property
    def run_id(self) -> str | None:
        """The first tracking run id among the trackers (the W&B run's), stored in checkpoints to resume it."""
        return next((t.run_id for t in self.trackers if getattr(t, "run_id", None) is not None), None)

    def flush(self) -> bool:
        """Everything logged so far on disk, before a checkpoint copies it (trackers without the method are)."""
        return all([t.flush() for t in self.trackers if hasattr(t, "flush")])

    def files_to_checkpoint(self) -> dict:
        """Files a checkpoint must carry so that a new pod still holds the whole history (W&B offline)."""
        out = {}
        for t in self.trackers:
            if hasattr(t, "files_to_checkpoint"):
                out.update(t.files_to_checkpoint())
        return out

    def close(self) -> None:
        for t in self.trackers:
            t.close()


# --- Weights & Biases -------------------------------------------------------------------------------

REDACTED = "<redacted>"
_SECRET_WORDS = {"key", "token", "secret", "secrets", "password", "passwd", "credential", "credentials"}
_SECRET_PARTS = ("secret", "password", "passwd", "credential")
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def _is_secret_name(name: object) -> bool:
    # Whole words (api_key, hfToken, AWS_SECRET_ACCESS_KEY) or glued endings (apikey, authtoken), so that
    # max_input_tokens, tokenizer or passage_title stay visible.
    words = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", str(name)).lower()
    parts = [w for w in re.split(r"[^a-z0-9]+", words) if w]
    glued = "".join(parts)
    return (any(w in _SECRET_WORDS for w in parts) or glued.endswith(("key", "token"))
            or any(p in glued for p in _SECRET_PARTS))


def _redact_url(value: str) -> str:
    try:
        parts = urlsplit(value)
        password = parts.password
    except ValueError:  # a malformed port or netloc: not a URL we can rewrite, so show none of it
        return REDACTED
    netloc = parts.netloc
    if password is not None:
        userinfo, _, hostport = netloc.rpartition("@")
        netloc = f"{userinfo.split(':', 1)[0]}:{REDACTED}@{hostport}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_is_secret_name(k) for k, _ in pairs):
            query = urlencode([(k, REDACTED if _is_secret_name(k) else v) for k, v in pairs], safe="<>")
    if (netloc, query) == (parts.netloc, parts.query):
        return value  # untouched, not re-spelled by urlunsplit
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _is_unset(value: Any) -> bool:
    return value is None or (isinstance(value, str | list | tuple | dict) and len(value) == 0)


def redact(config: Any) -> Any:
    """A copy of ``config`` that is safe to upload: secret-looking keys and URL passwords are ``<redacted>``.

    A key is secret-looking when its name has a word key, token, secret, password or credential
    (case-insensitive, at any depth; ``max_input_tokens`` is not). Its value becomes ``<redacted>`` unless it is
    None or empty, which shows that nothing was set. In string values that are URLs, ``user:password@``
    keeps the user, and query parameters with secret-looking names are redacted.
    """
    if isinstance(config, Mapping):
        return {k: (REDACTED if _is_secret_name(k) and not _is_unset(v) else redact(v)) for k, v in config.items()}
    if isinstance(config, list | tuple):
        return [redact(v) for v in config]
    if isinstance(config, str) and _URL.match(config):
        return _redact_url(config)
    return copy.deepcopy(config)


_WANDB_MODES = ("online", "offline", "disabled")
_WANDB_MODE_ALIASES = {"dryrun": "offline", "run": "online"}  # older spellings that wandb still accepts


def wandb_api_key_configured(env: Mapping[str, str] | None = None) -> bool:
    """Whether W&B has credentials: ``WANDB_API_KEY`` (or an identity token file), or a netrc entry for the
    W&B host (``WANDB_BASE_URL``, default api.wandb.ai) as ``wandb login`` writes. Reads only ``env``
    (default ``os.environ``) and the netrc file it points to; nothing goes over the network.
    """
    env = os.environ if env is None else env
    if env.get("WANDB_API_KEY") or env.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(env.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    path = Path(env["NETRC"]) if env.get("NETRC") else Path(env.get("HOME") or "~") / ".netrc"
    try:
        entry = netrc.netrc(str(path.expanduser())).authenticators(host) if host else None
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def resolve_wandb_mode(configured: str, env: Mapping[str, str] | None = None) -> str:
    """online, offline or disabled: ``WANDB_MODE`` if set, else ``configured``; auto is online with an API key
    (:func:`wandb_api_key_configured`), offline without one."""
    env = os.environ if env is None else env
    forced = (env.get("WANDB_MODE") or "").strip().lower()
    if forced:
        mode = _WANDB_MODE_ALIASES.get(forced, forced)
        if mode not in _WANDB_MODES:
            raise ValueError(f"WANDB_MODE={env['WANDB_MODE']!r}: expected one of {', '.join(_WANDB_MODES)}")
        return mode
    if configured == "auto":
        return "online" if wandb_api_key_configured(env) else "offline"
    if configured not in _WANDB_MODES:
        raise ValueError(f"tracking.wandb.mode={configured!r}: expected auto, {', '.join(_WANDB_MODES)}")
    return configured


def wandb_sync_command(run_dir: str | Path) -> str:
    """The command that uploads every offline W&B run in ``run_dir``; the parts of a resumed run share an id
    and ``wandb sync`` uploads them in start order. (Not ``wandb sync run_dir/wandb``: that also walks the
    ``latest-run`` link and takes one run twice.)"""
    return f"wandb sync {Path(run_dir) / 'wandb' / 'offline-run-*'}"


class WandbTracker:
    """One W&B run for one training job; its files go under ``run_dir/wandb/``.

    The W&B step is the optimizer step. ``resume_id`` (the ``run_id`` stored in the checkpoint) continues the
    same run: online, W&B appends to its history; offline, a new ``offline-run-*`` folder with the same id
    holds the continuation and ``wandb sync`` joins them. W&B drops (with a warning) any step not greater than
    the last one it has, so a job resumed from a checkpoint older than its last log line loses those steps.
    ``config`` (the resolved job config) is logged through :func:`redact`.

    wandb-core keeps the records of the last partial 32 KiB block of the run's ``.wandb`` file in memory until a
    flush (every ``FLUSH_SECONDS`` here, 15 s by wandb's default) and a step's row until a later step is logged:
    a SIGKILL loses them. :meth:`flush` before each checkpoint makes every step up to it reach the file, and
    :meth:`files_to_checkpoint` / :meth:`restore_files` carry the offline run files with the checkpoints, so that
    a new pod with an empty disk still has the whole offline history to ``wandb sync``.
    """

    FLUSH_SECONDS = 1.0

    def __init__(self, cfg: WandbConfig, run_dir: str | Path, config: dict, resume_id: str | None = None):
        import wandb

        self._mode = resolve_wandb_mode(cfg.mode, os.environ)
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)  # else wandb warns that the git root does not exist
        self._run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or cfg.project,
            entity=cfg.entity or os.environ.get("WANDB_ENTITY") or None,
            name=cfg.run_name or os.environ.get("WANDB_NAME") or self.run_dir.resolve().name,
            tags=list(cfg.tags) or None,
            config=redact(config),
            dir=self.run_dir,
            id=resume_id,
            resume="allow",
            mode=self._mode,
            job_type="train",
            settings=wandb.Settings(x_transaction_log_flush_interval=self.FLUSH_SECONDS),
        )
        self._run_id: str = self._run.id
        self._sync_file = Path(self._run.settings.sync_file)
        self._last_step: int | None = None
        self._committed_step: int | None = None
        self._scan = (0, -1)  # (byte offset of the next unread record in the .wandb file, newest step read)
        if self._mode == "offline" and cfg.mode == "auto" and not os.environ.get("WANDB_MODE"):
            tqdm.write(f"wandb: no API key (WANDB_API_KEY or `wandb login`), so logging offline to "
                       f"{self.run_dir / 'wandb'}; upload later with: {wandb_sync_command(self.run_dir)}")

    @property
    def run_id(self) -> str:
        return self._run_id

    @property
    def mode(self) -> str:
        """The resolved mode: online, offline or disabled."""
        return self._mode

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self._run is not None:
            self._run.log(dict(metrics), step=step)
            self._last_step = step

    def log_samples(self, samples: list[dict], step: int) -> None:
        """Generated answers as a table ``eval/samples`` (columns step, question, generated, reference)."""
        if self._run is None or not samples:
            return
        import wandb

        table = wandb.Table(columns=["step", "question", "generated", "reference"],
                            data=[[step, s["question"], s["generated"], s["reference"]] for s in samples])
        self._run.log({"eval/samples": table}, step=step)
        self._last_step = step

    def flush(self, timeout: float = 30.0) -> bool:
        """Make every step logged so far reach the run's ``.wandb`` file; True once it is there.

        Commits the row of the last logged step (a later log call at that same step is then dropped by W&B:
        call this after everything of the step is logged, right before the checkpoint) and waits, at most
        ``timeout`` seconds, until wandb-core has written it, reading the file's new records to know.
        """
        step = self._last_step
        if self._run is None or step is None:
            return True
        if self._committed_step != step:
            self._run.log({}, step=step, commit=True)
            self._committed_step = step
        deadline = time.monotonic() + timeout
        while self._newest_step_in_file() < step:
            if time.monotonic() > deadline:
                tqdm.write(f"wandb: step {step} did not reach {self._sync_file} within {timeout:g}s")
                return False
            time.sleep(0.05)
        return True

    def _newest_step_in_file(self) -> int:
        """The newest history step in the ``.wandb`` file; reads only what was added since the last call.

        The file is a LevelDB-style log (7-byte header, 32 KiB blocks of chunks with a 7-byte header: CRC-32,
        length, type FULL/FIRST/MIDDLE/LAST); a record cut at the end of the file is read again next time.
        """
        import struct

        from wandb.proto import wandb_internal_pb2

        block, header = 32 * 1024, struct.Struct("<IHB")
        offset, newest = self._scan
        try:
            with self._sync_file.open("rb") as f:
                f.seek(offset)
                data = f.read()
        except OSError:
            return newest
        pos, start, record = max(offset, 7), offset, bytearray()
        base = offset
        while True:
            left = block - pos % block
            if left < header.size:
                pos += left
                continue
            if pos + header.size > base + len(data):
                break
            _, length, kind = header.unpack_from(data, pos - base)
            if kind == 0 and length == 0:  # the zeroed rest of a block
                pos += left
                continue
            if pos + header.size + length > base + len(data):
                break
            record += data[pos - base + header.size: pos - base + header.size + length]
            pos += header.size + length
            if kind in (1, 4):  # FULL, LAST: a whole record
                parsed = wandb_internal_pb2.Record()
                parsed.ParseFromString(bytes(record))
                if parsed.WhichOneof("record_type") == "history" and parsed.history.HasField("step"):
                    newest = max(newest, parsed.history.step.num)
                record, start = bytearray(), pos
        self._scan = (max(start, 7), newest)
        return newest

    def files_to_checkpoint(self) -> dict[str, Path]:
        """The files of this run's offline folders (this part's and earlier parts' brought back by
        :meth:`restore_files`) as ``{"wandb/<folder>/<file>": path}``, for ``CheckpointManager.save``'s
        ``extra_files``; W&B's own debug logs are left out. Empty unless offline (online, W&B has the history).
        Call :meth:`flush` first."""
        if self._mode != "offline":
            return {}
        files = {}
        for folder in sorted((self.run_dir / "wandb").glob(f"offline-run-*-{self._run_id}")):
            if not folder.is_dir() or folder.is_symlink():
                continue
            for path in sorted(folder.rglob("*")):
                rel = path.relative_to(folder)
                if path.is_file() and rel.parts[0] != "logs":
                    files[f"wandb/{folder.name}/{rel.as_posix()}"] = path
        return files

    @staticmethod
    def restore_files(checkpoint_dir: str | Path, run_dir: str | Path) -> list[Path]:
        """Bring the offline run files a checkpoint carries (its ``wandb/``) back into ``run_dir/wandb/``, each
        where it is missing (one already there is this disk's own, at least as long). Returns those copied."""
        import shutil

        source = Path(checkpoint_dir) / "wandb"
        restored = []
        for path in sorted(source.rglob("*")) if source.is_dir() else []:
            target = Path(run_dir) / "wandb" / path.relative_to(source)
            if path.is_file() and not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)
                restored.append(target)
        return restored

    def close(self) -> None:
        if self._run is None:
            return
        import wandb

        run, self._run = self._run, None
        try:
            run.finish()
        finally:
            wandb.teardown()  # ends the wandb-core service process, which otherwise lives until interpreter exit
        if self._mode == "offline":
            tqdm.write(f"wandb: offline run {self._run_id} saved; upload it with: {wandb_sync_command(self.run_dir)}")


def make_wandb_tracker(cfg: WandbConfig, run_dir: str | Path, config: dict,
                       resume_id: str | None = None) -> WandbTracker | NullTracker:
    """A :class:`WandbTracker`, or a :class:`NullTracker` (which starts nothing) when W&B is disabled."""
    if resolve_wandb_mode(cfg.mode, os.environ) == "disabled":
        return NullTracker()
    return WandbTracker(cfg, run_dir, config, resume_id)


# --- hardware metrics -------------------------------------------------------------------------------

def peak_memory_gb(device: torch.device | str) -> float:
    """Peak memory of this process in GiB: CUDA tensors allocated on ``device`` (since the last
    ``torch.cuda.reset_peak_memory_stats``), or on other devices the process's peak resident set size."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak * (1 if sys.platform == "darwin" else 1024) / 2**30


def progress_bar_enabled(setting: bool | str, stream=None) -> bool:
    """``tracking.progress_bar``: true, false, or ``auto`` (only when the console is a terminal)."""
    if setting == "auto":
        stream = sys.stderr if stream is None else stream
        return bool(getattr(stream, "isatty", lambda: False)())
    return bool(setting)
