"""lfqa plan: parameter counts, the placement of model states per ZeRO stage, the activation inventory
against PyTorch's own saved tensors, the verdicts, the command line, and the estimate against a measured
peak of real training steps on CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from conftest import ROOT, lfqa_env

from lfqa import plan
from lfqa.config import TinyModelConfig, load_job

LED_BASE_JOB = ROOT / "jobs" / "led-base-lfqa.yaml"
GIB = plan.GIB


def led_base_shape() -> plan.ModelShape:
    from transformers import LEDConfig

    return plan.shape_from_led_config(LEDConfig(**plan.KNOWN_MODELS["allenai/led-base-16384"]),
                                      "allenai/led-base-16384")


def strategies(gpus: int = 8) -> dict[str, plan.Strategy]:
    return {s.accelerate_config.split("/")[-1].removesuffix(".yaml"): s
            for s in plan.shipped_strategies(gpus, d_model=768)}


def test_parameter_count_equals_the_real_tiny_model():
    from transformers import LEDForConditionalGeneration

    job = load_job(ROOT / "jobs" / "tiny-cpu.yaml", ["model.cache_dir=/nonexistent"])  # not built: model.tiny
    config = plan.led_config_for_job(job)
    shape = plan.shape_from_led_config(config, "tiny-led")
    real = LEDForConditionalGeneration(config)
    assert shape.parameters == sum(p.numel() for p in real.parameters())
    assert shape.d_model == TinyModelConfig().d_model == 128
    assert shape.attention_window == 16 and shape.max_input_tokens == 1024


def test_parameter_count_equals_the_real_led_base():
    from transformers import LEDConfig, LEDForConditionalGeneration

    shape = led_base_shape()
    real = LEDForConditionalGeneration(LEDConfig(**plan.KNOWN_MODELS["allenai/led-base-16384"]))
    assert shape.parameters == sum(p.numel() for p in real.parameters()) == 161_844_480
    # the shared embedding, 6 + 6 layers and the two embedding blocks add up to the whole
    assert (shape.shared_parameters + shape.encoder_embedding_parameters + shape.decoder_embedding_parameters
            + 6 * shape.encoder_layer_parameters + 6 * shape.decoder_layer_parameters) == shape.parameters


def test_shipped_configs_are_read_from_the_deepspeed_jsons():
    found = strategies(8)
    assert set(found) == {"multi-gpu", "zero2", "zero3", "zero2-offload", "zero3-offload", "zero3-offload-params"}
    assert [s.name for s in plan.shipped_strategies(8, 768)][:3] == ["DDP", "ZeRO-2", "ZeRO-3"]
    assert found["zero2"].stage == 2 and found["zero2"].reduce_bucket_size == 500_000_000
    assert found["zero2"].overlap_comm and not found["zero2"].offload_optimizer
    assert found["zero3-offload"].offload_optimizer and not found["zero3-offload"].offload_param
    assert found["zero3-offload-params"].offload_param
    assert found["zero3"].param_persistence_threshold == 100_000
    assert "single-gpu" in strategies(1)


def test_auto_bucket_sizes_get_accelerates_values(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {
        "stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto"}}))
    s = plan.strategy_from_deepspeed("x", "x.yaml", path, d_model=768, rank=0)
    assert s.reduce_bucket_size == 768 * 768
    assert s.prefetch_bucket_size == int(0.9 * 768 * 768)
    assert s.param_persistence_threshold == 7680


def test_zero3_model_states_shrink_by_the_number_of_gpus():
    shape, zero3 = led_base_shape(), strategies(8)["zero3"]
    one = plan.model_states(shape, zero3, n=1, precision="bf16", device="cuda")
    eight = plan.model_states(shape, zero3, n=8, precision="bf16", device="cuda")
    assert eight.grads == pytest.approx(one.grads / 8)
    assert eight.optimizer == pytest.approx(one.optimizer / 8) == pytest.approx(12 * shape.parameters / 8)
    persistent = 2 * shape.persistent_parameters(100_000)  # biases and layer norms stay whole on every GPU
    assert eight.params - persistent == pytest.approx((one.params - persistent) / 8)
    # ZeRO-2 keeps the 16-bit weights whole: only gradients and optimizer states shrink
    zero2_1 = plan.model_states(shape, strategies(8)["zero2"], n=1, precision="bf16", device="cuda")
    zero2_8 = plan.model_states(shape, strategies(8)["zero2"], n=8, precision="bf16", device="cuda")
    assert zero2_8.params == zero2_1.params == 2 * shape.parameters
    assert zero2_8.optimizer == pytest.approx(zero2_1.optimizer / 8)
    # DDP: 4 + 4 + 8 bytes per parameter on every GPU, plus its reducer's buckets
    ddp = plan.model_states(shape, strategies(8)["multi-gpu"], n=8, precision="bf16", device="cuda")
    assert (ddp.params, ddp.grads, ddp.optimizer, ddp.buffers_persistent) == tuple(
        k * shape.parameters for k in (4, 4, 8, 4))


def test_offload_moves_optimizer_states_to_host_memory():
    shape, found = led_base_shape(), strategies(8)
    on_gpu = plan.model_states(shape, found["zero2"], n=8, precision="bf16", device="cuda")
    offload = plan.model_states(shape, found["zero2-offload"], n=8, precision="bf16", device="cuda")
    assert on_gpu.optimizer > 0 and on_gpu.cpu_per_process == 0
    assert offload.optimizer == 0 and offload.grads == 0
    # fp32 master + two Adam moments + the fp32 gradient shard, per process
    assert offload.cpu_per_process == pytest.approx(16 * shape.parameters / 8)
    params = plan.model_states(shape, found["zero3-offload-params"], n=8, precision="bf16", device="cuda")
    assert params.params < 0.01 * GIB and params.cpu_per_process > offload.cpu_per_process
    w = plan.Workload(batch_size=4, input_tokens=4096, answer_tokens=512, global_tokens=64)
    e = plan.estimate(shape, w, found["zero2-offload"], n=8, gpus_per_node=8, precision="bf16", gpu_memory_gib=80)
    assert e.cpu_per_node == pytest.approx(8 * offload.cpu_per_process)


@pytest.mark.parametrize("tokens", [4096, 16384])
def test_gradient_checkpointing_lowers_activations(tokens):
    shape = led_base_shape()
    w = plan.Workload(batch_size=4, input_tokens=tokens, answer_tokens=512, global_tokens=64)
    for s in strategies(8).values():
        e = plan.estimate(shape, w, s, n=8, gpus_per_node=8, precision="bf16", gpu_memory_gib=80)
        assert e.activations[True] < 0.5 * e.activations[False]
        assert e.peak[True] < e.peak[False]


def test_activations_grow_with_input_length_and_batch():
    shape, ddp = led_base_shape(), strategies(8)["multi-gpu"]

    def peak(batch, tokens):
        w = plan.Workload(batch_size=batch, input_tokens=tokens, answer_tokens=512, global_tokens=64)
        return plan.estimate(shape, w, ddp, n=8, gpus_per_node=8, precision="bf16", gpu_memory_gib=80).peak[True]

    assert peak(4, 4096) < peak(4, 8192) < peak(4, 16384)
    assert peak(1, 16384) < peak(2, 16384) < peak(4, 16384)


def test_a_verdict_flips_between_24_and_80_gb_for_led_base_at_16k():
    job = load_job(LED_BASE_JOB)
    small = plan.make_plan(job, str(LED_BASE_JOB), gpus=8, gpu_memory_gib=24)
    large = plan.make_plan(job, str(LED_BASE_JOB), gpus=8, gpu_memory_gib=80, shape=small.shape)
    assert small.workload.input_tokens == 16384
    flips = [(a.strategy.name, ckpt) for a, b in zip(small.estimates, large.estimates) for ckpt in (False, True)
             if not a.fits(ckpt) and b.fits(ckpt)]
    assert flips, "no config fits 80 GB but not 24 GB"
    assert all(not e.fits(False) for e in small.estimates)  # 16k without checkpointing never fits 24 GB
    assert large.recommendation() is not None and small.recommendation() is not None
    assert small.recommendation()[1] is True  # on 24 GB checkpointing is needed


INVENTORY_SHAPE = {"B": 3, "L": 256, "A": 40}


def saved_by_forward(encoder_layers: int = 2, attention: str = "eager", autocast: bool = False, G: int = 6):
    """A small LED's forward pass: bytes of every tensor kept for backward (by storage, weights excluded;
    under autocast the weights' 16-bit copies excluded too), and its config."""
    from transformers import LEDConfig, LEDForConditionalGeneration

    from lfqa.led_attention import set_encoder_attention

    B, L, A = INVENTORY_SHAPE["B"], INVENTORY_SHAPE["L"], INVENTORY_SHAPE["A"]
    torch.manual_seed(0)
    config = LEDConfig(vocab_size=500, d_model=64, encoder_layers=encoder_layers, decoder_layers=2,
                       encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                       decoder_ffn_dim=128, attention_window=16, max_encoder_position_embeddings=256,
                       max_decoder_position_embeddings=64, pad_token_id=1)
    model = LEDForConditionalGeneration(config).train()
    assert set_encoder_attention(model, attention) == (encoder_layers if attention == "sdpa" else 0)
    ids = torch.randint(5, 500, (B, L))
    global_mask = torch.zeros(B, L, dtype=torch.long)
    global_mask[:, :G] = 1
    saved: dict[int, int] = {}

    def pack(t):
        saved.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), global_attention_mask=global_mask,
                     labels=torch.randint(5, 500, (B, A))).loss
    assert loss.requires_grad
    copies = sum(p.numel() * 2 for p in model.parameters() if p.dim() == 2) if autocast else 0
    return sum(n for ptr, n in saved.items() if ptr not in params) - copies, config


def test_activation_inventory_equals_the_tensors_pytorch_saves():
    """Every tensor the forward pass keeps for backward, counted by storage: the plan's inventory is exact."""
    measured, config = saved_by_forward(attention="eager")
    shape = plan.shape_from_led_config(config, "small", encoder_attention="eager")
    w = plan.Workload(batch_size=3, input_tokens=256, answer_tokens=40, global_tokens=6)
    expected = plan.saved_after_forward(shape, w, plan.tensor_bytes("fp32", "torch", "cpu"), checkpointing=False)
    assert expected == pytest.approx(measured, rel=0.02)


def test_workload_pads_to_the_window_and_caps_at_the_positions():
    job = load_job(LED_BASE_JOB, ["data.max_input_tokens=3000"])
    shape = led_base_shape()
    assert plan.workload_for_job(job, shape).input_tokens == 3072
    assert plan.workload_for_job(job, shape, input_tokens=40000).input_tokens == 16384
    budget = load_job(LED_BASE_JOB, ["data.max_tokens_per_batch=20000"])
    assert plan.workload_for_job(budget, shape).batch_size == 1  # 16384 + 512 tokens per row
    first = load_job(LED_BASE_JOB, ["data.global_attention=first_token"])
    assert plan.workload_for_job(first, shape).global_tokens == 1


def test_cli_prints_the_table_and_a_recommendation(capsys):
    assert plan.main([str(LED_BASE_JOB), "--gpus", "8", "--gpu-memory", "80"]) == 0
    out = capsys.readouterr().out
    assert "allenai/led-base-16384 (161.8M parameters)" in out
    for row in ("parameters", "gradients", "optimizer states", "activations, ckpt off", "activations, ckpt on",
                "TOTAL (peak), ckpt on", "CPU RAM per node", "evaluation (peak)"):
        assert row in out
    for name in ("DDP", "ZeRO-2", "ZeRO-3", "ZeRO-3 +offload all"):
        assert name in out
    assert "Recommended: " in out
    assert "accelerate launch --config_file accelerate_configs/" in out


def test_cli_through_the_lfqa_command_and_json(capsys):
    from lfqa.cli import main as lfqa_main

    assert lfqa_main(["plan", str(LED_BASE_JOB), "--gpus", "1", "--gpu-memory", "24", "--input-tokens", "4096",
                      "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["workload"]["input_tokens"] == 4096 and data["gpus"] == 1
    assert data["configs"][0]["accelerate_config"] == "accelerate_configs/single-gpu.yaml"
    assert data["recommendation"]["peak_gib"] <= 24 * 0.9
    assert {"peak_ckpt_on", "peak_ckpt_off", "activations_ckpt_on"} <= set(data["configs"][0]["gib"])


def test_cli_says_what_to_change_when_nothing_fits(capsys):
    assert plan.main([str(LED_BASE_JOB), "--gpus", "1", "--gpu-memory", "6"]) == 0
    out = capsys.readouterr().out
    assert "Nothing fits" in out
    assert "data.batch_size=" in out or "data.max_input_tokens=" in out


def test_overrides_go_before_or_after_the_options(capsys):
    assert plan.main([str(LED_BASE_JOB), "--gpus", "8", "--gpu-memory", "80", "data.batch_size=1", "--json"]) == 0
    after = json.loads(capsys.readouterr().out)
    assert plan.main([str(LED_BASE_JOB), "data.batch_size=1", "--gpus", "8", "--gpu-memory", "80", "--json"]) == 0
    before = json.loads(capsys.readouterr().out)
    assert after["workload"]["batch_size"] == before["workload"]["batch_size"] == 1


def test_bad_job_key_exits_2_with_one_line(capsys):
    assert plan.main([str(LED_BASE_JOB), "train.learnig_rate=1", "--gpus", "1", "--gpu-memory", "24"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lfqa: error:") and "train.learnig_rate" in err[0]


def test_non_led_model_and_uneven_nodes_exit_2(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bart", "d_model": 64}))
    assert plan.main([str(LED_BASE_JOB), "--gpus", "1", "--gpu-memory", "24", "--model-config", str(tmp_path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"lfqa: error: --model-config {tmp_path}: lfqa plan covers LED models; BART "
                   "models train but have no memory estimate (measure one: benchmarks/run.py reports each "
                   "preset's peak memory)"]
    assert plan.main([str(LED_BASE_JOB), "--gpus", "3", "--gpu-memory", "24", "--nodes", "2"]) == 2
    assert "multiple of --nodes" in capsys.readouterr().err


def test_gradient_accumulation_keeps_gradients_through_the_forward():
    shape, ddp = led_base_shape(), strategies(8)["multi-gpu"]
    w = plan.Workload(batch_size=4, input_tokens=4096, answer_tokens=512, global_tokens=64)
    one = plan.estimate(shape, w, ddp, n=8, gpus_per_node=8, precision="bf16", gpu_memory_gib=80)
    accum = plan.estimate(shape, replace(w, gradient_accumulation_steps=4), ddp, n=8, gpus_per_node=8,
                          precision="bf16", gpu_memory_gib=80)
    assert one.peak[True] < accum.peak[True] <= one.peak[True] + one.gradients


def test_estimate_is_within_15_percent_of_a_measured_cpu_peak():
    """Real training steps (tiny LED, fp32, AdamW) measured by benchmarks/plan_memory.py in a fresh process:
    the measured peak of allocated memory against the plan's estimate for the same shape."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "plan_memory.py"), "--case", "tiny-1k", "--dtype", "fp32",
           "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=lfqa_env(), cwd=ROOT, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout)
    assert {r["checkpointing"] for r in results} == {False, True}
    for r in results:
        assert abs(r["error"]) < 0.15, r
        assert r["peak_allocated"] > 50 * 2**20  # a real measurement, not an empty one


@pytest.mark.parametrize("autocast,G", [(False, 6), (True, 6), (False, 50)])
def test_sdpa_encoder_layer_inventory_equals_the_tensors_pytorch_saves(autocast, G):
    """lfqa's SDPA encoder attention (model.encoder_attention: sdpa, the default), fp32 and bf16 autocast:
    what two more encoder layers save for backward, against the plan's inventory of two layers. With 50
    global tokens and a one-sided window of 8 the query blocks are 24 wide and 256 tokens become 264."""
    from lfqa.led_attention import block_layout

    assert block_layout(256, 8, G) == ((8, 8, 256) if G == 6 else (24, 56, 264))
    two, config = saved_by_forward(2, "sdpa", autocast, G)
    four, _ = saved_by_forward(4, "sdpa", autocast, G)
    shape = plan.shape_from_led_config(config, "small", encoder_attention="sdpa")
    eager = plan.shape_from_led_config(config, "small", encoder_attention="eager")
    w = plan.Workload(batch_size=3, input_tokens=256, answer_tokens=40, global_tokens=G)
    t = plan.tensor_bytes("bf16" if autocast else "fp32", "torch", "cpu")
    layer = plan.layer_memory(plan.encoder_layer_stages(shape, w, t)).saved
    assert 2 * layer == pytest.approx(four - two, rel=0.02)
    assert layer < plan.layer_memory(plan.encoder_layer_stages(eager, w, t)).saved
    if not autocast:  # the whole model, as for the eager attention above
        assert plan.saved_after_forward(shape, w, t, checkpointing=False) == pytest.approx(two, rel=0.02)


@pytest.mark.parametrize("name, family", [("tiny-bart", "BART"), ("tiny-t5", "T5"), ("tiny-longt5", "LongT5"),
                                          ("facebook/bart-large", "BART"), ("google/flan-t5-base", "T5"),
                                          ("google/long-t5-tglobal-base", "LongT5"), ("t5-small", "T5")])
def test_other_families_are_one_line_naming_what_plan_covers(name, family, capsys):
    """Refused by name, before the hub cache is asked (offline it usually has none of them)."""
    args = [str(LED_BASE_JOB), f"model.name_or_path={name}", "--gpus", "1", "--gpu-memory", "24"]
    assert plan.main(args) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"lfqa: error: model.name_or_path '{name}': lfqa plan covers LED "
                                               f"models; {family} models train but have no memory estimate"), err


def test_a_model_of_no_family_lfqa_trains_is_one_line(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 64}))
    args = [str(LED_BASE_JOB), "--gpus", "1", "--gpu-memory", "24", "--model-config", str(tmp_path)]
    assert plan.main(args) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"lfqa: error: --model-config {tmp_path}: lfqa plan covers LED models; 'bert' is no "
        "family lfqa trains"]


@pytest.mark.parametrize("job, family", [("bart-large-eli5-style.yaml", "BART"),
                                         ("long-t5-tglobal-base-lfqa.yaml", "LongT5")])
def test_the_other_families_shipped_jobs_are_one_line(job, family, capsys):
    assert plan.main([str(ROOT / "jobs" / job), "--gpus", "8", "--gpu-memory", "80"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and f"lfqa plan covers LED models; {family} models train" in err[0], err
