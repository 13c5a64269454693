"""Measure the peak memory of real LED training steps on CPU and compare it with ``lfqa plan``'s estimate.

    python benchmarks/plan_memory.py                    # every case; writes benchmarks/results/plan-memory-cpu.md
    python benchmarks/plan_memory.py --case tiny-1k     # some cases, table on stdout only
    python benchmarks/plan_memory.py --case tiny-1k --json   # JSON on stdout (the accuracy test uses this)

Each case runs in a fresh process: plain ``torch.optim.AdamW``, a random LED built from an ``LEDConfig``,
a random padded batch of the case's shape, one warm-up step (it creates Adam's states) and then measured
steps of forward, backward, gradient clipping, optimizer step and ``zero_grad`` - the order ``lfqa.train``
uses. fp32 is the plan's "1 GPU" layout with ``device="cpu"``; bf16 casts the whole model (no autocast),
which is how a DeepSpeed bf16 engine holds activations.

Two peaks are measured, both relative to the process just before the model is built:

* **allocated**: the CPU equivalent of ``torch.cuda.max_memory_allocated`` (PyTorch keeps no such
  statistic for CPU): glibc's bytes in use (``mallinfo2``: ``uordblks + hblkhd``) read after every aten
  operation by a ``TorchDispatchMode``, which also sees the backward pass. This is what the plan estimates.
* **RSS**: the kernel's peak resident set (``VmHWM`` in ``/proc/self/status``, reset by writing 5 to
  ``/proc/self/clear_refs``) - what the operating system sees, with the allocator's fragmentation.

It also counts the activations the forward pass saved for backward (``saved_tensors_hooks``, each storage
once), to check the plan's activation inventory on its own.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "plan-memory-cpu.md"

# name: (LEDConfig fields, batch, input tokens, answer tokens, global tokens)
CASES = {
    # the tiny-cpu job's model and batch (d 128, 2+2 layers, window 16)
    "tiny-1k": (dict(d_model=128, encoder_layers=2, decoder_layers=2, heads=4, ffn=256, window=16, vocab=2000,
                     max_input=1024, max_answer=256), 4, 1024, 256, 16),
    # a mid-sized LED: d 256, 4+4 layers, window 256 (DESIGN.md's small LED has this width and window)
    "mid-2k": (dict(d_model=256, encoder_layers=4, decoder_layers=4, heads=4, ffn=1024, window=256, vocab=8000,
                    max_input=4096, max_answer=512), 2, 2048, 256, 32),
    "mid-4k": (dict(d_model=256, encoder_layers=4, decoder_layers=4, heads=4, ffn=1024, window=256, vocab=8000,
                    max_input=4096, max_answer=512), 1, 4096, 256, 32),
    # wider: d 512, 8 heads, window 512
    "wide-4k": (dict(d_model=512, encoder_layers=2, decoder_layers=2, heads=8, ffn=2048, window=512, vocab=16000,
                     max_input=4096, max_answer=512), 1, 4096, 384, 48),
}

BF16_CASES = ("tiny-1k", "mid-4k")
"""Cases also run with the model cast to bf16 (by default)."""


def led_config(fields: dict):
    from transformers import LEDConfig

    return LEDConfig(
        vocab_size=fields["vocab"], d_model=fields["d_model"], encoder_layers=fields["encoder_layers"],
        decoder_layers=fields["decoder_layers"], encoder_attention_heads=fields["heads"],
        decoder_attention_heads=fields["heads"], encoder_ffn_dim=fields["ffn"], decoder_ffn_dim=fields["ffn"],
        attention_window=fields["window"], max_encoder_position_embeddings=fields["max_input"],
        max_decoder_position_embeddings=fields["max_answer"], pad_token_id=1, bos_token_id=0, eos_token_id=2,
        decoder_start_token_id=2,
    )


# --- measuring (in the child process) ---------------------------------------------------------------------


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _libc():
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    return libc


def allocated_bytes(libc) -> int:
    """Bytes malloc has handed out and not got back (all arenas, plus mmap-ed blocks)."""
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure(case: str, checkpointing: bool, dtype: str = "fp32", steps: int = 2, attention: str = "sdpa") -> dict:
    """Train ``steps`` measured steps (after one warm-up step) and return the peaks in bytes.

    ``dtype="bf16"`` casts the whole model to bfloat16 (as a DeepSpeed bf16 engine does; no autocast), to
    check the plan's 16-bit activation inventory.
    """
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from transformers import LEDForConditionalGeneration

    from lfqa.led_attention import set_encoder_attention
    from lfqa.modeling import enable_gradient_checkpointing

    fields, batch, input_tokens, answer_tokens, global_tokens = CASES[case]
    torch.set_num_threads(1)
    torch.manual_seed(0)
    libc = _libc()

    class PeakAllocated(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.peak = 0
            self.phase = self.peak_phase = ""

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            now = allocated_bytes(libc)
            if now > self.peak:
                self.peak, self.peak_phase = now, f"{self.phase} ({func.__name__})"
            return out

    config = led_config(fields)
    ids = torch.randint(5, config.vocab_size, (batch, input_tokens))
    # Rows of different lengths, padded as lfqa's collator pads them (the longest row to the window):
    # padding makes LED build its 4-d decoder masks, as in real batches.
    attention_mask = torch.ones_like(ids)
    for row in range(batch):
        attention_mask[row, input_tokens - 3 - row * input_tokens // (2 * batch):] = 0
    ids[attention_mask == 0] = config.pad_token_id
    global_mask = torch.zeros(batch, input_tokens, dtype=torch.long)
    global_mask[:, :global_tokens] = 1
    inputs = {"input_ids": ids, "attention_mask": attention_mask, "global_attention_mask": global_mask,
              "labels": torch.randint(5, config.vocab_size, (batch, answer_tokens))}
    base_allocated = allocated_bytes(libc)
    base_rss = _status_kib("VmRSS") * 1024
    rss_reset = reset_peak_rss()

    model = LEDForConditionalGeneration(config)
    set_encoder_attention(model, attention)  # as lfqa's loader does (model.encoder_attention)
    if dtype == "bf16":
        model.to(torch.bfloat16)
    model.train()
    if checkpointing:
        enable_gradient_checkpointing(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    tracker = PeakAllocated()

    def step() -> float:
        tracker.phase = "forward"
        loss = model(**inputs).loss
        tracker.phase = "backward"
        loss.backward()
        tracker.phase = "optimizer step"
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        return loss.item()

    step()  # warm-up: Adam's states appear here, and so do what the first steps allocate besides tensors
    # (lazily imported modules, oneDNN's primitive caches): from here on, what malloc holds beyond the
    # weights and Adam's states is not training memory, so it becomes the baseline.
    states = sum(p.nbytes for p in model.parameters()) + sum(
        v.nbytes for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))
    base = allocated_bytes(libc) - states
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        saved.setdefault(storage.data_ptr(), storage.nbytes())
        return tensor

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(**inputs).loss
    saved_bytes = sum(n for ptr, n in saved.items() if ptr not in params)
    loss.backward()
    optimizer.zero_grad()
    del loss

    start = time.perf_counter()
    with tracker:
        for _ in range(steps):
            step()
    seconds = (time.perf_counter() - start) / steps
    peak_rss = _status_kib("VmHWM") * 1024 if rss_reset else None
    return {
        "case": case, "checkpointing": checkpointing, "dtype": dtype, "attention": attention,
        "batch": batch, "input_tokens": input_tokens,
        "answer_tokens": answer_tokens, "global_tokens": global_tokens, "config": fields,
        "parameters": sum(p.numel() for p in model.parameters()),
        "peak_allocated": tracker.peak - base, "peak_phase": tracker.peak_phase,
        "not_tensors_after_warmup": base - base_allocated,
        "peak_rss": None if peak_rss is None else peak_rss - base_rss,
        "saved_after_forward": saved_bytes, "seconds_per_step": seconds,
    }


# --- estimating and comparing (in the parent) -----------------------------------------------------------


def plan_estimate(case: str, checkpointing: bool, dtype: str = "fp32", attention: str = "sdpa") -> dict:
    """The plan's numbers for the same run: one process, PyTorch AdamW, on CPU.

    fp32 goes through the plan's own "1 GPU" layout (``model_states`` with ``device="cpu"``). A bf16 model
    has no config of its own in the plan: its activations are those of a DeepSpeed bf16 engine
    (``tensor_bytes("bf16", "deepspeed", "cpu")``) and its states are bf16 weights, bf16 gradients and
    AdamW's two bf16 moments (2 + 2 + 4 bytes per parameter).
    """
    from lfqa.plan import (
        ModelStates,
        Strategy,
        Workload,
        model_states,
        saved_after_forward,
        shape_from_led_config,
        tensor_bytes,
        walk_step,
    )

    fields, batch, input_tokens, answer_tokens, global_tokens = CASES[case]
    shape = shape_from_led_config(led_config(fields), case, encoder_attention=attention)
    workload = Workload(batch_size=batch, input_tokens=input_tokens, answer_tokens=answer_tokens,
                        global_tokens=global_tokens)
    if dtype == "fp32":
        single = Strategy(name="1 process", accelerate_config="accelerate_configs/single-gpu.yaml", rank=0)
        states = model_states(shape, single, n=1, precision="fp32", device="cpu")
        t = tensor_bytes("fp32", "torch", "cpu")
    else:
        P = shape.parameters
        states = ModelStates(params=2 * P, grads=2 * P, optimizer=4 * P, buffers_persistent=0, buffers_backward=0,
                             grads_grow=True, step_temporary=2 * 2 * max(shape.parameter_sizes), cpu_per_process=0)
        t = tensor_bytes("bf16", "deepspeed", "cpu")
    peak = walk_step(shape, workload, t, states, checkpointing)
    return {"peak": peak.total, "peak_phase": peak.phase,
            "saved_after_forward": saved_after_forward(shape, workload, t, checkpointing),
            "model_states": states.params + states.grads + states.optimizer}


def run_case(case: str, checkpointing: bool, dtype: str = "fp32", attention: str = "sdpa") -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TRANSFORMERS_VERBOSITY="error", OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--measure", case, "--dtype", dtype,
           "--encoder-attention", attention]
    if checkpointing:
        cmd.append("--checkpointing")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{case}: measuring failed:\n{done.stderr[-3000:]}")
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    measured["estimate"] = plan_estimate(case, checkpointing, dtype, attention)
    measured["error"] = measured["estimate"]["peak"] / measured["peak_allocated"] - 1
    measured["error_rss"] = (measured["estimate"]["peak"] / measured["peak_rss"] - 1) if measured["peak_rss"] else None
    measured["error_saved"] = measured["estimate"]["saved_after_forward"] / measured["saved_after_forward"] - 1
    return measured


def _mib(x: float) -> str:
    return f"{x / 2**20:,.0f}"


def table(results: list[dict]) -> str:
    lines = [
        "| case | model (parameters) | dtype | batch x input + answer | ckpt | estimate MiB | measured MiB | error "
        "| peak: measured in / estimated in | saved activations: plan / measured MiB | peak RSS MiB | s/step |",
        "| --- | --- | --- | --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    for r in results:
        c = r["config"]
        model = (f"d {c['d_model']}, {c['encoder_layers']}+{c['decoder_layers']} layers, window {c['window']}, "
                 f"vocab {c['vocab']} ({r['parameters'] / 1e6:.1f}M)")
        # With checkpointing the hooks do not see what checkpointed layers keep (checkpoint's own hooks win).
        saved = ("n/a" if r["checkpointing"] else
                 f"{_mib(r['estimate']['saved_after_forward'])} / {_mib(r['saved_after_forward'])}")
        rss = _mib(r["peak_rss"]) if r["peak_rss"] else "n/a"
        lines.append(
            f"| {r['case']} | {model} | {r['dtype']} | {r['batch']} x {r['input_tokens']} + {r['answer_tokens']} "
            f"| {'on' if r['checkpointing'] else 'off'} | {_mib(r['estimate']['peak'])} "
            f"| {_mib(r['peak_allocated'])} | {r['error']:+.1%} | {r['peak_phase']} / {r['estimate']['peak_phase']} "
            f"| {saved} | {rss} | {r['seconds_per_step']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", action="append", choices=sorted(CASES), help="run only these (repeatable)")
    parser.add_argument("--checkpointing-only", choices=["on", "off"], help="only with / without checkpointing")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], action="append",
                        help="model dtype (repeatable; default: fp32 for every case, bf16 for BF16_CASES)")
    parser.add_argument("--encoder-attention", choices=["sdpa", "eager"], default="sdpa",
                        help="LED encoder attention, as model.encoder_attention (default: sdpa, lfqa's default)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON, write no file")
    parser.add_argument("--measure", choices=sorted(CASES), help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:  # child process
        print(json.dumps(measure(args.measure, args.checkpointing, (args.dtype or ["fp32"])[0],
                                 attention=args.encoder_attention)))
        return 0
    sys.path.insert(0, str(ROOT))
    cases = args.case or list(CASES)
    modes = {"on": [True], "off": [False]}.get(args.checkpointing_only, [False, True])
    runs = [(case, dtype) for dtype in (args.dtype or ["fp32", "bf16"]) for case in cases
            if args.dtype or dtype == "fp32" or case in BF16_CASES]
    results = [run_case(case, ckpt, dtype, args.encoder_attention) for case, dtype in runs for ckpt in modes]
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    text = table(results)
    print(text)
    if not args.case and not args.checkpointing_only and not args.dtype and args.encoder_attention == "sdpa":
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(report(text, results))
        print(f"written to {RESULTS.relative_to(ROOT)}")
    return 0


def report(text: str, results: list[dict]) -> str:
    import platform

    import torch
    import transformers

    errors = [r["error"] for r in results]
    extra = [r["not_tensors_after_warmup"] / 2**20 for r in results]
    saved = max(abs(r["error_saved"]) for r in results if not r["checkpointing"])
    return f"""# lfqa plan: estimate vs measured peak memory (CPU)

LED's encoder attention is lfqa's default, `model.encoder_attention: sdpa` (`--encoder-attention eager` measures
transformers' own; this file's version of commit 3ab4b4c has those runs: -0.5% to +11.2%).

Generated by `python benchmarks/plan_memory.py` ({len(results)} runs, about 7 minutes) on {platform.machine()}
({os.cpu_count()} cores, shared), torch {torch.__version__}, transformers {transformers.__version__}. Each run: a
fresh process, a random LED built from an `LEDConfig`, a random padded batch of the shape given, plain
`torch.optim.AdamW`, one warm-up step, then the peak over two training steps (forward, backward, gradient clipping,
optimizer step, `zero_grad`). *fp32*: the model as `lfqa train` runs it on one process (the plan's "1 GPU" layout
with `device="cpu"`). *bf16*: the whole model cast to bfloat16 with no autocast, which is how a DeepSpeed bf16
engine holds activations (states: bf16 weights, gradients and AdamW moments, 8 bytes per parameter).

- **estimate**: `lfqa.plan` for the same shape (model states + the layer-by-layer walk through the step).
- **measured**: the CPU counterpart of `torch.cuda.max_memory_allocated` (PyTorch has no such statistic for CPU):
  bytes malloc has handed out (`mallinfo2`), read after every aten operation by a `TorchDispatchMode` (which also
  sees the backward pass), minus what malloc held after the warm-up step besides the weights and Adam's states
  (lazily imported modules, oneDNN caches: {min(extra):.0f}-{max(extra):.0f} MiB here; on a GPU their counterparts
  are in the plan's assumed 1 GiB of CUDA context).
- **peak: measured in / estimated in**: the phase and operation at the measured peak, and where the walk puts it.
- **saved activations**: what the forward pass keeps for backward, counted by storage with `saved_tensors_hooks`,
  against the plan's inventory (n/a with checkpointing: checkpoint's own hooks hide what its layers keep).
- **peak RSS**: the kernel's peak resident set (`VmHWM`, reset through `/proc/self/clear_refs`) above the process
  before the model was built, for reference.

{text}

Error of the estimate against the measured peak: {min(errors):+.1%} to {max(errors):+.1%}
(mean {sum(errors) / len(errors):+.1%}); the activation inventory matches the saved tensors within {saved:.1%}.

## Sources of error

1. **Checkpointing runs are over-estimated (up to +8%; +11% with transformers' attention).** The walk puts a
   recomputed layer's largest backward temporaries on top of everything the stages before it saved; PyTorch frees
   recomputed tensors as soon as their backward has used them, so fewer of them are alive at the worst moment. The
   error is on the safe side.
2. **Temporaries are the largest few tensors of each stage**, read from the code (the SDPA attention's padded
   key/value windows and masks, or `_sliding_chunks_query_key_matmul` and its backward, the fp32 softmax,
   `as_strided`'s backward with its int64 index, the cross-attention scores, the logits): small intermediates are
   left out. Without checkpointing the error is under 3%.
3. **The peak can fall elsewhere than the walk says** (a `mm` of the LM head's backward rather than the encoder's
   last layer): the two candidates are within a few percent of each other.
4. **RSS is 1.3-2.7x the allocated peak.** glibc keeps freed heap memory (after the first large free it moves large
   blocks from mmap onto the heap) and the process allocates beyond tensors. On a GPU the caching allocator's
   reserved-but-free memory plays this part; the plan leaves 10% of the card for it.
5. **Not measured here (no GPU):** CUDA autocast's dtypes (it runs softmax and layer norm in fp32; CPU autocast does
   not, so it cannot stand in), bool dropout masks (1 byte instead of the CPU's float noise), the foreach AdamW
   temporary (4 bytes per parameter), DeepSpeed's reduce buckets and ZeRO-3's gathered weights, the CUDA context.
   These are derived from the sources of torch 2.13, DeepSpeed 0.19.8 and accelerate 1.15. To check them on a GPU:
   run a few steps of `lfqa train` under each accelerate config and compare `torch.cuda.max_memory_allocated()`
   (+ the context from `nvidia-smi`) with `lfqa plan` for the same job.
"""


if __name__ == "__main__":
    sys.exit(main())
