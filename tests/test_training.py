"""End to end: the tiny job on 2 CPU processes through `accelerate launch`, as `make train` runs it."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TRAINED_STEPS, cache_overrides, lfqa_env

from lfqa.config import load_job

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.distributed
def test_two_processes_split_the_data(trained):
    _, run_dir, _ = trained
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["distributed_type"] == "DistributedType.MULTI_CPU"
    # 12,000 rows, 4 per batch: 1,500 batches each; no row trained on by both ranks in an epoch.
    assert summary["ranks"]["rows_seen_per_rank_epoch0"] == [6000, 6000]
    assert summary["ranks"]["rows_seen_by_several_ranks_epoch0"] == 0
    assert summary["train"]["steps"] == TRAINED_STEPS == 1500


@pytest.mark.distributed
def test_validation_loss_falls_and_fact_recall_and_rouge_beat_the_untrained_model(trained):
    _, run_dir, output = trained
    summary = json.loads((run_dir / "summary.json").read_text())
    start, end = summary["eval_start"], summary["eval_end"]
    assert end["loss"] < start["loss"] - 5.0
    assert end["rouge"]["rougeL"] > start["rouge"]["rougeL"] + 0.3
    assert start["facts"]["fact_recall"] < 0.05 and end["facts"]["fact_recall"] > 0.45
    assert end["facts"]["fact_rows"] == 49
    assert end["facts"]["fact_recall_ci_low"] < end["facts"]["fact_recall"] < end["facts"]["fact_recall_ci_high"]
    answers = json.loads((run_dir / f"eval-step{TRAINED_STEPS}.json").read_text())
    assert len({a["generated"] for a in answers["samples"]}) == 49  # every entity's own answer
    assert answers["facts"] == end["facts"]
    # Not memorised: the validation loss (entities never trained on) stays near the training loss.
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_loss = [r["train/loss"] for r in records if "train/loss" in r][-10:]
    assert end["loss"] < 1.5 * sum(train_loss) / len(train_loss)
    assert "untrained model: eval loss" in output and "trained model: eval loss" in output
    assert f"trained model: eval loss {end['loss']:.4f} | fact_recall {end['facts']['fact_recall']:.4f} [" in output
    assert "generated:" in output and f"model saved to {run_dir / 'model'}" in output


@pytest.mark.distributed
def test_only_the_main_process_writes_metrics(trained):
    _, run_dir, _ = trained
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train/loss" in r]
    steps = [r["step"] for r in train]
    assert steps == sorted(set(steps)), "each step logged once"
    assert steps[-1] == TRAINED_STEPS and len(steps) == TRAINED_STEPS // 10
    assert train[-1]["train/loss"] < train[0]["train/loss"] / 3
    for r in train:
        assert r["train/samples_per_s"] > 0 and 0 < r["train/input_padding_efficiency"] <= 1
        assert 0 < r["train/answer_padding_efficiency"] <= 1 and r["train/lr"] >= 0
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "checkpoints", "curves.png", "eval-step0.json", "eval-step1000.json", "eval-step1500.json", "metrics.jsonl",
        "model", "summary.json", "wandb"]
    # Checkpoints every 500 steps and at the end; kept: the newest 2 and the best by eval loss (the final one).
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-00001000", "step-00001500"]


@pytest.mark.distributed
def test_the_saved_model_reloads_answers_and_reproduces_the_validation_loss(trained):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from lfqa.data import Seq2SeqCollator
    from lfqa.modeling import attention_window
    from lfqa.train import build_data

    tmp, run_dir, _ = trained
    model_dir = run_dir / "model"
    assert (model_dir / "model.safetensors").exists() and (model_dir / "tokenizer.json").exists()
    job = load_job(model_dir / "job.yaml")
    assert job.output.dir == str(run_dir)
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)

    val = build_data(job, tok, model.config, log=lambda _: None).eval
    ds = val.dataset
    assert len(ds) == 49
    collate = Seq2SeqCollator(tok.pad_token_id, attention_window(model))

    def validation_loss(input_of) -> float:
        """Token-weighted loss over the validation rows, row i answered from the input of row input_of(i)."""
        loss_sum = tokens = 0.0
        with torch.no_grad():
            for i in range(0, len(ds), 10):
                rows = [{**ds[input_of(j)], "labels": ds[j]["labels"]} for j in range(i, min(i + 10, len(ds)))]
                batch = collate(rows)
                n = (batch["labels"] != -100).sum().item()
                loss_sum += model(**batch).loss.item() * n
                tokens += n
        return loss_sum / tokens

    summary = json.loads((run_dir / "summary.json").read_text())
    right = validation_loss(lambda j: j)
    assert right == pytest.approx(summary["eval_end"]["loss"], abs=1e-4)
    # The model reads its input: each answer is likelier from its own passages than from the next row's.
    # (An encoder collapsed to a constant, as a too-fast warm-up causes, gives equal losses.)
    assert validation_loss(lambda j: (j + 1) % len(ds)) > right + 0.01

    from lfqa.evaluation import generation_kwargs

    batch = collate([ds[0]])
    out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         global_attention_mask=batch["global_attention_mask"], **generation_kwargs(job.eval.generation))
    answer = tok.decode(out[0], skip_special_tokens=True)
    assert len(answer.split()) >= 10
    sample = summary["eval_end"]["sample"]
    assert sample["question"] == val.questions[0]
    assert answer.split()[:3] == sample["generated"].split()[:3]


def run_single(args, tmp, timeout=300):
    return subprocess.run([sys.executable, "-m", "lfqa.train", *args], cwd=ROOT, env=lfqa_env(),
                          capture_output=True, text=True, timeout=timeout)


def test_single_process_run_reuses_the_tokenised_cache(tmp_path):
    args = ["jobs/tiny-cpu.yaml", f"output.dir={tmp_path / 'run'}", "train.max_steps=3", "eval.at_start=false",
            "eval.max_generate_samples=2", "data.max_eval_samples=4", "tracking.progress_bar=false",
            *cache_overrides(tmp_path)]
    first = run_single(args, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "lfqa: 1 process(es)" in first.stdout + first.stderr
    assert "encoder attention sdpa" in first.stdout + first.stderr  # the defaults
    assert "memory: freed memory stays in the process" in first.stdout + first.stderr
    # Started over (a plain rerun would resume from the finished run's last checkpoint and only evaluate).
    second = run_single([*args, "checkpoint.resume=never"], tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    out = second.stdout + second.stderr
    assert "tiny_train.jsonl: loaded tokenised rows from cache" in out
    assert "tiny_validation.jsonl: loaded tokenised rows from cache" in out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["train"]["steps"] == 3 and summary["ranks"]["rows_seen_per_rank_epoch0"] == [12]  # 3 steps of 4 rows
    # A finished model is not replaced unless the job allows it.
    third = run_single([*args, "output.overwrite=false"], tmp_path)
    assert "resum" not in third.stdout + third.stderr  # refused before anything was loaded
    assert third.returncode == 1
    assert third.stderr.strip().splitlines()[-1] == (
        f"lfqa: error: output.dir: {tmp_path / 'run'}/model exists and output.overwrite is false")


def test_config_errors_stop_before_anything_starts(tmp_path):
    proc = run_single(["jobs/tiny-cpu.yaml", "train.learnig_rate=1"], tmp_path, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == ["lfqa: error: jobs/tiny-cpu.yaml (with overrides): unknown key 'train.learnig_rate' "
                     "(did you mean 'train.learning_rate'?)"]


def test_missing_data_file_is_a_one_line_error(tmp_path):
    proc = run_single(["jobs/tiny-cpu.yaml", f"output.dir={tmp_path / 'run'}",
                       f"data.train_files=[{tmp_path / 'missing.jsonl'}]", *cache_overrides(tmp_path)], tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == f"lfqa: error: {tmp_path / 'missing.jsonl'}: no such file"


def test_help_lists_usage():
    proc = subprocess.run([sys.executable, "-m", "lfqa.train", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "key=value" in proc.stdout and "accelerate launch" in proc.stdout


def test_plot_draws_the_curves_of_a_run(trained, tmp_path, capsys):
    from lfqa.plot import PlotError, read_metrics, series
    from lfqa.plot import main as plot_main

    _, run_dir, output = trained
    assert f"training curves drawn to {run_dir / 'curves.png'}" in output
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = read_metrics(run_dir)
    steps, losses = series(records, "train/loss")
    assert steps == list(range(10, TRAINED_STEPS + 1, 10)) and losses[-1] < losses[0]
    # Answers and their scores a few times, the loss alone more often.
    assert series(records, "eval/rougeL")[0] == series(records, "eval/fact_recall")[0] == [0, 1000, 1500]
    assert series(records, "eval/loss")[0] == list(range(0, TRAINED_STEPS + 1, 250))
    assert series(records, "eval/fact_recall_ci_low")[0] == [0, 1000, 1500]
    out = tmp_path / "c.png"
    assert plot_main([str(run_dir), "--out", str(out)]) == 0 and out.stat().st_size > 10_000
    assert plot_main([str(tmp_path)]) == 1
    assert "metrics.jsonl: no such file" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n')
    with pytest.raises(PlotError, match=r"metrics.jsonl:2: line is not valid JSON"):
        read_metrics(tmp_path)


def test_planned_steps_sum_each_epochs_own_batch_count():
    """With a token budget every epoch packs its shuffle differently: the run's length is the sum."""
    from lfqa.data import LengthGroupedBatchSampler
    from lfqa.train import plan_steps

    g = torch.Generator().manual_seed(0)
    inputs = torch.randint(50, 1000, (300,), generator=g).tolist()
    answers = torch.randint(5, 300, (300,), generator=g).tolist()
    # small sort groups (as in tiny-cpu.yaml) make the packing differ between epochs
    sampler = LengthGroupedBatchSampler(inputs, answers, 8, window=16, seed=3, max_tokens=3000, group_size=8)
    counts = []
    for epoch in range(5):
        sampler.set_epoch(epoch)
        counts.append(len(sampler))
    assert len(set(counts)) > 1  # the premise: the count changes between epochs
    assert plan_steps(sampler, 1, 1, epochs=5, max_steps=0) == (sum(counts), 5)
    assert sampler.epoch == 0  # left as the loop expects it
    # two processes and accumulation 2: per epoch ceil(ceil(batches / 2) / 2) optimizer steps
    expected = sum(math.ceil(math.ceil(c / 2) / 2) for c in counts[:3])
    assert plan_steps(sampler, 2, 2, epochs=3, max_steps=0)[0] == expected
    # max_steps wins and takes as many epochs as it needs
    assert plan_steps(sampler, 1, 1, epochs=1, max_steps=counts[0] + 1) == (counts[0] + 1, 2)
    fixed = LengthGroupedBatchSampler(inputs, answers, 4, window=16, seed=3)
    assert plan_steps(fixed, 1, 1, epochs=3, max_steps=0) == (3 * len(fixed), 3)
    assert plan_steps(fixed, 1, 1, epochs=3, max_steps=2 * len(fixed) + 1) == (2 * len(fixed) + 1, 3)
