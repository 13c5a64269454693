"""The ``lfqa`` command: one entry point, a subcommand per thing a person does.

    lfqa train jobs/tiny-cpu.yaml [key=value ...]     # one process (accelerate launch -m lfqa.train for several)
    lfqa eval --model runs/tiny-cpu/model [--compare OTHER] [--data FILE ...]
    lfqa answer --model runs/tiny-cpu/model --question "..." --document paper.pdf
    lfqa data-report [--job JOB] [--data FILE ...]
    lfqa plot runs/tiny-cpu
    lfqa checkpoints list runs/tiny-cpu | s3://bucket/run
    lfqa export runs/tiny-cpu/checkpoints/step-100 --out exported-model
    lfqa plan jobs/led-base-lfqa.yaml --gpus 8 --gpu-memory 80
    lfqa check-job jobs/led-base-lfqa.yaml [key=value ...]
    lfqa build-tiny --out /tmp/tiny-led

Every command ends a failure with one line, ``lfqa: error: <file/key/row>: <what is wrong>``; an unexpected
one also names a file holding the traceback, and ``--debug`` anywhere on the line prints it instead
(see lfqa.errors).
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from pathlib import Path

from lfqa.config import ConfigError, JobConfig, dump_job, load_job
from lfqa.errors import run_command

# Subcommands with their own argument parser: (module, help). Each module has main(argv) -> int.
DELEGATED = {
    "train": ("lfqa.train", "train a job in this process"),
    "eval": ("lfqa.model_eval", "score a model's answers with ROUGE (bootstrap intervals), optionally vs another"),
    "answer": ("lfqa.answer", "answer a question about a text, Markdown or PDF document"),
    "data-report": ("lfqa.data_report", "row counts and length histograms of a job's data"),
    "plot": ("lfqa.plot", "draw a run's training and evaluation curves to a PNG"),
    "checkpoints": ("lfqa.checkpoints_cli", "list, pull or prune a run's checkpoints, local or on S3"),
    "export": ("lfqa.export", "turn a (sharded ZeRO) checkpoint into a model folder loadable with from_pretrained"),
    "plan": ("lfqa.plan", "estimate per-GPU memory of a job per ZeRO stage and say which config fits"),
}


_SECTIONS = ("model", "data", "train", "eval", "output", "checkpoint", "tracking")
_OVERRIDE = re.compile(rf"^(?:{'|'.join(_SECTIONS)})(?:\.[A-Za-z_]\w*)+=")


def is_override(word: str) -> bool:
    """``data.fields.question=input`` is a job override; an existing file of that name is not."""
    return bool(_OVERRIDE.match(word)) and not Path(word).exists()


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """``(other words, overrides)``: job overrides may stand anywhere on a command line, even after an option
    that takes several values (``--data rows.jsonl data.fields.context=passages``)."""
    overrides = [w for w in argv if is_override(w)]
    return [w for w in argv if not is_override(w)], overrides


def check_job_text(path: str | Path) -> None:
    """A ConfigError for a job file that is binary or not UTF-8 (YAML is text; load_job would fail on decoding)."""
    try:
        Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a YAML job file (not UTF-8 text at byte {err.start})") from None
    except OSError:
        pass  # load_job names the file and the reason


def read_job(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """``load_job``, with a binary or non-UTF-8 file reported as such."""
    check_job_text(path)
    return load_job(path, overrides)


def _check_job(args) -> int:
    print(dump_job(read_job(args.job, args.overrides)), end="")
    return 0


# lfqa.modeling.TINY_FAMILIES' values, here without importing torch for every command's parser.
TINY_FAMILY_NAMES = ("led", "bart", "t5", "longt5")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lfqa",
        description="Fine-tune encoder-decoder models (LED, BART, T5, LongT5) for long-form question answering. "
                    "`lfqa COMMAND --help` for each.",
        epilog="Several processes: accelerate launch --config_file accelerate_configs/cpu.yaml "
               "-m lfqa.train jobs/tiny-cpu.yaml. A failure is one line; --debug (anywhere) prints its traceback.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in DELEGATED.items():
        sub.add_parser(name, help=help_text, add_help=False)
    check = sub.add_parser("check-job", help="validate a job file with overrides and print the resolved config")
    check.add_argument("job")
    check.add_argument("overrides", nargs="*", metavar="key=value")
    tiny = sub.add_parser("build-tiny", help="build a tiny random model and its tokenizer into a folder (no download)")
    tiny.add_argument("--out", required=True)
    tiny.add_argument("--family", default="led", choices=TINY_FAMILY_NAMES)
    return parser


def dispatch(argv: list[str]) -> int:
    if argv and argv[0] in DELEGATED:
        return importlib.import_module(DELEGATED[argv[0]][0]).main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "check-job":
        return _check_job(args)
    from lfqa.errors import output_folder
    from lfqa.modeling import main as build_main

    output_folder(args.out)
    build_main(["--out", args.out, "--family", args.family])
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(dispatch, argv)


if __name__ == "__main__":
    sys.exit(main())
