"""The training loop in this process: lfqa.train.run on the tiny job, watched through the loop's callbacks."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, cache_overrides
from sync_counter import SyncCounter

from lfqa.config import load_job
from lfqa.train import run

QUIET = ["eval.at_start=false", "eval.max_generate_samples=0", "data.max_eval_samples=4", "eval.batch_size=4",
         "tracking.progress_bar=false", "tracking.wandb.mode=disabled", "checkpoint.every_steps=0",
         "checkpoint.every_minutes=0"]


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    return cache_overrides(tmp_path_factory.mktemp("caches"))


@pytest.fixture
def job(tmp_path, caches):
    from accelerate.state import AcceleratorState, GradientState

    def make(*overrides: str):
        return load_job(ROOT / "jobs" / "tiny-cpu.yaml",
                        [f"output.dir={tmp_path / 'run'}", *QUIET, *caches, *overrides])

    yield make
    # accelerate keeps one process-wide state; the next run may ask for another precision
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


class CountSyncs:
    """Counts host-device waits during micro-batch ``at`` (its step, log check, evaluation and checkpoint
    checks), and the model's forwards in it."""

    def __init__(self, at: int):
        self.at, self.batches, self.forwards, self.sync = at, 0, 0, SyncCounter()

    def on_fit_start(self, trainer):
        def count(*_):
            if self.batches == self.at:
                self.forwards += 1

        trainer.parts.model.register_forward_pre_hook(count)

    def on_batch_start(self, trainer):
        self.batches += 1
        if self.batches == self.at:
            self.sync.__enter__()

    def on_batch_end(self, trainer):
        if self.batches == self.at:
            self.sync.__exit__(None, None, None)


def test_a_step_waits_for_the_device_only_for_the_encoders_global_tokens(job):
    """No wait in the loop between log steps; in the model, at most one of lfqa's (the global slots of the
    SDPA attention, shared by every layer) and transformers' own test for global tokens, per forward."""
    quiet, logged = CountSyncs(at=3), CountSyncs(at=4)
    run(job("train.max_steps=5", "tracking.log_every_steps=4", "checkpoint.every_steps=10"),
        callbacks=[quiet, logged])
    assert quiet.forwards == 1
    allowed = {("lfqa/led_attention.py:global_counts", "__int__"),
               ("transformers/models/led/modeling_led.py:forward", "item")}
    assert set(quiet.sync.counts) <= allowed, quiet.sync.counts
    assert all(n <= quiet.forwards for n in quiet.sync.counts.values())
    # The counter sees waits where there are some: a log step reduces and reads the sums.
    assert logged.sync.total("lfqa/trainer.py") >= 1


class Watch:
    def __init__(self):
        self.trainer, self.batches, self.steps_at_batch = None, 0, []

    def on_fit_start(self, trainer):
        self.trainer = trainer

    def on_batch_end(self, trainer):
        self.batches += 1
        self.steps_at_batch.append(trainer.state.step)


def train_records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "train/loss" in r]


def test_logged_flops_are_the_flops_model_of_the_rows_trained(job):
    from lfqa.flops import ModelShape, train_flops

    watch = Watch()
    j = job("data.max_train_samples=24", "train.epochs=1", "train.max_steps=null", "tracking.log_every_steps=1000")
    run(j, callbacks=[watch])
    (line,) = train_records(Path(j.output.dir))
    data = watch.trainer.parts.loader.dataset
    model = watch.trainer.parts.model
    expected = train_flops(ModelShape.from_config(model.config), data["input_length"], data["label_length"],
                           np.maximum(1, data["num_global"]))
    seconds = len(data) / line["train/samples_per_s"]
    assert line["train/model_flops_per_s"] * seconds == pytest.approx(expected, rel=1e-9)
    peak = watch.trainer.metrics.peak.flops_per_s
    assert line["train/mfu"] == pytest.approx(line["train/model_flops_per_s"] / peak, rel=1e-9)
    assert line["train/hfu"] > line["train/mfu"]  # padding to the window is computed too


def test_bf16_autocast_gradient_checkpointing_and_accumulation_take_effect(job):
    dtypes, layer_calls = [], []

    class Probe(Watch):
        def on_fit_start(self, trainer):
            super().on_fit_start(trainer)
            layer = trainer.parts.model.led.encoder.layers[0]
            def record(module, inputs, out) -> None:
                if module.training:  # not the evaluations at steps 2 and 4
                    dtypes.append(out.dtype)
                    layer_calls.append(self.batches)

            layer.fc1.register_forward_hook(record)

    watch = Probe()
    j = job("train.max_steps=2", "train.precision=bf16", "model.gradient_checkpointing=true",
            "train.gradient_accumulation_steps=2", "eval.every_steps=1", "tracking.log_every_steps=1")
    summary = run(j, callbacks=[watch])
    assert watch.batches == 4 and watch.steps_at_batch == [0, 1, 1, 2]  # a step per 2 micro-batches
    assert summary["ranks"]["rows_seen_per_rank_epoch0"] == [16]
    assert set(dtypes) == {torch.bfloat16}  # autocast reached the encoder's matrix products
    # checkpointing: each micro-batch runs the layer twice (forward, recomputed in backward)
    per_batch = np.bincount(layer_calls, minlength=4)
    assert list(per_batch) == [2] * 4
    assert watch.trainer.parts.model.is_activation_checkpointing
    run_dir = watch.trainer.parts.evaluator.run_dir
    assert (run_dir / "eval-step1.json").exists() and (run_dir / "eval-step2.json").exists()
    train = train_records(run_dir)
    assert [r["step"] for r in train] == [1, 2]
    assert [round(r["train/lr"] / 1e-3 * 200) for r in train] == [1, 2]  # warm-up 200 steps
    assert all(r["train/grad_norm"] > 0 for r in train)


def test_token_budget_batches_hold_what_the_sampler_packed(job):
    watch = Watch()
    j = job("train.max_steps=4", "data.batch_size=8", "data.max_tokens_per_batch=3000", "tracking.log_every_steps=1")
    summary = run(j, callbacks=[watch])
    sampler = watch.trainer.parts.sampler
    sampler.set_epoch(0)
    batches = list(sampler)[:4]
    lengths = watch.trainer.parts.loader.dataset["input_length"]
    for batch in batches:
        assert 1 <= len(batch) <= 8
        widest = max(-(-lengths[i] // 16) * 16 for i in batch)  # padded to the tiny model's window
        assert len(batch) * widest <= 3000 or len(batch) == 1
    assert summary["ranks"]["rows_seen_per_rank_epoch0"] == [sum(len(b) for b in batches)]
    assert sum(len(b) for b in batches) != 16  # not the fixed 4 rows a batch
    assert all(r["train/answer_padding_efficiency"] > 0.5 for r in train_records(watch.trainer.parts.evaluator.run_dir))


def test_the_same_seed_gives_the_same_run(job, tmp_path):
    from safetensors.torch import load_file

    def train(name):
        j = job(f"output.dir={tmp_path / name}", "train.max_steps=6", "tracking.log_every_steps=2")
        run(j)
        return ([r["train/loss"] for r in train_records(tmp_path / name)],
                load_file(tmp_path / name / "model" / "model.safetensors"))

    losses_a, weights_a = train("a")
    losses_b, weights_b = train("b")
    assert len(losses_a) == 3 and losses_a == losses_b
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


def test_loss_only_evaluations_log_the_validation_loss_between_full_ones(job):
    j = job("train.max_steps=4", "eval.loss_every_steps=2", "eval.every_steps=0", "tracking.log_every_steps=1")
    run(j)
    run_dir = Path(j.output.dir)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval/loss" in r] == [2, 4]
    assert [r["step"] for r in records if "eval/rougeL" in r] == [4]  # answers only at the end here
    assert sorted(p.name for p in run_dir.glob("eval-step*.json")) == ["eval-step4.json"]
