"""``lfqa plan``: estimate the per-GPU memory of a training job under every shipped launch config.

    lfqa plan jobs/led-base-lfqa.yaml --gpus 8 --gpu-memory 80
    lfqa plan jobs/led-base-lfqa.yaml --gpus 1 --gpu-memory 24 --input-tokens 4096
    lfqa plan jobs/led-base-lfqa.yaml data.batch_size=2 --gpus 16 --nodes 2 --gpu-memory 40 --json

It covers LED models; for BART, T5 and LongT5 (which lfqa trains too) it says so in one line, since their
activations differ (full or block-local attention, T5's fp32 position biases) and are not inventoried here.

Nothing is downloaded and no GPU is needed: the model's shape comes from its config (the tiny model's
``model.tiny``, a local folder's ``config.json``, the hub cache, or the built-in table of
``allenai/led-base-16384`` / ``allenai/led-large-16384``) and its parameters are counted exactly by
building it on PyTorch's ``meta`` device.

How the estimate is made (every term has a docstring below):

* **Model states** per GPU follow the ZeRO paper's accounting, with the sizes DeepSpeed 0.19 and PyTorch
  really allocate: DDP keeps fp32 weights, fp32 gradients, Adam's two fp32 moments and its reducer's
  gradient buckets on every GPU; ZeRO-2 keeps 16-bit weights whole and shards gradients, the fp32 master
  copy and the moments over the N processes; ZeRO-3 shards the weights too but gathers them layer by
  layer; offload moves the master copy, the moments and the fp32 gradients (and with ``offload_param``
  the weights) to host memory. DeepSpeed's reduce buckets and ZeRO-3's gathered-weights working set are
  read from the JSONs in ``deepspeed_configs/``.
* **Activations** are an inventory of every tensor that LED's forward pass saves for backward (read from
  transformers' ``modeling_led.py`` and checked tensor by tensor with ``saved_tensors_hooks``), stage by
  stage within each layer, plus each stage's largest temporaries, in the dtype each tensor really has
  (autocast keeps the residual stream and softmax outputs in fp32; a DeepSpeed bf16 model holds
  everything in bf16 but LED's encoder softmax, which is always fp32).
* **The peak** is found by walking one training step layer by layer: forward (activations pile up),
  backward (activations are freed while gradients fill up; with gradient checkpointing each layer is
  recomputed right before its backward) and the optimizer step. An evaluation batch (validation loss
  and beam search with ``eval.batch_size`` rows) is estimated too. Both are compared with
  ``--gpu-memory`` less 10% headroom (allocator fragmentation, NCCL).

``benchmarks/plan_memory.py`` measures real training steps on CPU (fp32, and a bf16 model as DeepSpeed
runs it) against this estimate: within -1% and +11% (``benchmarks/results/plan-memory-cpu.md``).
What needs a GPU to check - CUDA autocast's dtypes, DeepSpeed's buffers, the CUDA context - is derived
from the sources of torch 2.13, DeepSpeed 0.19.8 and accelerate 1.15, not measured.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

from lfqa.config import ConfigError, JobConfig, load_job

GIB = 1024**3
REPO_ROOT = Path(__file__).resolve().parent.parent

HEADROOM = 0.10
"""Share of GPU memory left free: the caching allocator's fragmentation, NCCL's buffers, cuDNN/cuBLAS
workspaces. A job whose estimate is below 90% of the card is said to fit."""

CUDA_OVERHEAD_BYTES = 1 * GIB
"""Memory a CUDA process uses outside PyTorch's tensors: the CUDA context (~0.3-0.5 GiB on recent cards),
cuBLAS workspaces and kernel images. An assumption, not a measurement: ``nvidia-smi`` shows it as the
difference between a process's usage and ``torch.cuda.memory_reserved()``."""

DEFAULT_GLOBAL_TOKENS = {"question": 64, "first_token": 1}
"""Tokens with global attention per input when ``--global-tokens`` is not given: LFQA questions are
mostly 10-40 tokens (plus ``question:``), so 64 is a generous bound; ``first_token`` uses only ``<s>``."""

KNOWN_MODELS = {
    # The hub's config.json of each model (the fields that matter for memory), so that planning works
    # offline and without a hub cache.
    "allenai/led-base-16384": dict(
        d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12, decoder_attention_heads=12,
        encoder_ffn_dim=3072, decoder_ffn_dim=3072, vocab_size=50265, attention_window=[1024] * 6,
        max_encoder_position_embeddings=16384, max_decoder_position_embeddings=1024, dropout=0.1,
        attention_dropout=0.0, activation_dropout=0.0, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        decoder_start_token_id=2,
    ),
    "allenai/led-large-16384": dict(
        d_model=1024, encoder_layers=12, decoder_layers=12, encoder_attention_heads=16, decoder_attention_heads=16,
        encoder_ffn_dim=4096, decoder_ffn_dim=4096, vocab_size=50265, attention_window=[1024] * 12,
        max_encoder_position_embeddings=16384, max_decoder_position_embeddings=1024, dropout=0.1,
        attention_dropout=0.0, activation_dropout=0.0, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        decoder_start_token_id=2,
    ),
}


class PlanError(ValueError):
    """The plan cannot be made (an unknown model shape, impossible flags); the message is one line."""


# --- the model ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """What memory depends on in an LED model; ``parameters`` and the per-block counts are exact."""

    name: str
    d_model: int
    encoder_layers: int
    decoder_layers: int
    encoder_heads: int
    decoder_heads: int
    encoder_ffn: int
    decoder_ffn: int
    vocab_size: int
    attention_window: int
    """Two-sided window (LED pads inputs to a multiple of it); each token sees window/2 on either side."""
    max_input_tokens: int
    max_answer_tokens: int
    dropout: float
    attention_dropout: float
    activation_dropout: float
    parameters: int
    """Distinct parameters (the tied token embedding and LM head counted once)."""
    shared_parameters: int
    """The token embedding matrix shared by encoder, decoder and LM head (its gradient is made first)."""
    encoder_embedding_parameters: int
    """Encoder position embeddings and embedding layer norm."""
    decoder_embedding_parameters: int
    encoder_layer_parameters: int
    """One encoder layer (all are the same size)."""
    decoder_layer_parameters: int
    parameter_sizes: tuple[int, ...] = field(repr=False, default=())
    """Element count of every parameter (ZeRO-3 keeps those below its persistence threshold whole)."""
    encoder_attention: str = "sdpa"
    """``model.encoder_attention``: lfqa's blocked SDPA attention or transformers' ``eager`` one."""

    def persistent_parameters(self, threshold: int) -> int:
        """Parameters that ZeRO-3 does not shard: those with at most ``threshold`` elements."""
        return sum(n for n in self.parameter_sizes if n <= threshold)


def shape_from_led_config(config, name: str, encoder_attention: str = "sdpa") -> ModelShape:
    """Count the parameters of an ``LEDConfig`` on the meta device: exact, instant, no memory used."""
    import torch
    from transformers import LEDForConditionalGeneration

    with torch.device("meta"):
        model = LEDForConditionalGeneration(config)
    blocks: dict[str, int] = {}
    sizes = []
    for pname, p in model.named_parameters():  # named_parameters() yields a tied weight once
        sizes.append(p.numel())
        parts = pname.split(".")
        if pname in ("led.shared.weight", "lm_head.weight") or parts[-2] == "embed_tokens":
            key = "shared"
        elif parts[2] == "layers":
            key = f"{parts[1]}.layer.{parts[3]}"
        else:
            key = f"{parts[1]}.embedding"
        blocks[key] = blocks.get(key, 0) + p.numel()
    window = config.attention_window
    window = max(window) if isinstance(window, (list, tuple)) else int(window)
    return ModelShape(
        name=name, d_model=config.d_model, encoder_layers=config.encoder_layers,
        decoder_layers=config.decoder_layers, encoder_heads=config.encoder_attention_heads,
        decoder_heads=config.decoder_attention_heads, encoder_ffn=config.encoder_ffn_dim,
        decoder_ffn=config.decoder_ffn_dim, vocab_size=config.vocab_size, attention_window=window,
        max_input_tokens=config.max_encoder_position_embeddings,
        max_answer_tokens=config.max_decoder_position_embeddings, dropout=config.dropout,
        attention_dropout=config.attention_dropout, activation_dropout=config.activation_dropout,
        parameters=sum(sizes), shared_parameters=blocks.get("shared", 0),
        encoder_embedding_parameters=blocks.get("encoder.embedding", 0),
        decoder_embedding_parameters=blocks.get("decoder.embedding", 0),
        encoder_layer_parameters=blocks.get("encoder.layer.0", 0),
        decoder_layer_parameters=blocks.get("decoder.layer.0", 0),
        parameter_sizes=tuple(sizes), encoder_attention=encoder_attention,
    )


def led_config_for_job(job: JobConfig, model_config: str | None = None):
    """The ``LEDConfig`` of the job's model, without downloading anything.

    ``model_config`` (a ``config.json`` or a folder holding one) wins; then ``tiny-led`` (the built
    model's config when it is in ``model.cache_dir``, else ``model.tiny``), a local folder, the built-in
    table, and finally the local hub cache.
    """
    from transformers import AutoConfig, LEDConfig

    name = job.model.name_or_path
    if model_config:
        path = Path(model_config)
        path = path if path.is_file() else path / "config.json"
        if not path.is_file():
            raise PlanError(f"--model-config {model_config}: no config.json there")
        config = LEDConfig.from_json_file(str(path))
    elif name == "tiny-led":
        from lfqa.modeling import tiny_model_dir

        built = tiny_model_dir(job.model) / "config.json"
        if built.is_file():
            config = LEDConfig.from_json_file(str(built))
        else:  # not built yet: the tokenizer may end up a few tokens short of vocab_size; close enough
            tiny = job.model.tiny
            config = LEDConfig(
                vocab_size=tiny.vocab_size, d_model=tiny.d_model, encoder_layers=tiny.encoder_layers,
                decoder_layers=tiny.decoder_layers, encoder_attention_heads=tiny.attention_heads,
                decoder_attention_heads=tiny.attention_heads, encoder_ffn_dim=tiny.ffn_dim,
                decoder_ffn_dim=tiny.ffn_dim, attention_window=tiny.attention_window,
                max_encoder_position_embeddings=tiny.max_input_tokens,
                max_decoder_position_embeddings=tiny.max_answer_tokens,
            )
    elif (Path(name) / "config.json").is_file():
        config = AutoConfig.from_pretrained(name)
    elif family_by_name(name):  # before the hub cache, which usually does not hold them
        raise PlanError(not_led_message(f"model.name_or_path '{name}'", family_by_name(name)))
    elif name in KNOWN_MODELS:
        config = LEDConfig(**KNOWN_MODELS[name])
    else:
        try:
            config = AutoConfig.from_pretrained(name, revision=job.model.revision, local_files_only=True)
        except (OSError, ValueError):
            raise PlanError(f"model.name_or_path '{name}': no local config.json and not in the hub cache; "
                            "pass --model-config PATH (a config.json or a model folder)") from None
    if getattr(config, "model_type", None) != "led":
        where = f"--model-config {model_config}" if model_config else f"model.name_or_path '{name}'"
        raise PlanError(not_led_message(where, getattr(config, "model_type", None) or "unknown"))
    return config


TINY_NON_LED = {"tiny-bart": "bart", "tiny-t5": "t5", "tiny-longt5": "longt5"}
HUB_PREFIXES = (("facebook/bart-", "bart"), ("google/long-t5-", "longt5"), ("google/flan-t5-", "t5"),
                ("google/t5-", "t5"), ("google-t5/", "t5"), ("t5-", "t5"))
"""Hub ids of the other families lfqa trains, known without a config (there is seldom one offline)."""

FAMILY_NAMES = {"bart": "BART", "t5": "T5", "mt5": "mT5", "longt5": "LongT5"}


def family_by_name(name: str) -> str | None:
    """The family of a tiny builder or a well-known hub id of a non-LED family lfqa trains, else None."""
    if name in TINY_NON_LED:
        return TINY_NON_LED[name]
    return next((family for prefix, family in HUB_PREFIXES if name.startswith(prefix)), None)


def not_led_message(where: str, model_type: str) -> str:
    """The one line for a model whose memory lfqa plan does not know: which families it covers, and what
    there is for the others."""
    family = FAMILY_NAMES.get(model_type)
    if family is None:
        return f"{where}: lfqa plan covers LED models; '{model_type}' is no family lfqa trains"
    return (f"{where}: lfqa plan covers LED models; {family} models train but have no "
            "memory estimate (measure one: benchmarks/run.py reports each preset's peak memory)")


# --- the workload ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """One micro-batch on one GPU, at its worst case."""

    batch_size: int
    input_tokens: int
    """Encoder length, padded up to a multiple of the attention window (the collator does this)."""
    answer_tokens: int
    """Decoder length: the longest answer kept (``data.max_answer_tokens``)."""
    global_tokens: int
    """Tokens per input with global attention (the question)."""
    gradient_accumulation_steps: int = 1


def workload_for_job(job: JobConfig, shape: ModelShape, input_tokens: int | None = None,
                     global_tokens: int | None = None) -> Workload:
    window = shape.attention_window
    tokens = min(input_tokens or job.data.max_input_tokens, shape.max_input_tokens)
    padded = math.ceil(tokens / window) * window
    answer = min(job.data.max_answer_tokens, shape.max_answer_tokens)
    batch = job.data.batch_size
    if job.data.max_tokens_per_batch:  # the token budget caps the rows of a batch of such long inputs
        batch = max(1, min(batch, job.data.max_tokens_per_batch // (padded + answer)))
    g = global_tokens if global_tokens is not None else DEFAULT_GLOBAL_TOKENS[job.data.global_attention]
    return Workload(batch_size=batch, input_tokens=padded, answer_tokens=answer,
                    global_tokens=max(1, min(g, padded)),
                    gradient_accumulation_steps=job.train.gradient_accumulation_steps)


# --- how tensors are stored -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorBytes:
    """Bytes per element of each kind of tensor the model keeps, for one way of running it.

    Three regimes: fp32; PyTorch autocast (DDP or one GPU with ``train.precision`` bf16/fp16: fp32
    weights, matrix products in 16 bits, layer norms and softmax in fp32, a residual stream that stays
    fp32 because fp32 residual + 16-bit branch = fp32); and a DeepSpeed 16-bit model (the engine casts the
    module, so every activation is 16-bit; accelerate does not add autocast under DeepSpeed).
    """

    compute: int
    """Inputs and outputs of matrix products (linear layers, attention bmm/einsum)."""
    stream: int
    """The residual stream: layer-norm inputs, layer outputs kept by gradient checkpointing."""
    softmax: int
    """``F.softmax`` outputs without an explicit dtype (decoder attention): autocast runs softmax in fp32."""
    amp_copy: int
    """Autocast casts an fp32 tensor again for every matrix product that reads it, and keeps each copy:
    the size of such a 16-bit copy, 0 where there is no autocast."""
    logits: int
    """The LM head's logits and their ``log_softmax`` (fp32 under autocast: the fp32 bias promotes them)."""
    embed: int
    """The dtype of ``inputs_embeds``, in which LED builds its B x L x L encoder mask."""
    mask: int
    """A dropout mask: bool on CUDA (fused dropout), a float noise tensor of the input's dtype on CPU."""
    on_gpu: bool

    @property
    def autocast(self) -> bool:
        return self.amp_copy > 0


def tensor_bytes(precision: str, engine: Literal["torch", "deepspeed"], device: Literal["cuda", "cpu"]) -> TensorBytes:
    cuda = device == "cuda"
    if precision == "fp32":
        return TensorBytes(4, 4, 4, 0, 4, 4, 1 if cuda else 4, cuda)
    if engine == "deepspeed":
        return TensorBytes(2, 2, 2, 0, 2, 2, 1 if cuda else 2, cuda)
    return TensorBytes(2, 4, 4, 2, 4, 4, 1 if cuda else 2, cuda)


# --- activations ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    """A part of a layer, in forward order: what it saves for backward and its largest temporaries.

    In backward the stages run in reverse and each frees what it saved once its gradient is computed, so
    the layer's backward peak is at the stage where (saved by this and earlier stages + its temporaries)
    is largest, not at (everything saved + the largest temporary).
    """

    name: str
    saved: dict[str, float]
    """Bytes kept for backward, by tensor."""
    forward_temporary: float
    """Largest short-lived bytes while the stage runs forward (freed when it ends)."""
    backward_temporary: float
    """Largest short-lived bytes while the stage's backward runs (gradients in flight)."""

    @property
    def saved_bytes(self) -> float:
        return sum(self.saved.values())


@dataclass(frozen=True)
class LayerMemory:
    saved: float
    """Everything the layer keeps for backward."""
    forward_peak: float
    """Peak while the layer runs forward: what earlier stages saved + the running stage's saved + temporaries."""
    backward_peak: float
    """Peak while the layer runs backward (its saved tensors included)."""


def layer_memory(stages: list[Stage]) -> LayerMemory:
    so_far, forward, backward = 0.0, 0.0, 0.0
    for stage in stages:
        so_far += stage.saved_bytes
        forward = max(forward, so_far + stage.forward_temporary)
        backward = max(backward, so_far + stage.backward_temporary)
    return LayerMemory(saved=so_far, forward_peak=forward, backward_peak=backward)


def encoder_layer_stages(m: ModelShape, w: Workload, t: TensorBytes) -> list[Stage]:
    """One LED encoder layer (``LEDEncoderLayer``: Longformer self-attention, then the FFN).

    B rows, L tokens, d hidden, H heads, F ffn, one-sided window ``h = window / 2``, G global tokens;
    P = B*H*L (token, head) pairs. Read from ``LEDEncoderSelfAttention`` in transformers 5.23 and checked
    tensor by tensor with ``saved_tensors_hooks`` (``benchmarks/plan_memory.py`` compares the sums).
    """
    if m.encoder_attention == "sdpa":
        return [sdpa_encoder_attention_stage(m, w, t), encoder_ffn_stage(m, w, t)]
    B, L, d, H, G = w.batch_size, w.input_tokens, m.d_model, m.encoder_heads, w.global_tokens
    h = m.attention_window // 2
    BLd, P = B * L * d, B * H * L
    c, half = t.compute, t.compute != 4
    chunks = B * H * (L // h - 1)
    scores = chunks * 2 * h * 2 * h * c  # chunked query x key products (2h x 2h per chunk)
    padded = chunks * (2 * h + 1) * 2 * h * c  # the same padded to 2h+1 rows before the band is copied out
    band = P * (2 * h + 1) * c  # the band of 2h+1 scores per token
    band_g = P * (2 * h + 1 + G)  # band plus the G global-key columns (elements)
    diag = P * (3 * h + 2) * c  # probabilities padded and diagonalised for the chunked matmul
    qk = Stage(
        "query/key projections and sliding-window scores",
        {
            # query, key, value, key_global and value_global read the input transposed to (L, B, d); each
            # linear flattens that non-contiguous view with its own copy and saves it (one row: a shared view)
            "projection inputs": (5 if B > 1 else 1) * BLd * c,
            # _sliding_chunks_query_key_matmul: the einsum copies overlapping chunks of 2h rows of query
            # and key: about twice each tensor
            "query/key chunks": 2 * chunks * 2 * h * (d // H) * c,
            "query for the global keys": BLd * c,  # _concat_with_global_key_attn_probs' einsum
        },
        # the chunk products and their padded copy are alive together; then the padded copy and the band
        forward_temporary=max(scores + padded, padded + band),
        # slice/select backward scatter the band's gradient into chunk-sized zero tensors, two at a time;
        # then the query and key chunk gradients go through as_strided's backward for overlapping views,
        # which builds an int64 index of the chunks (arange + a contiguous copy: 8 + 16 bytes per element)
        backward_temporary=max(2 * padded + band, BLd * (5 * c + 24)),
    )
    softmax = Stage(
        "softmax over the window and global columns",
        # softmax(..., dtype=float32): fp32 whatever the training precision
        {"attention probabilities (fp32)": band_g * 4,
         "attention dropout mask": band_g * t.mask if m.attention_dropout > 0 else 0},
        # torch.cat of old and new scores; then scores + fp32 masked_fill + the cast back to 16 bits
        forward_temporary=max(band + band_g * c, band_g * (c + 4 + (c if half else 0))),
        # gradients of the probabilities (two narrow() paths summed), the fp32 cast, masked_fill, softmax
        backward_temporary=band_g * (2 * c + 8),
    )
    pv = Stage(
        "probabilities x values, global attention, output projection",
        {
            "global-column probabilities": P * G * c,  # cloned for the matmul with the global values
            "band probabilities (diagonalised)": diag,
            # value padded by h on both sides, cut into overlapping chunks of 3h rows: 3 x the value tensor
            "value chunks": 3 * BLd * c,
            # _compute_global_attn_output_from_hidden: keys and values of all L tokens for the G global
            # queries, and their fp32 softmax over L (+ its 16-bit copy for the bmm)
            "global keys and values": 2 * BLd * c,
            "global-token probabilities": B * H * G * L * (4 + (c if half else 0)),
            "output projection input": BLd * c,
        },
        # the band made contiguous, its transposed copy and the padded diagonalised copy
        forward_temporary=2 * band + diag,
        # gradients of the diagonalised probabilities (two slice_backward zero tensors) and of the band;
        # the value chunks' gradient through as_strided's backward (int64 index of 3 x the value, as above)
        backward_temporary=max(2 * diag + band, diag + BLd * (4 * c + 32)),
    )
    return [qk, softmax, pv, encoder_ffn_stage(m, w, t)]


def sdpa_encoder_attention_stage(m: ModelShape, w: Workload, t: TensorBytes) -> Stage:
    """``lfqa.led_attention.SdpaLEDEncoderSelfAttention``: query blocks of b tokens (``block_layout``)
    against their b + 2h local keys plus the global slots, one fused SDPA call that keeps its output and
    log-sum-exp but not the probabilities. Checked tensor by tensor like the eager stages."""
    from lfqa.led_attention import block_layout

    B, L, d, H, G = w.batch_size, w.input_tokens, m.d_model, m.encoder_heads, w.global_tokens
    h = m.attention_window // 2
    BLd, c = B * L * d, t.compute
    b, slots, Lp = block_layout(L, h, G)  # Lp: L padded to whole blocks
    S = slots + b + 2 * h
    blocks = B * (Lp // b) * S * d * c  # keys (or values) of every block, global slots included
    saved = {
        # query/key/value/key_global/value_global read the same (B, L, d) input: one tensor, or under
        # autocast one 16-bit copy per projection
        "projection inputs": 5 * BLd * t.amp_copy if t.autocast else BLd * c,
        "query blocks, output": 2 * B * Lp * d * c,
        "key and value blocks": 2 * blocks,
        # SDPA turns the boolean mask into an additive one of the query's dtype and keeps it
        "block masks": B * Lp * S * c,
        "log-sum-exp": B * H * Lp * 4,
        "global keys and values": 2 * BLd * c,
        "global queries": B * slots * d * (3 * c) + B * L * c + B * H * slots * 4,
        "output projection input": BLd * c,
    }
    if m.attention_dropout > 0:  # no fused kernel with dropout on CPU: the math path keeps the probabilities
        saved["attention probabilities and dropout mask"] = B * H * Lp * S * (c + t.mask)
    return Stage(
        "blocked SDPA self-attention (model.encoder_attention: sdpa)",
        saved,
        # the padded keys/values and the three-block concatenation before the global slots join; masks
        forward_temporary=2 * (B * Lp * d * c + blocks * (b + 2 * h) / S) + 3 * B * Lp * S,
        # gradients of the key and value blocks, then their sums back onto (B, L, d) and the projections
        backward_temporary=2 * blocks + 4 * BLd * c,
    )


def encoder_ffn_stage(m: ModelShape, w: Workload, t: TensorBytes) -> Stage:
    B, L, d, F = w.batch_size, w.input_tokens, m.d_model, m.encoder_ffn
    BLd = B * L * d
    c = t.compute
    return Stage(
        "residual, layer norms and feed-forward",
        {
            "residual dropout masks (2)": 2 * BLd * t.mask if m.dropout > 0 else 0,
            "layer-norm inputs and statistics (2)": 2 * BLd * t.stream + 4 * B * L * 4,
            # fc1 reads the layer-norm output: saved as is without autocast, as a 16-bit copy with it
            "fc1 input": BLd * (c if t.autocast else t.stream),
            "GELU input and fc2 input": 2 * B * L * F * c,
            "activation dropout mask": B * L * F * t.mask if m.activation_dropout > 0 else 0,
        },
        forward_temporary=2 * BLd * t.stream,
        backward_temporary=2 * B * L * F * c,  # gradients of the fc2 input and of the GELU input
    )


def decoder_layer_stages(m: ModelShape, w: Workload, t: TensorBytes) -> list[Stage]:
    """One LED decoder layer: causal self-attention over A answer tokens, cross-attention over the L
    encoder outputs (the encoder output itself is counted once, in ``encoder_output_saved``), FFN."""
    B, A, L, d, H, F = w.batch_size, w.answer_tokens, w.input_tokens, m.d_model, m.decoder_heads, m.decoder_ffn
    BAd = B * A * d
    c, s = t.compute, t.stream
    copy_in = c if t.autocast else s  # a linear's saved input: a 16-bit copy under autocast

    def attention(keys: int, inputs: dict[str, float], name: str) -> Stage:
        probs = B * H * A * keys
        return Stage(
            name,
            {**inputs,
             "query and keys, values": BAd * c + 2 * B * keys * d * c,
             # F.softmax keeps its output (fp32 under autocast, which casts it again for the bmm)
             "probabilities": probs * (t.softmax + t.amp_copy),
             "attention dropout mask": probs * t.mask if m.attention_dropout > 0 else 0,
             "output projection input": BAd * c,
             "residual dropout mask": BAd * t.mask if m.dropout > 0 else 0,
             "layer-norm input and statistics": BAd * s + 2 * B * A * 4},
            # scores, scores + mask, (autocast) the fp32 copy softmax makes of its input
            forward_temporary=probs * (2 * c + (4 if t.autocast else 0)),
            # gradients of the probabilities and of the scores (autocast: of the 16-bit copy too)
            backward_temporary=probs * (2 * t.softmax + t.amp_copy),
        )

    # under autocast q, k and v each cast the fp32 input again: three 16-bit copies
    self_inputs = {"projection inputs": 3 * BAd * c if t.autocast else BAd * s}
    cross_inputs = {"query projection input": BAd * copy_in}
    if t.autocast:  # k_proj and v_proj of every layer cast the fp32 encoder output again
        cross_inputs["key/value projection inputs (16-bit copies)"] = 2 * B * L * d * c
    ffn = Stage(
        "feed-forward",
        {"fc1 input": BAd * copy_in, "GELU input and fc2 input": 2 * B * A * F * c,
         "activation dropout mask": B * A * F * t.mask if m.activation_dropout > 0 else 0,
         "residual dropout mask": BAd * t.mask if m.dropout > 0 else 0,
         "layer-norm input and statistics": BAd * s + 2 * B * A * 4},
        forward_temporary=2 * BAd * s,
        backward_temporary=2 * B * A * F * c,
    )
    return [attention(A, self_inputs, "self-attention"), attention(L, cross_inputs, "cross-attention"), ffn]


def encoder_mask_bytes(w: Workload, t: TensorBytes, m: ModelShape | None = None) -> tuple[float, float]:
    """(transient, kept) bytes of LED's encoder attention mask.

    With ``model.encoder_attention: sdpa`` lfqa builds the mask per row (``lfqa.led_attention``): four
    B x L tensors, one of them kept. Otherwise (transformers' own code):

    ``LEDEncoder.forward`` calls ``_prepare_4d_attention_mask_inverted``, which expands the (B, L) mask to
    (B, 1, L, L) in the embeddings' dtype and then takes row 0: four such B x L x L tensors exist at once
    (expanded, inverted, masked, product) and the returned view keeps one of them alive for the whole
    encoder forward - and, with gradient checkpointing, until the encoder's backward has finished, because
    each checkpointed layer keeps its arguments. At 16k tokens these are the largest tensors of the step.
    """
    per_row = m is not None and m.encoder_attention == "sdpa"
    one = w.batch_size * w.input_tokens * (1 if per_row else w.input_tokens) * t.embed
    return 4 * one, one


def encoder_output_saved(m: ModelShape, w: Workload, t: TensorBytes) -> float:
    """The encoder output, read by every decoder layer's cross-attention key and value projections: one
    shared tensor (under autocast each projection keeps its own 16-bit copy instead, counted per layer)."""
    return 0 if t.autocast else w.batch_size * w.input_tokens * m.d_model * t.stream


def embedding_saved(m: ModelShape, w: Workload, t: TensorBytes, tokens: int) -> float:
    """Token ids (int64, kept by the embedding lookups), the embedding layer norm's input and statistics,
    and the embedding dropout mask, for ``tokens`` positions per row."""
    B, d = w.batch_size, m.d_model
    mask = B * tokens * d * t.mask if m.dropout > 0 else 0
    return B * tokens * 8 + B * tokens * d * t.stream + 2 * B * tokens * 4 + mask


def head_saved(m: ModelShape, w: Workload, t: TensorBytes) -> float:
    """The LM head's input and ``log_softmax`` of the B x A x vocab logits (kept by the cross-entropy
    loss): often the largest tensor of a short-input step."""
    B, A = w.batch_size, w.answer_tokens
    return B * A * m.d_model * t.compute + B * A * m.vocab_size * t.logits + B * A * 8


def head_temporaries(m: ModelShape, w: Workload, t: TensorBytes) -> tuple[float, float]:
    """(forward, backward) temporaries of the LM head and loss: the logits before and after the bias in
    forward; in backward the gradient of ``log_softmax`` and of the logits (plus its 16-bit cast)."""
    BAV = w.batch_size * w.answer_tokens * m.vocab_size
    return BAV * (t.compute + t.logits), BAV * (2 * t.logits + (t.compute if t.autocast else 0))


def layer_input_bytes(m: ModelShape, w: Workload, t: TensorBytes, tokens: int) -> float:
    """What gradient checkpointing keeps of a layer: its input hidden states (B x tokens x d)."""
    return w.batch_size * tokens * m.d_model * t.stream


# --- launch configs -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Strategy:
    """A shipped launch config: how parameters, gradients and optimizer states are placed."""

    name: str
    accelerate_config: str
    rank: int
    """Order of preference: simpler and faster first (DDP, ZeRO-2, ZeRO-3, then the offload variants)."""
    deepspeed_config: str | None = None
    stage: int = 0
    """0: plain PyTorch (DDP over N > 1 processes, none on one GPU)."""
    offload_optimizer: bool = False
    offload_param: bool = False
    reduce_bucket_size: int = 0
    """Elements per gradient reduce bucket (ZeRO-2 allocates two when ``overlap_comm``, ZeRO-3 one)."""
    overlap_comm: bool = False
    contiguous_gradients: bool = False
    allgather_bucket_size: int = 0
    prefetch_bucket_size: int = 0
    max_live_parameters: int = 0
    param_persistence_threshold: int = 0

    @property
    def deepspeed(self) -> bool:
        return self.stage > 0


def _auto(value, default: int) -> int:
    return default if value in (None, "auto") else int(value)


def strategy_from_deepspeed(name: str, accelerate_config: str, ds_path: Path, d_model: int, rank: int) -> Strategy:
    """Read a DeepSpeed JSON; "auto" sizes get the values accelerate fills in from the model's hidden
    size (``Accelerator._prepare_deepspeed``: reduce bucket d^2, prefetch 0.9 d^2, persistence 10 d)."""
    config = json.loads(ds_path.read_text())
    zero = config.get("zero_optimization", {})
    offload_opt = (zero.get("offload_optimizer") or {}).get("device", "none") in ("cpu", "nvme")
    offload_par = (zero.get("offload_param") or {}).get("device", "none") in ("cpu", "nvme")
    return Strategy(
        name=name, accelerate_config=accelerate_config, rank=rank, deepspeed_config=str(ds_path),
        stage=int(zero.get("stage", 0)), offload_optimizer=offload_opt, offload_param=offload_par,
        reduce_bucket_size=_auto(zero.get("reduce_bucket_size"), d_model * d_model),
        overlap_comm=bool(zero.get("overlap_comm", False)),
        contiguous_gradients=bool(zero.get("contiguous_gradients", True)),
        allgather_bucket_size=_auto(zero.get("allgather_bucket_size"), 500_000_000),
        prefetch_bucket_size=_auto(zero.get("stage3_prefetch_bucket_size"), int(0.9 * d_model * d_model)),
        max_live_parameters=_auto(zero.get("stage3_max_live_parameters"), 1_000_000_000),
        param_persistence_threshold=_auto(zero.get("stage3_param_persistence_threshold"), 10 * d_model),
    )


def shipped_strategies(gpus: int, d_model: int, root: Path = REPO_ROOT) -> list[Strategy]:
    """Plain PyTorch plus every DeepSpeed config that ``accelerate_configs/`` launches on GPUs."""
    import yaml

    configs = root / "accelerate_configs"
    plain = "single-gpu.yaml" if gpus == 1 else "multi-gpu.yaml"
    name = "1 GPU" if gpus == 1 else "DDP"
    out = [Strategy(name=name, accelerate_config=f"accelerate_configs/{plain}", rank=0)]
    for path in sorted(configs.glob("*.yaml")):
        if path.stem.endswith("-cpu") or path.stem == "multi-node":
            continue
        launch = yaml.safe_load(path.read_text()) or {}
        ds_file = (launch.get("deepspeed_config") or {}).get("deepspeed_config_file")
        if launch.get("distributed_type") != "DEEPSPEED" or not ds_file:
            continue
        strategy = strategy_from_deepspeed(path.stem, f"accelerate_configs/{path.name}", root / ds_file,
                                           d_model, rank=0)
        offload = (2 if strategy.offload_param else 1) if strategy.offload_optimizer else 0
        label = f"ZeRO-{strategy.stage}" + ("" if not offload else " +offload" if offload == 1 else " +offload all")
        out.append(replace(strategy, name=label, rank=1 + 10 * offload + strategy.stage))
    return sorted(out, key=lambda s: s.rank)


# --- the estimate ---------------------------------------------------------------------------------------


@dataclass
class Estimate:
    """Per-GPU bytes of one launch config, with and without gradient checkpointing."""

    strategy: Strategy
    parameters: float
    gradients: float
    """Gradients at the end of the backward pass (for ZeRO: the rank's shard)."""
    optimizer_states: float
    """Adam's moments and, for ZeRO, the fp32 master copy of the rank's shard."""
    buffers: float
    """Communication buckets (DDP's reducer, DeepSpeed's reduce buckets) and ZeRO-3's gathered weights."""
    overhead: float
    activations: dict[bool, float]
    """Peak of saved activations plus temporaries during forward and backward, by checkpointing on/off."""
    peak: dict[bool, float]
    """Peak of the whole training step (the walk through it), by checkpointing on/off."""
    peak_phase: dict[bool, str]
    """Where in the step the peak is."""
    cpu_per_node: float
    """Host memory for offloaded states on one node (all its processes)."""
    usable: float
    eval_peak: float = 0.0
    """Peak of an evaluation batch (validation loss and generate), 0 when not estimated."""
    eval_phase: str = ""

    def fits(self, checkpointing: bool) -> bool:
        return self.peak[checkpointing] <= self.usable

    @property
    def eval_fits(self) -> bool:
        return self.eval_peak <= self.usable


@dataclass(frozen=True)
class ModelStates:
    """Bytes on one GPU that do not depend on the batch (and on the host, with offload)."""

    params: float
    grads: float
    optimizer: float
    buffers_persistent: float
    buffers_backward: float
    grads_grow: bool
    """Gradients appear layer by layer in backward (PyTorch, ZeRO-2) rather than preallocated (ZeRO-3)."""
    step_temporary: float
    cpu_per_process: float


def model_states(m: ModelShape, s: Strategy, n: int, precision: str, device: str) -> ModelStates:
    """Parameters, gradients, optimizer states and buffers on one GPU of ``n``.

    * PyTorch (DDP / one GPU): fp32 weights (autocast keeps them), fp32 gradients, Adam's two fp32
      moments: 4 + 4 + 8 bytes per parameter. DDP's reducer keeps its own flat gradient buckets (another
      4 bytes per parameter; ``gradient_as_bucket_view`` is off). The foreach AdamW step allocates one
      fp32 temporary per parameter (the square root of the second moment); on CPU AdamW runs per tensor.
    * ZeRO-2: the 16-bit model whole (2 bytes), a 16-bit gradient shard (2/N), fp32 master + moments
      (12/N); ``overlap_comm`` with ``contiguous_gradients`` allocates two reduce buckets of
      ``reduce_bucket_size`` elements in the gradient dtype for the backward pass (2 GiB in bf16 at the
      shipped 5e8). The step makes the shard's fp32 gradient (4/N) and Adam's temporary (4/N).
    * ZeRO-3: weights sharded (2/N) except parameters under ``stage3_param_persistence_threshold`` (kept
      whole), a preallocated 16-bit gradient shard, master + moments (12/N), one reduce bucket, and the
      weights gathered for compute: at most ``stage3_max_live_parameters``, and no more than the prefetch
      bucket plus a layer - with the shipped values (5e8 / 1e9 elements) all of LED-base may be gathered.
    * offload_optimizer: master, moments and the fp32 gradient shard live in pinned host memory
      (16/N bytes per parameter per process) and DeepSpeed's CPU Adam steps there; offload_param also
      moves the 16-bit weight shard (2/N).
    * ``allgather_bucket_size`` costs nothing extra: DeepSpeed 0.19 all-gathers ZeRO-2's updated weights
      straight into the flat 16-bit buffer (``all_gather_into_tensor``).
    fp32 training under DeepSpeed keeps the same layout with 4-byte weights and gradients (ZeRO still
    makes an fp32 master copy).
    """
    P = m.parameters
    if not s.deepspeed:
        ddp_buckets = 4 * P if n > 1 else 0
        if device == "cuda":
            step = 4 * P
        else:
            step = 2 * 4 * max(m.parameter_sizes or (P,))
        return ModelStates(params=4 * P, grads=4 * P, optimizer=8 * P, buffers_persistent=ddp_buckets,
                           buffers_backward=0, grads_grow=True, step_temporary=step, cpu_per_process=0)
    half = precision != "fp32"
    pb = 2 if half else 4
    shard = P / n
    bucket = s.reduce_bucket_size * pb if s.contiguous_gradients else 0
    host = 0.0
    if s.offload_optimizer:
        optimizer_gpu, host, step = 0.0, 16 * shard, 0.0
        grads = 0.0
    else:
        optimizer_gpu, step = 12 * shard, 8 * shard
        grads = pb * shard
    if s.stage in (1, 2):  # ZeRO-1 (not shipped) keeps whole gradients
        grads = grads if s.stage == 2 or s.offload_optimizer else pb * P
        return ModelStates(params=pb * P, grads=grads, optimizer=optimizer_gpu, buffers_persistent=0,
                           buffers_backward=bucket * (2 if s.overlap_comm else 1), grads_grow=True,
                           step_temporary=step, cpu_per_process=host)
    persistent = m.persistent_parameters(s.param_persistence_threshold)
    sharded = P - persistent
    gathered = min(sharded, s.max_live_parameters,
                   s.prefetch_bucket_size + max(m.encoder_layer_parameters, m.decoder_layer_parameters,
                                                m.shared_parameters)) * pb
    params_gpu = persistent * pb + (0 if s.offload_param else pb * sharded / n)
    if s.offload_param:
        host += pb * sharded / n
    # ZeRO-3's 16-bit gradient shard is one flat buffer allocated at start-up (on the host with offload).
    grads = 0.0 if s.offload_optimizer else pb * shard
    return ModelStates(params=params_gpu, grads=grads, optimizer=optimizer_gpu,
                       buffers_persistent=bucket + gathered, buffers_backward=0, grads_grow=False,
                       step_temporary=step, cpu_per_process=host)


def saved_after_forward(m: ModelShape, w: Workload, t: TensorBytes, checkpointing: bool) -> float:
    """Bytes of activations alive when the forward pass has returned the loss (what
    ``saved_tensors_hooks`` sees, plus what checkpointed layers keep as their arguments)."""
    if checkpointing:
        layers = (m.encoder_layers * layer_input_bytes(m, w, t, w.input_tokens)
                  + m.decoder_layers * layer_input_bytes(m, w, t, w.answer_tokens)
                  + layer_input_bytes(m, w, t, w.input_tokens) + encoder_mask_bytes(w, t, m)[1])
    else:
        layers = (m.encoder_layers * layer_memory(encoder_layer_stages(m, w, t)).saved
                  + m.decoder_layers * layer_memory(decoder_layer_stages(m, w, t)).saved
                  + encoder_output_saved(m, w, t))
    return (layers + embedding_saved(m, w, t, w.input_tokens) + embedding_saved(m, w, t, w.answer_tokens)
            + head_saved(m, w, t))


@dataclass(frozen=True)
class StepPeak:
    total: float
    """Peak bytes of the whole training step."""
    activations: float
    """Peak bytes of activations and temporaries alone."""
    phase: str
    """Where the peak happens, e.g. "backward, encoder layer 1"."""


def walk_step(m: ModelShape, w: Workload, t: TensorBytes, states: ModelStates, checkpointing: bool) -> StepPeak:
    """Walk one training step layer by layer and return its peak.

    ``fixed`` is what stays for the whole step (weights, optimizer states, persistent buffers); live
    activations grow through the forward pass and shrink in backward while the gradients of the layers
    already done accumulate. At every layer the layer's own temporaries (and, with checkpointing, its
    recomputed activations) are added.
    """
    fixed = states.params + states.optimizer + states.buffers_persistent
    # Gradients that exist all along: ZeRO-3's preallocated shard, or, with gradient accumulation, the
    # previous micro-batches' gradients.
    grads_always = states.grads if (w.gradient_accumulation_steps > 1 or not states.grads_grow) else 0.0
    grad_per_param = 0.0 if grads_always else states.grads / m.parameters
    best = StepPeak(0.0, 0.0, "")
    live = grads = 0.0

    def bump(phase: str, extra: float, backward: bool = False) -> None:
        nonlocal best
        act = live + extra
        total = fixed + act + grads_always + grads + (states.buffers_backward if backward else 0)
        best = StepPeak(max(best.total, total), max(best.activations, act),
                        phase if total > best.total else best.phase)

    L, A = w.input_tokens, w.answer_tokens
    enc = layer_memory(encoder_layer_stages(m, w, t))
    dec = layer_memory(decoder_layer_stages(m, w, t))
    head_fwd, head_bwd = head_temporaries(m, w, t)
    mask_transient, mask_kept = encoder_mask_bytes(w, t, m)
    enc_in = layer_input_bytes(m, w, t, L)
    dec_in = layer_input_bytes(m, w, t, A)
    enc_emb = embedding_saved(m, w, t, L)
    dec_emb = embedding_saved(m, w, t, A)
    enc_out = enc_in if checkpointing else encoder_output_saved(m, w, t)
    cross_mask = w.batch_size * A * (L + A) * t.embed  # the decoder's 4-d masks (causal and cross)
    head = head_saved(m, w, t)
    keep_enc = enc_in if checkpointing else enc.saved
    keep_dec = dec_in if checkpointing else dec.saved

    def layer_backward(layer: LayerMemory) -> float:
        # Checkpointing runs the layer's forward again right before its backward; without it the layer's
        # saved tensors are part of ``live`` already.
        if checkpointing:
            return max(layer.forward_peak, layer.backward_peak)
        return layer.backward_peak - layer.saved

    # forward
    inputs_embeds = w.batch_size * L * m.d_model * t.embed
    bump("forward, encoder attention mask", inputs_embeds + mask_transient)
    live += enc_emb + mask_kept
    for i in range(m.encoder_layers):
        bump(f"forward, encoder layer {i + 1}", enc.forward_peak)
        live += keep_enc
    if not checkpointing:
        live -= mask_kept
    live += enc_out + cross_mask + dec_emb
    for i in range(m.decoder_layers):
        bump(f"forward, decoder layer {i + 1}", dec.forward_peak)
        live += keep_dec
    bump("forward, LM head and loss", head + head_fwd)
    live += head
    # backward: the LM head's gradient (the shared embedding) comes first
    grads += m.shared_parameters * grad_per_param
    bump("backward, LM head and loss", head_bwd, backward=True)
    live -= head
    for i in reversed(range(m.decoder_layers)):
        grads += m.decoder_layer_parameters * grad_per_param
        bump(f"backward, decoder layer {i + 1}", layer_backward(dec), backward=True)
        live -= keep_dec
    grads += m.decoder_embedding_parameters * grad_per_param
    live -= enc_out + cross_mask + dec_emb
    for i in reversed(range(m.encoder_layers)):
        grads += m.encoder_layer_parameters * grad_per_param
        bump(f"backward, encoder layer {i + 1}", layer_backward(enc), backward=True)
        live -= keep_enc
    grads += m.encoder_embedding_parameters * grad_per_param
    # optimizer step: no activations; all gradients, plus the step's temporaries
    step = fixed + states.grads + states.step_temporary
    if step > best.total:
        best = StepPeak(step, best.activations, "optimizer step")
    return best


@dataclass(frozen=True)
class EvalWorkload:
    """An evaluation batch: the validation loss forward and ``generate`` (beam search), no gradients."""

    batch_size: int
    num_beams: int
    max_new_tokens: int


def eval_peak(m: ModelShape, w: Workload, e: EvalWorkload, t: TensorBytes, states: ModelStates) -> StepPeak:
    """Peak of an evaluation batch (``lfqa.evaluation``: loss forward, then ``generate``), under no_grad.

    Weights and optimizer states stay where they are (ZeRO-3's gradient buffer too). The encoder runs on
    the evaluation batch with the same B x L x L mask temporaries as in training - with ``eval.batch_size``
    rows, often more than in training. Each layer's forward peak is bounded by its training forward peak
    (under no_grad its tensors are freed as the layer's functions return). ``generate`` then expands the
    encoder output to batch x beams rows and caches each decoder layer's cross-attention keys and values
    for all L input tokens, plus the self-attention cache for the generated tokens and one step's logits.
    """
    fixed = states.params + states.optimizer + states.buffers_persistent + (0 if states.grads_grow
                                                                             else states.grads)
    ew = replace(w, batch_size=e.batch_size)
    L, d, c = w.input_tokens, m.d_model, t.compute
    mask_transient, mask_kept = encoder_mask_bytes(ew, t, m)
    rows = e.batch_size * e.num_beams
    phases = {
        "evaluation, encoder attention mask": e.batch_size * L * d * t.embed + mask_transient,
        "evaluation, encoder layer": mask_kept + e.batch_size * L * d * t.stream
        + layer_memory(encoder_layer_stages(m, ew, t)).forward_peak,
        "evaluation, decoder layer": e.batch_size * L * d * t.stream
        + layer_memory(decoder_layer_stages(m, ew, t)).forward_peak,
        "evaluation, loss": e.batch_size * w.answer_tokens * m.vocab_size * (t.compute + 2 * t.logits),
        "generation, caches": rows * L * d * c * (1 + 2 * m.decoder_layers)
        + rows * e.max_new_tokens * d * c * 2 * m.decoder_layers
        + rows * m.vocab_size * 4 * 3 + rows * m.decoder_heads * L * (c + 4),
    }
    phase = max(phases, key=phases.get)
    return StepPeak(fixed + phases[phase], phases[phase], phase)


def estimate(m: ModelShape, w: Workload, s: Strategy, n: int, gpus_per_node: int, precision: str,
             gpu_memory_gib: float, device: Literal["cuda", "cpu"] = "cuda",
             evaluation: EvalWorkload | None = None) -> Estimate:
    """The memory of one GPU (or, with ``device="cpu"``, of one CPU process) for ``s`` on ``n`` processes."""
    engine = "deepspeed" if s.deepspeed else "torch"
    t = tensor_bytes(precision, engine, device)
    states = model_states(m, s, n, precision, device)
    walks = {ckpt: walk_step(m, w, t, states, ckpt) for ckpt in (False, True)}
    overhead = CUDA_OVERHEAD_BYTES if device == "cuda" else 0
    ev = eval_peak(m, w, evaluation, t, states) if evaluation else None
    return Estimate(
        strategy=s, parameters=states.params, gradients=states.grads, optimizer_states=states.optimizer,
        buffers=states.buffers_persistent + states.buffers_backward, overhead=overhead,
        activations={k: v.activations for k, v in walks.items()},
        peak={k: v.total + overhead for k, v in walks.items()},
        peak_phase={k: v.phase for k, v in walks.items()},
        cpu_per_node=states.cpu_per_process * gpus_per_node, usable=gpu_memory_gib * GIB * (1 - HEADROOM),
        eval_peak=ev.total + overhead if ev else 0.0, eval_phase=ev.phase if ev else "",
    )


# --- the plan -------------------------------------------------------------------------------------------


@dataclass
class Plan:
    job: JobConfig
    job_path: str
    shape: ModelShape
    workload: Workload
    evaluation: EvalWorkload
    gpus: int
    nodes: int
    gpu_memory_gib: float
    estimates: list[Estimate]
    notes: list[str]

    @property
    def precision(self) -> str:
        return self.job.train.precision

    def recommendation(self) -> tuple[Estimate, bool] | None:
        """The simplest config whose training step fits: DDP, ZeRO-2, ZeRO-3 without gradient checkpointing,
        then with it (recomputing costs 20-30% more compute, sharding among the GPUs of a node next to
        nothing), then the offload configs (whose optimizer step runs on the CPU) likewise."""
        on_gpu = [e for e in self.estimates if not e.strategy.offload_optimizer]
        offload = [e for e in self.estimates if e.strategy.offload_optimizer]
        for group in (on_gpu, offload):
            for ckpt in (False, True):
                for e in group:
                    if e.fits(ckpt):
                        return e, ckpt
        return None


def make_plan(job: JobConfig, job_path: str, gpus: int, gpu_memory_gib: float, nodes: int = 1,
              input_tokens: int | None = None, global_tokens: int | None = None, model_config: str | None = None,
              shape: ModelShape | None = None) -> Plan:
    """Estimate every shipped config for ``job`` on ``gpus`` GPUs of ``gpu_memory_gib`` each."""
    if gpus % nodes:
        raise PlanError(f"--gpus {gpus} is not a multiple of --nodes {nodes}")
    if shape is None:
        shape = shape_from_led_config(led_config_for_job(job, model_config), job.model.name_or_path,
                                      job.model.encoder_attention)
    workload = workload_for_job(job, shape, input_tokens, global_tokens)
    generation = job.eval.generation
    evaluation = EvalWorkload(job.eval.batch_size, generation.num_beams,
                              min(generation.max_new_tokens, shape.max_answer_tokens))
    notes = []
    asked = input_tokens or job.data.max_input_tokens
    if asked > shape.max_input_tokens:
        notes.append(f"{asked} input tokens is more than the model's {shape.max_input_tokens} positions: "
                     f"planning for {shape.max_input_tokens}")
    if workload.batch_size < job.data.batch_size:
        notes.append(f"data.max_tokens_per_batch {job.data.max_tokens_per_batch} allows {workload.batch_size} "
                     f"row(s) of {workload.input_tokens} + {workload.answer_tokens} tokens per batch")
    estimates = [estimate(shape, workload, s, gpus, gpus // nodes, job.train.precision, gpu_memory_gib,
                          evaluation=evaluation)
                 for s in shipped_strategies(gpus, shape.d_model)]
    return Plan(job=job, job_path=job_path, shape=shape, workload=workload, evaluation=evaluation, gpus=gpus,
                nodes=nodes, gpu_memory_gib=gpu_memory_gib, estimates=estimates, notes=notes)


def _replan(plan: Plan, job: JobConfig | None = None, gpus: int | None = None, input_tokens: int | None = None) -> Plan:
    return make_plan(job or plan.job, plan.job_path, gpus or plan.gpus, plan.gpu_memory_gib, plan.nodes,
                     input_tokens=input_tokens or plan.workload.input_tokens,
                     global_tokens=plan.workload.global_tokens, shape=plan.shape)


def _with(job: JobConfig, section: str, **values) -> JobConfig:
    return replace(job, **{section: replace(getattr(job, section), **values)})


def advice(plan: Plan) -> list[str]:
    """What to launch and what to set in the job, or what to change when nothing fits."""
    rec = plan.recommendation()
    if rec is None:
        return _what_to_change(plan)
    e, ckpt = rec
    lines = [f"Recommended: {e.strategy.name} ({e.strategy.accelerate_config}) with gradient checkpointing "
             f"{'on' if ckpt else 'off'}: {e.peak[ckpt] / GIB:.1f} of {e.usable / GIB:.1f} usable GiB per GPU "
             f"(peak: {e.peak_phase[ckpt]})."]
    if ckpt and not plan.job.model.gradient_checkpointing:
        lines.append("  Gradient checkpointing is needed: model.gradient_checkpointing=true")
    elif ckpt:
        lines.append("  Gradient checkpointing is needed (the job has it on).")
    elif plan.job.model.gradient_checkpointing:
        lines.append("  Gradient checkpointing is not needed: model.gradient_checkpointing=false is 20-30% faster.")
    train = f"-m lfqa.train {plan.job_path}"
    if e.strategy.accelerate_config.endswith("single-gpu.yaml"):
        lines.append(f"  accelerate launch --config_file {e.strategy.accelerate_config} {train}")
    elif plan.nodes > 1:
        ds = _rel(e.strategy.deepspeed_config) if e.strategy.deepspeed_config else "none: a MULTI_GPU config"
        lines.append(f"  accelerate launch --config_file accelerate_configs/multi-node.yaml "
                     f"--num_machines {plan.nodes} --num_processes {plan.gpus} --machine_rank R "
                     f"--main_process_ip HOST {train}")
        lines.append(f"  (on every node; in multi-node.yaml set deepspeed_config_file: {ds})")
    else:
        lines.append(f"  accelerate launch --config_file {e.strategy.accelerate_config} --num_processes {plan.gpus} "
                     f"{train}")
    if not e.eval_fits:
        batch = next((b for b in range(plan.evaluation.batch_size - 1, 0, -1)
                      if _replan(plan, job=_with(plan.job, "eval", batch_size=b)).estimates[
                          plan.estimates.index(e)].eval_fits), None)
        fix = (f"eval.batch_size={batch}" if batch else
               "even eval.batch_size=1 does not: use fewer eval.generation.num_beams or shorter inputs")
        lines.append(f"  Evaluation ({plan.evaluation.batch_size} rows x {plan.evaluation.num_beams} beams) needs "
                     f"{e.eval_peak / GIB:.1f} GiB ({e.eval_phase}): {fix}")
    return lines


def _what_to_change(plan: Plan) -> list[str]:
    lines = [f"Nothing fits {plan.gpus} x {plan.gpu_memory_gib:g} GiB, even with gradient checkpointing and "
             "offload. Change one of:"]
    w = plan.workload
    batch = next((b for b in range(w.batch_size - 1, 0, -1)
                  if _replan(plan, job=_with(plan.job, "data", batch_size=b, max_tokens_per_batch=None))
                  .recommendation()), None)
    if batch:
        lines.append(f"  a smaller batch: data.batch_size={batch} with train.gradient_accumulation_steps="
                     f"{math.ceil(w.batch_size / batch) * w.gradient_accumulation_steps} for the same effective batch")
    window = plan.shape.attention_window
    tokens = next((k * window for k in range(w.input_tokens // window - 1, 0, -1)
                   if _replan(plan, input_tokens=k * window).recommendation()), None)
    if tokens:
        lines.append(f"  shorter inputs: data.max_input_tokens={tokens}")
    more = next((g for g in (2 * plan.gpus, 4 * plan.gpus, 8 * plan.gpus)
                 if _replan(plan, gpus=g).recommendation()), None)
    if more:
        lines.append(f"  more GPUs: {more} (ZeRO-3 shards the model states over them)")
    else:
        best = min(plan.estimates, key=lambda e: e.peak[True])
        lines.append(f"  (more GPUs do not help: even with checkpointing and everything sharded, activations "
                     f"({best.activations[True] / GIB:.1f} GiB) and the CUDA context ({best.overhead / GIB:g} GiB) "
                     f"exceed the {best.usable / GIB:.1f} usable GiB of a GPU)")
    if not (batch or tokens or more):
        lines.append("  a GPU with more memory")
    return lines


def _rel(path: str) -> str:
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return path


def _gib(x: float) -> str:
    if x == 0:
        return "-"
    return f"{x / GIB:.2f}" if x < 10 * GIB else f"{x / GIB:.1f}"


def render(plan: Plan, advice_lines: list[str]) -> str:
    m, w, ev = plan.shape, plan.workload, plan.evaluation
    nodes = f" on {plan.nodes} nodes" if plan.nodes > 1 else ""
    lines = [
        f"lfqa plan: {plan.job_path} - {m.name} ({m.parameters / 1e6:.1f}M parameters), {plan.precision}, "
        f"{plan.gpus} GPU(s) x {plan.gpu_memory_gib:g} GiB{nodes}",
        f"per GPU: a batch of {w.batch_size} x {w.input_tokens} input tokens (window {m.attention_window}, "
        f"{w.global_tokens} global) + {w.answer_tokens} answer tokens; evaluation {ev.batch_size} rows x "
        f"{ev.num_beams} beams, up to {ev.max_new_tokens} new tokens",
        "",
    ]
    names = [e.strategy.name for e in plan.estimates]
    width = max(13, *(len(n) + 2 for n in names))
    label = 26
    rows = [
        ("parameters", [e.parameters for e in plan.estimates]),
        ("gradients", [e.gradients for e in plan.estimates]),
        ("optimizer states", [e.optimizer_states for e in plan.estimates]),
        ("buffers", [e.buffers for e in plan.estimates]),
        ("CUDA context etc.", [e.overhead for e in plan.estimates]),
        ("activations, ckpt off", [e.activations[False] for e in plan.estimates]),
        ("activations, ckpt on", [e.activations[True] for e in plan.estimates]),
        ("TOTAL (peak), ckpt off", [e.peak[False] for e in plan.estimates]),
        ("TOTAL (peak), ckpt on", [e.peak[True] for e in plan.estimates]),
        ("evaluation (peak)", [e.eval_peak for e in plan.estimates]),
        ("CPU RAM per node", [e.cpu_per_node for e in plan.estimates]),
    ]
    lines.append("GiB per GPU".ljust(label) + "".join(n.rjust(width) for n in names))
    for title, values in rows:
        lines.append(title.ljust(label) + "".join(_gib(v).rjust(width) for v in values))
    usable = plan.estimates[0].usable / GIB
    verdicts = [
        (f"ckpt off: in {usable:.1f} GiB", [e.fits(False) for e in plan.estimates]),
        (f"ckpt on: in {usable:.1f} GiB", [e.fits(True) for e in plan.estimates]),
        ("evaluation", [e.eval_fits for e in plan.estimates]),
    ]
    for title, fits in verdicts:
        lines.append(title.ljust(label) + "".join(("fits" if f else "does not fit").rjust(width) for f in fits))
    lines += [
        "",
        "TOTAL: the peak of a training step (forward, backward, optimizer step), less than the sum of the rows",
        "above it because gradients fill up while activations are freed. Usable: the card less "
        f"{HEADROOM:.0%} headroom.",
        f"CUDA context etc.: an assumed {CUDA_OVERHEAD_BYTES / GIB:g} GiB. Estimate vs measured: "
        "benchmarks/results/plan-memory-cpu.md.",
    ]
    lines.extend(f"Note: {n}" for n in plan.notes)
    lines.append("")
    lines.extend(advice_lines)
    return "\n".join(lines)


def to_json(plan: Plan, advice_lines: list[str]) -> dict:
    shape = asdict(plan.shape)
    shape.pop("parameter_sizes")
    rec = plan.recommendation()
    return {
        "job": plan.job_path, "model": shape, "workload": asdict(plan.workload),
        "evaluation": asdict(plan.evaluation), "precision": plan.precision, "gpus": plan.gpus, "nodes": plan.nodes,
        "gpu_memory_gib": plan.gpu_memory_gib, "usable_gib": plan.gpu_memory_gib * (1 - HEADROOM),
        "configs": [
            {
                "name": e.strategy.name, "accelerate_config": e.strategy.accelerate_config,
                "deepspeed_config": _rel(e.strategy.deepspeed_config) if e.strategy.deepspeed_config else None,
                "gib": {
                    "parameters": e.parameters / GIB, "gradients": e.gradients / GIB,
                    "optimizer_states": e.optimizer_states / GIB, "buffers": e.buffers / GIB,
                    "overhead": e.overhead / GIB,
                    "activations_ckpt_off": e.activations[False] / GIB,
                    "activations_ckpt_on": e.activations[True] / GIB,
                    "peak_ckpt_off": e.peak[False] / GIB, "peak_ckpt_on": e.peak[True] / GIB,
                    "evaluation_peak": e.eval_peak / GIB, "cpu_per_node": e.cpu_per_node / GIB,
                },
                "peak_phase_ckpt_off": e.peak_phase[False], "peak_phase_ckpt_on": e.peak_phase[True],
                "fits_ckpt_off": e.fits(False), "fits_ckpt_on": e.fits(True), "evaluation_fits": e.eval_fits,
            }
            for e in plan.estimates
        ],
        "recommendation": None if rec is None else {
            "name": rec[0].strategy.name, "accelerate_config": rec[0].strategy.accelerate_config,
            "gradient_checkpointing": rec[1], "peak_gib": rec[0].peak[rec[1]] / GIB,
        },
        "advice": advice_lines,
        "notes": plan.notes,
    }


# --- command line ---------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lfqa plan",
        description="Estimate the per-GPU memory of a job (parameters, gradients, optimizer states, activations) "
                    "under each shipped launch config, and say which fits.",
        epilog="Example: lfqa plan jobs/led-base-lfqa.yaml --gpus 8 --gpu-memory 80",
    )
    parser.add_argument("job", help="job YAML")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, as for lfqa train")
    parser.add_argument("--gpus", type=_positive_int, required=True, help="processes in all (GPUs of all nodes)")
    parser.add_argument("--gpu-memory", type=_positive_float, required=True, metavar="GIB",
                        help="memory of one GPU in GiB (80 for an 80 GB A100/H100, 24 for a 24 GB card)")
    parser.add_argument("--nodes", type=_positive_int, default=1, help="machines (host memory is per node)")
    parser.add_argument("--input-tokens", type=_positive_int,
                        help="plan for this input length (default: data.max_input_tokens, capped at the model's)")
    parser.add_argument("--global-tokens", type=_positive_int,
                        help="tokens with global attention per input (default: 64 for question, 1 for first_token)")
    parser.add_argument("--model-config", metavar="PATH",
                        help="config.json (or a folder holding one) giving the model's shape")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    # intermixed: overrides may come before or after the options
    args = build_parser().parse_intermixed_args(argv)
    try:
        job = load_job(args.job, args.overrides)
        plan = make_plan(job, args.job, args.gpus, args.gpu_memory, args.nodes, input_tokens=args.input_tokens,
                         global_tokens=args.global_tokens, model_config=args.model_config)
        lines = advice(plan)
    except (ConfigError, PlanError) as err:
        print(f"lfqa: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(to_json(plan, lines), indent=1) if args.json else render(plan, lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
