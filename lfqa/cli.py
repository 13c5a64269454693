"""The ``lfqa`` command.

    lfqa train jobs/tiny-cpu.yaml [key=value ...]     # one process (use accelerate launch for several)
    lfqa check-job jobs/led-base-lfqa.yaml [key=value ...]
    lfqa build-tiny --out /tmp/tiny-led
"""

from __future__ import annotations

import argparse
import sys

from lfqa.config import ConfigError, dump_job, load_job


def _check_job(args) -> int:
    try:
        job = load_job(args.job, args.overrides)
    except ConfigError as err:
        print(f"lfqa: error: {err}", file=sys.stderr)
        return 2
    print(dump_job(job), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="lfqa",
        description="Fine-tune LED models for long-form question answering.",
        epilog="Several processes: accelerate launch --config_file accelerate_configs/cpu.yaml "
               "-m lfqa.train jobs/tiny-cpu.yaml",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    sub.add_parser("train", help="train a job in this process (see `lfqa train --help`)", add_help=False)
    check = sub.add_parser("check-job", help="validate a job file with overrides and print the resolved config")
    check.add_argument("job")
    check.add_argument("overrides", nargs="*", metavar="key=value")
    tiny = sub.add_parser("build-tiny", help="build the tiny LED and its tokenizer into a folder (no download)")
    tiny.add_argument("--out", required=True)

    if argv and argv[0] == "train":
        from lfqa.train import main as train_main

        return train_main(argv[1:])
    args = parser.parse_args(argv)
    if args.command == "check-job":
        return _check_job(args)
    if args.command == "build-tiny":
        from lfqa.modeling import main as build_main

        build_main(["--out", args.out])
        return 0
    parser.error(f"unknown command {args.command}")  # pragma: no cover - argparse rejects it first
    return 2


if __name__ == "__main__":
    sys.exit(main())
