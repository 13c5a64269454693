"""LED's encoder self-attention as blocks of torch's scaled_dot_product_attention.

transformers' ``LEDEncoderSelfAttention`` (Longformer's "sliding chunks") computes each token's window of
``2w + 1`` scores by multiplying overlapping chunks of ``2w`` queries by ``2w`` keys, then copies the band
out of the chunk products, pads, diagonalises and copies it back for the product with the values. The
profile of ``make bench`` showed those copies and fills at 19% of a training step, and the scores are
materialised in fp32 (``B x L x H x (2w + 1 + G)``) whatever the precision.

No library ships a sliding-window attention with Longformer's global tokens for LED, so this module
writes one from PyTorch parts: the queries are cut into blocks of ``b`` tokens (``b = w`` unless many global
tokens meet a narrow window, see ``block_layout``); a block attends to its own keys and the ``w`` keys on
either side (``b + 2w`` keys, masked to the exact band ``|i - k| <= w``) plus the global tokens' keys, in one
``F.scaled_dot_product_attention`` call over all blocks, which runs a fused kernel on CPU (flash) and on GPU
(memory-efficient) that does not store the probabilities (unless attention dropout is on: then CPU runs take
PyTorch's unfused path). The global tokens' own rows are a second SDPA call with the global projections over
the whole sequence, as in LED.

The weights, the parameter names and the results are LED's: same local band, same treatment of padding
(masked keys; padding queries give zeros) and global tokens (global keys are seen through the local key and
value projections by every token and left out of the band; global queries use ``query_global``,
``key_global`` and ``value_global`` over all unmasked keys). ``tests/test_led_attention.py`` checks outputs
and gradients against transformers' implementation. Only the class of each encoder attention module is
swapped, so checkpoints and ``save_pretrained`` folders stay plain LED for any other tool.

    model = use_sdpa_encoder_attention(model)      # what lfqa's loaders do (model.encoder_attention: sdpa)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.led import modeling_led
from transformers.models.led.modeling_led import LEDEncoderSelfAttention

from lfqa.config import ENCODER_ATTENTIONS


def _windows(x: torch.Tensor, blocks: int, b: int, w: int) -> torch.Tensor:
    """(..., blocks * b, X) -> (..., blocks, b + 2w, X): each block of b rows with the w rows before it
    and the w rows after it (zeros beyond the ends)."""
    padded = F.pad(x, (0, 0, w, w))
    length = blocks * b
    before = padded[..., :length, :].unflatten(-2, (blocks, b))[..., :w, :]
    after = padded[..., 2 * w:, :].unflatten(-2, (blocks, b))[..., b - w:, :]
    return torch.cat([before, x.unflatten(-2, (blocks, b)), after], dim=-2)


def block_layout(length: int, window: int, num_global: int) -> tuple[int, int, int]:
    """(query block size b, global slots, padded length) for ``length`` tokens, a one-sided ``window`` w and
    up to ``num_global`` global tokens per row.

    A block of b queries sees b + 2w local keys plus the global slots, which are copied into every block.
    With a narrow window and many global tokens the copies would dominate (64 global keys in blocks of 8
    queries: 12x the keys), so blocks grow to a multiple of w that keeps the global slots under about half
    of the keys. The slots are rounded up so that each block's key count is a multiple of 16 (the GPU
    kernels want aligned masks); the length is padded to whole blocks (masked, cut off afterwards).
    """
    b = window * max(1, num_global // (2 * window))
    slots = min(length, num_global + (-(num_global + b + 2 * window)) % 16) if num_global else 0
    return b, slots, -(-length // b) * b


class GlobalCounts:
    """The global tokens per row and their maximum, read once per encoder forward and shared by its layers.

    The maximum sizes the global slots, so the host must read it from the device: on a GPU that waits for
    the queued work. Every layer of one forward gets the same ``is_index_global_attn`` tensor from
    ``LEDEncoder.forward`` (and so does the recomputation under gradient checkpointing), so the first layer
    reads it and the others reuse the result; the tensor is kept to compare by identity."""

    def __init__(self):
        self.key: torch.Tensor | None = None
        self.value: tuple[torch.Tensor, int] | None = None


def global_counts(module, is_index_global_attn: torch.Tensor) -> tuple[torch.Tensor, int]:
    cache = getattr(module, "global_counts_cache", None)
    if cache is not None and cache.key is is_index_global_attn:
        return cache.value
    num_global = is_index_global_attn.sum(dim=1)
    value = (num_global, int(num_global.max()))
    if cache is not None:
        cache.key, cache.value = is_index_global_attn, value
    return value


class SdpaLEDEncoderSelfAttention(LEDEncoderSelfAttention):
    """Drop-in for ``LEDEncoderSelfAttention`` (same parameters); see the module docstring."""

    def forward(self, hidden_states, attention_mask=None, is_index_masked=None, is_index_global_attn=None,
                is_global_attn=None, output_attentions=False):
        batch, length, embed = hidden_states.shape
        heads, head_dim, w = self.num_heads, self.head_dim, self.one_sided_attn_window_size
        if output_attentions or length % w or attention_mask is None:
            # attention maps are only produced by the original; LED always pads to the window, so the
            # length check only guards hand-made inputs
            return super().forward(hidden_states, attention_mask, is_index_masked, is_index_global_attn,
                                   is_global_attn, output_attentions)
        device = hidden_states.device
        dropout = self.dropout if self.training else 0.0
        num_global, most_global = global_counts(self, is_index_global_attn) if is_global_attn else (None, 0)
        b, slots, padded = block_layout(length, w, most_global)
        blocks, pad = padded // b, padded - length

        def split_heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, length, heads, head_dim).transpose(1, 2)  # B H L D

        query = split_heads(self.query(hidden_states))
        key_rows = self.key(hidden_states).view(batch, length, heads, head_dim)
        value_rows = self.value(hidden_states).view(batch, length, heads, head_dim)
        key, value = key_rows.transpose(1, 2), value_rows.transpose(1, 2)

        # Local keys: not padding and not global (global tokens are seen through their own slots below).
        # attention_mask is LED's (B, L): 0 local, large negative padding, large positive global.
        key_ok = attention_mask.view(batch, length) == 0
        query_masked = is_index_masked.view(batch, length)
        if pad:  # whole blocks: padded keys are masked, padded queries are cut off at the end
            query, key, value = (F.pad(x, (0, 0, 0, pad)) for x in (query, key, value))
            key_ok = F.pad(key_ok, (0, pad), value=False)
            query_masked = F.pad(query_masked, (0, pad), value=True)
        s = torch.arange(b, device=device)
        t = torch.arange(b + 2 * w, device=device)
        # query s of a block and key t of its window (which starts w before the block) are |t - w - s| apart
        band = (t[None, :] >= s[:, None]) & (t[None, :] <= s[:, None] + 2 * w)  # (b, b + 2w)
        keys = _windows(key, blocks, b, w)  # B H n (b + 2w) D
        values = _windows(value, blocks, b, w)
        # B n (b + 2w), False beyond both ends
        ok = _windows(key_ok.unsqueeze(-1).to(torch.uint8), blocks, b, w).squeeze(-1).bool()
        mask = band[None, None] & ok[:, :, None, :]  # B n b (b + 2w)

        global_pos = global_ok = None
        if is_global_attn:
            # positions of each row's global tokens first, in order (a stable sort keeps them sorted)
            global_pos = torch.argsort((~is_index_global_attn).to(torch.uint8), dim=1, stable=True)[:, :slots]
            global_ok = torch.arange(slots, device=device)[None, :] < num_global[:, None]  # B G
            # indexing, not gather: gather's backward keeps the whole source tensor alive
            rows = torch.arange(batch, device=device)[:, None]
            global_keys = key_rows[rows, global_pos].transpose(1, 2)  # B H G D
            global_values = value_rows[rows, global_pos].transpose(1, 2)
            global_keys = global_keys[:, :, None].expand(batch, heads, blocks, slots, head_dim)
            global_values = global_values[:, :, None].expand(batch, heads, blocks, slots, head_dim)
            keys = torch.cat([global_keys, keys], dim=-2)
            values = torch.cat([global_values, values], dim=-2)
            mask = torch.cat([global_ok[:, None, None, :].expand(batch, blocks, b, slots), mask], dim=-1)
        # A padding query whose whole window is padding has no key: let it see itself (the softmax would
        # give NaN, and NaN survives the zeroing below in the backward pass); its output is zeroed anyway.
        own = torch.zeros(b, mask.shape[-1], dtype=torch.bool, device=device)
        own[s, mask.shape[-1] - b - w + s] = True  # key t = w + s of the window, after the global slots
        mask = mask | (query_masked.view(batch, blocks, b, 1) & own)

        # (B, H, n, b, D) -> (B*n, H, b, D): SDPA's fused kernels take 4-D inputs
        width = keys.shape[-2]
        out = F.scaled_dot_product_attention(
            query.unflatten(2, (blocks, b)).transpose(1, 2).reshape(batch * blocks, heads, b, head_dim),
            keys.transpose(1, 2).reshape(batch * blocks, heads, width, head_dim),
            values.transpose(1, 2).reshape(batch * blocks, heads, width, head_dim),
            attn_mask=mask.reshape(batch * blocks, 1, b, width),
            dropout_p=dropout,
        )
        out = out.view(batch, blocks, heads, b, head_dim).permute(0, 1, 3, 2, 4).reshape(batch, padded, embed)
        out = out[:, :length] if pad else out
        out = out.masked_fill(is_index_masked.view(batch, length, 1), 0.0)  # LED zeroes padding rows

        if is_global_attn:
            out = self._with_global_rows(out, hidden_states, (global_pos, global_ok), is_index_masked,
                                         is_index_global_attn, dropout)
        return (out,)

    def _with_global_rows(self, out, hidden_states, global_slots, is_index_masked, is_index_global_attn, dropout):
        """``out`` with the global tokens' rows replaced by their attention over every unmasked key, through
        LED's global projections."""
        global_pos, global_ok = global_slots
        batch, length, embed = hidden_states.shape
        heads, head_dim = self.num_heads, self.head_dim

        def split_heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, length, heads, head_dim).transpose(1, 2)  # B H L D

        rows = torch.arange(batch, device=hidden_states.device)[:, None]
        global_query = self.query_global(hidden_states[rows, global_pos])
        global_query = global_query.view(batch, -1, heads, head_dim).transpose(1, 2)
        global_out = F.scaled_dot_product_attention(
            global_query,
            split_heads(self.key_global(hidden_states)),
            split_heads(self.value_global(hidden_states)),
            attn_mask=~is_index_masked.view(batch, 1, 1, length),
            dropout_p=dropout,
        )
        global_out = global_out.transpose(1, 2).reshape(batch, -1, embed) * global_ok[..., None]
        # global rows take the global result (spare slots scatter zeros onto rows the where() skips)
        index = global_pos[:, :, None].expand(-1, -1, embed)
        scattered = out.new_zeros(()).expand_as(out).scatter(1, index, global_out)
        return torch.where(is_index_global_attn[..., None], scattered, out)


def _row_mask_inverted(mask: torch.Tensor, dtype: torch.dtype, tgt_len: int | None = None):
    """``modeling_led._prepare_4d_attention_mask_inverted`` computed on one row and broadcast.

    transformers' version materialises (B, 1, L, L) in the embeddings' dtype four times over (expanded,
    inverted, filled, multiplied) and ``LEDEncoder.forward`` keeps only row 0 of it, as a view that holds the
    whole B x L x L tensor alive through the encoder (through its backward with gradient checkpointing): 1 GiB
    kept and 4 GiB at the peak for one fp32 row of 16k tokens. The same arithmetic on (B, 1, 1, L) and an
    ``expand`` give the same values; the function has no other caller in transformers 5."""
    bsz, src_len = mask.size()
    tgt_len = tgt_len if tgt_len is not None else src_len
    inverted = 1.0 - mask[:, None, None, :].to(dtype)
    filled = inverted.masked_fill(inverted.bool(), torch.finfo(dtype).min) * inverted
    return filled.expand(bsz, 1, tgt_len, src_len)


# transformers' own, kept before any patch (tests compare against it)
TRANSFORMERS_ENCODER_MASK = getattr(modeling_led, "_prepare_4d_attention_mask_inverted", None)


def _patch_encoder_mask() -> None:
    if TRANSFORMERS_ENCODER_MASK is not None:
        modeling_led._prepare_4d_attention_mask_inverted = _row_mask_inverted


def use_sdpa_encoder_attention(model):
    """Swap every LED encoder self-attention module of ``model`` (in place) for the SDPA version, and make
    LED's encoder build its padding mask per row instead of per (row, token) pair (see ``_row_mask_inverted``).

    Returns the number of modules swapped: 0 for models that are not LED (nothing to do)."""
    swapped = 0
    cache = GlobalCounts()
    for module in model.modules():
        if type(module) is LEDEncoderSelfAttention:
            module.__class__ = SdpaLEDEncoderSelfAttention
            module.global_counts_cache = cache
            swapped += 1
    if swapped:
        _patch_encoder_mask()
        _prepare_cross_attention_mask(model)
    return swapped


def _cross_attention_mask(module, args, kwargs):
    """The decoder's cross-attention mask in 4-D, with the values transformers builds from the 2-D one.

    From a 2-D mask, transformers first checks on the host whether any input token is padding (to drop the
    mask when none is): on a GPU that waits for the whole encoder to finish. A 4-D mask is taken as it is:
    boolean for SDPA, additive (0 or the dtype's minimum) for eager attention."""
    mask = kwargs.get("encoder_attention_mask")
    if mask is None or mask.dim() != 2:
        return args, kwargs
    tokens = kwargs.get("input_ids")
    tokens = tokens if tokens is not None else kwargs.get("inputs_embeds")
    if tokens is None:
        return args, kwargs
    keep = mask[:, None, None, :].bool()
    if module.config._attn_implementation != "sdpa":
        dtype = module.embed_tokens.weight.dtype
        keep = torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, torch.finfo(dtype).min)
    # (B, 1, answer length, input length), the shape LED's attention checks: a broadcast view, no copy
    kwargs["encoder_attention_mask"] = keep.expand(mask.shape[0], 1, tokens.shape[1], mask.shape[1])
    return args, kwargs


def _prepare_cross_attention_mask(model) -> None:
    for module in model.modules():
        if isinstance(module, modeling_led.LEDDecoder) and module.config._attn_implementation in ("sdpa", "eager"):
            if getattr(module, "cross_attention_mask_hook", None) is None:
                module.cross_attention_mask_hook = module.register_forward_pre_hook(_cross_attention_mask,
                                                                                   with_kwargs=True)


def _restore_cross_attention_mask(model) -> None:
    for module in model.modules():
        hook = getattr(module, "cross_attention_mask_hook", None)
        if hook is not None:
            hook.remove()
            module.cross_attention_mask_hook = None


def set_encoder_attention(model, implementation: str) -> int:
    """``sdpa``: this module's attention; ``eager``: transformers' own, mask included.

    The encoder mask function is module-wide in transformers: the per-row one gives the same values, so
    models already set up are not affected in their results, only in the memory the mask takes. ``eager``
    puts transformers' function back, so that ``eager`` measures transformers' behaviour (benchmarks set up
    one attention after the other in one process). Other families (BART, T5, LongT5) keep transformers'
    attention whatever ``implementation`` says: nothing is swapped or patched, 0 is returned."""
    if implementation not in ENCODER_ATTENTIONS:
        raise ValueError(f"encoder attention must be one of {', '.join(ENCODER_ATTENTIONS)}, "
                         f"not {implementation!r}")
    if not any(isinstance(module, LEDEncoderSelfAttention) for module in model.modules()):
        return 0
    if implementation == "sdpa":
        return use_sdpa_encoder_attention(model)
    swapped = 0
    for module in model.modules():
        if type(module) is SdpaLEDEncoderSelfAttention:
            module.__class__ = LEDEncoderSelfAttention
            swapped += 1
    _restore_cross_attention_mask(model)
    if any(isinstance(module, LEDEncoderSelfAttention) for module in model.modules()):
        if TRANSFORMERS_ENCODER_MASK is not None:
            modeling_led._prepare_4d_attention_mask_inverted = TRANSFORMERS_ENCODER_MASK
    return swapped
