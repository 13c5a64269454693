"""``lfqa checkpoints list|pull|prune``: a run's checkpoints, in its local folder or its bucket.

    lfqa checkpoints list runs/tiny-cpu
    lfqa checkpoints list s3://bucket/runs/led --s3-endpoint-url http://127.0.0.1:9000
    lfqa checkpoints pull s3://bucket/runs/led --out ./led-ckpt          # the newest complete one
    lfqa checkpoints pull s3://bucket/runs/led --step 1200 --out ./led-ckpt
    lfqa checkpoints prune s3://bucket/runs/led --keep-last 2 --keep-best 1 --metric eval/loss --dry-run
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from lfqa.checkpoint import (
    CHECKPOINTS,
    MARKER,
    CheckpointError,
    checkpoint_name,
    list_checkpoints,
    newest_complete,
    parse_step,
    prune,
    retained,
)


def _store(run: str, endpoint: str | None, region: str | None):
    from lfqa.storage import StorageError, open_store

    if not str(run).startswith("s3://") and not Path(run).is_dir():
        raise StorageError(f"{run}: no such run folder")
    return open_store(run, endpoint, region)


def fetch_remote_checkpoint(uri: str, into: Path, endpoint: str | None, region: str | None) -> Path:
    """Download the complete checkpoint at ``s3://.../checkpoints/step-N`` into ``into/step-N``."""
    parent, _, name = uri.rstrip("/").rpartition("/")
    if parse_step(name) is None:
        raise CheckpointError(f"{uri}: not a checkpoint folder (expected .../checkpoints/step-NNNNNNNN)")
    store = _store(parent, endpoint, region)
    if not store.exists(f"{name}/{MARKER}"):
        raise CheckpointError(f"{uri}: not a complete checkpoint (no {MARKER}); it was never fully uploaded")
    target = Path(into) / name
    store.download_dir(name, target)
    return target


def _metric_text(metrics: dict) -> str:
    shown = [f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith("eval/") and isinstance(v, (int, float))]
    return ", ".join(shown[:3])


def cmd_list(args) -> int:
    store = _store(args.run, args.s3_endpoint_url, args.s3_region)
    infos = list_checkpoints(store)
    if not infos:
        print(f"no checkpoints in {store.url(CHECKPOINTS)}")
        return 0
    newest = newest_complete(infos)
    print(f"{'checkpoint':<16} {'step':>9}  {'state':<10}  metrics")
    for info in infos:
        state = "complete" if info.complete else "incomplete"
        flag = "  <- resume" if newest is not None and info.name == newest.name else ""
        print(f"{info.name:<16} {info.step:>9}  {state:<10}  {_metric_text(info.metrics)}{flag}")
    incomplete = sum(not i.complete for i in infos)
    print(f"{len(infos)} checkpoint(s) in {store.url(CHECKPOINTS)}, {incomplete} incomplete "
          f"(never resumed: saving or uploading was cut)")
    return 0


def cmd_pull(args) -> int:
    store = _store(args.run, args.s3_endpoint_url, args.s3_region)
    infos = list_checkpoints(store, with_metrics=False)
    if args.step is None:
        info = newest_complete(infos)
        if info is None:
            raise CheckpointError(f"{store.url(CHECKPOINTS)}: no complete checkpoint")
    else:
        matches = [i for i in infos if i.step == args.step]
        if not matches:
            raise CheckpointError(f"{store.url(CHECKPOINTS)}: no checkpoint at step {args.step} "
                                  f"(have {', '.join(str(i.step) for i in infos) or 'none'})")
        info = matches[0]
        if not info.complete:
            raise CheckpointError(f"{store.url(CHECKPOINTS + '/' + info.name)}: incomplete (no {MARKER})")
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    store.download_dir(f"{CHECKPOINTS}/{info.name}", out)
    print(f"pulled {store.url(CHECKPOINTS + '/' + info.name)} to {out} "
          f"(lfqa export {out} --out MODEL turns it into a model folder)")
    return 0


def cmd_prune(args) -> int:
    store = _store(args.run, args.s3_endpoint_url, args.s3_region)
    if args.dry_run:
        infos = list_checkpoints(store)
        keep = retained(infos, args.keep_last, args.keep_best, args.metric, args.mode)
        for info in infos:
            print(f"{'keep  ' if info.name in keep else 'delete'} {info.name}")
        return 0
    deleted = prune(store, args.keep_last, args.keep_best, args.metric, args.mode)
    if not deleted:
        print(f"nothing to delete in {store.url(CHECKPOINTS)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lfqa checkpoints",
                                     description="List, download or prune a run's checkpoints, local or on S3.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("run", help="the run: its output.dir folder or its output.uri (s3://bucket/prefix)")
    common.add_argument("--s3-endpoint-url", default=None, help="S3-compatible endpoint (default: AWS / env)")
    common.add_argument("--s3-region", default=None)
    sub.add_parser("list", parents=[common], help="checkpoints with step, completeness and eval metrics")
    pull = sub.add_parser("pull", parents=[common], help="download a complete checkpoint (default: the newest)")
    pull.add_argument("--step", type=int, default=None, help=f"the checkpoint of this step ({checkpoint_name(0)})")
    pull.add_argument("--out", required=True, help="folder to download into (replaced if it exists)")
    prune_p = sub.add_parser("prune", parents=[common], help="delete all but the newest K and the best K")
    prune_p.add_argument("--keep-last", type=int, default=2)
    prune_p.add_argument("--keep-best", type=int, default=1)
    prune_p.add_argument("--metric", default="eval/loss")
    prune_p.add_argument("--mode", choices=("min", "max"), default="min")
    prune_p.add_argument("--dry-run", action="store_true", help="only print what would be kept and deleted")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from lfqa.storage import StorageError

    if args.command == "prune" and args.keep_last < 1:
        print("lfqa: error: --keep-last must be >= 1", file=sys.stderr)
        return 2
    try:
        return {"list": cmd_list, "pull": cmd_pull, "prune": cmd_prune}[args.command](args)
    except (CheckpointError, StorageError) as err:
        print(f"lfqa: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
