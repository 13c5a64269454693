"""The same training loop under DDP and DeepSpeed ZeRO-2 / ZeRO-3 (with offload), 2 CPU processes over gloo."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, cache_overrides, free_port, lfqa_env

LAUNCH_CONFIGS = {"ddp": "cpu", "zero2": "zero2-cpu", "zero3": "zero3-cpu", "zero3_offload": "zero3-offload-cpu"}
SHORT = ["train.max_steps=30", "train.warmup_steps=5", "eval.at_start=false", "eval.max_generate_samples=5",
         "data.max_eval_samples=9", "eval.batch_size=1", "eval.generation.max_new_tokens=12",
         "tracking.progress_bar=false", "tracking.log_every_steps=10", "checkpoint.every_steps=20"]


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    """Runs the tiny job once per launch config (2 processes) and keeps the result for every test."""
    tmp = tmp_path_factory.mktemp("sharding")
    done = {}

    def run(stage: str):
        if stage not in done:
            run_dir = tmp / stage
            cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
                   f"accelerate_configs/{LAUNCH_CONFIGS[stage]}.yaml", "--main_process_port", str(free_port()),
                   "-m", "lfqa.train", "jobs/tiny-cpu.yaml", f"output.dir={run_dir}", *SHORT, *cache_overrides(tmp)]
            proc = subprocess.run(cmd, cwd=ROOT, env=lfqa_env(), capture_output=True, text=True, timeout=900)
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
            done[stage] = (run_dir, proc.stdout + proc.stderr)
        return done[stage]

    return run


@pytest.mark.distributed
@pytest.mark.parametrize("stage", list(LAUNCH_CONFIGS))
def test_tiny_job_trains_on_two_processes(stage, launch):
    run_dir, output = launch(stage)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["num_processes"] == 2
    expected = "DistributedType.MULTI_CPU" if stage == "ddp" else "DistributedType.DEEPSPEED"
    assert summary["distributed_type"] == expected
    # 30 steps x 4 rows on each rank, no row on both.
    assert summary["ranks"] == {"rows_seen_per_rank_epoch0": [120, 120], "rows_seen_by_several_ranks_epoch0": 0}
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train] == [10, 20, 30]  # one writer: each step once
    assert train[-1]["train/loss"] < train[0]["train/loss"] - 0.3
    assert summary["eval_end"]["loss"] < 7.3  # untrained: about 7.64
    from transformers import AutoModelForSeq2SeqLM

    model = AutoModelForSeq2SeqLM.from_pretrained(run_dir / "model")
    assert sum(p.numel() for p in model.parameters()) > 1_000_000  # whole, not one rank's shard


@pytest.mark.distributed
def test_zero2_and_zero3_train_the_same_weights_as_ddp(launch):
    from transformers import AutoModelForSeq2SeqLM

    weights = {s: AutoModelForSeq2SeqLM.from_pretrained(launch(s)[0] / "model").state_dict()
               for s in ("ddp", "zero2", "zero3")}
    for stage in ("zero2", "zero3"):
        diff = max((weights[stage][k] - weights["ddp"][k]).abs().max().item() for k in weights["ddp"])
        assert diff < 1e-4, f"{stage} differs from DDP by {diff}"


def evaluate_alone(model_dir: Path):
    """Loss, ROUGE and answers of a saved model on the run's validation rows, in this one process."""
    from accelerate import Accelerator

    from lfqa.config import load_job
    from lfqa.data import Seq2SeqCollator
    from lfqa.evaluation import evaluate
    from lfqa.modeling import attention_window, load_model, load_tokenizer
    from lfqa.train import build_data

    job = load_job(model_dir / "job.yaml")
    model, tok = load_model(str(model_dir)), load_tokenizer(str(model_dir))
    val = build_data(job, tok, model.config, log=lambda _: None).eval
    return evaluate(model, tok, val, job.eval, Accelerator(cpu=True),
                    Seq2SeqCollator(tok.pad_token_id, attention_window(model)))


@pytest.mark.distributed
def test_zero3_evaluation_matches_the_exported_model_in_one_process(launch):
    """Generation under ZeRO-3 (synced_gpus, ranks in lockstep) gives what the exported model gives alone."""
    run_dir, _ = launch("zero3")
    summary = json.loads((run_dir / "summary.json").read_text())
    result = evaluate_alone(run_dir / "model")
    assert result.loss == pytest.approx(summary["eval_end"]["loss"], abs=1e-4)
    assert result.rouge == pytest.approx(summary["eval_end"]["rouge"], abs=1e-6)
    ranked = json.loads((run_dir / "eval-step30.json").read_text())["samples"]
    assert [s["generated"] for s in result.samples] == [s["generated"] for s in ranked]
    assert len(ranked) == 5


def resolved_deepspeed_config(path: Path) -> dict:
    """A DeepSpeed JSON with its "auto" values filled as lfqa + accelerate fill them."""
    config = json.loads(path.read_text())
    config.update(train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=1, gradient_clipping=1.0,
                  train_batch_size=4, bf16={"enabled": True}, fp16={"enabled": False})
    if "optimizer" in config:
        config["optimizer"]["params"] = {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}
    if "scheduler" in config:
        config["scheduler"]["params"].update(warmup_max_lr=1e-3, warmup_num_steps=10, total_num_steps=100)
    return config


@pytest.mark.parametrize("path", sorted((ROOT / "deepspeed_configs").glob("*.json")), ids=lambda p: p.stem)
def test_every_deepspeed_config_is_valid_and_leaves_job_values_to_auto(path):
    from deepspeed.runtime.config import DeepSpeedConfig

    raw = json.loads(path.read_text())
    # Values the job file owns are never written here (one place for each value).
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert raw[key] == "auto", key
    assert raw["bf16"]["enabled"] == "auto" and raw["fp16"]["enabled"] == "auto"
    for key in ("lr", "betas", "eps", "weight_decay"):
        assert raw.get("optimizer", {}).get("params", {}).get(key, "auto") == "auto"
    config = DeepSpeedConfig(resolved_deepspeed_config(path))
    stage = int(path.stem[len("zero")])
    assert config.zero_optimization_stage == stage
    assert (config.zero_config.offload_optimizer is not None) == ("offload" in path.stem)
    assert (config.zero_config.offload_param is not None) == ("params" in path.stem)
    if stage == 3:
        assert config.zero_config.gather_16bit_weights_on_model_save  # save_pretrained needs whole weights


@pytest.mark.parametrize("path", sorted((ROOT / "accelerate_configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_accelerate_config_loads_and_points_at_real_files(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    raw = yaml.safe_load(path.read_text())
    assert config.num_processes == raw["num_processes"] >= 1
    if path.stem.endswith("-cpu") or path.stem == "cpu":
        assert config.num_processes == 2 and config.num_machines == 1  # what the tests launch
    if raw["distributed_type"] == "DEEPSPEED":
        ds_file = ROOT / raw["deepspeed_config"]["deepspeed_config_file"]
        assert ds_file.is_file()
        assert not raw.get("use_cpu"), "use_cpu would replace DeepSpeed by DDP"
        if path.stem.endswith("-cpu"):
            assert (ROOT / "accelerate_configs" / f"{path.stem[:-4]}.yaml").is_file()  # a GPU twin
            assert ds_file.stem == path.stem[:-4]
    assert raw.get("mixed_precision", "no") == "no"  # precision lives in the job file


def test_deepspeed_auto_values_come_from_the_job():
    from types import SimpleNamespace

    from lfqa.config import load_job
    from lfqa.train import configure_deepspeed

    job = load_job(ROOT / "jobs/tiny-cpu.yaml", ["data.batch_size=6", "train.max_grad_norm=0.5",
                                                    "train.adam_beta2=0.98"])
    config = json.loads((ROOT / "deepspeed_configs/zero3-offload.json").read_text())
    accelerator = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=config)))
    filled = configure_deepspeed(accelerator, job)
    assert filled["train_micro_batch_size_per_gpu"] == 6 and filled["gradient_clipping"] == 0.5
    assert filled["optimizer"]["params"]["betas"] == [0.9, 0.98]
    assert filled["optimizer"]["params"]["eps"] == pytest.approx(1e-8)
    assert configure_deepspeed(SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=None)), job) is None


@pytest.mark.distributed
@pytest.mark.parametrize("stage", ["ddp", "zero3"])
def test_export_of_the_last_checkpoint_is_the_trained_model(stage, launch, tmp_path):
    """`lfqa export` merges the (ZeRO-3: sharded) checkpoint into the same weights as the final model, and the
    exported model reproduces the run's validation loss."""
    from safetensors.torch import load_file
    from transformers import AutoModelForSeq2SeqLM

    from lfqa.export import main as export_main

    run_dir, _ = launch(stage)
    checkpoint = run_dir / "checkpoints" / "step-00000030"
    if stage == "zero3":
        assert list((checkpoint / "pytorch_model").glob("*optim_states.pt")), "not a ZeRO checkpoint"
    assert export_main([str(checkpoint), "--out", str(tmp_path / "exported")]) == 0
    exported = load_file(str(tmp_path / "exported" / "model.safetensors"))
    final = load_file(str(run_dir / "model" / "model.safetensors"))
    assert exported.keys() == final.keys()
    assert max((exported[k] - final[k]).abs().max().item() for k in final) <= 1e-6
    assert (tmp_path / "exported" / "job.yaml").exists() and (tmp_path / "exported" / "tokenizer.json").exists()
    model = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "exported")
    assert sum(p.numel() for p in model.parameters()) > 1_000_000

    summary = json.loads((run_dir / "summary.json").read_text())
    result = evaluate_alone(tmp_path / "exported")
    assert result.loss == pytest.approx(summary["eval_end"]["loss"], abs=1e-4)
    assert result.rouge == pytest.approx(summary["eval_end"]["rouge"], abs=1e-6)  # generation under ZeRO-3 too


def test_export_refuses_an_incomplete_checkpoint(tmp_path, capsys):
    from lfqa.export import main as export_main

    checkpoint = tmp_path / "step-00000005"
    checkpoint.mkdir()
    assert export_main([str(checkpoint), "--out", str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err.strip() == f"lfqa: error: {checkpoint}: not a complete checkpoint (no COMPLETE file)"
    (checkpoint / "COMPLETE").write_text("{}")  # marked complete, but nothing was saved in it
    assert export_main([str(checkpoint), "--out", str(tmp_path / "out")]) == 1
    assert "no hf/config.json" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
