"""Who runs at the next step: the engine's scheduling decisions, torch-free and testable on their own.

Jobs are ids with a row count, a deadline and a cancelled flag; the scheduler keeps them in a FIFO
queue and an active set under a row cap and decides, each iteration, a `StepPlan`: which jobs
start, which run, and which leave (cancelled, or past their deadline). Policies decide admission:

    StepPolicy    step-level continuous batching: the queue's head joins at the next step while
                  its rows fit beside the active jobs (first come, first served)
    StaticPolicy  the baseline: wait up to `wait_s` (or until a batch is full), run that batch to
                  completion, and only then admit more

The scheduler is not thread-safe: the engine calls it under its lock.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Optional

from .requests import Cancelled, DeadlineExceeded, DuplicateRequest, EngineError, QueueFull


@dataclass(eq=False)
class Job:
    id: str
    rows: int  # forward rows per model evaluation
    submitted: float  # monotonic seconds
    timeout_s: Optional[float] = None
    cancelled: bool = False

    @property
    def deadline(self) -> Optional[float]:
        return self.submitted + self.timeout_s if self.timeout_s else None

    def overdue(self, now: float) -> bool:
        return self.deadline is not None and now > self.deadline


@dataclass
class StepPlan:
    """One iteration's decisions, in ids."""

    started: list[str] = field(default_factory=list)  # admitted now: their state starts before the step
    running: list[str] = field(default_factory=list)  # every active job, in admission order (started included)
    dropped: list[tuple[str, EngineError]] = field(default_factory=list)  # left: cancelled or overdue

    def rows(self, scheduler: Scheduler) -> int:
        return sum(scheduler.jobs[i].rows for i in self.running)


class StepPolicy:
    """Admit the queue's head while its rows fit beside the active jobs; alone, it always fits."""

    def admit(self, queue: deque[Job], active_rows: int, capacity: int, now: float) -> int:
        count, rows = 0, active_rows
        for job in queue:
            if rows + job.rows > capacity and (active_rows or count):
                break
            count, rows = count + 1, rows + job.rows
        return count

    def wake_in(self, queue: deque[Job], now: float) -> Optional[float]:
        return None  # nothing changes until a submission


class StaticPolicy(StepPolicy):
    """Gather for up to `wait_s` after the queue is first seen non-empty (or until a batch is full),
    then admit that batch; nothing more until every admitted job has finished."""

    def __init__(self, wait_s: float):
        self.wait_s = wait_s
        self.window_closes: Optional[float] = None

    def admit(self, queue: deque[Job], active_rows: int, capacity: int, now: float) -> int:
        if active_rows or not queue:
            return 0
        if self.window_closes is None:
            self.window_closes = now + self.wait_s
        if sum(job.rows for job in queue) < capacity and now < self.window_closes:
            return 0
        self.window_closes = None
        return super().admit(queue, 0, capacity, now)

    def wake_in(self, queue: deque[Job], now: float) -> Optional[float]:
        return None if self.window_closes is None else max(0.0, self.window_closes - now)


def policy(mode: str, static_wait_ms: float = 20.0) -> StepPolicy:
    if mode == "step":
        return StepPolicy()
    if mode == "static":
        return StaticPolicy(static_wait_ms / 1000)
    raise ValueError(f"batching mode must be 'step' or 'static', got {mode!r}")


class Scheduler:
    """The queue, the active set and the decisions between them."""

    def __init__(self, max_batch_rows: int = 64, max_queue: int = 256, admission: Optional[StepPolicy] = None):
        self.max_batch_rows, self.max_queue = max_batch_rows, max_queue
        self.admission = admission or StepPolicy()
        self.queue: deque[Job] = deque()  # waiting, in arrival order; the head waits for room
        self.active: list[Job] = []
        self.jobs: dict[str, Job] = {}  # every job not yet answered, queued or active

    def submit(self, job: Job, now: float) -> list[tuple[str, EngineError]]:
        """Queue a job; raises DuplicateRequest or QueueFull. When the queue is full, overdue queued jobs
        leave first: they are returned to be answered."""
        return self.submit_all([job], now)

    def submit_all(self, jobs: list[Job], now: float) -> list[tuple[str, EngineError]]:
        """Queue jobs together: all of them, or (DuplicateRequest, QueueFull, ValueError) none."""
        for job in jobs:
            if job.id in self.jobs:
                raise DuplicateRequest(f"a request with id {job.id!r} is already in flight")
            if job.rows > self.max_batch_rows:
                raise ValueError(f"request needs {job.rows} rows per step but max_batch_rows is {self.max_batch_rows}")
        full = len(self.queue) + len(jobs) > self.max_queue
        dropped = self._drop_overdue_queued(now) if full else []
        if len(self.queue) + len(jobs) > self.max_queue:
            raise QueueFull(f"queue full ({self.max_queue} requests waiting)")
        self.queue.extend(jobs)
        self.jobs.update((job.id, job) for job in jobs)
        return dropped

    def cancel(self, job_id: str) -> Optional[bool]:
        """The client went away. None: no such job; True: it was queued and has left now (answer it);
        False: it is running and leaves at the next plan."""
        job = self.jobs.get(job_id)
        if job is None:
            return None
        job.cancelled = True
        if job in self.queue:
            self._remove(job)
            return True
        return False

    def plan(self, now: float) -> StepPlan:
        """Drop the cancelled and overdue, admit by the policy, and name what runs."""
        plan = StepPlan(dropped=self._drop_overdue_queued(now))
        for job in list(self.active):
            if job.cancelled:
                plan.dropped.append((job.id, Cancelled("client disconnected")))
            elif job.overdue(now):
                plan.dropped.append((job.id, DeadlineExceeded(f"not finished within {job.timeout_s} s")))
            else:
                continue
            self._remove(job)
        for _ in range(self.admission.admit(self.queue, self.active_rows(), self.max_batch_rows, now)):
            job = self.queue.popleft()
            self.active.append(job)
            plan.started.append(job.id)
        plan.running = [job.id for job in self.active]
        return plan

    def finish(self, job_id: str) -> bool:
        """The job was answered (result or error): it leaves. False when it had already left."""
        job = self.jobs.get(job_id)
        if job is None:
            return False
        self._remove(job)
        return True

    def drain(self) -> list[str]:
        """Everything leaves (the engine's final sweep); returns the ids to answer."""
        ids = list(self.jobs)
        self.queue.clear()
        self.active.clear()
        self.jobs.clear()
        return ids

    def wake_in(self, now: float) -> Optional[float]:
        """How long the engine may sleep before a plan could change without a submission."""
        return self.admission.wake_in(self.queue, now)

    def queue_depth(self) -> int:
        """Requests waiting for rows, the head that waits for room included."""
        return len(self.queue)

    def active_rows(self) -> int:
        return sum(job.rows for job in self.active)

    def idle(self) -> bool:
        return not self.jobs

    def _drop_overdue_queued(self, now: float) -> list[tuple[str, EngineError]]:
        overdue = [job for job in self.queue if job.overdue(now)]
        for job in overdue:
            self._remove(job)
        return [
            (job.id, DeadlineExceeded(f"waited in the queue past its {job.timeout_s} s deadline")) for job in overdue
        ]

    def _remove(self, job: Job) -> None:
        if job in self.queue:
            self.queue.remove(job)
        if job in self.active:
            self.active.remove(job)
        self.jobs.pop(job.id, None)
