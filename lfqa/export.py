"""``lfqa export``: turn a checkpoint (sharded ZeRO or plain) into a model folder for ``from_pretrained``.

    lfqa export runs/led/checkpoints/step-00012000 --out led-lfqa-12k
    lfqa export s3://bucket/runs/led/checkpoints/step-00012000 --out led-lfqa-12k

Under DeepSpeed, accelerate's ``save_state`` writes ZeRO shards (one optimizer/parameter partition per rank);
DeepSpeed's own ``zero_to_fp32`` merges them into fp32 weights. Its ``--safe_serialization`` output fails on
LED's tied embeddings, so the merged state dict is loaded into the model built from the checkpoint's config and
written with ``save_pretrained`` instead, beside the tokenizer and the job.yaml the checkpoint carries.
Its ``generation_config.json`` holds the job's decoding settings (``eval.generation``), so a plain
``AutoModelForSeq2SeqLM.from_pretrained(out).generate(...)`` decodes as ``lfqa answer`` does.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from lfqa.checkpoint import MARKER, CheckpointError
from lfqa.errors import one_line

DEEPSPEED_TAG = "pytorch_model"  # the ckpt_id accelerate gives DeepSpeed's save_checkpoint for the first model


def load_checkpoint_weights(path: Path) -> dict:
    """The model's full state dict from a checkpoint folder written by ``accelerator.save_state``."""
    import torch

    if (path / DEEPSPEED_TAG).is_dir():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=DEEPSPEED_TAG)
    elif (path / "model.safetensors").exists():
        from safetensors.torch import load_file

        state = load_file(str(path / "model.safetensors"))
    elif (path / "pytorch_model.bin").exists():
        state = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise CheckpointError(f"{path}: no model weights (neither {DEEPSPEED_TAG}/ ZeRO shards nor model.safetensors)")
    # A DDP-wrapped model's state dict (save_state keeps the wrapper) prefixes every key with "module.".
    return {k.removeprefix("module."): v for k, v in state.items()}


def export_checkpoint(path: Path, out: Path, log=print) -> Path:
    """Write ``out`` (safetensors weights, config, tokenizer, job.yaml) from checkpoint folder ``path``."""
    import torch
    from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer

    path = Path(path)
    if not (path / MARKER).exists():
        raise CheckpointError(f"{path}: not a complete checkpoint (no {MARKER} file)")
    hf = path / "hf"
    if not (hf / "config.json").exists():
        raise CheckpointError(f"{path}: no hf/config.json (was it written by lfqa train?)")
    try:
        config = AutoConfig.from_pretrained(hf)
    except Exception as err:  # noqa: BLE001 - a damaged config.json gives several types
        raise CheckpointError(f"{hf / 'config.json'}: not a readable model config ({one_line(err, 150)})") from None
    try:
        state = load_checkpoint_weights(path)
    except CheckpointError:
        raise
    except Exception as err:  # noqa: BLE001 - damaged weights: safetensors, torch, pickle and OS errors
        raise CheckpointError(f"{path}: the model weights cannot be read ({type(err).__name__}: "
                              f"{one_line(err, 150)})") from None
    with torch.device("meta"):
        model = AutoModelForSeq2SeqLM.from_config(config)
    model = model.to_empty(device="cpu")
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied copies (LED, BART and T5 share their embeddings with the encoder, decoder and output layer) may be
    # absent.
    tied = {k for k in missing if k.endswith(("embed_tokens.weight", "lm_head.weight"))}
    model.tie_weights()
    if set(missing) - tied or unexpected:
        raise CheckpointError(f"{path}: the weights do not match the model config "
                              f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})")
    for name, buffer in model.named_buffers():
        if buffer.is_meta:  # pragma: no cover - LED has no non-persistent buffers today
            raise CheckpointError(f"{path}: buffer {name} was not restored")
    _decode_as_trained(model, hf)
    out = Path(out)
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(hf).save_pretrained(out)
    if (hf / "job.yaml").exists():
        shutil.copyfile(hf / "job.yaml", out / "job.yaml")
    n_params = sum(p.numel() for p in model.parameters())
    log(f"exported {path} ({n_params / 1e6:.2f}M parameters) to {out}")
    return out


def _decode_as_trained(model, hf: Path) -> None:
    """The checkpoint's decoding settings into ``model.generation_config``: its ``hf/generation_config.json``,
    or for checkpoints written before it existed, the ``eval.generation`` of its job.yaml."""
    from transformers import GenerationConfig

    from lfqa.modeling import apply_generation_config, check_decoder_start

    if (hf / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(hf)
    elif (hf / "job.yaml").is_file():
        from lfqa.config import load_job

        apply_generation_config(model, load_job(hf / "job.yaml").eval.generation)
    check_decoder_start(model)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lfqa export",
        description="Turn a training checkpoint (ZeRO shards or plain) into a model folder loadable with "
                    "from_pretrained: safetensors weights, config, tokenizer and the job's job.yaml.",
        epilog="Examples:\n"
               "  lfqa export runs/tiny-cpu/checkpoints/step-00000100 --out tiny-step100\n"
               "  lfqa export s3://bucket/run/checkpoints/step-00012000 --out led-12k",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", help="a checkpoint folder (checkpoints/step-N) or its s3:// URI")
    parser.add_argument("--out", required=True, help="folder to write the model to (replaced if it exists)")
    parser.add_argument("--job", default=None, help="take the S3 endpoint and region from this job file")
    parser.add_argument("--s3-endpoint-url", default=None, help="S3-compatible endpoint (default: AWS / env)")
    parser.add_argument("--s3-region", default=None)
    return parser


def _run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        from lfqa.errors import InputError

        raise InputError(f"--out {out}: is a file, expected a folder (it is replaced by the model)")
    endpoint, region = args.s3_endpoint_url, args.s3_region
    if args.job:
        from lfqa.config import load_job

        job = load_job(args.job)
        endpoint, region = endpoint or job.output.s3_endpoint_url, region or job.output.s3_region
    if args.checkpoint.startswith("s3://"):
        from lfqa.checkpoints_cli import fetch_remote_checkpoint

        with tempfile.TemporaryDirectory(prefix="lfqa-export-") as tmp:
            local = fetch_remote_checkpoint(args.checkpoint, Path(tmp), endpoint, region)
            export_checkpoint(local, out)
    else:
        path = Path(args.checkpoint)
        if not path.is_dir():
            raise CheckpointError(f"{path}: " + ("is a file, expected a checkpoint folder" if path.exists()
                                                 else "no such checkpoint folder"))
        export_checkpoint(path, out)
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command; every failure is one line on stderr and a non-zero exit (see lfqa.errors)."""
    from lfqa.errors import run_command

    return run_command(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
