"""Checkpoints that survive preemption: save, mark complete, upload, retain, find and resume.

Layout, the same on local disk (``output.dir``) and in the bucket (``output.uri``)::

    checkpoints/step-00000120/
        (accelerate's save_state: model, optimizer, scheduler, RNG states per rank; ZeRO shards under DeepSpeed)
        trainer_state.json   step, data position, loop sums, eval metrics, tracking run id
        metrics.jsonl        the run's metrics up to this step (restored on resume)
        hf/                  config.json, tokenizer and job.yaml, so that ``lfqa export`` needs nothing else
        COMPLETE             written last; a folder without it is never resumed

Locally, ``COMPLETE`` is written by each node's first process after every rank has written its part. Remotely,
each node uploads what its ranks wrote and then a ``.nodes/<node>`` part marker; the run's main process writes
``COMPLETE`` only once its own upload is done and every node's part marker is there. A checkpoint whose upload
was cut (process killed, server gone) therefore has no remote ``COMPLETE`` and is ignored.

accelerate's ``save_state`` / ``load_state`` do the actual (sharded) state; this module adds what no library
does for us: completeness across ranks and nodes, remote sync ordering, retention of newest + best, and the
choice of what to resume from.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lfqa.errors import LfqaError

MARKER = "COMPLETE"
STATE_FILE = "trainer_state.json"
CHECKPOINTS = "checkpoints"
_NAME = re.compile(r"^step-(\d{8,})$")

#: Exit status of a run stopped by SIGTERM after checkpointing (sysexits EX_TEMPFAIL: "try again later").
EXIT_PREEMPTED = 75


class CheckpointError(LfqaError, RuntimeError):
    """A checkpoint cannot be used; ``str(err)`` is one line naming the checkpoint."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def parse_step(name: str) -> int | None:
    match = _NAME.match(name)
    return int(match.group(1)) if match else None


def _step_text(step: int | None) -> str:
    return "none" if step is None else f"step {step}"


@dataclass
class CheckpointInfo:
    name: str
    step: int
    complete: bool
    metrics: dict = field(default_factory=dict)


def list_checkpoints(store, with_metrics: bool = True) -> list[CheckpointInfo]:
    """Checkpoints in a store (local or S3), oldest first; metrics only for complete ones."""
    out = []
    for name in store.list_subdirs(CHECKPOINTS):
        step = parse_step(name)
        if step is None:
            continue
        complete = store.exists(f"{CHECKPOINTS}/{name}/{MARKER}")
        metrics = {}
        if complete and with_metrics:
            try:
                metrics = json.loads(store.read_text(f"{CHECKPOINTS}/{name}/{STATE_FILE}")).get("metrics") or {}
            except Exception:  # noqa: BLE001 - a checkpoint without readable metrics is still a checkpoint
                metrics = {}
        out.append(CheckpointInfo(name, step, complete, metrics))
    return sorted(out, key=lambda c: c.step)


def newest_complete(infos: list[CheckpointInfo]) -> CheckpointInfo | None:
    complete = [c for c in infos if c.complete]
    return complete[-1] if complete else None


def retained(infos: list[CheckpointInfo], keep_last: int, keep_best: int, metric: str, mode: str,
             keep_newer_than: int | None = None) -> set[str]:
    """Names to keep: the newest ``keep_last`` complete checkpoints and the best ``keep_best`` by ``metric``.

    Incomplete checkpoints newer than the newest complete one are kept (an upload or save may be in flight);
    older incomplete ones are leftovers of a crash and are not. ``keep_newer_than`` (a step) keeps every
    checkpoint after it as well: locally, those not yet confirmed in the bucket.
    """
    complete = [c for c in infos if c.complete]
    keep = {c.name for c in complete[-keep_last:]}
    scored = [c for c in complete if isinstance(c.metrics.get(metric), (int, float))
              and math.isfinite(c.metrics[metric])]
    scored.sort(key=lambda c: (c.metrics[metric] if mode == "min" else -c.metrics[metric], -c.step))
    keep |= {c.name for c in scored[:keep_best]}
    newest = complete[-1].step if complete else -1
    keep |= {c.name for c in infos if not c.complete and c.step > newest}
    if keep_newer_than is not None:
        keep |= {c.name for c in infos if c.step > keep_newer_than}
    return keep


def prune(store, keep_last: int, keep_best: int, metric: str, mode: str, log=print,
          keep_newer_than: int | None = None) -> list[str]:
    """Delete the checkpoints that :func:`retained` does not keep; returns their names."""
    infos = list_checkpoints(store)
    keep = retained(infos, keep_last, keep_best, metric, mode, keep_newer_than)
    deleted = []
    for info in infos:
        if info.name not in keep:
            # The marker goes first: a half-deleted checkpoint must never look complete.
            store.delete_prefix(f"{CHECKPOINTS}/{info.name}", marker=MARKER)
            deleted.append(info.name)
    if deleted:
        log(f"checkpoints: deleted {', '.join(deleted)} from {store.url(CHECKPOINTS)} "
            f"(keeping {', '.join(sorted(keep))})")
    return deleted


# Settings that may change between a checkpoint and the job resuming it: where things go, how often to
# checkpoint, log and evaluate, and how long to train (extending a finished run is a resume).
# model.encoder_attention, train.fused_optimizer, train.cpu_keep_freed_memory: the same computation done
# another way (the same weights and optimizer states; results equal up to float rounding).
_MAY_CHANGE = ("output.", "checkpoint.", "tracking.", "eval.", "train.max_steps", "train.epochs",
               "model.cache_dir", "model.encoder_attention", "train.fused_optimizer",
               "train.cpu_keep_freed_memory", "data.cache_dir", "data.max_eval_samples", "data.validation")


def changed_settings(saved_job: Path, job) -> list[str]:
    """``key: old -> new`` for each setting that differs from the checkpoint's job and may not."""
    import yaml

    from lfqa.config import job_to_dict

    if not saved_job.exists():
        return []

    def flat(tree: dict, prefix: str = "") -> dict:
        out = {}
        for key, value in tree.items():
            if isinstance(value, dict):
                out.update(flat(value, f"{prefix}{key}."))
            else:
                out[f"{prefix}{key}"] = value
        return out

    old, new = flat(yaml.safe_load(saved_job.read_text()) or {}), flat(job_to_dict(job))
    # A key the checkpoint's job does not have was added by a later lfqa: the old run knew no such
    # setting, so it cannot have been changed (comparing it with None would refuse every old checkpoint).
    return [f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in sorted(old)
            if not key.startswith(_MAY_CHANGE) and old.get(key) != new.get(key)]


def node_layout(accelerator) -> tuple[int, int]:
    """(this process's node index, number of nodes), from the launcher's LOCAL_WORLD_SIZE."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes) or 1)
    local = max(1, min(local, accelerator.num_processes))
    return accelerator.process_index // local, max(1, accelerator.num_processes // local)


class StopSignal:
    """SIGTERM handling and time-based checkpoints, agreed on by every rank.

    A rank that receives SIGTERM (Kubernetes sends it before killing a pod) only sets a flag; the loop asks
    :meth:`poll` once per optimizer step. Every rank must stop, or checkpoint, at the same step or the sharded
    save would deadlock, so the flags are combined with an all-reduce (MAX). That all-reduce runs on a CPU
    (gloo) group of its own, started asynchronously and read one step later: the step never waits for it and
    the flags never touch the GPU, so reading them never waits for the GPU's queued work.
    """

    def __init__(self, num_processes: int, every_minutes: float, clock=time.monotonic, group=None):
        self.num_processes = num_processes
        self.every_seconds = every_minutes * 60
        self.clock = clock
        self.last_checkpoint = clock()
        self.received = False
        self._pending = None
        self._previous = None
        self._group = group
        if num_processes > 1 and group is None:
            import torch.distributed as dist

            self._group = dist.new_group(backend="gloo")  # a collective: every rank builds its StopSignal
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        self.received = True

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def checkpointed(self) -> None:
        self.last_checkpoint = self.clock()

    def poll(self) -> tuple[bool, bool]:
        """(a time-based checkpoint is due, stop now) as agreed by all ranks."""
        due = bool(self.every_seconds) and self.clock() - self.last_checkpoint >= self.every_seconds
        if self.num_processes == 1:
            return due, self.received
        import torch.distributed as dist

        agreed = (False, False)
        if self._pending is not None:
            tensor, work = self._pending
            work.wait()
            agreed = (bool(tensor[0]), bool(tensor[1]))
        local = torch.tensor([int(due), int(self.received)], dtype=torch.int32)
        self._pending = (local, dist.all_reduce(local, op=dist.ReduceOp.MAX, group=self._group, async_op=True))
        return agreed

    def drain(self) -> None:
        """Finish the all-reduce still in flight (every rank calls this at the same point)."""
        if self._pending is not None:
            self._pending[1].wait()
            self._pending = None


@dataclass(frozen=True)
class SaveDecision:
    save: bool = False
    stop: bool = False
    reason: str = ""


class CheckpointSchedule:
    """When a checkpoint is due: every N optimizer steps, every M minutes, on SIGTERM, and at the end."""

    def __init__(self, every_steps: int, stop: StopSignal):
        self.every_steps = every_steps
        self.stop = stop
        self.enabled = bool(every_steps or stop.every_seconds)
        self.last_saved_step: int | None = None

    def due(self, step: int) -> SaveDecision:
        """Asked once per optimizer step, by every rank (the time and SIGTERM flags are agreed between ranks)."""
        time_due, preempted = self.stop.poll()
        if preempted:
            return SaveDecision(save=True, stop=True, reason="SIGTERM")
        if time_due:
            return SaveDecision(save=True, reason="checkpoint.every_minutes")
        if self.every_steps and step % self.every_steps == 0:
            return SaveDecision(save=True, reason="checkpoint.every_steps")
        return SaveDecision()

    def final_due(self, step: int) -> bool:
        """The run's last state, with its evaluation, unless that very step was just saved."""
        return self.enabled and self.last_saved_step != step

    def saved(self, step: int) -> None:
        self.last_saved_step = step
        self.stop.checkpointed()


class CheckpointManager:
    """Saves, uploads, prunes and finds checkpoints for one run. Every rank creates one and calls
    :meth:`save` and :meth:`resume` at the same points (they contain collectives)."""

    schedule: CheckpointSchedule | None = None
    """When saves are due; set by :meth:`start_schedule`."""

    def __init__(self, accelerator, job, run_dir: Path, remote=None, log=print):
        from lfqa.storage import LocalStore

        self.accelerator = accelerator
        self.cfg = job.checkpoint
        self.job = job
        self.run_dir = Path(run_dir)
        self.local = LocalStore(self.run_dir)
        self.remote = remote
        self.log = log
        self.node, self.num_nodes = node_layout(accelerator)
        self.uploader = None
        self.upload_errors: list[str] = []
        self.upload_waits: list[float] = []
        self._lock = threading.Lock()  # the upload status, written by the uploader thread
        self._prune_lock = threading.Lock()  # local retention runs after a save and after an upload
        self._status = {"uploads_ok": 0, "failures_total": 0, "failed_in_a_row": 0, "alarm": False,
                        "newest_in_bucket_step": None, "newest_local_step": None, "last_error": None}
        if remote is not None and hasattr(remote, "with_limits"):
            # A bucket that stops answering fails an upload in about a minute, not in many.
            remote = self.remote = remote.with_limits(self.cfg.s3_max_attempts, self.cfg.s3_timeout_seconds)
        if remote is not None and accelerator.is_local_main_process:
            from lfqa.storage import BackgroundUploader

            self._status["newest_in_bucket_step"] = self._newest_step(remote)
            self._status["newest_local_step"] = self._newest_step(self.local)
            # In a low-priority child process: the upload never takes CPU or the GIL from training. A stuck
            # upload holds a save for at most upload_wait_seconds; a failed one is tried again.
            self.uploader = BackgroundUploader(remote, on_done=self._after_upload, isolate=True,
                                               wait_seconds=self.cfg.upload_wait_seconds,
                                               retry_seconds=self.cfg.upload_retry_seconds, report=self.log)

    # --- cadence ----------------------------------------------------------------------------------------

    def start_schedule(self) -> None:
        """Every rank, once before training: from now on SIGTERM only sets a flag that :meth:`due` reads."""
        stop = StopSignal(self.accelerator.num_processes, self.cfg.every_minutes)
        self.schedule = CheckpointSchedule(self.cfg.every_steps, stop)

    def due(self, step: int) -> SaveDecision:
        return self.schedule.due(step)

    def final_due(self, step: int) -> bool:
        return self.schedule.final_due(step)

    def end_schedule(self) -> None:
        """Every rank, after the last step: finish the flags' all-reduce and give SIGTERM back."""
        self.schedule.stop.drain()
        self.schedule.stop.restore()

    # --- saving -----------------------------------------------------------------------------------------

    def path(self, name: str) -> Path:
        return self.run_dir / CHECKPOINTS / name

    def save(self, step: int, state: dict, tokenizer, model, extra_files: dict[str, Path] | None = None) -> Path:
        """Write checkpoint ``step`` (all ranks), mark it complete locally, queue its upload and prune."""
        from lfqa.config import dump_job

        acc = self.accelerator
        schedule = self.schedule
        if schedule is not None:
            schedule.stop.drain()  # the flags' collective first, at the same point on every rank
        name = checkpoint_name(step)
        path = self.path(name)
        if acc.is_local_main_process and path.exists():
            shutil.rmtree(path)  # an incomplete leftover of a crash at this very step
        acc.wait_for_everyone()
        started = time.perf_counter()
        acc.save_state(str(path))
        if acc.is_main_process:
            hf = path / "hf"
            unwrapped = acc.unwrap_model(model)
            unwrapped.config.save_pretrained(hf)
            unwrapped.generation_config.save_pretrained(hf)
            tokenizer.save_pretrained(hf)
            (hf / "job.yaml").write_text(dump_job(self.job))
            (path / STATE_FILE).write_text(json.dumps(state, indent=1, default=str))
            for target, source in (extra_files or {}).items():
                if Path(source).exists():
                    (path / target).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(source, path / target)
        acc.wait_for_everyone()  # every rank's part is on disk
        if acc.is_local_main_process:
            (path / MARKER).write_text(json.dumps({"step": step, "time": time.time()}))
        self.log(f"checkpoint {name} saved to {path} in {time.perf_counter() - started:.1f}s")
        if self.uploader is not None:
            self._queue_upload(name, path)
        if acc.is_local_main_process:
            self._prune_local()
        if schedule is not None:
            schedule.saved(step)
        return path

    def _queue_upload(self, name: str, path: Path) -> None:
        remote_dir = f"{CHECKPOINTS}/{name}"
        with self._lock:
            self._status["newest_local_step"] = max(parse_step(name), self._status["newest_local_step"] or -1)
            failing = self._status["failed_in_a_row"] > 0
        # While uploads fail, the running one will likely fail too: waiting for it would only stall training.
        self.uploader.wait_seconds = 0.0 if failing else self.cfg.upload_wait_seconds
        if self.num_nodes == 1:
            # One node holds every rank's part: its upload puts COMPLETE last by itself.
            waited = self.uploader.submit(path, remote_dir, marker=MARKER)
        else:
            # Each node uploads its ranks' parts; _after_upload then marks the node done and the main process
            # writes COMPLETE once every node has.
            waited = self.uploader.submit(path, remote_dir, exclude=(MARKER,))
        self.upload_waits.append(waited)
        if waited > 0.05:
            self.log(f"checkpoint {name}: waited {waited:.1f}s for the previous upload to finish")

    def upload_newest_local(self) -> str | None:
        """Queue the newest complete local checkpoint when the bucket has nothing as new (the bucket was down
        when an earlier run on this disk saved it). Call it after :meth:`resume`; returns the name queued."""
        if self.uploader is None or self.num_nodes > 1:
            return None
        local = newest_complete(list_checkpoints(self.local, with_metrics=False))
        in_bucket = self._status["newest_in_bucket_step"]
        if local is None or (in_bucket is not None and local.step <= in_bucket):
            return None
        self.log(f"checkpoint {local.name} is newer than the newest in {self.remote.url(CHECKPOINTS)} "
                 f"({_step_text(in_bucket)}): uploading it")
        self._queue_upload(local.name, self.path(local.name))
        return local.name

    def _after_upload(self, remote_dir: str, ok: bool) -> None:
        """Runs on the uploader thread after each try: completes the checkpoint in the bucket, keeps the upload
        status and prunes. Never raises."""
        error = None if ok else self.uploader.last_error
        if ok:
            try:
                ok = self._complete_remote(remote_dir)
            except Exception as err:  # noqa: BLE001 - counted as a failed upload below
                ok, error = False, f"completing {self.remote.url(remote_dir)} failed: {err}"
            if ok is None:
                return
        if not ok:
            self._upload_failed(error or f"upload of {remote_dir} failed")
            return
        self._upload_confirmed(remote_dir)
        if self.accelerator.is_main_process:
            try:
                prune(self.remote, self.cfg.keep_last, self.cfg.keep_best, self.cfg.best_metric, self.cfg.best_mode,
                      log=self.log)
            except Exception as err:  # noqa: BLE001 - retention runs again after the next upload
                self.log(f"checkpoint retention in {self.remote.url(CHECKPOINTS)} failed: {err}")
        self._prune_local()

    def _complete_remote(self, remote_dir: str) -> bool | None:
        """After this node's upload: True once the checkpoint counts as in the bucket for this node (on several
        nodes: its part marker, and on the main process COMPLETE after every node's); None when given up for a
        newer checkpoint that is queued."""
        if self.num_nodes == 1:
            return True
        store = self.remote
        store.write_text(f"{remote_dir}/.nodes/{self.node}", json.dumps({"node": self.node, "time": time.time()}))
        if not self.accelerator.is_main_process:
            return True
        deadline = time.monotonic() + 600
        missing = list(range(self.num_nodes))
        while missing := [n for n in missing if not store.exists(f"{remote_dir}/.nodes/{n}")]:
            if self.uploader.queued is not None:
                # Another node may have dropped this checkpoint for the newer one: do not wait for it.
                self.log(f"{store.url(remote_dir)}: left incomplete, nodes {missing} did not upload their part "
                         f"and a newer checkpoint is queued")
                return None
            if time.monotonic() > deadline:
                raise CheckpointError(f"{store.url(remote_dir)}: nodes {missing} never finished their upload; "
                                      f"the checkpoint stays incomplete")
            time.sleep(1)
        store.upload_file(self.run_dir / remote_dir / MARKER, f"{remote_dir}/{MARKER}")
        return True

    def _upload_failed(self, error: str) -> None:
        from lfqa.storage import redact_secrets

        error = redact_secrets(error)
        with self._lock:
            status = self._status
            status["failures_total"] += 1
            status["failed_in_a_row"] += 1
            status["last_error"] = error
            alarm = not status["alarm"] and status["failed_in_a_row"] >= self.cfg.upload_alarm_after
            status["alarm"] = status["alarm"] or alarm
            in_a_row, in_bucket, local = (status["failed_in_a_row"], status["newest_in_bucket_step"],
                                          status["newest_local_step"])
        if alarm:
            self.log(f"ALARM: checkpoint uploads to {self.remote.url(CHECKPOINTS)} failed {in_a_row} times in a row; "
                     f"newest there: {_step_text(in_bucket)}, newest on this disk: {_step_text(local)} (kept, "
                     f"tried again every {self.cfg.upload_retry_seconds:g}s); last error: {error}")

    def _upload_confirmed(self, remote_dir: str) -> None:
        step = parse_step(remote_dir.rsplit("/", 1)[-1])
        with self._lock:
            status = self._status
            recovered, failed = status["alarm"], status["failed_in_a_row"]
            status.update(failed_in_a_row=0, alarm=False, uploads_ok=status["uploads_ok"] + 1)
            if step is not None and step > (status["newest_in_bucket_step"] or -1):
                status["newest_in_bucket_step"] = step
        if self.accelerator.is_main_process:
            self.log(f"checkpoint uploaded to {self.remote.url(remote_dir)}")
        if recovered:
            self.log(f"checkpoint uploads work again: {self.remote.url(remote_dir)} is complete after {failed} "
                     f"failed tries")

    @staticmethod
    def _newest_step(store) -> int | None:
        try:
            newest = newest_complete(list_checkpoints(store, with_metrics=False))
        except Exception:  # noqa: BLE001 - unknown: nothing is taken as confirmed
            return None
        return None if newest is None else newest.step

    def upload_status(self) -> dict:
        """This node's checkpoint uploads, JSON-able (for W&B and summary.json): ``uploads_ok``,
        ``failures_total``, ``failed_in_a_row``, ``alarm`` (upload_alarm_after failures in a row),
        ``newest_in_bucket_step`` (confirmed complete there), ``newest_local_step``, ``newest_uploaded``,
        ``uploading`` (one runs or waits), ``dropped`` (checkpoints never uploaded because a newer one went
        first), ``last_error`` (one line, no credentials) and ``bucket``."""
        with self._lock:
            status = dict(self._status)
        uploader = self.uploader
        status["dropped"] = len(uploader.dropped) if uploader is not None else 0
        status["uploading"] = bool(uploader is not None and uploader.busy)
        status["bucket"] = self.remote.url(CHECKPOINTS) if self.remote is not None else None
        local, in_bucket = status["newest_local_step"], status["newest_in_bucket_step"]
        status["newest_uploaded"] = (uploader is None or local is None
                                     or (in_bucket is not None and in_bucket >= local))
        return status

    def _prune_local(self) -> None:
        # With a bucket, every checkpoint newer than the newest one confirmed there stays: it may be the only
        # copy (its upload failed, or waits). Runs after each save and after each confirmed upload.
        with self._prune_lock:
            keep_newer = None
            if self.uploader is not None:
                in_bucket = self._status["newest_in_bucket_step"]
                keep_newer = -1 if in_bucket is None else in_bucket
            prune(self.local, self.cfg.keep_last, self.cfg.keep_best, self.cfg.best_metric, self.cfg.best_mode,
                  log=self.log, keep_newer_than=keep_newer)
            newest = self._newest_step(self.local)
        with self._lock:
            self._status["newest_local_step"] = newest

    def wait_for_uploads(self, timeout: float | None = None) -> bool:
        """Block until nothing uploads and nothing waits for its first try (or ``timeout`` seconds passed); True
        when so. A failed upload waiting for its next try does not hold it."""
        if self.uploader is None:
            return True
        done = self.uploader.wait(timeout)
        self.upload_errors.extend(self.uploader.errors[len(self.upload_errors):])
        return done

    def close(self, timeout: float | None = None) -> bool:
        """Finish the uploads within ``timeout`` seconds and stop the uploader; True when the newest local
        checkpoint is in the bucket (always True without a bucket, and on ranks that upload nothing).

        A failed upload is tried again until ``checkpoint.upload_alarm_after`` tries failed in a row (once more
        if the alarm was already raised): a bucket that is down ends a run in minutes, not never."""
        if self.uploader is None:
            return True
        with self._lock:
            retries = 1 if self._status["alarm"] else self.cfg.upload_alarm_after - self._status["failed_in_a_row"]
        self.uploader.close(timeout, retries=max(1, retries))
        self.wait_for_uploads(0)
        status = self.upload_status()
        if not status["newest_uploaded"]:
            self.log(f"checkpoint step {status['newest_local_step']} is only on this disk ({self.run_dir}): the "
                     f"newest in {status['bucket']} is {_step_text(status['newest_in_bucket_step'])}")
        return status["newest_uploaded"]

    # --- resuming ---------------------------------------------------------------------------------------

    def _choose(self) -> tuple[str | None, str | None, str]:
        """Main process only: (checkpoint name, where: local|remote|explicit path/URI, description)."""
        what = self.cfg.resume.strip()
        if what == "never":
            return None, None, "checkpoint.resume is never: starting fresh"
        if what != "auto":
            return self._explicit(what)
        local = newest_complete(list_checkpoints(self.local, with_metrics=False))
        remote = newest_complete(list_checkpoints(self.remote, with_metrics=False)) if self.remote else None
        if local is None and remote is None:
            where = f"{self.local.url()}" + (f" or {self.remote.url()}" if self.remote else "")
            return None, None, f"no complete checkpoint in {where}: starting fresh"
        if remote is not None and (local is None or remote.step > local.step):
            return remote.name, "remote", f"resuming from {self.remote.url(CHECKPOINTS + '/' + remote.name)}"
        return local.name, "local", f"resuming from {self.path(local.name)}"

    def _explicit(self, what: str) -> tuple[str, str, str]:
        if what.startswith("s3://"):
            name = what.rstrip("/").rsplit("/", 1)[-1]
            if parse_step(name) is None:
                raise CheckpointError(f"checkpoint.resume: {what} is not a checkpoint folder (step-NNNNNNNN)")
            return name, what, f"resuming from {what}"
        path = Path(what)
        if not (path / MARKER).exists():
            raise CheckpointError(f"checkpoint.resume: {path} is not a complete checkpoint (no {MARKER} file)")
        return path.name, str(path), f"resuming from {path}"

    def resume(self) -> tuple[Path | None, dict | None]:
        """Every rank: pick (main decides), fetch if needed, and return (checkpoint folder, trainer state)."""
        from accelerate.utils import broadcast_object_list

        acc = self.accelerator
        decision = [None, None, None]
        if acc.is_main_process:
            try:
                decision = list(self._choose())
            except Exception as err:  # noqa: BLE001 - every rank must learn about it, or they would hang
                decision = [None, "error", f"{err}"]
        if acc.num_processes > 1:
            broadcast_object_list(decision, from_process=0)
        name, where, message = decision
        if where == "error":
            raise CheckpointError(message)
        self.log(message)
        if name is None:
            return None, None
        # From this run's store or a bucket URI it lands in this run's folder; an explicit local path stays.
        path = self.path(name) if where in ("local", "remote") or where.startswith("s3://") else Path(where)
        error = None
        if acc.is_local_main_process and not (path / MARKER).exists():
            # Another node's disk, a new pod, or an explicit URI: fetch the whole checkpoint from the bucket.
            error = self._download(name, where, path)
        errors = [error]
        if acc.num_processes > 1:
            from accelerate.utils import gather_object

            errors = gather_object([error])
        errors = [e for e in errors if e]
        if errors:
            raise CheckpointError(errors[0])
        state = json.loads((path / STATE_FILE).read_text())
        if state.get("num_processes") not in (None, acc.num_processes):
            raise CheckpointError(
                f"{path}: written by {state['num_processes']} processes, this job has {acc.num_processes}; "
                f"resuming needs the same process count (or checkpoint.resume=never, or lfqa export)")
        changed = changed_settings(path / "hf" / "job.yaml", self.job)
        if changed:
            raise CheckpointError(
                f"{path} was trained with other settings ({'; '.join(changed[:3])}): resuming would mix two runs. "
                f"Use a new output.dir, or checkpoint.resume=never to start over in this one")
        acc.load_state(str(path))
        return path, state

    def _download(self, name: str, where: str, path: Path) -> str | None:
        from lfqa.storage import StorageError, open_store

        try:
            if where.startswith("s3://"):
                parent, _, _ = where.rstrip("/").rpartition("/")
                out = self.job.output
                store = open_store(parent, out.s3_endpoint_url, out.s3_region, self.cfg.upload_workers)
                remote_dir = name
            elif self.remote is not None:
                store, remote_dir = self.remote, f"{CHECKPOINTS}/{name}"
            else:
                return f"{path}: not on this node's disk and there is no output.uri to fetch it from"
            if not store.exists(f"{remote_dir}/{MARKER}"):
                return f"{store.url(remote_dir)}: not a complete checkpoint (no {MARKER})"
            partial = path.with_name(path.name + ".download")
            shutil.rmtree(partial, ignore_errors=True)
            started = time.perf_counter()
            store.download_dir(remote_dir, partial)
            if path.exists():
                shutil.rmtree(path)
            partial.rename(path)
            self.log(f"downloaded {store.url(remote_dir)} in {time.perf_counter() - started:.1f}s")
        except (StorageError, OSError) as err:
            return f"cannot fetch checkpoint {name}: {err}"
        return None
