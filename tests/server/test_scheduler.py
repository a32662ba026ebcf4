"""Scheduling decisions with fake jobs: no checkpoint, no torch, no threads."""

import subprocess
import sys

import pytest

from racedit.server.requests import Cancelled, DeadlineExceeded, DuplicateRequest, QueueFull
from racedit.server.scheduler import Job, Scheduler, StaticPolicy, StepPolicy


def job(name: str, rows: int = 2, at: float = 0.0, timeout_s=None) -> Job:
    return Job(name, rows, submitted=at, timeout_s=timeout_s)


def test_the_scheduler_imports_no_torch():
    code = "import sys, racedit.server.scheduler; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_step_policy_admits_in_arrival_order_while_rows_fit_and_joins_at_the_next_step():
    s = Scheduler(max_batch_rows=4)
    for name in "abc":
        s.submit(job(name), now=0)
    plan = s.plan(now=0)
    assert plan.started == ["a", "b"] and plan.running == ["a", "b"] and plan.rows(s) == 4
    assert s.queue_depth() == 1  # c waits for room, counted in the queue
    assert s.plan(now=1).started == []
    s.finish("a")
    plan = s.plan(now=2)
    assert plan.started == ["c"] and plan.running == ["b", "c"]


def test_a_head_that_does_not_fit_blocks_those_behind_it():
    s = Scheduler(max_batch_rows=4)
    s.submit(job("big", rows=4), now=0)
    s.submit(job("wide", rows=4), now=0)
    s.submit(job("small", rows=1), now=0)
    assert s.plan(now=0).started == ["big"]
    assert s.plan(now=0).started == []  # small would fit, but first come, first served


def test_requests_wider_than_a_batch_and_duplicate_ids_are_refused():
    s = Scheduler(max_batch_rows=4)
    with pytest.raises(ValueError, match="max_batch_rows"):
        s.submit(job("wide", rows=6), now=0)
    s.submit(job("a"), now=0)
    with pytest.raises(DuplicateRequest):
        s.submit(job("a"), now=0)


def test_a_full_queue_first_drops_its_overdue_jobs():
    s = Scheduler(max_batch_rows=2, max_queue=2)
    s.submit(job("running"), now=0)
    s.plan(now=0)
    s.submit(job("late", timeout_s=1.0), now=0)
    s.submit(job("waiting"), now=0)
    with pytest.raises(QueueFull):
        s.submit(job("refused"), now=0.5)
    dropped = s.submit(job("fits"), now=2.0)  # "late" is overdue: its place is free
    assert [(i, type(e)) for i, e in dropped] == [("late", DeadlineExceeded)]
    assert [j.id for j in s.queue] == ["waiting", "fits"]


def test_cancelled_queued_jobs_leave_at_once_and_running_ones_at_the_next_plan():
    s = Scheduler(max_batch_rows=2)
    s.submit(job("running"), now=0)
    s.plan(now=0)
    s.submit(job("queued"), now=0)
    assert s.cancel("queued") is True and s.queue_depth() == 0 and "queued" not in s.jobs
    assert s.cancel("running") is False and "running" in s.jobs  # still active until the next plan
    assert s.cancel("unknown") is None
    plan = s.plan(now=1)
    assert [(i, type(e)) for i, e in plan.dropped] == [("running", Cancelled)] and plan.running == []
    assert s.idle()


def test_overdue_jobs_leave_queued_or_running():
    s = Scheduler(max_batch_rows=2)
    s.submit(job("running", timeout_s=5), now=0)
    s.plan(now=0)
    s.submit(job("queued", timeout_s=1), now=0)
    plan = s.plan(now=6)
    assert sorted(i for i, _ in plan.dropped) == ["queued", "running"]
    assert all(isinstance(e, DeadlineExceeded) for _, e in plan.dropped)


def test_a_job_leaves_exactly_once():
    s = Scheduler()
    s.submit(job("a"), now=0)
    s.plan(now=0)
    assert s.finish("a") is True and s.finish("a") is False
    s.submit(job("b"), now=0)
    assert s.drain() == ["b"] and s.drain() == [] and s.idle()


def test_static_policy_gathers_for_its_window_then_runs_a_batch_to_completion():
    s = Scheduler(max_batch_rows=4, admission=StaticPolicy(wait_s=0.2))
    s.submit(job("a"), now=0)
    assert s.plan(now=0.0).started == []  # the window opens
    assert s.wake_in(now=0.05) == pytest.approx(0.15)
    plan = s.plan(now=0.25)
    assert plan.started == ["a"]
    s.submit(job("b", rows=1), now=0.3)
    s.submit(job("c", rows=1), now=0.3)  # two rows of four: not a full batch
    assert s.plan(now=1.0).started == []  # nothing joins a running static batch
    s.finish("a")
    assert s.plan(now=1.0).started == [] and s.wake_in(1.0) == pytest.approx(0.2)  # a new window
    assert s.plan(now=1.3).started == ["b", "c"]


def test_static_policy_starts_at_once_when_the_queue_fills_a_batch():
    s = Scheduler(max_batch_rows=4, admission=StaticPolicy(wait_s=10))
    s.submit(job("a"), now=0)
    s.submit(job("b"), now=0)
    assert s.plan(now=0).started == ["a", "b"]


def test_step_policy_never_asks_to_wake():
    assert StepPolicy().wake_in(None, 0) is None and Scheduler().wake_in(0) is None
