"""The longest input that trains at batch 1, with and without gradient checkpointing, per encoder attention.

    python benchmarks/longest_input.py --device cuda --precision bf16 --preset led-base --max-positions 65536
    python benchmarks/longest_input.py --preset tiny --memory-gib 0.25 --max-positions 8192   # CPU, seconds

For each combination of ``model.encoder_attention`` (lfqa's ``sdpa``, transformers' ``eager``) and
gradient checkpointing (off, on) it searches, by bisection over multiples of the attention window, the
longest input for which a training step (forward, backward, gradient clipping, AdamW step) of one row with
an answer of ``--answer-tokens`` tokens completes:

* on a GPU, within the card's memory (``torch.cuda.OutOfMemoryError`` is a failure), or within
  ``--memory-gib`` when given (``torch.cuda.set_per_process_memory_fraction``, to stand for a smaller card);
* on CPU, within ``--memory-gib`` of peak allocated memory above the process before the model was built
  (glibc's bytes in use, read after every aten operation, as ``benchmarks/plan_memory.py`` does): CPU
  training does not run out of memory the way a GPU does, so the budget plays the card.

The model is a random LED of the preset's shape with ``--max-positions`` encoder positions (LED-base has
16,384; a longer table lets the search find where memory, not the table, ends it), global attention on the
first ``--global-tokens`` tokens (the question), and the model's own dropout. Every probe uses the same
weights. The table goes to stdout and, with ``--out``, to a Markdown file; ``--json`` prints every probe.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from run import LED_PRESETS, PRESETS, machine_line  # noqa: E402  (benchmarks/run.py: the same presets as make bench)

from lfqa.config import ENCODER_ATTENTIONS as ATTENTIONS  # noqa: E402


class Probe:
    """Runs training steps of one input length and says whether they fit."""

    def __init__(self, args):
        import torch
        from transformers import LEDConfig

        self.args = args
        self.torch = torch
        self.cuda = args.device == "cuda"
        preset = PRESETS[args.preset]
        self.window = preset.window
        self.config = LEDConfig(
            vocab_size=preset.vocab_size or 2000, d_model=preset.d_model, encoder_layers=preset.layers,
            decoder_layers=preset.layers, encoder_attention_heads=preset.heads, decoder_attention_heads=preset.heads,
            encoder_ffn_dim=preset.ffn_dim, decoder_ffn_dim=preset.ffn_dim, attention_window=preset.window,
            max_encoder_position_embeddings=args.max_positions,
            max_decoder_position_embeddings=max(1024, args.answer_tokens), pad_token_id=1, bos_token_id=0,
            eos_token_id=2, decoder_start_token_id=2)
        if self.cuda:
            if args.memory_gib:
                total = torch.cuda.get_device_properties(0).total_memory
                torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_gib * 2**30 / total))
        else:
            from plan_memory import _libc, allocated_bytes

            self._libc, self._allocated = _libc(), allocated_bytes
            torch.set_num_threads(args.threads)

    def _build(self, attention: str, checkpointing: bool):
        from transformers import LEDForConditionalGeneration

        from lfqa.led_attention import set_encoder_attention
        from lfqa.modeling import enable_gradient_checkpointing

        torch = self.torch
        torch.manual_seed(0)
        model = LEDForConditionalGeneration(self.config)
        set_encoder_attention(model, attention)
        if checkpointing:
            enable_gradient_checkpointing(model)
        device = "cuda" if self.cuda else "cpu"
        model.to(device).train()
        return model, torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

    def _batch(self, length: int):
        torch = self.torch
        device = "cuda" if self.cuda else "cpu"
        g = torch.Generator().manual_seed(length)
        ids = torch.randint(5, self.config.vocab_size, (1, length), generator=g)
        glob = torch.zeros_like(ids)
        glob[:, :self.args.global_tokens] = 1
        labels = torch.randint(5, self.config.vocab_size, (1, self.args.answer_tokens), generator=g)
        return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
                "global_attention_mask": glob.to(device), "labels": labels.to(device)}

    def run(self, attention: str, checkpointing: bool, length: int) -> dict:
        """Two training steps at ``length`` tokens: fits, peak bytes, seconds per step."""
        torch = self.torch
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = self._allocated(self._libc)
        autocast = torch.autocast("cuda" if self.cuda else "cpu", dtype=torch.bfloat16,
                                  enabled=self.args.precision == "bf16")
        model = optimizer = batch = None
        peak, fits, error, seconds = 0, True, None, None
        watcher = None if self.cuda else _PeakWatcher(self._libc, self._allocated)
        try:
            model, optimizer = self._build(attention, checkpointing)
            batch = self._batch(length)
            start = None
            for step in range(2):
                if step == 1:
                    start = time.perf_counter()
                if watcher is not None:
                    watcher.__enter__()
                try:
                    with autocast:
                        loss = model(**batch).loss
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    del loss
                finally:
                    if watcher is not None:
                        watcher.__exit__(None, None, None)
                if self.cuda:
                    torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        except torch.cuda.OutOfMemoryError as err:
            fits, error = False, str(err).splitlines()[0][:200]
        finally:
            if self.cuda:
                peak = torch.cuda.max_memory_allocated() - base
            else:
                peak = watcher.peak - base
            del model, optimizer, batch
            gc.collect()
            if self.cuda:
                torch.cuda.empty_cache()
        if not self.cuda and self.args.memory_gib and peak > self.args.memory_gib * 2**30:
            fits, error = False, f"peak {peak / 2**30:.2f} GiB over the {self.args.memory_gib} GiB budget"
        return {"attention": attention, "checkpointing": checkpointing, "input_tokens": length, "fits": fits,
                "peak_gib": peak / 2**30, "seconds_per_step": seconds, "error": error}


class _PeakWatcher:
    """Peak of glibc's bytes in use, read after every aten operation (the backward pass included)."""

    def __init__(self, libc, allocated):
        from torch.utils._python_dispatch import TorchDispatchMode

        watcher = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                watcher.peak = max(watcher.peak, allocated(libc))
                return out

        self.peak = 0
        self._mode = Mode()

    def __enter__(self):
        self._mode.__enter__()

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)


def longest(probe: Probe, attention: str, checkpointing: bool, max_positions: int, log) -> tuple[dict | None,
                                                                                                  list[dict]]:
    """Bisection over multiples of the window: the longest length that fits, and every probe."""
    window = probe.window
    lo, hi = 0, max_positions // window  # lo fits (0: nothing yet), hi + 1 does not or is past the table
    probes: list[dict] = []
    best = None
    # try the top first: with a short table everything may fit
    candidates = [hi]
    while candidates:
        k = candidates.pop()
        result = probe.run(attention, checkpointing, k * window)
        probes.append(result)
        log(f"  {attention:5s} checkpointing {'on ' if checkpointing else 'off'} {k * window:6d} tokens: "
            f"{'fits' if result['fits'] else 'does not fit'} (peak {result['peak_gib']:.2f} GiB)")
        if result["fits"]:
            lo, best = k, result
        else:
            hi = k - 1
        if lo < hi:
            candidates.append((lo + hi + 1) // 2)
    return best, probes


def render(args, results: list[dict], machine: str) -> str:
    lines = [f"# Longest input at batch 1 ({args.device}, {args.precision}, preset {args.preset})", "",
             f"- machine: {machine}",
             f"- model: random LED, preset {args.preset} (window {PRESETS[args.preset].window}), "
             f"{args.max_positions} encoder positions; answer {args.answer_tokens} tokens; global attention on "
             f"{args.global_tokens} tokens; AdamW, gradient clipping",
             "- limit: " + (f"{args.memory_gib} GiB" + (" of the GPU" if args.device == "cuda" else
                                                          " of peak allocated memory (CPU)")
                            if args.memory_gib else "the GPU's memory"),
             f"- command: `python benchmarks/longest_input.py {' '.join(args.argv)}`", "",
             "| encoder attention | gradient checkpointing | longest input (tokens) | peak at that length | s/step |",
             "| --- | --- | ---: | ---: | ---: |"]
    for r in results:
        best = r["best"]
        length = f"{best['input_tokens']:,}" if best else f"< {PRESETS[args.preset].window}"
        capped = " (the position table's end)" if best and best["input_tokens"] >= args.max_positions else ""
        lines.append(f"| {r['attention']} | {'on' if r['checkpointing'] else 'off'} | {length}{capped} | "
                     + (f"{best['peak_gib']:.2f} GiB | {best['seconds_per_step']:.2f} |" if best else "- | - |"))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:4]))
    parser.add_argument("--preset", choices=LED_PRESETS, default="led-base")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--memory-gib", type=float, default=None,
                        help="memory limit (required on CPU; on a GPU, default: the whole card)")
    parser.add_argument("--max-positions", type=int, default=16384,
                        help="encoder position table (LED-base: 16384); the search stops there")
    parser.add_argument("--answer-tokens", type=int, default=256)
    parser.add_argument("--global-tokens", type=int, default=64)
    parser.add_argument("--attention", choices=ATTENTIONS, action="append",
                        help="encoder attention(s) to search (repeatable; default: both)")
    parser.add_argument("--checkpointing", choices=["off", "on"], action="append",
                        help="with / without gradient checkpointing (repeatable; default: both)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument("--out", type=Path, help="also write the table to this Markdown file")
    parser.add_argument("--json", action="store_true", help="print every probe as JSON after the table")
    args = parser.parse_args(argv)
    args.argv = argv
    if args.device == "cpu" and not args.memory_gib:
        parser.error("--memory-gib is required on CPU (the budget that stands for a GPU's memory)")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device is visible")
    if args.max_positions < PRESETS[args.preset].window:
        parser.error(f"--max-positions must be at least the window ({PRESETS[args.preset].window})")

    probe = Probe(args)
    results = []
    for attention in args.attention or ATTENTIONS:
        for ckpt in [c == "on" for c in (args.checkpointing or ["off", "on"])]:
            best, probes = longest(probe, attention, ckpt, args.max_positions,
                                   lambda m: print(m, file=sys.stderr, flush=True))
            results.append({"attention": attention, "checkpointing": ckpt, "best": best, "probes": probes})
    text = render(args, results, machine_line(args.device))
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    if args.json:
        print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
