"""The training loop. :meth:`Trainer.fit` only sequences; the components decide.

The checkpoint manager decides when a save is due (steps, minutes, SIGTERM agreed by every rank, the final
state), the evaluator when an evaluation is, :class:`TrainMetrics` when a log line is. What a checkpoint
holds of the loop is :class:`TrainState`. Built by :func:`lfqa.train.run`; tests build it the same way.

No step waits for the device except at log, evaluation and checkpoint steps: the collator counts tokens,
FLOPs and row ids on the host (:class:`BatchStats`), the loss is summed on the device, and the two meet only
when a log line or checkpoint needs them.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

#: The running sums of the loop, in this order (``trainer_state.json``'s ``log_sums``; older checkpoints end
#: after ``answer_padded``).
SUM_FIELDS = ("loss", "micro_batches", "rows", "input_tokens", "input_padded", "answer_tokens", "answer_padded",
              "model_flops", "hardware_flops")


@dataclass
class BatchStats:
    """What the loop counts of a batch, computed on the host by the collator (never moved to the device:
    accelerate only moves tensors and objects with ``.to``)."""

    row_ids: np.ndarray
    counts: np.ndarray
    """rows, input tokens, padded input tokens, answer tokens, padded answer tokens, model FLOPs, hardware FLOPs."""


class StatsCollator:
    """Wraps a model collator: the batch plus its :class:`BatchStats` under ``batch["stats"]``."""

    def __init__(self, collator, flops):
        self.collator = collator
        self.flops = flops

    def __call__(self, rows: list[dict]) -> dict:
        batch = self.collator(rows)
        inputs = np.array([len(r["input_ids"]) for r in rows])
        answers = np.array([len(r["labels"]) for r in rows])
        glob = batch["global_attention_mask"].sum(dim=1).numpy() if "global_attention_mask" in batch else 0
        width, answer_width = batch["input_ids"].shape[1], batch["labels"].shape[1]
        cost = self.flops.batch(inputs, answers, glob, width, answer_width)
        counts = np.array([len(rows), inputs.sum(), len(rows) * width, answers.sum(), len(rows) * answer_width,
                           cost.model, cost.hardware], dtype=np.float64)
        batch["stats"] = BatchStats(np.array([r["row_id"] for r in rows]), counts)
        return batch


@dataclass
class TrainState:
    """The loop's position and running figures: what ``trainer_state.json`` holds and a resume restores."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    seed: int = 0
    num_processes: int = 1
    train_seconds: float = 0.0
    log_window_seconds: float = 0.0
    """Training seconds that the restored ``log_sums`` cover (so the first rate after a resume is right)."""
    log_sums: list[float] = field(default_factory=list)
    """Every rank's :data:`SUM_FIELDS` since the last log line, added up."""
    metrics: dict = field(default_factory=dict)
    """The evaluation of this very step, if there was one (retention keeps the best by it)."""
    tracking_run_id: str | None = None

    def state_dict(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch,
                "seed": self.seed, "num_processes": self.num_processes, "log_sums": list(self.log_sums),
                "log_window_seconds": self.log_window_seconds, "train_seconds": self.train_seconds,
                "metrics": self.metrics, "time": time.time(), "tracking_run_id": self.tracking_run_id}

    @classmethod
    def from_state_dict(cls, saved: dict) -> TrainState:
        known = {k: saved[k] for k in cls.__dataclass_fields__ if k in saved}
        known["metrics"] = known.get("metrics") or {}
        return cls(**known)


class TrainClock:
    """Training seconds, with evaluation and checkpoint time left out (they run inside :meth:`paused`)."""

    def __init__(self, train_seconds: float = 0.0, window_seconds: float = 0.0, clock=time.perf_counter):
        self.clock = clock
        self._base = train_seconds
        self._started = clock()
        self._paused_total = 0.0
        self._paused_at: float | None = None
        self._window_start = self.seconds() - window_seconds

    def seconds(self) -> float:
        now = self._paused_at if self._paused_at is not None else self.clock()
        return self._base + now - self._started - self._paused_total

    def window(self) -> float:
        """Seconds since the last log line."""
        return self.seconds() - self._window_start

    def new_window(self) -> None:
        self._window_start = self.seconds()

    @contextmanager
    def paused(self):
        if self._paused_at is not None:  # already paused by an outer block
            yield
            return
        self._paused_at = self.clock()
        try:
            yield
        finally:
            self._paused_total += self.clock() - self._paused_at
            self._paused_at = None


class RunningSums:
    """:data:`SUM_FIELDS` since the last log line: the loss on the device, everything else on the host."""

    def __init__(self, device):
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.host = np.zeros(len(SUM_FIELDS) - 1)

    def add(self, loss: torch.Tensor, stats: BatchStats) -> None:
        self.loss += loss.detach()  # queued on the device: nothing waits for it
        self.host[0] += 1
        self.host[1:] += stats.counts

    def totals(self, accelerator) -> np.ndarray:
        """Every rank's sums added up (a collective, and the one wait for the device)."""
        local = torch.cat([self.loss.reshape(1), torch.from_numpy(self.host).to(self.loss.device)])
        return accelerator.reduce(local, reduction="sum").cpu().numpy()

    def reset(self) -> None:
        self.loss.zero_()
        self.host[:] = 0

    def restore(self, totals: list[float]) -> None:
        """A checkpoint's reduced sums (older checkpoints have fewer fields), on one rank only."""
        values = np.zeros(len(SUM_FIELDS))
        values[: len(totals)] = totals
        self.loss += float(values[0])
        self.host += values[1:]


class TrainMetrics:
    """The train/* log line: when it is due, and its figures from the running sums and the clock."""

    def __init__(self, accelerator, log_every_steps: int, total_steps: int, peak=None):
        self.accelerator = accelerator
        self.every = log_every_steps
        self.total_steps = total_steps
        self.peak = peak
        """:class:`lfqa.flops.PeakFlops` of one device, or None (no utilisation figures)."""
        self.sums = RunningSums(accelerator.device)

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.total_steps

    def compute(self, seconds: float, lr: float, epoch: int, grad_norm) -> dict:
        """The log line's figures over the last ``seconds`` of training; resets the sums (every rank)."""
        from lfqa.tracking import peak_memory_gb

        t = self.sums.totals(self.accelerator)
        self.sums.reset()
        seconds = max(seconds, 1e-9)
        metrics = {
            "train/loss": t[0] / max(t[1], 1), "train/lr": lr,
            "train/samples_per_s": t[2] / seconds, "train/tokens_per_s": (t[3] + t[5]) / seconds,
            "train/input_padding_efficiency": t[3] / max(t[4], 1),
            "train/answer_padding_efficiency": t[5] / max(t[6], 1),
            "train/epoch": epoch + 1, "train/model_flops_per_s": t[7] / seconds,
        }
        if grad_norm is not None:
            metrics["train/grad_norm"] = float(grad_norm)
        metrics["train/peak_memory_gb"] = peak_memory_gb(self.accelerator.device)
        if self.peak is not None:
            per_device = seconds * self.accelerator.num_processes * self.peak.flops_per_s
            metrics["train/mfu"] = t[7] / per_device
            metrics["train/hfu"] = t[8] / per_device
        return metrics


def upload_metrics(status: dict) -> dict:
    """The checkpoint uploads' health as checkpoint/* figures beside the train/* ones."""
    in_bucket = status.get("newest_in_bucket_step")
    return {"checkpoint/upload_failures_total": status.get("failures_total", 0),
            "checkpoint/upload_failed_in_a_row": status.get("failed_in_a_row", 0),
            "checkpoint/upload_alarm": int(bool(status.get("alarm"))),
            "checkpoint/newest_in_bucket_step": -1 if in_bucket is None else in_bucket,
            "checkpoint/uploads_dropped": status.get("dropped", 0)}


def saved_evaluation(state: TrainState) -> dict:
    """The evaluation record of a checkpoint's own step, as :meth:`lfqa.evaluator.Evaluator.run` returns it."""
    metrics = state.metrics
    return {"step": state.step, "loss": metrics.get("eval/loss"), "sample": None, "metrics": metrics,
            "rouge": {k.removeprefix("eval/"): v for k, v in metrics.items() if k.startswith("eval/rouge")}}


@dataclass
class TrainParts:
    """Everything the loop drives, built by :func:`lfqa.train.build_parts`."""

    model: object
    optimizer: object
    scheduler: object
    loader: object
    sampler: object
    tokenizer: object
    evaluator: object
    """:class:`lfqa.evaluator.Evaluator`"""
    checkpoints: object
    """:class:`lfqa.checkpoint.CheckpointManager`"""
    tracker: object
    metrics_file: object = None
    """The run's metrics.jsonl, which travels with every checkpoint."""


@dataclass
class StepPlan:
    total_steps: int
    epochs: int


class Callbacks:
    """Optional hooks for tools that watch the loop (the benchmark's turns, the sync-counting test):
    each callback may define ``on_fit_start(trainer)``, ``on_batch_start(trainer)``, ``on_batch_end(trainer)``."""

    def __init__(self, callbacks=()):
        self.callbacks = list(callbacks)

    def __getattr__(self, name: str):
        if not name.startswith("on_"):
            raise AttributeError(name)

        def call(trainer) -> None:
            for callback in self.callbacks:
                hook = getattr(callback, name, None)
                if hook is not None:
                    hook(trainer)

        return call


class Trainer:
    def __init__(self, job, accelerator, parts: TrainParts, state: TrainState, plan: StepPlan, log=print,
                 callbacks=(), peak=None):
        self.job, self.accelerator, self.parts, self.state, self.plan = job, accelerator, parts, state, plan
        self.log = log
        self.callbacks = Callbacks(callbacks)
        self.clock = TrainClock(state.train_seconds, state.log_window_seconds)
        self.metrics = TrainMetrics(accelerator, job.tracking.log_every_steps, plan.total_steps, peak)
        if accelerator.is_main_process and state.log_sums:
            self.metrics.sums.restore(state.log_sums)  # the checkpoint holds all ranks' sums: once is enough
        self.summary: dict = {}
        self.last_eval: dict = {}
        self.grad_norm = None
        self.preempted = False
        self.finished_before = False
        self.rows_seen = np.zeros(0, dtype=np.int64)
        self.progress = None

    def fit(self) -> dict:
        """Train to the planned step; evaluate, log and checkpoint when their components say; stop on SIGTERM."""
        self.start()
        for batch in self.batches():
            self.callbacks.on_batch_start(self)
            done = self.train_step(batch) and self.after_step()
            self.callbacks.on_batch_end(self)
            if done:
                break
        self.progress.close()
        self.summary["train"] = {"steps": self.state.step, "seconds": round(self.clock.seconds(), 2)}
        if self.finished_before:
            self.summary["eval_end"] = self.last_eval = saved_evaluation(self.state)
        elif not self.preempted:
            self.summary["eval_end"] = self.evaluate(self.state.step, "trained model")
            if self.parts.checkpoints.final_due(self.state.step):
                self.save_checkpoint()  # the last state with its evaluation, to extend or export the run
        self.parts.checkpoints.end_schedule()
        self.summary["ranks"] = self.ranks_summary()
        return self.summary

    def start(self) -> None:
        from tqdm.auto import tqdm

        from lfqa.tracking import progress_bar_enabled

        state, loader = self.state, self.parts.loader
        if state.step:
            self.set_epoch(state.epoch)
            if state.batches_in_epoch >= len(loader):
                state.epoch, state.batches_in_epoch = state.epoch + 1, 0
            self.log(f"resumed at step {state.step} (epoch {state.epoch + 1}, batch {state.batches_in_epoch} "
                     f"of {len(loader)})")
            if state.step >= self.plan.total_steps:
                # A finished run run again: its last checkpoint holds the final evaluation (nothing to redo).
                self.finished_before = bool(state.metrics)
                what = "saving the model only" if self.finished_before else "evaluating and saving only"
                self.log(f"the run already reached its {self.plan.total_steps} steps: {what} (raise "
                         f"train.max_steps to train on, or use checkpoint.resume=never or a new output.dir)")
        elif self.parts.evaluator.due_at_start(resumed=False):
            self.summary["eval_start"] = self.evaluate(0, "untrained model")
        self.parts.checkpoints.start_schedule()
        show = self.accelerator.is_main_process and progress_bar_enabled(self.job.tracking.progress_bar)
        self.progress = tqdm(total=self.plan.total_steps, initial=state.step, desc="train", disable=not show,
                             dynamic_ncols=True)
        self.parts.model.train()
        self.callbacks.on_fit_start(self)

    def set_epoch(self, epoch: int) -> None:
        # accelerate's loader passes its own epoch count to the sampler at each iteration, and under several
        # processes its set_epoch does not reach our sampler (wrapped in a BatchSamplerShard): set both.
        self.parts.sampler.set_epoch(epoch)
        self.parts.loader.set_epoch(epoch)

    def batches(self):
        """The run's remaining batches, epoch by epoch. A resumed epoch skips the batches it already trained
        on without loading them (the sampler is deterministic in seed and epoch: the same order)."""
        state, first = self.state, self.state.epoch
        for epoch in range(first, self.plan.epochs):
            if state.step >= self.plan.total_steps:
                return
            skip = state.batches_in_epoch if epoch == first else 0
            state.epoch, state.batches_in_epoch = epoch, skip
            self.set_epoch(epoch)
            loader = self.parts.loader
            for batch in self.accelerator.skip_first_batches(loader, skip) if skip else loader:
                state.batches_in_epoch += 1
                yield batch

    def train_step(self, batch: dict) -> bool:
        """One micro-batch: forward, backward and, at the end of an accumulation, the optimizer step.
        True when the optimizer stepped."""
        acc, parts, state = self.accelerator, self.parts, self.state
        stats = batch.pop("stats")
        if state.epoch == 0:
            self.mark_seen(stats.row_ids)
        with acc.accumulate(parts.model):
            loss = parts.model(**batch).loss
            acc.backward(loss)
            if acc.sync_gradients and self.job.train.max_grad_norm:
                self.grad_norm = acc.clip_grad_norm_(parts.model.parameters(), self.job.train.max_grad_norm)
            parts.optimizer.step()
            parts.optimizer.zero_grad(set_to_none=True)
        self.metrics.sums.add(loss, stats)
        if not acc.sync_gradients:
            return False
        parts.scheduler.step()
        state.step += 1
        self.progress.update(1)
        return True

    def after_step(self) -> bool:
        """Log, evaluate and checkpoint as due; True when the run stops here (done, or preempted)."""
        step = self.state.step
        if self.metrics.due(step):
            self.log_metrics()
        if step >= self.plan.total_steps:
            return True
        kind = self.parts.evaluator.due(step, self.plan.total_steps)
        if kind:
            self.evaluate(step, f"step {step}", kind)
        decision = self.parts.checkpoints.due(step)
        if decision.stop:
            self.log(f"SIGTERM received: checkpointing at step {step} and stopping")
        if decision.save:
            self.save_checkpoint()
        self.preempted = decision.stop
        return decision.stop

    def log_metrics(self) -> None:
        lr = self.parts.scheduler.get_last_lr()[0]
        metrics = self.metrics.compute(self.clock.window(), lr, self.state.epoch, self.grad_norm)
        self.clock.new_window()
        if self.parts.checkpoints.remote is not None:
            metrics.update(upload_metrics(self.parts.checkpoints.upload_status()))
        self.parts.tracker.log(metrics, self.state.step)
        self.progress.set_postfix(loss=f"{metrics['train/loss']:.3f}", lr=f"{lr:.2e}",
                                  samples_s=f"{metrics['train/samples_per_s']:.2f}")

    def evaluate(self, step: int, label: str, kind: str = "full") -> dict:
        parts = self.parts
        with self.clock.paused():
            self.last_eval = parts.evaluator.run(parts.model, parts.tokenizer, parts.tracker, step, label, kind)
        return self.last_eval

    def save_checkpoint(self) -> None:
        state, parts = self.state, self.parts
        with self.clock.paused():
            state.log_sums = self.metrics.sums.totals(self.accelerator).tolist()
            state.train_seconds, state.log_window_seconds = self.clock.seconds(), self.clock.window()
            state.metrics = self.last_eval["metrics"] if self.last_eval.get("step") == state.step else {}
            state.tracking_run_id = getattr(parts.tracker, "run_id", None)
            parts.tracker.flush()  # every step logged so far is in the files the checkpoint copies
            extra = {"metrics.jsonl": parts.metrics_file} if parts.metrics_file else {}
            extra.update(parts.tracker.files_to_checkpoint())
            parts.checkpoints.save(state.step, state.state_dict(), parts.tokenizer, parts.model, extra_files=extra)

    def mark_seen(self, row_ids: np.ndarray) -> None:
        if len(row_ids) and row_ids.max() >= len(self.rows_seen):
            grown = np.zeros(int(row_ids.max()) + 1, dtype=np.int64)
            grown[: len(self.rows_seen)] = self.rows_seen
            self.rows_seen = grown
        self.rows_seen[row_ids] = 1

    def ranks_summary(self) -> dict:
        """Which rows each rank trained on in epoch 0 (collectives: every rank)."""
        acc = self.accelerator
        sizes = acc.gather(torch.tensor([len(self.rows_seen)], device=acc.device)).cpu().tolist()
        seen = np.zeros(max(sizes), dtype=np.int64)
        seen[: len(self.rows_seen)] = self.rows_seen
        counts = acc.reduce(torch.tensor(seen, device=acc.device), reduction="sum").cpu().numpy()
        per_rank = acc.gather(torch.tensor([int(seen.sum())], device=acc.device)).cpu().tolist()
        return {"rows_seen_per_rank_epoch0": per_rank, "rows_seen_by_several_ranks_epoch0": int((counts > 1).sum())}
