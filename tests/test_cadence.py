"""Each component's cadence, without a training run or (but for one test) a process group."""

import os
import signal
import socket
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lfqa.checkpoint import CheckpointSchedule, StopSignal
from lfqa.config import EvalConfig
from lfqa.evaluator import Evaluator
from lfqa.trainer import BatchStats, TrainClock, TrainMetrics, TrainState


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def one_process():
    return SimpleNamespace(device=torch.device("cpu"), num_processes=1, reduce=lambda t, reduction: t)


@pytest.fixture
def clock():
    return FakeClock()


def schedule(every_steps: int, every_minutes: float, clock) -> CheckpointSchedule:
    return CheckpointSchedule(every_steps, StopSignal(1, every_minutes, clock=clock))


def test_checkpoints_every_n_steps_and_at_the_end(clock):
    plan = schedule(every_steps=5, every_minutes=0, clock=clock)
    try:
        due = [step for step in range(1, 21) if plan.due(step).save]
        assert due == [5, 10, 15, 20]
        assert plan.due(5).reason == "checkpoint.every_steps" and not plan.due(5).stop
        plan.saved(20)
        assert not plan.final_due(20) and plan.final_due(21)
    finally:
        plan.stop.restore()


def test_checkpoints_every_m_minutes_counted_from_the_last_save(clock):
    plan = schedule(every_steps=0, every_minutes=2, clock=clock)
    try:
        assert not plan.due(1).save
        clock.now += 119
        assert not plan.due(2).save
        clock.now += 1
        decision = plan.due(3)
        assert decision.save and decision.reason == "checkpoint.every_minutes"
        plan.saved(3)
        clock.now += 60
        assert not plan.due(4).save  # the timer restarted at the save
    finally:
        plan.stop.restore()


def test_no_checkpoints_when_neither_cadence_is_set(clock):
    plan = schedule(every_steps=0, every_minutes=0, clock=clock)
    try:
        clock.now += 10**6
        assert not any(plan.due(step).save for step in range(1, 50))
        assert not plan.final_due(49)
    finally:
        plan.stop.restore()


def test_sigterm_checkpoints_and_stops_at_the_next_step(clock):
    plan = schedule(every_steps=1000, every_minutes=0, clock=clock)
    try:
        assert plan.due(1) == plan.due(1).__class__()  # nothing due
        os.kill(os.getpid(), signal.SIGTERM)  # only sets a flag
        decision = plan.due(2)
        assert decision.save and decision.stop and decision.reason == "SIGTERM"
    finally:
        plan.stop.restore()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def _agree(rank: int, port: int, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    stop = StopSignal(2, every_minutes=0)
    seen = []
    for poll in range(6):
        if rank == 1 and poll == 2:
            stop.received = True  # only this rank got SIGTERM
        seen.append(stop.poll())
    stop.drain()
    stop.restore()
    results.put((rank, seen))
    dist.destroy_process_group()


def test_ranks_agree_on_sigterm_at_the_same_step():
    """One rank's SIGTERM stops every rank at the same poll (one step later: the all-reduce is asynchronous)."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_agree, args=(rank, port, results)) for rank in range(2)]
    for proc in procs:
        proc.start()
    got = dict(results.get(timeout=120) for _ in procs)
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    expected = [(False, False)] * 3 + [(False, True)] * 3
    assert got[0] == expected and got[1] == expected


def test_evaluation_cadence():
    evaluator = Evaluator(EvalConfig(every_steps=4, at_start=True), None, None, None, ".")
    assert [s for s in range(1, 13) if evaluator.due(s, total_steps=12)] == [4, 8]  # 12: the final evaluation
    assert evaluator.due_at_start(resumed=False) and not evaluator.due_at_start(resumed=True)
    never = Evaluator(EvalConfig(every_steps=0, at_start=False), None, None, None, ".")
    assert not any(never.due(s, 12) for s in range(1, 13)) and not never.due_at_start(resumed=False)
    # The loss alone in between; a step due for both gets the whole evaluation.
    both = Evaluator(EvalConfig(every_steps=4, loss_every_steps=2), None, None, None, ".")
    assert {s: both.due(s, total_steps=12) for s in range(1, 13) if both.due(s, 12)} == {
        2: "loss", 4: "full", 6: "loss", 8: "full", 10: "loss"}


def test_log_cadence():
    metrics = TrainMetrics(one_process(), log_every_steps=10, total_steps=25)
    assert [s for s in range(1, 26) if metrics.due(s)] == [10, 20, 25]


def test_train_state_round_trip_and_checkpoints_of_earlier_versions():
    state = TrainState(step=7, epoch=1, batches_in_epoch=3, seed=5, num_processes=2, train_seconds=12.5,
                       log_window_seconds=1.5, log_sums=[1.0] * 9, metrics={"eval/loss": 2.0}, tracking_run_id="r")
    saved = state.state_dict()
    assert TrainState.from_state_dict(saved) == state
    # trainer_state.json of the loop before TrainState: seven sums, no window seconds, metrics may be null
    older = {"step": 120, "epoch": 0, "batches_in_epoch": 120, "seed": 42, "num_processes": 2,
             "log_sums": [1.0, 2, 8, 900, 1000, 200, 250], "train_seconds": 30.0, "metrics": None,
             "time": 1.7e9, "tracking_run_id": None}
    restored = TrainState.from_state_dict(older)
    assert (restored.step, restored.log_window_seconds, restored.metrics) == (120, 0.0, {})
    assert restored.log_sums == older["log_sums"]


def test_clock_leaves_out_paused_time(clock):
    timer = TrainClock(train_seconds=10.0, window_seconds=2.0, clock=clock)
    clock.now += 3
    assert timer.seconds() == 13.0 and timer.window() == 5.0
    with timer.paused():
        clock.now += 100
        assert timer.seconds() == 13.0
        with timer.paused():  # nested pauses count once
            clock.now += 1
    clock.now += 1
    assert timer.seconds() == 14.0 and timer.window() == 6.0
    timer.new_window()
    assert timer.window() == 0.0


def test_throughput_after_a_resume_covers_the_restored_window(clock):
    """The checkpoint held 8 rows of 2 s; 4 more rows in 1 s after the resume: 12 rows / 3 s, not 12 / 1."""
    metrics = TrainMetrics(one_process(), log_every_steps=10, total_steps=100)
    metrics.sums.restore([3.0, 2, 8, 800, 1000, 160, 200, 8e9, 9e9])
    timer = TrainClock(train_seconds=20.0, window_seconds=2.0, clock=clock)
    stats = BatchStats(np.arange(4), np.array([4, 400, 500, 80, 100, 4e9, 4.5e9]))
    metrics.sums.add(torch.tensor(1.5), stats)
    clock.now += 1.0
    line = metrics.compute(timer.window(), lr=1e-3, epoch=0, grad_norm=None)
    assert line["train/samples_per_s"] == pytest.approx(12 / 3)
    assert line["train/loss"] == pytest.approx(4.5 / 3)
    assert line["train/model_flops_per_s"] == pytest.approx(12e9 / 3)
    assert line["train/input_padding_efficiency"] == pytest.approx(1200 / 1500)
    assert "train/mfu" not in line  # no peak given
