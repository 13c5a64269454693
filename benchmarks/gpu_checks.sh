#!/usr/bin/env bash
# The GPU checks in one go, for a machine with one CUDA GPU (about 8-10 minutes on an H100 for LED's, plus
# the two other families' benchmarks, not timed yet):
#   1. lfqa's SDPA encoder attention against transformers' on the GPU (fp32 and bf16 autocast)
#   2. make bench in bf16 with LED-base's shape, with MFU (a, b, c, d); BART-base's and LongT5-base's (b, c)
#   3. the longest input that trains at batch 1, with and without gradient checkpointing, per attention
#   4. where a step's time goes (torch.profiler)
# Results go to $OUT (default benchmarks/results/gpu-<date>/). Usage:
#   OUT=/tmp/gpu bash benchmarks/gpu_checks.sh            # after `make setup` (or with a venv that has lfqa)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-benchmarks/results/gpu-$(date +%F)}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"

echo "== 1. SDPA attention vs transformers' on the GPU"
"$PY" - <<'EOF' | tee "$OUT/attention-check.txt"
import copy, torch
from transformers import LEDConfig, LEDForConditionalGeneration
from lfqa.led_attention import use_sdpa_encoder_attention
torch.manual_seed(0)
cfg = LEDConfig(vocab_size=50265, d_model=768, encoder_layers=2, decoder_layers=2, encoder_attention_heads=12,
                decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072, attention_window=1024,
                max_encoder_position_embeddings=16384, max_decoder_position_embeddings=1024, dropout=0.0)
eager = LEDForConditionalGeneration(cfg).cuda().train()
sdpa = copy.deepcopy(eager)
use_sdpa_encoder_attention(sdpa)
ids = torch.randint(5, 50000, (2, 3000), device="cuda")
mask = torch.ones_like(ids); mask[1, 2100:] = 0
glob = torch.zeros_like(ids); glob[:, :40] = 1
labels = torch.randint(5, 50000, (2, 200), device="cuda")
for dtype in (torch.float32, torch.bfloat16):
    grads = []
    for model in (eager, sdpa):
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = model(input_ids=ids, attention_mask=mask, global_attention_mask=glob, labels=labels)
        out.loss.backward()
        grads.append((out.loss.item(), torch.cat([p.grad.flatten().float() for p in model.parameters()])))
    (l0, g0), (l1, g1) = grads
    rel = ((g1 - g0).norm() / g0.norm()).item()
    print(f"{dtype}: loss eager {l0:.6f} sdpa {l1:.6f}; gradient relative difference {rel:.2e}")
    assert abs(l0 - l1) < (1e-4 if dtype == torch.float32 else 2e-2) and rel < (1e-3 if dtype == torch.float32 else 5e-2)
# lfqa plan assumes the memory-efficient kernel (no stored probabilities): this raises if it cannot run
from torch.nn.attention import SDPBackend, sdpa_kernel
torch.cuda.reset_peak_memory_stats()
with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]), torch.autocast("cuda", dtype=torch.bfloat16):
    sdpa(input_ids=ids, attention_mask=mask, global_attention_mask=glob, labels=labels).loss.backward()
print(f"memory-efficient SDPA kernel: ok, peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
print("ok")
EOF

echo "== 2. make bench, bf16, led-base shape, with MFU"
"$PY" benchmarks/run.py --device cuda --precision bf16 --preset led-base --samples 600 --seed-samples 16 \
    --variants abcd --out "$OUT/bench-led-base-bf16.md"
# the other families on the same rows: BART-base (inputs cut to 1,024) and LongT5-base (transient-global)
for preset in bart-base long-t5-base; do
    "$PY" benchmarks/run.py --device cuda --precision bf16 --preset "$preset" --samples 600 --variants bc \
        --out "$OUT/bench-$preset-bf16.md"
done

echo "== 3. longest input at batch 1"
"$PY" benchmarks/longest_input.py --device cuda --precision bf16 --preset led-base --max-positions 65536 \
    --out "$OUT/longest-input-led-base-bf16.md"

echo "== 4. profile of one step"
"$PY" benchmarks/profile_step.py --device cuda --precision bf16 --preset led-base --rows 16 \
    > "$OUT/profile-led-base-bf16.md"
"$PY" benchmarks/profile_step.py --device cuda --precision bf16 --preset led-base --rows 16 \
    --encoder-attention eager --no-fused > "$OUT/profile-led-base-bf16-eager.md"
echo "results in $OUT"
