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
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lfqa.config import ConfigError, JobConfig, dump_job, job_to_dict, load_job

EXIT_CONFIG_ERROR = 2


@dataclass
class PreparedData:
    train: object
    validation: object
    val_questions: list[str]
    val_references: list[str]
    reports: dict


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
    from accelerate.utils import InitProcessGroupKwargs

    handlers = []
    cpu_only = not torch.cuda.is_available()
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if cpu_only and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # On CPU-only machines accelerate needs an explicit gloo backend and, for plain DDP, `cpu=True` (its
        # launcher sets ACCELERATE_USE_CPU only for --cpu, which starts a single process); without them every
        # rank silently trains alone: no gradient sync, no data split, all ranks write the same files.
        # Under DeepSpeed, cpu=True would replace DeepSpeed by DDP, so there only gloo is set.
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    precision = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[job.train.precision]
    return Accelerator(
        cpu=cpu_only and not deepspeed,
        mixed_precision=precision,
        gradient_accumulation_steps=job.train.gradient_accumulation_steps,
        # We step the scheduler once per optimizer step ourselves and size it in optimizer steps.
        step_scheduler_with_optimizer=False,
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


def stage_data_files(job: JobConfig):
    """The data config with ``s3://`` data files replaced by local copies (downloaded once into
    ``data.cache_dir/s3``, refreshed when the object changes), through the job's S3 endpoint and region."""
    import dataclasses

    from lfqa.data import DataError
    from lfqa.storage import StorageError, stage_s3_uri

    def local(paths: list[str]) -> list[str]:
        out = []
        for path in paths:
            if not path.startswith("s3://"):
                out.append(path)
                continue
            try:
                out.append(str(stage_s3_uri(path, Path(job.data.cache_dir) / "s3",
                                             endpoint_url=job.output.s3_endpoint_url, region=job.output.s3_region)))
            except StorageError as err:
                raise DataError(f"{path}: {err}") from None
        return out

    return dataclasses.replace(job.data, train_files=local(job.data.train_files),
                               validation_files=local(job.data.validation_files))


def prepare_data(job: JobConfig, tokenizer, model, accelerator, log) -> PreparedData:
    from lfqa.data import read_split, tokenize_examples

    max_input = min(job.data.max_input_tokens, model.config.max_encoder_position_embeddings)
    max_answer = min(job.data.max_answer_tokens, model.config.max_decoder_position_embeddings)
    if max_input < job.data.max_input_tokens:
        log(f"data.max_input_tokens {job.data.max_input_tokens} is more than the model's "
            f"{model.config.max_encoder_position_embeddings} positions: using {max_input}")
    if max_answer < job.data.max_answer_tokens:
        log(f"data.max_answer_tokens {job.data.max_answer_tokens} is more than the model's "
            f"{model.config.max_decoder_position_embeddings} decoder positions: using {max_answer}")
    out, reports = {}, {}
    val_examples = None
    for split, limit in (("train", job.data.max_train_samples), ("validation", job.data.max_eval_samples)):
        # The local main process reads and tokenises into the cache first; the others then load it.
        with accelerator.local_main_process_first():
            examples, report, fingerprint = read_split(stage_data_files(job), split)
            out[split] = tokenize_examples(examples, tokenizer, job.data, report, fingerprint,
                                           max_input_tokens=max_input, max_answer_tokens=max_answer,
                                           limit=limit, log=log)
        for line in report.lines(max_answer, max_input):
            log(line)
        reports[split] = report.to_dict()
        if split == "validation":
            val_examples = examples
    # Questions and references of the rows that survived filtering, for printing and ROUGE.
    kept = out["validation"]["row_id"]
    questions = [val_examples[i].question for i in kept]
    references = [val_examples[i].answer for i in kept]
    return PreparedData(out["train"], out["validation"], questions, references, reports)


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


def run(job: JobConfig) -> dict:
    """Train, evaluate and save; returns the summary that also goes to ``summary.json``."""
    from accelerate.utils import DistributedType, set_seed
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    from lfqa.checkpoint import CheckpointManager
    from lfqa.data import LengthGroupedBatchSampler, Seq2SeqCollator
    from lfqa.modeling import (
        apply_generation_config,
        attention_window,
        enable_gradient_checkpointing,
        load_model,
        load_tokenizer,
        resolve_model_path,
    )
    from lfqa.tracking import (
        ConsoleTracker,
        JsonlTracker,
        NullTracker,
        Trackers,
        make_wandb_tracker,
        resolve_wandb_mode,
    )

    run_dir = Path(job.output.dir)
    if (run_dir / "model").exists() and not job.output.overwrite:  # every rank stops, before any collective
        raise ConfigError(f"output.dir: {run_dir}/model exists and output.overwrite is false")
    try:
        resolve_wandb_mode(job.tracking.wandb.mode)
    except ValueError as err:
        raise ConfigError(f"tracking.wandb.mode: {err}") from None
    accelerator = make_accelerator(job)
    is_main = accelerator.is_main_process

    def log(message: str) -> None:
        if is_main:
            tqdm.write(message)

    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    log(f"lfqa: {accelerator.num_processes} process(es) ({accelerator.distributed_type}), device {accelerator.device}, "
        f"precision {job.train.precision}, run folder {run_dir}"
        + (f", remote copy {job.output.uri}" if job.output.uri else ""))
    if accelerator.device.type == "cpu" and job.train.cpu_keep_freed_memory:
        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            # DeepSpeed allocates multi-GB buffers (reduce buckets) that it barely touches; on the heap, with
            # nothing handed back, each new one lands above the last: tens of GB of address space in minutes.
            log("memory: train.cpu_keep_freed_memory is not used under DeepSpeed")
        elif keep_freed_memory():
            log("memory: freed memory stays in the process (glibc mallopt; train.cpu_keep_freed_memory)")
        else:
            log("memory: not glibc, train.cpu_keep_freed_memory has no effect")
    remote = open_remote(job, accelerator)
    if remote is not None:
        log(f"storage: {remote.url()} is reachable and writable")

    set_seed(job.train.seed)
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

    data = prepare_data(job, tokenizer, model, accelerator, log)
    window = attention_window(model)
    collator = Seq2SeqCollator(pad_token_id=tokenizer.pad_token_id, pad_to_multiple_of=window)
    sampler = LengthGroupedBatchSampler(
        data.train["input_length"], data.train["label_length"], job.data.batch_size,
        window=window, group_size=job.data.length_group_size, group_by_length=job.data.group_by_length,
        seed=job.train.seed, max_tokens=job.data.max_tokens_per_batch,
    )
    # Its own generator: starting an iterator draws a seed from it, which would otherwise come from the global
    # RNG and shift dropout after a resume (the checkpoint restores the global RNG before the epoch restarts).
    loader = DataLoader(data.train, batch_sampler=sampler, collate_fn=_collate_with_row_ids(collator),
                        generator=torch.Generator().manual_seed(job.train.seed))

    no_decay = ("bias", "layer_norm", "layernorm", "LayerNorm")
    groups = [
        {"params": [p for n, p in model.named_parameters() if not any(k in n for k in no_decay)],
         "weight_decay": job.train.weight_decay},
        {"params": [p for n, p in model.named_parameters() if any(k in n for k in no_decay)], "weight_decay": 0.0},
    ]
    accum = job.train.gradient_accumulation_steps
    total_steps, epochs = plan_steps(sampler, accelerator.num_processes, accum, job.train.epochs,
                                     job.train.max_steps)

    ds_config = configure_deepspeed(accelerator, job) or {}
    betas = (job.train.adam_beta1, job.train.adam_beta2)
    if "optimizer" in ds_config:
        # DeepSpeed builds its own optimizer (CPU Adam when offloading); "auto" values come from here.
        from accelerate.utils import DummyOptim

        optimizer = DummyOptim(groups, lr=job.train.learning_rate, weight_decay=job.train.weight_decay,
                               betas=betas, eps=job.train.adam_epsilon)
    else:
        # Not under DeepSpeed: ZeRO-2 with a fused torch AdamW resumed 5e-6 away from the uninterrupted run
        # (tests/test_checkpoints.py asserts 1e-6); the for-loop AdamW resumes exactly.
        fused = (job.train.fused_optimizer and accelerator.device.type in ("cpu", "cuda")
                 and accelerator.distributed_type != DistributedType.DEEPSPEED)
        optimizer = torch.optim.AdamW(groups, lr=job.train.learning_rate, betas=betas, eps=job.train.adam_epsilon,
                                      fused=fused or None)
    if "scheduler" in ds_config:
        from accelerate.utils import DummyScheduler

        # DeepSpeed's WarmupDecayLR: the same linear warm-up and decay. accelerate divides total_num_steps by
        # the process count (it assumes steps counted over all processes); ours are optimizer steps.
        scheduler = DummyScheduler(optimizer, total_num_steps=total_steps * accelerator.num_processes,
                                   warmup_num_steps=job.train.warmup_steps)
    else:
        scheduler = get_linear_schedule_with_warmup(optimizer, job.train.warmup_steps, total_steps)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    per_batch = (f"up to {job.data.batch_size} rows and {job.data.max_tokens_per_batch} tokens"
                 if job.data.max_tokens_per_batch else f"{job.data.batch_size}")
    log(f"train: {len(data.train)} rows, {len(loader)} batches of {per_batch} per process, "
        f"{total_steps} optimizer steps ({epochs} epoch(s), gradient accumulation {accum})")

    checkpoints = CheckpointManager(accelerator, job, run_dir, remote=remote, log=log)
    resumed_from, state = checkpoints.resume()
    metrics_file = run_dir / "metrics.jsonl"
    if is_main:
        if resumed_from is not None and (resumed_from / "metrics.jsonl").exists():
            # The curve up to the checkpoint; anything logged after it by the stopped run is replayed now.
            shutil.copyfile(resumed_from / "metrics.jsonl", metrics_file)
        else:
            metrics_file.unlink(missing_ok=True)
    tracker = NullTracker()
    if is_main:
        # metrics.jsonl always; W&B online with an API key, offline without (see tracking.wandb).
        resume_id = (state or {}).get("tracking_run_id")
        tracker = Trackers(ConsoleTracker(prefixes=("train/",)), JsonlTracker(metrics_file),
                           make_wandb_tracker(job.tracking.wandb, run_dir, job_to_dict(job), resume_id))
    try:
        return _train_loop(job, accelerator, log, run_dir, remote, tokenizer, model, n_params, data, collator,
                           sampler, loader, optimizer, scheduler, total_steps, epochs, checkpoints, resumed_from,
                           state, metrics_file, tracker)
    finally:
        tracker.close()  # also when training fails: ends W&B's background service


def _train_loop(job, accelerator, log, run_dir, remote, tokenizer, model, n_params, data, collator, sampler, loader,
                optimizer, scheduler, total_steps, epochs, checkpoints, resumed_from, state, metrics_file,
                tracker) -> dict:
    """The optimisation loop with evaluation, checkpoints and preemption; then the final model."""
    from tqdm.auto import tqdm

    from lfqa.checkpoint import StopSignal
    from lfqa.evaluation import evaluate
    from lfqa.tracking import model_flops_utilization, peak_memory_gb

    is_main = accelerator.is_main_process

    def run_eval(step: int, label: str) -> dict:
        result = evaluate(model, tokenizer, data.validation, data.val_questions, data.val_references,
                          job.eval, accelerator, collator)
        tracker.log(result.metrics(), step)
        tracker.log_samples(result.samples, step)
        if is_main:
            log(f"{label}: eval loss {result.loss:.4f} | " +
                " | ".join(f"{k} {v:.4f}" for k, v in result.rouge.items()))
            for sample in result.samples[: job.eval.num_examples_to_print]:
                log(f"  question:  {sample['question']}\n  generated: {sample['generated']}\n"
                    f"  reference: {sample['reference']}")
            (run_dir / f"eval-step{step}.json").write_text(json.dumps(
                {"step": step, "loss": result.loss, "rouge": result.rouge, "samples": result.samples}, indent=1))
        return {"step": step, "loss": result.loss, "rouge": result.rouge,
                "sample": result.samples[0] if result.samples else None, "metrics": result.metrics()}

    summary: dict = {"job": job_to_dict(job), "data": data.reports, "num_processes": accelerator.num_processes,
                     "distributed_type": str(accelerator.distributed_type)}
    step, start_epoch, skip_batches = 0, 0, 0
    if state is not None:
        step, start_epoch, skip_batches = state["step"], state["epoch"], state["batches_in_epoch"]
        # a token budget makes the batch count depend on the epoch; under several processes the loader's
        # set_epoch does not reach our sampler (accelerate wraps it in a BatchSamplerShard)
        sampler.set_epoch(start_epoch)
        loader.set_epoch(start_epoch)
        if skip_batches >= len(loader):
            start_epoch, skip_batches = start_epoch + 1, 0
        summary["resumed_from"] = {"checkpoint": str(resumed_from), "step": step}
        log(f"resumed at step {step} (epoch {start_epoch + 1}, batch {skip_batches} of {len(loader)})")
        if step >= total_steps:
            log(f"the run already reached its {total_steps} steps: evaluating and saving only (raise "
                f"train.max_steps to train on, or use checkpoint.resume=never or a new output.dir to start over)")
    elif job.eval.at_start:
        summary["eval_start"] = run_eval(0, "untrained model")

    # Which rows (by row_id, their place in the data file) this rank trained on in epoch 0.
    seen = np.zeros(max(data.train["row_id"]) + 1, dtype=np.int64)
    # Sums since the last log line, kept on the device so that the step never waits for a .item():
    # loss, micro-batches, rows, real input tokens, padded input tokens, real answer tokens, padded answer tokens.
    sums = torch.zeros(7, dtype=torch.float64, device=accelerator.device)
    if state is not None and is_main:
        # The checkpoint holds the sums of all ranks; on one rank they add up to the same reduced total.
        sums += torch.tensor(state["log_sums"], dtype=torch.float64, device=accelerator.device)
    train_seconds = float(state["train_seconds"]) if state is not None else 0.0
    last_eval: dict = {}
    stop = StopSignal(accelerator, job.checkpoint.every_minutes)
    progress = tqdm(total=total_steps, initial=step, desc="train", disable=not (is_main and job.tracking.progress_bar),
                    dynamic_ncols=True)

    def save_checkpoint(epoch: int, batches_in_epoch: int) -> None:
        stop.drain()
        totals = accelerator.reduce(sums.clone(), reduction="sum").cpu().tolist()
        loop_state = {
            "step": step, "epoch": epoch, "batches_in_epoch": batches_in_epoch, "seed": job.train.seed,
            "num_processes": accelerator.num_processes, "log_sums": totals,
            "train_seconds": train_seconds + time.perf_counter() - segment_start,
            "metrics": last_eval["metrics"] if last_eval.get("step") == step else {}, "time": time.time(),
            "tracking_run_id": getattr(tracker, "run_id", None),
        }
        checkpoints.save(step, loop_state, tokenizer, model, extra_files={"metrics.jsonl": metrics_file})
        stop.checkpointed()
        saved_steps.append(step)

    saved_steps: list[int] = [step] if state is not None else []
    checkpointing = bool(job.checkpoint.every_steps or job.checkpoint.every_minutes)
    epoch, batch_index = start_epoch, skip_batches

    model.train()
    preempted = False
    last_log = segment_start = time.perf_counter()
    for epoch in range(start_epoch, epochs):
        if step >= total_steps:
            break
        # accelerate's loader counts its own epochs and passes them to the sampler at each iteration; a resumed
        # run (or a skipping loader, which starts counting at the loader's count) must set it explicitly.
        sampler.set_epoch(epoch)
        loader.set_epoch(epoch)
        skip = skip_batches if epoch == start_epoch else 0
        # Resume: skip the batches this epoch already trained on without loading them (the sampler is
        # deterministic in seed and epoch, so the order is the interrupted run's).
        epoch_loader = accelerator.skip_first_batches(loader, skip) if skip else loader
        batch_index = skip
        for batch in epoch_loader:
            batch_index += 1
            row_ids = batch.pop("row_id")
            if epoch == 0:
                seen[row_ids.cpu().numpy()] = 1
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                grad_norm = None
                if accelerator.sync_gradients and job.train.max_grad_norm:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), job.train.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            labels = batch["labels"]
            sums[0] += loss.detach()
            sums[3] += batch["attention_mask"].sum()
            sums[5] += (labels != -100).sum()
            sums[[1, 2, 4, 6]] += torch.tensor([1, labels.shape[0], batch["input_ids"].numel(), labels.numel()],
                                                 dtype=torch.float64, device=accelerator.device)
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            step += 1
            progress.update(1)
            if step % job.tracking.log_every_steps == 0 or step == total_steps:
                stats = accelerator.reduce(sums, reduction="sum").cpu().numpy()
                now = time.perf_counter()
                metrics = {
                    "train/loss": stats[0] / stats[1],
                    "train/lr": scheduler.get_last_lr()[0],
                    "train/samples_per_s": stats[2] / (now - last_log),
                    "train/tokens_per_s": (stats[3] + stats[5]) / (now - last_log),
                    "train/input_padding_efficiency": stats[3] / stats[4],
                    "train/answer_padding_efficiency": stats[5] / stats[6],
                    "train/epoch": epoch + 1,
                }
                if grad_norm is not None:
                    metrics["train/grad_norm"] = float(grad_norm)
                metrics["train/peak_memory_gb"] = peak_memory_gb(accelerator.device)
                # Estimated from 6 x parameters x tokens per process; on GPU only (None on CPU).
                mfu = model_flops_utilization(n_params, metrics["train/tokens_per_s"] / accelerator.num_processes,
                                              accelerator.device)
                if mfu is not None:
                    metrics["train/mfu"] = mfu
                tracker.log(metrics, step)
                progress.set_postfix(loss=f"{metrics['train/loss']:.3f}", lr=f"{metrics['train/lr']:.2e}",
                                     samples_s=f"{metrics['train/samples_per_s']:.2f}")
                sums.zero_()
                last_log = now
            if step >= total_steps:
                break
            if job.eval.every_steps and step % job.eval.every_steps == 0:
                paused = time.perf_counter()
                last_eval = run_eval(step, f"step {step}")
                segment_start += time.perf_counter() - paused  # training time excludes evaluation
                last_log = time.perf_counter()  # throughput counts training time only
            time_due, preempted = stop.poll()
            if preempted or time_due or (job.checkpoint.every_steps and step % job.checkpoint.every_steps == 0):
                if preempted:
                    log(f"SIGTERM received: checkpointing at step {step} and stopping")
                paused = time.perf_counter()
                save_checkpoint(epoch, batch_index)
                segment_start += time.perf_counter() - paused
                last_log = time.perf_counter()
            if preempted:
                break
        if step >= total_steps or preempted:
            break
    progress.close()
    if preempted:
        stop.restore()
        return _stop_preempted(job, accelerator, checkpoints, tracker, run_dir, step, summary, log)
    train_seconds += time.perf_counter() - segment_start
    segment_start = time.perf_counter()
    summary["eval_end"] = last_eval = run_eval(step, "trained model")
    if checkpointing and saved_steps[-1:] != [step]:
        # The last state with its evaluation (retention may keep it as the best), to extend or export the run.
        save_checkpoint(epoch, batch_index)
    stop.drain()
    stop.restore()

    seen_counts = accelerator.reduce(torch.tensor(seen, device=accelerator.device), reduction="sum").cpu().numpy()
    per_rank = accelerator.gather(torch.tensor([int(seen.sum())], device=accelerator.device)).cpu().tolist()
    summary["ranks"] = {"rows_seen_per_rank_epoch0": per_rank,
                        "rows_seen_by_several_ranks_epoch0": int((seen_counts > 1).sum())}
    summary["train"] = {"steps": step, "seconds": round(train_seconds, 2)}
    summary["checkpoint_upload_waits_s"] = [round(w, 3) for w in checkpoints.upload_waits]

    # Every rank takes part in collecting the weights (a collective under sharded training).
    state_dict = accelerator.get_state_dict(model)
    model_dir = run_dir / "model"
    if is_main:
        if model_dir.exists():
            shutil.rmtree(model_dir)
        accelerator.unwrap_model(model).save_pretrained(model_dir, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(model_dir)
        (model_dir / "job.yaml").write_text(dump_job(job))
        summary["model_dir"] = str(model_dir)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        log(f"model saved to {model_dir}")
    tracker.close()
    if is_main:
        from lfqa.plot import plot_run

        log(f"training curves drawn to {plot_run(run_dir)}")
    uploaded = checkpoints.close()
    if remote is not None and is_main:
        publish_run(remote, run_dir, log)
    if checkpoints.upload_errors or not uploaded:
        log(f"warning: {len(checkpoints.upload_errors)} checkpoint upload(s) failed; see the messages above")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def open_remote(job: JobConfig, accelerator):
    """The run's S3 store, checked (bucket, credentials, endpoint, write access) before anything is trained."""
    if not job.output.uri:
        return None
    from accelerate.utils import broadcast_object_list

    from lfqa.storage import StorageError, open_store

    store = open_store(job.output.uri, job.output.s3_endpoint_url, job.output.s3_region, job.checkpoint.upload_workers)
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


def _stop_preempted(job, accelerator, checkpoints, tracker, run_dir: Path, step: int, summary: dict, log) -> dict:
    """After the SIGTERM checkpoint: wait for its upload within the grace period, leave a note, and stop."""
    grace = job.checkpoint.preemption_grace_seconds
    uploaded = checkpoints.close(timeout=grace)
    summary["preempted"] = {"step": step, "uploaded": uploaded, "time": time.time()}
    if accelerator.is_local_main_process:
        # On every machine: each pod's start script turns torch's exit 1 into 75 when it finds this file.
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "preempted.json").write_text(json.dumps(summary["preempted"]))
    if accelerator.is_main_process:
        if uploaded:
            log(f"preempted at step {step}: checkpoint saved" + (" and uploaded" if checkpoints.remote else ""))
        else:
            log(f"preempted at step {step}: checkpoint saved locally; its upload did not finish in {grace:.0f}s, "
                f"so a restart resumes from the previous complete one in the bucket")
    tracker.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def _collate_with_row_ids(collator):
    """The model batch plus the rows' ids, so that the loop knows which rows each rank trained on."""

    def collate(rows: list[dict]) -> dict:
        batch = collator(rows)
        batch["row_id"] = torch.tensor([r["row_id"] for r in rows])
        return batch

    return collate


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
