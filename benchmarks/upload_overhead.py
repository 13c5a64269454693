"""Step time while a checkpoint upload is in flight vs. without one, in one run on one machine.

    python benchmarks/upload_overhead.py                     # ~2 minutes on 2 CPU cores
    python benchmarks/upload_overhead.py --payload-mb 512 --blocks 6 --out benchmarks/results/upload-overhead.md

The S3 server (moto in server mode) runs in its own process on loopback, pinned to the last CPU core, standing in
for a store on another machine; training runs pinned to the other cores. Blocks of steps without an upload and
steps during a background upload (lfqa's BackgroundUploader: boto3's transfer manager, multipart, the same code
the trainer uses) alternate, so that drift of the machine hits both alike. The figure is the ratio of median step
times (target: at most 1.05).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def start_moto(port: int, core: int | None) -> subprocess.Popen:
    code = ("from moto.server import ThreadedMotoServer; import time, logging; "
            "logging.getLogger('werkzeug').setLevel(logging.ERROR); "
            f"s = ThreadedMotoServer(ip_address='127.0.0.1', port={port}); s.start(); time.sleep(3600)")
    cmd = [sys.executable, "-c", code]
    if core is not None:
        cmd = ["taskset", "-c", str(core), *cmd]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_for_port(port: int, timeout: float = 30) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"moto server did not start on port {port}")


def build_step(d_model: int, layers: int, input_tokens: int, answer_tokens: int, batch: int):
    import torch
    from transformers import LEDConfig, LEDForConditionalGeneration

    torch.manual_seed(0)
    config = LEDConfig(vocab_size=8000, d_model=d_model, encoder_layers=layers, decoder_layers=layers,
                       encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=4 * d_model,
                       decoder_ffn_dim=4 * d_model, attention_window=[128] * layers,
                       max_encoder_position_embeddings=input_tokens, max_decoder_position_embeddings=answer_tokens)
    model = LEDForConditionalGeneration(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    input_ids = torch.randint(5, 8000, (batch, input_tokens))
    labels = torch.randint(5, 8000, (batch, answer_tokens))
    global_mask = torch.zeros_like(input_ids)
    global_mask[:, :16] = 1

    def step() -> float:
        started = time.perf_counter()
        loss = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                     global_attention_mask=global_mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    return step, sum(p.numel() for p in model.parameters())


def make_payload(folder: Path, megabytes: int) -> None:
    """A checkpoint-shaped folder: a few large shards and small files, random bytes (incompressible)."""
    folder.mkdir(parents=True, exist_ok=True)
    sizes = [megabytes * 2 // 3, megabytes // 3 - 1, 1]
    for i, size in enumerate(sizes):
        with (folder / f"shard-{i}.bin").open("wb") as f:
            for _ in range(size):
                f.write(os.urandom(1 << 20))
    (folder / "trainer_state.json").write_text("{}")
    (folder / "COMPLETE").write_text("{}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--payload-mb", type=int, default=512, help="checkpoint size to upload (MB)")
    parser.add_argument("--blocks", type=int, default=4, help="pairs of (no upload, upload) blocks")
    parser.add_argument("--min-steps", type=int, default=8, help="steps per block at least")
    parser.add_argument("--workers", type=int, default=8,
                        help="transfer-manager concurrency (checkpoint.upload_workers)")
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--input-tokens", type=int, default=1024)
    parser.add_argument("--answer-tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--out", default=None, help="also write the Markdown table to this file")
    parser.add_argument("--in-process", action="store_true",
                        help="upload on a thread of the training process instead of lfqa's low-priority child "
                             "process (to see what isolation buys)")
    args = parser.parse_args(argv)

    import torch

    from lfqa.storage import BackgroundUploader, S3Store

    cores = sorted(os.sched_getaffinity(0))
    server_core = cores[-1] if len(cores) > 1 else None
    if server_core is not None:
        os.sched_setaffinity(0, set(cores[:-1]))
        torch.set_num_threads(len(cores) - 1)
    os.environ.update(AWS_ACCESS_KEY_ID="benchmark", AWS_SECRET_ACCESS_KEY="benchmark", AWS_DEFAULT_REGION="us-east-1",
                      AWS_EC2_METADATA_DISABLED="true")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = start_moto(port, server_core)
    try:
        wait_for_port(port)
        endpoint = f"http://127.0.0.1:{port}"
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
        store = S3Store("s3://bench/run", endpoint_url=endpoint, workers=args.workers)
        store.check()
        step, n_params = build_step(args.d_model, args.layers, args.input_tokens, args.answer_tokens, args.batch)
        for _ in range(3):
            step()  # warm-up
        quiet, loaded, upload_seconds = [], [], []
        with tempfile.TemporaryDirectory(prefix="lfqa-upload-bench-") as tmp:
            payload = Path(tmp) / "checkpoint"
            make_payload(payload, args.payload_mb)
            uploader = BackgroundUploader(store, isolate=not args.in_process)
            for block in range(args.blocks):
                quiet += [step() for _ in range(args.min_steps)]
                started = time.perf_counter()
                uploader.submit(payload, f"checkpoints/step-{block:08d}", marker="COMPLETE")
                during = []
                while uploader.busy or len(during) < 1:
                    t = step()
                    if uploader.busy:  # the whole step ran while the upload was in flight
                        during.append(t)
                uploader.wait()
                upload_seconds.append(time.perf_counter() - started)
                loaded += during
                print(f"block {block + 1}/{args.blocks}: {len(during)} steps during a "
                      f"{args.payload_mb} MB upload of {upload_seconds[-1]:.1f}s", flush=True)
            uploader.close()
            if uploader.errors:
                raise SystemExit(f"uploads failed: {uploader.errors}")
    finally:
        server.terminate()
        server.wait()

    ratio = statistics.median(loaded) / statistics.median(quiet)
    lines = [
        f"Machine: {platform.processor() or platform.machine()}, {len(cores)} cores "
        f"(training on {max(1, len(cores) - 1)}, the S3 server on {'1' if server_core is not None else 'the same'}), "
        f"torch {torch.__version__}, no GPU. LED {args.d_model}-d {args.layers}+{args.layers} layers "
        f"({n_params / 1e6:.1f}M parameters), batch {args.batch} x {args.input_tokens} input / "
        f"{args.answer_tokens} answer tokens, fp32.",
        "",
        "| | steps | median step (s) | mean step (s) |",
        "| --- | ---: | ---: | ---: |",
        f"| no upload | {len(quiet)} | {statistics.median(quiet):.3f} | {statistics.mean(quiet):.3f} |",
        f"| during a {args.payload_mb} MB background upload ({args.workers} workers, "
        f"{'a thread of the training process' if args.in_process else 'a child process at nice 19'}) | {len(loaded)} | "
        f"{statistics.median(loaded):.3f} | {statistics.mean(loaded):.3f} |",
        "",
        f"Step time ratio (upload / none, medians): **{ratio:.3f}** (target <= 1.05). "
        f"Upload throughput {args.payload_mb / statistics.median(upload_seconds):.0f} MB/s.",
    ]
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
