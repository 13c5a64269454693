"""Fine-tune an LED model for long-form question answering with Accelerate.

One process (CPU or one GPU)::

    python -m lfqa.train jobs/tiny-cpu.yaml
    python -m lfqa.train jobs/tiny-cpu.yaml train.max_steps=20 eval.every_steps=10

Several processes (what ``make train`` runs: 2 CPU processes over gloo)::

    accelerate launch --config_file accelerate_configs/cpu.yaml -m lfqa.train jobs/tiny-cpu.yaml
    accelerate launch --config_file accelerate_configs/multi-gpu.yaml -m lfqa.train jobs/led-base-lfqa.yaml
    accelerate launch --config_file accelerate_configs/zero2.yaml -m lfqa.train jobs/led-base-lfqa.yaml
    accelerate launch --config_file accelerate_configs/zero3-cpu.yaml -m lfqa.train jobs/tiny-cpu.yaml  # test

The run folder (``output.dir``) receives ``metrics.jsonl``, ``summary.json`` and ``model/`` (weights as
safetensors, tokenizer, ``job.yaml``); only the main process writes.

This module builds the run (``build_*``: the same functions the tests and benchmarks call) and ends it;
the loop itself is :class:`lfqa.trainer.Trainer`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lfqa.config import ConfigError, JobConfig, dump_job, job_to_dict, load_job
from lfqa.evaluator import EvalData

EXIT_CONFIG_ERROR = 2


@dataclass
class PreparedData:
    train: object
    eval: EvalData
    reports: dict


@dataclass
class Run:
    """What :func:`run` holds besides the trainer: where things go and how to report."""

    job: JobConfig
    accelerator: object
    run_dir: Path
    remote: object
    log: object


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lfqa train",
        description="Fine-tune an LED model for long-form question answering (see jobs/ for job files).",
        epilog="Examples:\n"
               "  python -m lfqa.train jobs/tiny-cpu.yaml train.max_steps=20\n"
               "  accelerate launch --config_file accelerate_configs/cpu.yaml -m lfqa.train jobs/tiny-cpu.yaml",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("job", help="job YAML file, e.g. jobs/tiny-cpu.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides of the job file, e.g. train.learning_rate=3e-5 data.batch_size=4")
    return parser


def make_accelerator(job: JobConfig):
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs

    handlers = []
    cuda = torch.cuda.is_available()
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if not cuda and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # On CPU-only machines accelerate needs an explicit gloo backend and, for plain DDP, `cpu=True` (its
        # launcher sets ACCELERATE_USE_CPU only for --cpu, which starts a single process); without them every
        # rank silently trains alone: no gradient sync, no data split, all ranks write the same files.
        # Under DeepSpeed, cpu=True would replace DeepSpeed by DDP, so there only gloo is set.
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    precision = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[job.train.precision]
    return Accelerator(
        cpu=not cuda and not deepspeed,
        mixed_precision=precision,
        gradient_accumulation_steps=job.train.gradient_accumulation_steps,
        # We step the scheduler once per optimizer step ourselves and size it in optimizer steps.
        step_scheduler_with_optimizer=False,
        # Batches come from pinned memory on CUDA: their copy to the GPU then does not make the host wait.
        dataloader_config=DataLoaderConfiguration(non_blocking=cuda),
        kwargs_handlers=handlers,
    )


def configure_deepspeed(accelerator, job: JobConfig) -> dict | None:
    """Fill the DeepSpeed config's "auto" values that accelerate cannot infer, from the job (one place).

    accelerate fills precision, accumulation and the optimizer's learning rate itself; the micro batch it
    reads from a DataLoader's batch_size, which ours (a batch sampler) does not have. Returns the config,
    or None without DeepSpeed.
    """
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return None
    config = plugin.deepspeed_config
    if config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        config["train_micro_batch_size_per_gpu"] = job.data.batch_size
    if config.get("gradient_clipping", "auto") == "auto":
        config["gradient_clipping"] = job.train.max_grad_norm or 0.0
    # accelerate fills the optimizer's lr and weight_decay from DummyOptim, not betas and eps.
    params = config.get("optimizer", {}).get("params", {})
    for key, value in (("betas", [job.train.adam_beta1, job.train.adam_beta2]), ("eps", job.train.adam_epsilon)):
        if params.get(key) == "auto":
            params[key] = value
    return config


def length_limits(job: JobConfig, model_config, log=print) -> tuple[int, int]:
    """(input, answer) token limits: the job's, cut to the model's position tables (T5 and LongT5 have none).

    Also says once what of the job does not apply to this model family."""
    from lfqa.modeling import fit_limits, position_limits

    max_input, max_answer = fit_limits(model_config, job.data.max_input_tokens, job.data.max_answer_tokens)
    encoder, decoder = position_limits(model_config)
    if max_input < job.data.max_input_tokens:
        log(f"data.max_input_tokens {job.data.max_input_tokens} is more than the model's "
            f"{encoder} positions: using {max_input}")
    if max_answer < job.data.max_answer_tokens:
        log(f"data.max_answer_tokens {job.data.max_answer_tokens} is more than the model's "
            f"{decoder} decoder positions: using {max_answer}")
    if model_config.model_type != "led":
        log(f"note: model.encoder_attention ({job.model.encoder_attention}) and data.global_attention are LED's: "
            f"this {model_config.model_type} model keeps transformers' attention, without global tokens")
    return max_input, max_answer


def build_data(job: JobConfig, tokenizer, model_config, log=print, main_first=contextlib.nullcontext) -> PreparedData:
    """Read, filter and tokenise both splits (cached); ``main_first`` lets one process per machine fill the
    cache before the others read it."""
    from lfqa.bundled_data import ensure_training_file
    from lfqa.data import read_split, stage_data_files, tokenize_examples

    max_input, max_answer = length_limits(job, model_config, log)
    with main_first():
        if written := ensure_training_file(job.data.train_files):
            log(f"wrote the bundled training rows to {written}")
    out, reports, val_examples = {}, {}, None
    for split, limit in (("train", job.data.max_train_samples), ("validation", job.data.max_eval_samples)):
        with main_first():
            staged = stage_data_files(job.data, job.output.s3_endpoint_url, job.output.s3_region)
            examples, report, fingerprint = read_split(staged, split)
            out[split] = tokenize_examples(examples, tokenizer, job.data, report, fingerprint,
                                           max_input_tokens=max_input, max_answer_tokens=max_answer,
                                           limit=limit, log=log)
        for line in report.lines(max_answer, max_input):
            log(line)
        reports[split] = report.to_dict()
        if split == "validation":
            val_examples = examples
    # Questions, references and facts of the rows that survived filtering, for printing and scoring.
    kept = [val_examples[i] for i in out["validation"]["row_id"]]
    eval_data = EvalData(out["validation"], [e.question for e in kept], [e.answer for e in kept],
                         [e.facts for e in kept])
    return PreparedData(out["train"], eval_data, reports)


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of returning it to the kernel; False without glibc.

    By default glibc serves blocks above its mmap threshold (at most 32 MiB: the logits over a 50k
    vocabulary, attention buffers) with a fresh mmap and unmaps them on free, so every training step faults
    in and zero-fills the same memory again: 7-13% of CPU time in ``make bench``'s profile. No library
    exposes ``mallopt``, so it is called through ctypes: M_MMAP_MAX = 0 (large blocks come from the heap)
    and M_TRIM_THRESHOLD = 2**31 - 1 (the heap is not trimmed after a step).
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def set_up_cpu_memory(job: JobConfig, accelerator, log) -> None:
    from accelerate.utils import DistributedType

    if accelerator.device.type != "cpu" or not job.train.cpu_keep_freed_memory:
        return
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # DeepSpeed allocates multi-GB buffers (reduce buckets) that it barely touches; on the heap, with
        # nothing handed back, each new one lands above the last: tens of GB of address space in minutes.
        log("memory: train.cpu_keep_freed_memory is not used under DeepSpeed")
    elif keep_freed_memory():
        log("memory: freed memory stays in the process (glibc mallopt; train.cpu_keep_freed_memory)")
    else:
        log("memory: not glibc, train.cpu_keep_freed_memory has no effect")


def plan_steps(sampler, num_processes: int, accum: int, epochs: int, max_steps: int) -> tuple[int, int]:
    """(optimizer steps, epochs) of the run: ``max_steps`` if set, else ``epochs`` whole epochs.

    With a token budget the number of batches changes from epoch to epoch (each epoch's shuffle packs
    differently), so the steps are summed epoch by epoch instead of multiplying epoch 0's count."""
    varies = bool(getattr(sampler, "max_tokens", None))
    counts: dict[int, int] = {}

    def steps_in(epoch: int) -> int:
        key = epoch if varies else 0
        if key not in counts:
            sampler.set_epoch(key)
            # accelerate also steps at the end of the data loader, after a last partial accumulation.
            counts[key] = math.ceil(math.ceil(len(sampler) / num_processes) / accum)
            if counts[key] == 0:
                raise ValueError(f"epoch {key} of the training data holds no batch")
        return counts[key]

    if max_steps and not varies:
        done, total = math.ceil(max_steps / steps_in(0)), max_steps
    else:
        total = done = 0
        while (total < max_steps) if max_steps else (done < epochs):
            total += steps_in(done)
            done += 1
        total = max_steps or total
    sampler.set_epoch(0)
    return total, done


def build_collator(job: JobConfig, tokenizer, model):
    """The model batch (padded as the family wants, LED's global attention on the question) plus the host-side
    counts the loop logs (:class:`lfqa.trainer.BatchStats`)."""
    from lfqa.flops import FlopsCounter
    from lfqa.modeling import model_collator
    from lfqa.trainer import StatsCollator

    collator = model_collator(model, tokenizer)
    flops = FlopsCounter.for_model(model, job.model.gradient_checkpointing, collator.pad_to_multiple_of)
    return StatsCollator(collator, flops)


NO_WINDOW_BUCKET = 64
"""Input tokens per length bucket of the sampler for models without LED's window (padded to 8 or 1)."""


def sampler_window(model) -> int:
    """The sampler's length bucket: LED's attention window, else :data:`NO_WINDOW_BUCKET` tokens.

    Token-budget batches never mix two buckets; with BART's or T5's exact lengths nearly every batch would hold
    one row. Counting their inputs padded to 64 tokens also keeps the budget on the safe side of what the
    collator really makes."""
    from lfqa.modeling import attention_window

    window = attention_window(model)
    return window if window > 1 else NO_WINDOW_BUCKET


def build_sampler(job: JobConfig, dataset, window: int):
    from lfqa.data import LengthGroupedBatchSampler

    return LengthGroupedBatchSampler(
        dataset["input_length"], dataset["label_length"], job.data.batch_size,
        window=window, group_size=job.data.length_group_size, group_by_length=job.data.group_by_length,
        seed=job.train.seed, max_tokens=job.data.max_tokens_per_batch,
    )


def build_loader(dataset, sampler, collate, seed: int):
    from torch.utils.data import DataLoader

    # Its own generator: starting an iterator draws a seed from it, which would otherwise come from the global
    # RNG and shift dropout after a resume (the checkpoint restores the global RNG before the epoch restarts).
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, pin_memory=torch.cuda.is_available(),
                      generator=torch.Generator().manual_seed(seed))


def build_optimizer(job: JobConfig, model, device_type: str, ds_config: dict | None):
    """AdamW without weight decay on biases and norms; DeepSpeed's own when its config names an optimizer."""
    no_decay = ("bias", "layer_norm", "layernorm", "LayerNorm")
    named = list(model.named_parameters())
    groups = [
        {"params": [p for n, p in named if not any(k in n for k in no_decay)], "weight_decay": job.train.weight_decay},
        {"params": [p for n, p in named if any(k in n for k in no_decay)], "weight_decay": 0.0},
    ]
    betas = (job.train.adam_beta1, job.train.adam_beta2)
    if ds_config is not None and "optimizer" in ds_config:
        # DeepSpeed builds its own optimizer (CPU Adam when offloading); "auto" values come from here.
        from accelerate.utils import DummyOptim

        return DummyOptim(groups, lr=job.train.learning_rate, weight_decay=job.train.weight_decay,
                          betas=betas, eps=job.train.adam_epsilon)
    # Under DeepSpeed (a JSON without an optimizer section) the torch optimizer is the for-loop AdamW: ZeRO-2
    # with a fused one resumed 5e-6 away from the uninterrupted run, the for-loop one resumes exactly.
    fused = job.train.fused_optimizer and device_type in ("cpu", "cuda") and ds_config is None
    return torch.optim.AdamW(groups, lr=job.train.learning_rate, betas=betas, eps=job.train.adam_epsilon,
                             fused=fused or None)


def build_scheduler(job: JobConfig, optimizer, total_steps: int, num_processes: int, ds_config: dict | None):
    """Linear warm-up and decay over the run's optimizer steps."""
    if ds_config is not None and "scheduler" in ds_config:
        from accelerate.utils import DummyScheduler

        # DeepSpeed's WarmupDecayLR: the same linear warm-up and decay. accelerate divides total_num_steps by
        # the process count (it assumes steps counted over all processes); ours are optimizer steps.
        return DummyScheduler(optimizer, total_num_steps=total_steps * num_processes,
                              warmup_num_steps=job.train.warmup_steps)
    from transformers import get_linear_schedule_with_warmup

    return get_linear_schedule_with_warmup(optimizer, job.train.warmup_steps, total_steps)


def load_training_model(job: JobConfig, accelerator, log):
    """(model, tokenizer), from the hub, a folder, S3 or the tiny builder; decoding settings from the job."""
    from lfqa.modeling import (
        apply_generation_config,
        enable_gradient_checkpointing,
        load_model,
        load_tokenizer,
        resolve_model_path,
    )

    with accelerator.local_main_process_first():
        model_path = resolve_model_path(job.model, job.output.s3_endpoint_url, job.output.s3_region)
    tokenizer = load_tokenizer(model_path, job.model.revision)
    model = load_model(model_path, job.model.revision, job.model.encoder_attention)
    apply_generation_config(model, job.eval.generation)  # the saved model then decodes as evaluation does
    # ds_numel: under ZeRO-3 from_pretrained already partitions the weights across ranks.
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    log(f"model {job.model.name_or_path} ({n_params / 1e6:.2f}M parameters) "
        f"from {model_path}" + (f", encoder attention {job.model.encoder_attention}"
                                if model.config.model_type == "led" else ""))
    if job.model.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model, tokenizer


def build_trackers(job: JobConfig, run_dir: Path, is_main: bool, resume_id: str | None):
    """metrics.jsonl always; W&B online with an API key, offline without (see tracking.wandb); main process only."""
    from lfqa.tracking import ConsoleTracker, JsonlTracker, NullTracker, Trackers, make_wandb_tracker

    if not is_main:
        return NullTracker()
    return Trackers(ConsoleTracker(prefixes=("train/",)), JsonlTracker(run_dir / "metrics.jsonl"),
                    make_wandb_tracker(job.tracking.wandb, run_dir, job_to_dict(job), resume_id))


def restore_metrics_file(run_dir: Path, resumed_from: Path | None) -> Path:
    """The curve up to the checkpoint; anything logged after it by the stopped run is logged again now."""
    metrics_file = run_dir / "metrics.jsonl"
    if resumed_from is not None and (resumed_from / "metrics.jsonl").exists():
        shutil.copyfile(resumed_from / "metrics.jsonl", metrics_file)
    else:
        metrics_file.unlink(missing_ok=True)
    return metrics_file


def build_parts(ctx: Run):
    """(parts, plan, data): model, data, optimizer and schedule, prepared by accelerate; then the components."""
    from lfqa.checkpoint import CheckpointManager
    from lfqa.evaluator import Evaluator
    from lfqa.trainer import StepPlan, TrainParts

    job, acc, log = ctx.job, ctx.accelerator, ctx.log
    model, tokenizer = load_training_model(job, acc, log)
    data = build_data(job, tokenizer, model.config, log, acc.local_main_process_first)
    collate = build_collator(job, tokenizer, model)
    sampler = build_sampler(job, data.train, sampler_window(model))
    loader = build_loader(data.train, sampler, collate, job.train.seed)
    accum = job.train.gradient_accumulation_steps
    plan = StepPlan(*plan_steps(sampler, acc.num_processes, accum, job.train.epochs, job.train.max_steps))
    if job.train.warmup_steps > plan.total_steps:
        log(f"warning: train.warmup_steps {job.train.warmup_steps} is more than the run's {plan.total_steps} "
            f"steps: the learning rate never reaches train.learning_rate")
    ds_config = configure_deepspeed(acc, job)
    optimizer = build_optimizer(job, model, acc.device.type, ds_config)
    scheduler = build_scheduler(job, optimizer, plan.total_steps, acc.num_processes, ds_config)
    model, optimizer, loader, scheduler = acc.prepare(model, optimizer, loader, scheduler)
    per_batch = (f"up to {job.data.batch_size} rows and {job.data.max_tokens_per_batch} tokens"
                 if job.data.max_tokens_per_batch else f"{job.data.batch_size}")
    log(f"train: {len(data.train)} rows, {len(loader)} batches of {per_batch} per process, "
        f"{plan.total_steps} optimizer steps ({plan.epochs} epoch(s), gradient accumulation {accum})")
    checkpoints = CheckpointManager(acc, job, ctx.run_dir, remote=ctx.remote, log=log)
    evaluator = Evaluator(job.eval, acc, data.eval, collate.collator, ctx.run_dir, log)
    parts = TrainParts(model, optimizer, scheduler, loader, sampler, tokenizer, evaluator, checkpoints,
                       tracker=None, metrics_file=ctx.run_dir / "metrics.jsonl")
    return parts, plan, data


def build_trainer(ctx: Run, callbacks=()):
    """The trainer of this run, resumed from the newest complete checkpoint when there is one."""
    from lfqa.flops import peak_flops
    from lfqa.trainer import Trainer, TrainState

    job, acc = ctx.job, ctx.accelerator
    parts, plan, data = build_parts(ctx)
    resumed_from, saved = parts.checkpoints.resume()
    state = (TrainState.from_state_dict(saved) if saved is not None
             else TrainState(seed=job.train.seed, num_processes=acc.num_processes))
    if acc.is_main_process:
        restore_metrics_file(ctx.run_dir, resumed_from)
        if resumed_from is not None:  # a new pod: the offline W&B history of the earlier parts comes back
            from lfqa.tracking import WandbTracker

            WandbTracker.restore_files(resumed_from, ctx.run_dir)
    parts.checkpoints.upload_newest_local()  # one the bucket missed while it was down
    parts.tracker = build_trackers(job, ctx.run_dir, acc.is_main_process, state.tracking_run_id)
    peak = peak_flops(acc.device, job.train.precision)
    ctx.log(f"utilisation (train/mfu) against {peak.flops_per_s / 1e12:.3g} TFLOP/s per device: {peak.source}")
    trainer = Trainer(job, acc, parts, state, plan, ctx.log, callbacks, peak)
    trainer.summary.update({"job": job_to_dict(job), "data": data.reports, "num_processes": acc.num_processes,
                            "distributed_type": str(acc.distributed_type)})
    if resumed_from is not None:
        trainer.summary["resumed_from"] = {"checkpoint": str(resumed_from), "step": state.step}
    return trainer


def start_run(job: JobConfig) -> Run:
    """Checks that need no model (output folder, W&B mode, bucket), the accelerator, and the run's log."""
    from tqdm.auto import tqdm

    from lfqa.tracking import progress_bar_enabled, resolve_wandb_mode

    run_dir = Path(job.output.dir)
    if (run_dir / "model").exists() and not job.output.overwrite:  # every rank stops, before any collective
        raise ConfigError(f"output.dir: {run_dir}/model exists and output.overwrite is false")
    try:
        resolve_wandb_mode(job.tracking.wandb.mode)
    except ValueError as err:
        raise ConfigError(f"tracking.wandb.mode: {err}") from None
    accelerator = make_accelerator(job)

    def log(message: str) -> None:
        if accelerator.is_main_process:
            tqdm.write(message)

    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
    log(f"lfqa: {accelerator.num_processes} process(es) ({accelerator.distributed_type}), device {accelerator.device}, "
        f"precision {job.train.precision}, run folder {run_dir}"
        + (f", remote copy {job.output.uri}" if job.output.uri else ""))
    set_up_cpu_memory(job, accelerator, log)
    if not progress_bar_enabled(job.tracking.progress_bar):
        quiet_library_progress_bars()
    remote = open_remote(job, accelerator)
    if remote is not None:
        log(f"storage: {remote.url()} is reachable and writable")
    return Run(job, accelerator, run_dir, remote, log)


def quiet_library_progress_bars() -> None:
    """Off, with lfqa's own bar, where nobody watches a terminal: datasets' tokenising and transformers'
    saving bars would write their carriage-return frames into the log."""
    import datasets
    from transformers.utils import logging as transformers_logging

    datasets.disable_progress_bars()
    transformers_logging.disable_progress_bar()


def run(job: JobConfig, callbacks=()) -> dict:
    """Train, evaluate and save; returns the summary that also goes to ``summary.json``.

    ``callbacks``: objects with ``on_fit_start`` / ``on_batch_start`` / ``on_batch_end`` (see
    :class:`lfqa.trainer.Callbacks`), for tools that watch the loop."""
    from accelerate.utils import set_seed

    ctx = start_run(job)
    set_seed(job.train.seed)
    trainer = build_trainer(ctx, callbacks)
    try:
        trainer.fit()
        if trainer.preempted:
            return stop_preempted(ctx, trainer)
        return finish_run(ctx, trainer)
    finally:
        trainer.parts.tracker.close()  # also when training fails: ends W&B's background service


def save_final_model(ctx: Run, model, tokenizer, summary: dict) -> None:
    """The consolidated model (every rank takes part: a collective under sharded training) and summary.json."""
    acc = ctx.accelerator
    state_dict = acc.get_state_dict(model)
    model_dir = ctx.run_dir / "model"
    if acc.is_main_process:
        if model_dir.exists():
            shutil.rmtree(model_dir)
        acc.unwrap_model(model).save_pretrained(model_dir, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(model_dir)
        (model_dir / "job.yaml").write_text(dump_job(ctx.job))
        summary["model_dir"] = str(model_dir)
        (ctx.run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        ctx.log(f"model saved to {model_dir}")


def finish_run(ctx: Run, trainer) -> dict:
    """After the last step: the final model, the curves, the uploads. A run whose newest checkpoint or final
    model never reached the bucket fails (one line saying what is where), after every rank is done."""
    from lfqa.storage import StorageError

    acc, checkpoints, summary = ctx.accelerator, trainer.parts.checkpoints, trainer.summary
    summary["checkpoint_upload_waits_s"] = [round(w, 3) for w in checkpoints.upload_waits]
    save_final_model(ctx, trainer.parts.model, trainer.parts.tokenizer, summary)
    trainer.parts.tracker.close()
    failure = None
    if acc.is_main_process:
        from lfqa.plot import plot_run

        ctx.log(f"training curves drawn to {plot_run(ctx.run_dir)}")
    uploaded = checkpoints.close()
    if ctx.remote is not None and acc.is_main_process:
        status = summary["checkpoint_uploads"] = checkpoints.upload_status()
        (ctx.run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        failures = []
        if not uploaded:
            in_bucket = status["newest_in_bucket_step"]
            failures.append(f"checkpoint step {status['newest_local_step']} is only in {ctx.run_dir / 'checkpoints'}; "
                            f"the newest in {status['bucket']} is "
                            + ("none" if in_bucket is None else f"step {in_bucket}"))
        try:
            publish_run(ctx.remote, ctx.run_dir, ctx.log)
        except StorageError as err:
            failures.append(f"the final model is only in {ctx.run_dir / 'model'} ({err})")
        failure = "output.uri: " + "; ".join(failures) if failures else None
    acc.wait_for_everyone()
    acc.end_training()
    if failure:
        raise StorageError(failure)
    return summary


def open_remote(job: JobConfig, accelerator):
    """The run's S3 store, checked (bucket, credentials, endpoint, write access) before anything is trained."""
    if not job.output.uri:
        return None
    from accelerate.utils import broadcast_object_list

    from lfqa.storage import StorageError, open_store

    store = open_store(job.output.uri, job.output.s3_endpoint_url, job.output.s3_region, job.checkpoint.upload_workers,
                       max_attempts=job.checkpoint.s3_max_attempts, timeout=job.checkpoint.s3_timeout_seconds)
    error = [None]
    if accelerator.is_main_process:
        try:
            store.check()
        except StorageError as err:
            error = [str(err)]
    if accelerator.num_processes > 1:
        broadcast_object_list(error, from_process=0)
    if error[0]:
        raise StorageError(f"output.uri: {error[0]}")
    return store


def publish_run(remote, run_dir: Path, log) -> None:
    """Upload the final model and the run's reports; summary.json goes last (its presence means done)."""
    started = time.perf_counter()
    remote.upload_dir(run_dir / "model", "model")
    for path in sorted(run_dir.glob("eval-step*.json")) + [run_dir / "metrics.jsonl", run_dir / "curves.png"]:
        if path.exists():
            remote.upload_file(path, path.name)
    if (run_dir / "summary.json").exists():
        remote.upload_file(run_dir / "summary.json", "summary.json")
    log(f"model and reports uploaded to {remote.url()} in {time.perf_counter() - started:.1f}s")


def stop_preempted(ctx: Run, trainer) -> dict:
    """After the SIGTERM checkpoint: wait for its upload within the grace period, leave a note, and stop."""
    acc, checkpoints, step = ctx.accelerator, trainer.parts.checkpoints, trainer.state.step
    grace = ctx.job.checkpoint.preemption_grace_seconds
    uploaded = checkpoints.close(timeout=grace)
    summary = trainer.summary
    summary["preempted"] = {"step": step, "uploaded": uploaded, "time": time.time()}
    if acc.is_local_main_process:
        # On every machine: each pod's start script turns torch's exit 1 into 75 when it finds this file.
        ctx.run_dir.mkdir(parents=True, exist_ok=True)
        (ctx.run_dir / "preempted.json").write_text(json.dumps(summary["preempted"]))
    if acc.is_main_process:
        if uploaded:
            ctx.log(f"preempted at step {step}: checkpoint saved" + (" and uploaded" if checkpoints.remote else ""))
        else:
            ctx.log(f"preempted at step {step}: checkpoint saved locally; its upload did not finish in {grace:.0f}s, "
                    f"so a restart resumes from the previous complete one in the bucket")
    trainer.parts.tracker.close()
    acc.wait_for_everyone()
    acc.end_training()
    return summary


def main(argv: list[str] | None = None) -> int:
    """``python -m lfqa.train JOB [key=value ...]``: every failure is one line (``--debug``: the traceback)."""
    from lfqa.errors import LfqaError, run_command

    def train(args_list: list[str]) -> int:
        from lfqa.checkpoint import EXIT_PREEMPTED
        from lfqa.cli import check_job_text
        from lfqa.metrics import check_metrics

        args = build_parser().parse_args(args_list)
        # Validated before any model, data or process group exists (a ConfigError exits 2).
        check_job_text(args.job)
        job = load_job(args.job, args.overrides)
        check_metrics(job.eval.metrics)

        try:
            summary = run(job)
        except ConfigError as err:  # a setting that conflicts with what the run finds on disk: exit 1
            raise LfqaError(str(err)) from None
        return EXIT_PREEMPTED if summary.get("preempted") else 0

    return run_command(train, argv)


if __name__ == "__main__":
    sys.exit(main())
