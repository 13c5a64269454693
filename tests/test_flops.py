"""The FLOPs model against a hand count, and the peak FLOP/s it is compared with."""

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
