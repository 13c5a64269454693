"""Training FLOPs of an encoder-decoder, and the peak FLOP/s they are compared with.

One model for every figure lfqa reports: ``train/mfu`` in training, the benchmark's model TFLOP/s and MFU.

Model FLOPs count the multiply-adds (2 FLOPs each) that the model's mathematics needs for the real tokens:
each input token passes the encoder's weights, its attention (every input token for BART and T5, LED's band
and global tokens, LongT5's local band and its transient global tokens), and is projected once per decoder
layer for cross-attention; each answer token passes the decoder's weights, causal self-attention,
cross-attention over the input and the LM head. Embedding and position lookups cost nothing; layer norms,
softmax and activations are left out, as usual, and so are T5's relative position biases (a lookup
per head) and LongT5's sums of each block into its global token (additions, which transformers happens to
compute as a one-hot product). Training is 3 x forward (backward is twice forward).
Hardware FLOPs are what the device computes: the padded batch, plus the forward recomputed by gradient
checkpointing. Local attention is counted by its band there too, although the kernels compute more: LongT5
scores each block of ``local_radius + 1`` queries against three whole blocks (3 x 128 keys instead of a band of
255 for long-t5-tglobal-base), and eager causal self-attention computes the whole square.

    python -c "from lfqa.flops import measure_matmul_flops; print(measure_matmul_flops('cpu', 'fp32') / 1e9)"
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import numpy as np

#: Dense (no 2:4 sparsity) peak FLOP/s from NVIDIA's data sheets: (pattern matched against
#: ``torch.cuda.get_device_name()``, bf16/fp16 tensor cores, fp32 without TF32). The first match wins, so
#: "H100 PCIe" comes before "H100".
PEAK_FLOPS: tuple[tuple[str, float, float], ...] = (
    (r"H100.*PCIe", 756e12, 51e12),
    (r"H100.*NVL", 835e12, 60e12),
    (r"H100", 989e12, 67e12),  # SXM ("NVIDIA H100 80GB HBM3")
    (r"H200.*NVL", 835e12, 60e12),
    (r"H200", 989e12, 67e12),  # SXM and GH200
    (r"B200", 2250e12, 80e12),
    (r"A100", 312e12, 19.5e12),
    (r"L40S", 362e12, 91.6e12),
    (r"\bL4\b", 121e12, 30.3e12),
    (r"\bA10G?\b", 125e12, 31.2e12),  # AWS's A10G has no public data sheet; this is the A10's figure
    (r"4090", 165e12, 82.6e12),
)


def table_peak_flops(device_name: str, precision: str) -> float | None:
    """Dense peak FLOP/s of a known GPU at ``precision`` (fp32, bf16, fp16); None for unknown devices."""
    for pattern, half, single in PEAK_FLOPS:
        if re.search(pattern, device_name, re.IGNORECASE):
            return single if precision == "fp32" else half
    return None


def measure_matmul_flops(device, precision: str, seconds: float = 0.25, size: int = 1024) -> float:
    """This device's dense matrix-product rate at ``precision``, measured now (a sub-second GEMM probe).

    CPUs have no data-sheet peak that fits every machine lfqa runs on (the cores, vector units and bf16
    support differ), so utilisation on CPU is reported against what a plain large matmul reaches here.
    """
    import torch

    device = torch.device(device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    # A generator of its own: the probe runs after a resume restored the RNG states, and must not move them.
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, generator=generator).to(dtype)
    b = torch.randn(size, size, device=device, generator=generator).to(dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    torch.mm(a, b)  # warm-up: kernel choice, first-touch of the output
    sync()
    count, started = 0, time.perf_counter()
    while True:
        torch.mm(a, b)
        count += 1
        if count % 4 == 0:
            sync()
            elapsed = time.perf_counter() - started
            if elapsed >= seconds:
                return 2.0 * size**3 * count / elapsed


@dataclass(frozen=True)
class PeakFlops:
    flops_per_s: float
    source: str
    """Where the figure comes from: the data-sheet table or the GEMM probe."""


def peak_flops(device, precision: str) -> PeakFlops:
    """The device's peak: from the table for known GPUs, else measured by the GEMM probe (CPU, other GPUs)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        value = table_peak_flops(name, precision)
        if value is not None:
            return PeakFlops(value, f"{name} data sheet, dense {precision}")
    measured = measure_matmul_flops(device, precision)
    return PeakFlops(measured, f"measured {precision} matmul rate of this {device.type}")


@dataclass(frozen=True)
class ModelShape:
    """What the FLOPs of an encoder-decoder depend on (LED, BART, T5 / Flan-T5, LongT5)."""

    d_model: int
    encoder_layers: int
    decoder_layers: int
    encoder_ffn_dim: int
    decoder_ffn_dim: int
    vocab_size: int
    one_sided_window: int | None
    """Local attention: each input token attends to this many tokens on either side (LED's band, LongT5's
    ``local_radius``); None for full attention (BART, T5)."""
    global_projections: bool
    """LED: separate query/key/value projections for its global attention (the question's tokens)."""
    attention_dim: int | None = None
    """Width of the query/key/value projections: T5's ``num_heads x d_kv``, which may differ from ``d_model``
    (t5-11b: 128 x 128 against 1,024); None when it is ``d_model`` (LED, BART)."""
    gated_ffn: bool = False
    """T5 v1.1, Flan-T5, LongT5 (``feed_forward_proj: gated-*``): two input matrices in each feed-forward."""
    global_block_size: int | None = None
    """LongT5 transient-global: one global token per this many input tokens, seen by every token."""

    @property
    def attention_width(self) -> int:
        return self.attention_dim or self.d_model

    @classmethod
    def from_config(cls, config) -> ModelShape:
        """The shape of a transformers config of one of the families lfqa trains (ValueError for others)."""
        kind = getattr(config, "model_type", None)
        if kind in ("t5", "mt5", "umt5", "longt5"):
            return _t5_shape(config)
        if not hasattr(config, "encoder_ffn_dim"):  # BART-style attribute names, LED's included
            raise ValueError(f"no FLOPs model for '{kind}' models: lfqa counts LED, BART, T5 and LongT5")
        window = getattr(config, "attention_window", None) if kind == "led" else None
        if isinstance(window, (list, tuple)):
            window = max(window)
        return cls(d_model=config.d_model, encoder_layers=config.encoder_layers,
                   decoder_layers=config.decoder_layers, encoder_ffn_dim=config.encoder_ffn_dim,
                   decoder_ffn_dim=config.decoder_ffn_dim, vocab_size=config.vocab_size,
                   one_sided_window=None if window is None else window // 2,
                   global_projections=kind == "led")


def _t5_shape(config) -> ModelShape:
    """T5 and LongT5: one feed-forward width for both sides; LongT5's encoder attends locally."""
    local = config.model_type == "longt5"
    transient = local and config.encoder_attention_type == "transient-global"
    decoder_layers = config.num_decoder_layers if config.num_decoder_layers is not None else config.num_layers
    return ModelShape(
        d_model=config.d_model, encoder_layers=config.num_layers, decoder_layers=decoder_layers,
        encoder_ffn_dim=config.d_ff, decoder_ffn_dim=config.d_ff, vocab_size=config.vocab_size,
        # LongT5's locality mask keeps |i - j| < local_radius + 1 inside its three blocks
        one_sided_window=config.local_radius if local else None, global_projections=False,
        attention_dim=config.num_heads * config.d_kv, gated_ffn=bool(config.is_gated_act),
        global_block_size=config.global_block_size if transient else None,
    )


def band_pairs(length, window: int | None):
    """(query, key) pairs inside a sliding window of ``window`` tokens on either side (every pair without one)."""
    length = np.asarray(length, dtype=np.float64)
    if window is None:
        return length * length
    m = np.minimum(window, np.maximum(length - 1, 0))
    return length + 2 * (m * length - m * (m + 1) / 2)


def _ffn_weights(shape: ModelShape, ffn_dim: int) -> int:
    return (3 if shape.gated_ffn else 2) * shape.d_model * ffn_dim


def encoder_flops(shape: ModelShape, n, g):
    """Forward FLOPs of the encoder on inputs of ``n`` real tokens, ``g`` of them LED-global."""
    d, h = shape.d_model, shape.attention_width
    # q, k, v, o (+ LED's global k and v on every token) and the feed-forward
    weights = 4 * d * h + _ffn_weights(shape, shape.encoder_ffn_dim) + (2 * d * h if shape.global_projections else 0)
    enc = 2 * weights * n
    # Attention products (Q K^T and A V) over the full sequence or the local band
    enc += 4 * h * band_pairs(n, shape.one_sided_window)
    if shape.global_projections:  # LED: global q on the global tokens; they see every key, every token sees them
        enc += 2 * d * h * g + 4 * h * 2 * g * n
    if shape.global_block_size:
        # LongT5: each block of global_block_size tokens is summed into a global token (orphans join the
        # last block; the sum is additions only), projected to keys and values, and seen by every token.
        blocks = np.floor(n / shape.global_block_size)
        enc += 2 * 2 * d * h * blocks + 4 * h * n * blocks
    return enc * shape.encoder_layers


def forward_flops(shape: ModelShape, input_length, answer_length, global_tokens=0):
    """Forward FLOPs of one row (or arrays of rows) with these real lengths."""
    d, h = shape.d_model, shape.attention_width
    n, a = np.asarray(input_length, np.float64), np.asarray(answer_length, np.float64)
    g = np.asarray(global_tokens, np.float64)
    enc = encoder_flops(shape, n, g)
    # Decoder layer: self q, k, v, o, cross q and o, FFN per answer token; cross k and v per input token.
    dec_weights = 6 * d * h + _ffn_weights(shape, shape.decoder_ffn_dim)
    dec = 2 * dec_weights * a + 2 * 2 * d * h * n
    dec += 4 * h * a * (a + 1) / 2 + 4 * h * a * n  # causal self-attention, cross-attention
    dec *= shape.decoder_layers
    head = 2 * d * shape.vocab_size * a  # tied (LED, BART, T5) or not (T5 v1.1): the same product
    return enc + dec + head


def train_flops(shape: ModelShape, input_length, answer_length, global_tokens=0) -> float:
    """Model FLOPs of one training step (forward + backward) summed over rows with these real lengths."""
    return float(np.sum(3.0 * forward_flops(shape, input_length, answer_length, global_tokens)))


@dataclass(frozen=True)
class BatchFlops:
    model: float
    hardware: float


class FlopsCounter:
    """Model and hardware FLOPs of training batches (numpy on the host: computed while the batch is collated)."""

    def __init__(self, shape: ModelShape, gradient_checkpointing: bool = False, pad_to_multiple_of: int = 1):
        self.shape = shape
        self.recompute = gradient_checkpointing
        self.multiple = max(1, pad_to_multiple_of or 1)  # None: the family pads to no multiple

    @classmethod
    def for_model(cls, model, gradient_checkpointing: bool = False,
                  pad_to_multiple_of: int | None = 1) -> FlopsCounter:
        return cls(ModelShape.from_config(model.config), gradient_checkpointing, pad_to_multiple_of)

    def batch(self, input_lengths, answer_lengths, global_tokens, padded_input: int, padded_answer: int) -> BatchFlops:
        model = train_flops(self.shape, input_lengths, answer_lengths, global_tokens)
        rows = len(np.atleast_1d(input_lengths))
        width = -(-padded_input // self.multiple) * self.multiple
        forward = float(np.sum(forward_flops(self.shape, np.full(rows, width), np.full(rows, padded_answer),
                                             global_tokens)))
        return BatchFlops(model, forward * (4.0 if self.recompute else 3.0))
