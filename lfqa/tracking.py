"""Where metrics go: one small interface, several sinks (console, a JSONL file; W&B plugs in here).

Only the main process creates real trackers; the others get :class:`NullTracker`.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Protocol

from tqdm.auto import tqdm


class Tracker(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class NullTracker:
    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

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

    def close(self) -> None:
        for t in self.trackers:
            t.close()
