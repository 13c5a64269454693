"""Reads an offline W&B run back from its own files, for tests (offline runs write no summary JSON).

A run folder ``<dir>/wandb/offline-run-<time>-<id>/`` holds ``run-<id>.wandb``: a LevelDB-style log
(https://github.com/google/leveldb/blob/main/doc/log_format.md) after a 7-byte header (``:W&B``, magic 0xBEE1,
version 0). The log is cut into 32 KiB blocks; each chunk has a 7-byte header (CRC-32 of type + data, length,
type FULL/FIRST/MIDDLE/LAST); a block tail shorter than a header is zero padding. The chunks join into
serialized ``wandb.proto.wandb_internal_pb2.Record`` messages: ``run`` (id, name, tags, initial config),
``config`` (later updates), ``history`` (one row per step), ``summary`` ... Each item carries ``key`` or, for
nested keys (``eval/samples`` -> ``path``), ``nested_key``, and a JSON value. A logged ``wandb.Table`` is a
history value ``{"_type": "table-file", "path": "media/table/..."}``, relative to the folder's ``files/``.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

FILE_HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
BLOCK_SIZE = 32 * 1024
CHUNK_HEADER = struct.Struct("<IHB")  # crc32, length, type
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: str | Path) -> Iterator[wandb_internal_pb2.Record]:
    """Every record of a ``.wandb`` file, in order; checks the header, the checksums and the chunk order. A
    record cut off by the end of the file (the process was killed, or the file copied while written) ends it."""
    data = Path(path).read_bytes()
    if not data.startswith(FILE_HEADER):
        raise ValueError(f"{path}: not a W&B transaction log (header {data[:7]!r})")
    pos, pending = len(FILE_HEADER), None
    while pos < len(data):
        left_in_block = BLOCK_SIZE - pos % BLOCK_SIZE
        if left_in_block < CHUNK_HEADER.size:
            pos += left_in_block
            continue
        if pos + CHUNK_HEADER.size > len(data):
            return  # cut inside a chunk header
        crc, length, kind = CHUNK_HEADER.unpack_from(data, pos)
        if kind == 0 and length == 0:  # zeroed rest of a block (a file cut mid-block ends the same way)
            pos += left_in_block
            continue
        chunk = data[pos + CHUNK_HEADER.size: pos + CHUNK_HEADER.size + length]
        if len(chunk) != length:
            return  # the file was cut (a SIGKILL, or copied while written) inside its last record
        if zlib.crc32(bytes([kind]) + chunk) != crc:
            raise ValueError(f"{path}: corrupt chunk at byte {pos}")
        pos += CHUNK_HEADER.size + length
        if kind in (FULL, FIRST):
            if pending is not None:
                raise ValueError(f"{path}: record at byte {pos} starts inside another")
            pending = bytearray()
        elif pending is None:
            raise ValueError(f"{path}: chunk of type {kind} at byte {pos} continues no record")
        pending += chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(bytes(pending))
            pending = None
            yield record


def _put(tree: dict, item: Any) -> None:
    keys = [item.key] if item.key else list(item.nested_key)
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = json.loads(item.value_json)


@dataclass
class OfflineRun:
    """What one offline run folder holds, as plain Python data."""

    folder: Path
    run_id: str
    project: str
    name: str
    tags: list[str]
    start_time: float
    config: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    """One dict per committed step, with ``_step`` and the logged keys (nested keys as nested dicts)."""
    exited: bool = False
    """Whether the run was finished (an exit record) rather than cut off."""

    def metric(self, key: str) -> dict[int, Any]:
        """``{step: value}`` for one logged key."""
        return {row["_step"]: row[key] for row in self.history if key in row}

    def table(self, key: str, step: int) -> list[dict]:
        """The rows of the table logged under ``key`` at ``step``, as dicts by column."""
        (ref,) = [row[key] for row in self.history if row["_step"] == step and key in row]
        assert ref["_type"] == "table-file", ref
        table = json.loads((self.folder / "files" / ref["path"]).read_text())
        return [dict(zip(table["columns"], row)) for row in table["data"]]


def read_offline_run(folder: str | Path) -> OfflineRun:
    """Parses the ``run-<id>.wandb`` file of one ``offline-run-*`` folder."""
    folder = Path(folder)
    (path,) = folder.glob("run-*.wandb")
    run: OfflineRun | None = None
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run = OfflineRun(folder=folder, run_id=r.run_id, project=r.project, name=r.display_name,
                             tags=list(r.tags), start_time=r.start_time.ToMicroseconds() / 1e6)
            for item in r.config.update:
                _put(run.config, item)
        elif run is None:
            continue
        elif kind == "config":
            for item in record.config.update:
                _put(run.config, item)
            for item in record.config.remove:
                run.config.pop(item.key, None)
        elif kind == "history":
            row: dict = {}
            for item in record.history.item:
                _put(row, item)
            row["_step"] = record.history.step.num if record.history.HasField("step") else row.get("_step")
            run.history.append(row)
        elif kind == "exit":
            run.exited = True
    if run is None:
        raise ValueError(f"{path}: no run record")
    run.config.pop("_wandb", None)
    return run


def offline_runs(run_dir: str | Path) -> list[OfflineRun]:
    """Every offline W&B run under ``run_dir/wandb/``, oldest first (a resumed run has one per part)."""
    folders = [p for p in (Path(run_dir) / "wandb").glob("offline-run-*") if p.is_dir() and not p.is_symlink()]
    return sorted((read_offline_run(f) for f in folders), key=lambda r: r.start_time)
