"""Where a training step's time goes: torch.profiler over a few steps of lfqa's step on an LFQA-shaped batch.

    python benchmarks/profile_step.py                           # small preset, lfqa's defaults
    python benchmarks/profile_step.py --encoder-attention eager --no-fused   # the step before the speed-ups
    python benchmarks/profile_step.py --device cuda --precision bf16 --preset led-base

The batch is one of ``make bench``'s token-budget batches: rows of 1,000 input tokens (a 256-multiple window
bucket) and 218-token answers, as many as fit 4,096 tokens, global attention on a 24-token question. Each step
is lfqa's: forward, backward, gradient clipping, AdamW step, ``zero_grad``. Prints the operators with the most
self time, and the share of a few groups (matrix products, attention, optimizer, memory copies and fills).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from run import LED_PRESETS, PRESETS  # noqa: E402

from lfqa.config import ENCODER_ATTENTIONS  # noqa: E402

GROUPS = {
    "matrix products (mm, bmm, addmm, linear)": ("aten::mm", "aten::bmm", "aten::addmm", "aten::linear"),
    "fused attention kernels (SDPA)": ("scaled_dot_product", "flash_attention", "efficient_attention"),
    "softmax and log-softmax": ("softmax",),
    "copies and fills (copy_, fill_, cat, pad, zero_)": ("aten::copy_", "aten::fill_", "aten::cat",
                                                         "aten::constant_pad_nd", "aten::zero_"),
    "dropout": ("bernoulli", "dropout"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=LED_PRESETS, default="small")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--encoder-attention", choices=ENCODER_ATTENTIONS, default="sdpa")
    parser.add_argument("--no-fused", action="store_true", help="the for-loop AdamW instead of the fused one")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps (after two warm-up steps)")
    parser.add_argument("--rows", type=int, default=0, help="rows per batch (default: what fits 4,096 tokens)")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import LEDConfig, LEDForConditionalGeneration

    from lfqa.led_attention import set_encoder_attention

    preset = PRESETS[args.preset]
    torch.manual_seed(0)
    config = LEDConfig(vocab_size=preset.vocab_size or 2000, d_model=preset.d_model, encoder_layers=preset.layers,
                       decoder_layers=preset.layers, encoder_attention_heads=preset.heads,
                       decoder_attention_heads=preset.heads, encoder_ffn_dim=preset.ffn_dim,
                       decoder_ffn_dim=preset.ffn_dim, attention_window=preset.window,
                       max_encoder_position_embeddings=16384, max_decoder_position_embeddings=1024,
                       pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
    device = args.device
    model = LEDForConditionalGeneration(config).to(device).train()
    set_encoder_attention(model, args.encoder_attention)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, fused=not args.no_fused or None)
    inputs, answers = 1000, 218
    rows = args.rows or max(1, 4096 // (-(-inputs // preset.window) * preset.window + answers))
    ids = torch.randint(5, config.vocab_size, (rows, inputs), device=device)
    glob = torch.zeros_like(ids)
    glob[:, :24] = 1
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "global_attention_mask": glob,
             "labels": torch.randint(5, config.vocab_size, (rows, answers), device=device)}
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def step():
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
    events = prof.key_averages()
    attr = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    total = sum(getattr(e, attr) for e in events) or 1
    print(f"{args.preset}, {device}, {args.precision}, encoder attention {args.encoder_attention}, "
          f"{'for-loop' if args.no_fused else 'fused'} AdamW, {rows} rows x {inputs} + {answers} tokens, "
          f"{args.steps} steps: {total / 1e3 / args.steps:.0f} ms of operator time per step\n")
    print("| group | share of operator time |\n| --- | ---: |")
    for name, keys in GROUPS.items():
        share = sum(getattr(e, attr) for e in events if any(k.lower() in e.key.lower() for k in keys)) / total
        print(f"| {name} | {share:.1%} |")
    # the optimizer step as a whole (the for-loop AdamW runs generic mul_/add_/... operators)
    total_attr = "device_time_total" if device == "cuda" else "cpu_time_total"
    step_time = sum(getattr(e, total_attr) for e in events if e.key.startswith("Optimizer.step"))
    print(f"| optimizer step (AdamW, all its operators) | {step_time / total:.1%} |")
    print("\n| operator | share | calls per step |\n| --- | ---: | ---: |")
    for e in sorted(events, key=lambda e: -getattr(e, attr))[:args.top]:
        print(f"| `{e.key}` | {getattr(e, attr) / total:.1%} | {e.count // args.steps} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
