"""One error type for every failure a user can fix, and one way out of every command.

Every ``lfqa`` error class (``ConfigError``, ``DataError``, ``ModelLoadError``, ``InputError``, ``StorageError``,
``CheckpointError``, ``MetricError``) derives from :class:`LfqaError`, whose message is one line naming the
file, key or row, and whose ``exit_code`` is what the command exits with. :func:`run_command` is the one
handler every entry point goes through (``lfqa COMMAND ...`` and ``python -m lfqa.train``):

- an ``LfqaError`` prints ``lfqa: error: <file/key/row>: <what is wrong>`` and exits with its code;
- an ``OSError`` that names a file (a full disk, a folder given where a file is expected) prints the same
  kind of line;
- anything else is a bug: one line that names the exception and a file holding the full traceback.
  ``--debug`` anywhere on the command line (or ``LFQA_DEBUG=1``) prints the traceback instead.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
DEBUG_FLAG = "--debug"


class LfqaError(Exception):
    """A failure the user can fix; ``str(err)`` is one line that starts with the file, key or row."""

    exit_code: int = EXIT_ERROR


class InputError(LfqaError, ValueError):
    """Unusable input to a command (an empty question, an unreadable document, an output path that is a file)."""


class MetricError(LfqaError, RuntimeError):
    """A metric named in ``eval.metrics`` cannot be loaded or computed."""


def one_line(text: str, limit: int = 300) -> str:
    """The first non-empty line of ``text``, cut to ``limit`` characters."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    first = lines[0] if lines else ""
    return first if len(first) <= limit else first[: limit - 3] + "..."


def output_folder(path: str | Path, option: str = "--out") -> Path:
    """``path`` as a folder to write into (created when missing); an InputError when it cannot be one."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{option} {path}: is a file, expected a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"{option} {path}: cannot create the folder ({err.strerror or err})") from None
    if not os.access(path, os.W_OK):
        raise InputError(f"{option} {path}: the folder is not writable")
    return path


def output_file(path: str | Path, option: str = "--out") -> Path:
    """``path`` as a file to write (its folder created when missing); an InputError when it cannot be one."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{option} {path}: is a folder, expected a file")
    if path.parent.exists() and not path.parent.is_dir():
        raise InputError(f"{option} {path}: {path.parent} is a file, not a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"{option} {path}: cannot create its folder ({err.strerror or err})") from None
    return path


def _traceback_file(text: str) -> str | None:
    """Write ``text`` to a new file (``LFQA_TRACEBACK_DIR`` or the temp folder); its path, or None."""
    folder = os.environ.get("LFQA_TRACEBACK_DIR") or tempfile.gettempdir()
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        fd, path = tempfile.mkstemp(prefix=f"lfqa-traceback-{time.strftime('%Y%m%d-%H%M%S')}-", suffix=".txt",
                                    dir=folder)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        return path
    except OSError:
        return None


def expected_exit_code(err: BaseException) -> int | None:
    """The exit code of a failure the user can fix, None for a bug."""
    if isinstance(err, LfqaError):
        return err.exit_code
    from lfqa.config import ConfigError  # defined before this module existed; a usage error (exit 2)

    return EXIT_USAGE if isinstance(err, ConfigError) else None


def report(err: BaseException, *, debug: bool = False, prog: str = "lfqa") -> int:
    """Print the one line (or, with ``debug``, the traceback) for ``err``; return the exit code."""
    if debug:
        traceback.print_exception(err, file=sys.stderr)
    if isinstance(err, KeyboardInterrupt):
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    code = expected_exit_code(err)
    if code is not None:
        if not debug:
            print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        return code
    if isinstance(err, OSError) and err.filename is not None:
        if not debug:
            print(f"{prog}: error: {err.filename}: {err.strerror or one_line(err)}", file=sys.stderr)
        return EXIT_ERROR
    if debug:
        return EXIT_ERROR
    where = _traceback_file("".join(traceback.format_exception(err)))
    saved = f"full traceback in {where}" if where else "the traceback could not be saved"
    print(f"{prog}: error: unexpected {type(err).__name__}: {one_line(err) or '(no message)'} "
          f"(a bug in lfqa; {saved}; {DEBUG_FLAG} prints it)", file=sys.stderr)
    return EXIT_ERROR


_debug_active = False
"""True while an outer run_command was given --debug (``lfqa --debug train`` reaches lfqa.train's own handler)."""


def debug_requested(argv: list[str]) -> tuple[list[str], bool]:
    """``argv`` without ``--debug``, and whether it (or ``LFQA_DEBUG=1``) asks for tracebacks."""
    rest = [a for a in argv if a != DEBUG_FLAG]
    asked = len(rest) != len(argv) or os.environ.get("LFQA_DEBUG", "") not in ("", "0")
    return rest, asked or _debug_active


def run_command(main: Callable[[list[str]], int | None], argv: list[str] | None = None, *,
                prog: str = "lfqa") -> int:
    """Run ``main(argv)`` and turn every exception into one line and an exit code (argparse's exits pass)."""
    global _debug_active
    argv, debug = debug_requested(list(sys.argv[1:] if argv is None else argv))
    outer, _debug_active = _debug_active, debug
    try:
        return int(main(argv) or 0)
    except SystemExit:
        raise
    except BaseException as err:  # noqa: BLE001 - this is the one place that turns everything into a line
        return report(err, debug=debug, prog=prog)
    finally:
        _debug_active = outer
