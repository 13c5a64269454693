"""The FLOPs model against a hand count, and the peak FLOP/s it is compared with."""

from dataclasses import dataclass, replace

import pytest
import torch

from lfqa.flops import FlopsCounter, ModelShape, band_pairs, measure_matmul_flops, table_peak_flops, train_flops

D, FFN, VOCAB, LAYERS, WINDOW = 768, 3072, 50265, 6, 1024  # allenai/led-base-16384
LED_BASE = ModelShape(d_model=D, encoder_layers=LAYERS, decoder_layers=LAYERS, encoder_ffn_dim=FFN,
                      decoder_ffn_dim=FFN, vocab_size=VOCAB, one_sided_window=WINDOW // 2, global_projections=True)


def matmul(m: int, k: int, n: int) -> int:
    """FLOPs of an (m x k) @ (k x n) product: a multiply and an add per term."""
    return 2 * m * k * n


def hand_count(n: int, a: int, g: int) -> int:
    """Forward FLOPs of LED-base on one row of n input / a answer tokens, g of them global, matrix by matrix."""
    w = WINDOW // 2
    pairs = sum(min(n - 1, i + w) - max(0, i - w) + 1 for i in range(n))  # (query, key) pairs in the band
    encoder_layer = (
        4 * matmul(n, D, D)  # q, k, v, o
        + 2 * matmul(n, D, D) + matmul(g, D, D)  # global k, v on every token; global q on the global tokens
        + matmul(n, D, FFN) + matmul(n, FFN, D)
        + 2 * 2 * D * pairs  # Q K^T and A V over the band
        + 2 * matmul(n, D, g)  # every token against the global keys (scores, values)
        + 2 * matmul(g, D, n)  # the global tokens against every key
    )
    decoder_layer = (
        4 * matmul(a, D, D) + 2 * matmul(a, D, D)  # self q, k, v, o; cross q, o
        + 2 * matmul(n, D, D)  # cross k, v of the encoder output
        + matmul(a, D, FFN) + matmul(a, FFN, D)
        + 2 * 2 * D * (a * (a + 1) // 2)  # causal self-attention
        + 2 * matmul(a, D, n)  # cross-attention
    )
    return LAYERS * encoder_layer + LAYERS * decoder_layer + matmul(a, D, VOCAB)


def test_led_base_at_800_input_and_220_answer_tokens_matches_the_hand_count():
    expected = 3 * hand_count(800, 220, 20)  # training: forward + backward (twice the forward)
    assert train_flops(LED_BASE, 800, 220, 20) == pytest.approx(expected, rel=1e-12)
    assert 0.4e12 < expected < 0.5e12
    # The rule of thumb 6 x parameters x tokens overstates it about 2.2x: each token passes only its own
    # side's weights, and the 12.6M encoder position embeddings cost nothing.
    from transformers import LEDConfig, LEDForConditionalGeneration

    config = LEDConfig(d_model=D, encoder_layers=LAYERS, decoder_layers=LAYERS, encoder_ffn_dim=FFN,
                       decoder_ffn_dim=FFN, encoder_attention_heads=12, decoder_attention_heads=12, vocab_size=VOCAB,
                       attention_window=WINDOW, max_encoder_position_embeddings=16384,
                       max_decoder_position_embeddings=1024)
    assert ModelShape.from_config(config) == LED_BASE
    with torch.device("meta"):
        params = sum(p.numel() for p in LEDForConditionalGeneration(config).parameters())
    assert 2.0 < 6 * params * (800 + 220) / expected < 2.4


def test_rows_add_up_and_the_band_is_exact():
    rows = train_flops(LED_BASE, [800, 300], [220, 50], [20, 5])
    assert rows == pytest.approx(train_flops(LED_BASE, 800, 220, 20) + train_flops(LED_BASE, 300, 50, 5))
    for n in (1, 2, 300, 513, 1025, 4000):
        brute = sum(min(n - 1, i + 512) - max(0, i - 512) + 1 for i in range(n))
        assert band_pairs(n, 512) == brute
    assert band_pairs(300, None) == 300 * 300  # full attention


def test_hardware_flops_count_padding_and_the_recomputed_forward():
    counter = FlopsCounter(LED_BASE, gradient_checkpointing=False, pad_to_multiple_of=1024)
    real = counter.batch([800], [220], [20], padded_input=800, padded_answer=220)
    assert real.model == pytest.approx(train_flops(LED_BASE, 800, 220, 20))
    assert real.hardware == pytest.approx(train_flops(LED_BASE, 1024, 220, 20))  # LED pads to its window
    checkpointed = FlopsCounter(LED_BASE, gradient_checkpointing=True, pad_to_multiple_of=1024)
    assert checkpointed.batch([800], [220], [20], 800, 220).hardware == pytest.approx(real.hardware * 4 / 3)


def test_one_table_of_peaks():
    cases = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA H100 NVL": 835e12,
             "NVIDIA H200": 989e12, "NVIDIA H200 NVL": 835e12, "NVIDIA A100-SXM4-80GB": 312e12,
             "NVIDIA L4": 121e12, "NVIDIA L40S": 362e12, "NVIDIA A10G": 125e12, "NVIDIA A10": 125e12,
             "NVIDIA GeForce RTX 4090": 165e12, "Tesla T4": None}
    for name, peak in cases.items():
        assert table_peak_flops(name, "bf16") == peak, name
    assert table_peak_flops("NVIDIA H100 80GB HBM3", "fp32") == 67e12


def test_cpu_matmul_probe_is_quick_and_plausible():
    import time

    started = time.perf_counter()
    rate = measure_matmul_flops("cpu", "fp32", seconds=0.1, size=256)
    assert time.perf_counter() - started < 5
    assert 1e8 < rate < 1e14


def test_the_probe_leaves_the_random_state_alone():
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    measure_matmul_flops("cpu", "fp32", seconds=0.01, size=64)
    assert torch.equal(torch.rand(4), expected)


# --- the other families: BART, T5 / Flan-T5, LongT5 -------------------------------------------------------


@dataclass(frozen=True)
class Dims:
    d: int
    h: int  # query/key/value width
    enc_ffn: int
    dec_ffn: int
    ffn_matrices: int  # 2, or 3 for a gated feed-forward
    enc_layers: int
    dec_layers: int
    vocab: int


def full_attention_hand_count(n: int, a: int, dims: Dims, encoder_attention: int) -> int:
    """Forward FLOPs of an encoder-decoder, matrix by matrix; ``encoder_attention`` is the encoder's
    (query, key) pairs per layer."""
    d, h, enc_ffn, dec_ffn = dims.d, dims.h, dims.enc_ffn, dims.dec_ffn
    encoder_layer = (
        3 * matmul(n, d, h) + matmul(n, h, d)  # q, k, v, o
        + (dims.ffn_matrices - 1) * matmul(n, d, enc_ffn) + matmul(n, enc_ffn, d)  # wi (wi_0, wi_1 gated), wo
        + 2 * 2 * h * encoder_attention  # Q K^T and A V
    )
    decoder_layer = (
        3 * matmul(a, d, h) + matmul(a, h, d) + matmul(a, d, h) + matmul(a, h, d)  # self q, k, v, o; cross q, o
        + 2 * matmul(n, d, h)  # cross k, v of the encoder output
        + (dims.ffn_matrices - 1) * matmul(a, d, dec_ffn) + matmul(a, dec_ffn, d)
        + 2 * 2 * h * (a * (a + 1) // 2)  # causal self-attention
        + 2 * matmul(a, h, n)  # cross-attention
    )
    return dims.enc_layers * encoder_layer + dims.dec_layers * decoder_layer + matmul(a, d, dims.vocab)


def test_bart_large_is_led_without_its_band_and_global_projections():
    from transformers import BartConfig

    config = BartConfig(d_model=1024, encoder_layers=12, decoder_layers=12, encoder_ffn_dim=4096,
                        decoder_ffn_dim=4096, encoder_attention_heads=16, decoder_attention_heads=16,
                        vocab_size=50265, max_position_embeddings=1024)  # facebook/bart-large
    shape = ModelShape.from_config(config)
    assert shape.one_sided_window is None and not shape.global_projections and shape.attention_width == 1024
    expected = 3 * full_attention_hand_count(800, 220, Dims(1024, 1024, 4096, 4096, 2, 12, 12, 50265), 800 * 800)
    assert train_flops(shape, 800, 220) == pytest.approx(expected, rel=1e-12)
    assert 1.2e12 < expected < 1.35e12
    # BART has no global attention: the question's token counts the collator reports change nothing
    assert train_flops(shape, 800, 220, 20) == train_flops(shape, 800, 220)


def test_flan_t5_base_gated_feed_forward_and_an_attention_wider_than_d_model():
    from transformers import T5Config

    flan = T5Config(d_model=768, d_kv=64, num_heads=12, d_ff=2048, num_layers=12, num_decoder_layers=12,
                    vocab_size=32128, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    shape = ModelShape.from_config(flan)
    assert shape.gated_ffn and shape.attention_width == 768 and shape.decoder_layers == 12
    expected = 3 * full_attention_hand_count(800, 220, Dims(768, 768, 2048, 2048, 3, 12, 12, 32128), 800 * 800)
    assert train_flops(shape, 800, 220) == pytest.approx(expected, rel=1e-12)
    # t5-11b's layout: 128 heads of 128 against d_model 1,024; the original T5's ReLU feed-forward
    wide = ModelShape.from_config(T5Config(d_model=1024, d_kv=128, num_heads=128, d_ff=65536, num_layers=2,
                                           num_decoder_layers=3, vocab_size=32128, feed_forward_proj="relu"))
    assert not wide.gated_ffn and wide.attention_width == 16384
    expected = 3 * full_attention_hand_count(300, 50, Dims(1024, 16384, 65536, 65536, 2, 2, 3, 32128), 300 * 300)
    assert train_flops(wide, 300, 50) == pytest.approx(expected, rel=1e-12)


def longt5_encoder_pairs(n: int, radius: int) -> int:
    return sum(1 for i in range(n) for j in range(n) if abs(i - j) <= radius)


def test_long_t5_tglobal_base_local_band_and_transient_global_tokens():
    from transformers import LongT5Config

    config = LongT5Config(d_model=768, d_kv=64, num_heads=12, d_ff=2048, num_layers=12, num_decoder_layers=12,
                          vocab_size=32128, feed_forward_proj="gated-gelu", encoder_attention_type="transient-global",
                          local_radius=127, global_block_size=16, tie_word_embeddings=False)
    shape = ModelShape.from_config(config)  # google/long-t5-tglobal-base
    assert (shape.one_sided_window, shape.global_block_size, shape.gated_ffn) == (127, 16, True)
    n, a, d = 1000, 220, 768
    g = n // 16  # 62 global tokens; the last 8 inputs join the 62nd block
    per_layer_globals = 2 * matmul(g, d, d) + 2 * matmul(n, d, g)  # their k, v; every token's scores and values
    expected = 3 * (full_attention_hand_count(n, a, Dims(d, d, 2048, 2048, 3, 12, 12, 32128),
                                               longt5_encoder_pairs(n, 127))
                    + 12 * per_layer_globals)
    assert train_flops(shape, n, a) == pytest.approx(expected, rel=1e-12)
    local = ModelShape.from_config(LongT5Config(encoder_attention_type="local", local_radius=127))
    assert local.one_sided_window == 127 and local.global_block_size is None
    # at 16k inputs the local band and 1,024 global tokens keep LongT5's encoder attention far below T5's
    assert train_flops(shape, 16384, 512) < 0.6 * train_flops(replace(shape, one_sided_window=None,
                                                                      global_block_size=None), 16384, 512)


def measured_forward(model, n: int, a: int) -> int:
    """FLOPs of one forward of the real transformers modules, counted by PyTorch op by op."""
    from torch.utils.flop_counter import FlopCounterMode

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 100, (1, n), generator=generator)
    labels = torch.randint(3, 100, (1, a), generator=generator)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
    return counter.get_total_flops()


def small_family_models():
    from transformers import (
        BartConfig,
        BartForConditionalGeneration,
        LongT5Config,
        LongT5ForConditionalGeneration,
        T5Config,
        T5ForConditionalGeneration,
    )

    t5 = dict(vocab_size=128, d_model=32, d_kv=16, num_heads=4, d_ff=48, num_layers=2, num_decoder_layers=3,
              feed_forward_proj="gated-gelu", decoder_start_token_id=0)
    bart = BartConfig(vocab_size=128, d_model=32, encoder_layers=2, decoder_layers=3, encoder_ffn_dim=48,
                      decoder_ffn_dim=40, encoder_attention_heads=4, decoder_attention_heads=4,
                      max_position_embeddings=64)
    longt5 = LongT5Config(encoder_attention_type="transient-global", local_radius=3, global_block_size=4, **t5)
    torch.manual_seed(0)
    models = {}
    for name, config, cls in (("bart", bart, BartForConditionalGeneration),
                              ("t5", T5Config(tie_word_embeddings=False, **t5), T5ForConditionalGeneration),
                              ("longt5", longt5, LongT5ForConditionalGeneration)):
        config._attn_implementation = "eager"  # FlopCounterMode counts eager matmuls as they are
        models[name] = cls(config)
    return models


def test_the_model_matches_what_pytorch_counts_in_the_real_modules():
    """What the modules compute beyond the mathematics is known exactly: the decoder's causal triangle is
    computed whole, and LongT5 scores each block against three whole blocks and sums the blocks into
    global tokens by a one-hot product."""
    from lfqa.flops import forward_flops

    n, a = 40, 12
    for name, model in small_family_models().items():
        counter = FlopsCounter.for_model(model, False, None)
        shape, h = counter.shape, counter.shape.attention_width
        causal_rest = 4 * h * (a * a - a * (a + 1) // 2) * shape.decoder_layers
        extra = 0
        if name == "longt5":
            block, g = 3 + 1, n // 4
            computed_pairs = n * (3 * block + g)
            extra = shape.encoder_layers * (4 * h * computed_pairs - 4 * h * (band_pairs(n, 3) + n * g)
                                            + 2 * n * g * shape.d_model)
        assert measured_forward(model, n, a) == pytest.approx(forward_flops(shape, n, a) + causal_rest + extra,
                                                              rel=1e-12), name


def test_an_architecture_without_a_flops_model_is_one_line():
    from transformers import BertConfig

    with pytest.raises(ValueError, match=r"^no FLOPs model for 'bert' models: lfqa counts LED, BART, T5 and LongT5$"):
        ModelShape.from_config(BertConfig())
