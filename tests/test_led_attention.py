"""lfqa's SDPA encoder attention against transformers' LED attention: same outputs, same gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LEDConfig, LEDForConditionalGeneration
from transformers.models.led.modeling_led import LEDEncoderSelfAttention

from lfqa.led_attention import SdpaLEDEncoderSelfAttention, set_encoder_attention, use_sdpa_encoder_attention


def _model(window=16, layers=2, d=64, heads=4, dropout=0.0, attention_dropout=0.0, seed=0):
    torch.manual_seed(seed)
    config = LEDConfig(vocab_size=300, d_model=d, encoder_layers=layers, decoder_layers=2,
                       encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_ffn_dim=2 * d,
                       decoder_ffn_dim=2 * d, attention_window=window, max_encoder_position_embeddings=512,
                       max_decoder_position_embeddings=64, dropout=dropout, attention_dropout=attention_dropout,
                       pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
    return LEDForConditionalGeneration(config)


def _batch(lengths, globals_, total=None, seed=1):
    """Rows of the given lengths (right-padded to ``total``), the first ``g`` tokens of each global."""
    g = torch.Generator().manual_seed(seed)
    total = total or max(lengths)
    ids = torch.randint(5, 300, (len(lengths), total), generator=g)
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    glob = torch.zeros_like(mask)
    for i, (n, k) in enumerate(zip(lengths, globals_)):
        mask[i, :n] = 1
        ids[i, n:] = 1
        glob[i, :k] = 1
    labels = torch.randint(5, 300, (len(lengths), 23), generator=g)
    labels[0, 17:] = -100
    return dict(input_ids=ids, attention_mask=mask, global_attention_mask=glob, labels=labels)


def _run(model, batch):
    model.zero_grad()
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


CASES = {
    # lengths, global tokens per row, padded length, window
    "padding, different global counts": ([100, 61, 128], [7, 3, 12], 128, 16),
    "one row without global tokens": ([90, 120], [5, 0], 120, 16),
    "no global tokens at all": ([70, 47], [0, 0], 70, 16),
    "a window of padding only (row 2)": ([128, 20], [4, 2], 128, 16),
    "input shorter than the window": ([11, 9], [3, 2], 11, 32),
    "many global tokens, wide window": ([200, 150], [40, 33], 200, 64),
    "one row, every token global but one": ([32], [31], 32, 16),
    # 50 global tokens, w 8: blocks of 24 queries, the 112 tokens padded to 120 inside the attention
    "many global tokens, narrow window: wide blocks": ([112, 90], [50, 30], 112, 16),
    # global tokens scattered (not the leading ones): (row, positions) set by _batch's `scatter`
    "global tokens in the middle and at the end": ([120, 100], [0, 0], 120, 16),
}
SCATTERED_GLOBALS = {0: [5, 40, 41, 77, 119], 1: [0, 63, 64, 65, 99]}


@pytest.mark.parametrize("case", list(CASES))
def test_outputs_and_gradients_equal_transformers(case):
    lengths, globals_, total, window = CASES[case]
    eager = _model(window=window).train()  # train(): no dropout configured, so both are deterministic
    sdpa = copy.deepcopy(eager)
    assert use_sdpa_encoder_attention(sdpa) == 2
    batch = _batch(lengths, globals_, total)
    if case == "global tokens in the middle and at the end":
        for row, positions in SCATTERED_GLOBALS.items():
            batch["global_attention_mask"][row, positions] = 1
    ref, ref_grads = _run(eager, batch)
    new, new_grads = _run(sdpa, batch)

    assert torch.isfinite(new.loss)
    assert new.loss.item() == pytest.approx(ref.loss.item(), abs=1e-5)
    real = batch["attention_mask"].bool()
    enc_diff = (new.encoder_last_hidden_state - ref.encoder_last_hidden_state)[real].abs().max().item()
    assert enc_diff < 1e-4
    assert set(new_grads) == set(ref_grads)
    scale = max(g.abs().max().item() for g in ref_grads.values())
    worst = max((new_grads[n] - ref_grads[n]).abs().max().item() for n in ref_grads)
    assert worst < 1e-4 * scale, worst / scale
    # the global projections are trained too (LED's global rows), unless no row has a global token
    grad = new_grads.get("led.encoder.layers.0.self_attn.longformer_self_attn.query_global.weight")
    assert (grad is not None and grad.abs().sum() > 0) == bool(batch["global_attention_mask"].any())


def test_padding_rows_are_zero_like_transformers():
    """LED gives exactly zero attention output on padding positions; the layer after sees the same."""
    model = _model().eval()
    attn = model.led.encoder.layers[0].self_attn.longformer_self_attn
    hidden = torch.randn(2, 64, 64)
    mask = torch.zeros(2, 64)
    mask[1, 40:] = -10000.0
    mask[:, :3] = 10000.0
    kwargs = dict(attention_mask=mask, is_index_masked=mask < 0, is_index_global_attn=mask > 0, is_global_attn=True)
    ref = attn(hidden, **kwargs)[0]
    attn.__class__ = SdpaLEDEncoderSelfAttention
    new = attn(hidden, **kwargs)[0]
    assert torch.equal(new[1, 40:], torch.zeros_like(new[1, 40:]))
    assert (new - ref).abs().max() < 1e-5


def test_attention_maps_fall_back_to_transformers():
    model = _model().eval()
    set_encoder_attention(model, "sdpa")
    batch = _batch([50, 30], [3, 2])
    batch.pop("labels")
    out = model.led.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            global_attention_mask=batch["global_attention_mask"], output_attentions=True)
    assert len(out.attentions) == 2 and out.attentions[0].shape[-1] == 16 + 1 + 3  # band + global columns


def test_attention_dropout_reaches_local_and_global_rows():
    """In training, attention dropout draws anew on every call, in both SDPA calls (local and global rows)."""
    model = _model(attention_dropout=0.5).train()
    attn = model.led.encoder.layers[0].self_attn.longformer_self_attn
    attn.__class__ = SdpaLEDEncoderSelfAttention
    hidden = torch.randn(2, 64, 64)
    mask = torch.zeros(2, 64)
    mask[:, :3] = 10000.0
    kwargs = dict(attention_mask=mask, is_index_masked=mask < 0, is_index_global_attn=mask > 0, is_global_attn=True)
    first, second = attn(hidden, **kwargs)[0], attn(hidden, **kwargs)[0]
    assert not torch.allclose(first[:, :3], second[:, :3])  # global rows
    assert not torch.allclose(first[:, 3:], second[:, 3:])  # local rows
    attn.eval()
    assert torch.equal(attn(hidden, **kwargs)[0], attn(hidden, **kwargs)[0])


def test_dropout_runs_and_differs_between_steps():
    model = _model(attention_dropout=0.3).train()
    use_sdpa_encoder_attention(model)
    batch = _batch([64, 40], [4, 3])
    a = model(**batch).loss
    b = model(**batch).loss
    assert torch.isfinite(a) and torch.isfinite(b) and a.item() != b.item()
    model.eval()
    assert model(**batch).loss.item() == model(**batch).loss.item()


def test_generation_and_saved_folder_stay_plain_led(tmp_path):
    """Greedy answers are the same token for token; the saved folder loads in plain transformers."""
    eager = _model().eval()
    sdpa = copy.deepcopy(eager)
    use_sdpa_encoder_attention(sdpa)
    batch = _batch([80, 55], [6, 4])
    kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  global_attention_mask=batch["global_attention_mask"], max_new_tokens=12, num_beams=2,
                  do_sample=False)
    assert torch.equal(eager.generate(**kwargs), sdpa.generate(**kwargs))

    sdpa.save_pretrained(tmp_path)
    again = LEDForConditionalGeneration.from_pretrained(tmp_path)
    assert type(again.led.encoder.layers[0].self_attn.longformer_self_attn) is LEDEncoderSelfAttention
    state = sdpa.state_dict()
    assert all(torch.equal(t, state[k]) for k, t in again.state_dict().items())
    assert set_encoder_attention(sdpa, "eager") == 2
    assert type(sdpa.led.encoder.layers[1].self_attn.longformer_self_attn) is LEDEncoderSelfAttention
    with pytest.raises(ValueError, match="sdpa, eager"):
        set_encoder_attention(sdpa, "flash")


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_autocast_bf16_is_close(dtype):
    eager = _model().train()
    sdpa = copy.deepcopy(eager)
    use_sdpa_encoder_attention(sdpa)
    batch = _batch([100, 70], [5, 3])
    with torch.autocast("cpu", dtype=dtype):
        ref = eager(**batch).loss
        new = sdpa(**batch).loss
    assert torch.isfinite(new) and new.item() == pytest.approx(ref.item(), rel=2e-2)


def test_the_encoder_mask_is_built_per_row_with_the_same_values():
    """lfqa's replacement for LED's (B, 1, L, L) encoder mask: same values, one row of memory."""
    from transformers.models.led import modeling_led

    from lfqa.led_attention import TRANSFORMERS_ENCODER_MASK, _row_mask_inverted

    assert TRANSFORMERS_ENCODER_MASK is not None and TRANSFORMERS_ENCODER_MASK is not _row_mask_inverted
    mask = torch.tensor([[1, 1, 2, 0], [2, 1, 1, 1]])
    for dtype in (torch.float32, torch.bfloat16):
        new = _row_mask_inverted(mask, dtype)
        assert new.shape == (2, 1, 4, 4) and new.stride(2) == 0  # broadcast, not materialised
        assert torch.equal(TRANSFORMERS_ENCODER_MASK(mask, dtype), new)
        assert new[0, 0, 0].tolist() == [0.0, 0.0, -torch.finfo(dtype).min, torch.finfo(dtype).min]
    use_sdpa_encoder_attention(_model())
    assert modeling_led._prepare_4d_attention_mask_inverted is _row_mask_inverted
    set_encoder_attention(_model(), "eager")  # transformers' behaviour, mask included
    assert modeling_led._prepare_4d_attention_mask_inverted is TRANSFORMERS_ENCODER_MASK


def test_block_layout_grows_blocks_when_global_slots_would_dominate():
    from lfqa.led_attention import block_layout

    assert block_layout(1024, 512, 64) == (512, 64, 1024)  # LED-base: blocks of w, 64 + 1536 keys
    assert block_layout(1024, 128, 20) == (128, 32, 1024)  # 20 slots padded to 32: 32 + 384 keys
    b, slots, padded = block_layout(112, 8, 50)
    assert (b, padded) == (24, 120) and (slots + b + 16) % 16 == 0 and slots >= 50
    assert block_layout(64, 8, 0) == (8, 0, 64)
