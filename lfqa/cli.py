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
"""

from __future__ import annotations

import argparse
import importlib
import sys

from lfqa.config import ConfigError, dump_job, load_job

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


def _check_job(args) -> int:
    try:
        job = load_job(args.job, args.overrides)
    except ConfigError as err:
        print(f"lfqa: error: {err}", file=sys.stderr)
        return 2
    print(dump_job(job), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lfqa",
        description="Fine-tune LED models for long-form question answering. `lfqa COMMAND --help` for each.",
        epilog="Several processes: accelerate launch --config_file accelerate_configs/cpu.yaml "
               "-m lfqa.train jobs/tiny-cpu.yaml",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in DELEGATED.items():
        sub.add_parser(name, help=help_text, add_help=False)
    check = sub.add_parser("check-job", help="validate a job file with overrides and print the resolved config")
    check.add_argument("job")
    check.add_argument("overrides", nargs="*", metavar="key=value")
    tiny = sub.add_parser("build-tiny", help="build the tiny LED and its tokenizer into a folder (no download)")
    tiny.add_argument("--out", required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        return importlib.import_module(DELEGATED[argv[0]][0]).main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "check-job":
        return _check_job(args)
    from lfqa.modeling import main as build_main

    build_main(["--out", args.out])
    return 0


if __name__ == "__main__":
    sys.exit(main())
