"""The inference engine: one worker thread turns the scheduler's plans into the runner's steps.

Step-level continuous batching: every iteration runs ONE model evaluation for all active requests
as one batch (server/scheduler.py decides which; server/runner.py runs it). New requests join at
the next iteration; finished ones leave at once.

This module holds what is neither a decision nor a tensor: the thread, the lock, the futures,
the metrics and draining. Robustness: an exception in any phase of an iteration fails only the
requests it concerns; if the worker thread dies anyway, every waiting request is answered at once
and `ready` turns false. Submission and `stop()` share one lock, and a request leaves the
scheduler exactly once, so each is answered exactly once and nothing is accepted after the final sweep.

The engine knows nothing of HTTP: it takes `GenerationRequest`s and resolves
`concurrent.futures.Future`s with `GenerationResult`s or engine errors.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Optional

import torch

from racedit.model.denoiser import Denoiser
from racedit.model.exact import SERVING, Execution

from .metrics import EngineMetrics
from .requests import (
    Cancelled,
    DeadlineExceeded,
    DuplicateRequest,
    EngineError,
    GenerationRequest,
    GenerationResult,
    QueueFull,
    ShuttingDown,
    StepFailed,
    StepProgress,
)
from .runner import Decoder, RequestState, Runner
from .scheduler import Job, Scheduler, policy

# The engine's surface: what it takes, what its futures resolve to, and the errors they fail with.
__all__ = [
    "Engine",
    "GenerationRequest",
    "GenerationResult",
    "StepProgress",
    "EngineError",
    "QueueFull",
    "ShuttingDown",
    "DeadlineExceeded",
    "Cancelled",
    "DuplicateRequest",
    "StepFailed",
    "pick_device",
]
log = logging.getLogger("racedit.engine")


@dataclass(eq=False)
class Ticket:
    """An accepted job: its future and, once admitted, its runner state. A request is one job, or
    several under its one id (a KServe request's rows, `submit_all`); `key` names the job."""

    key: str
    request: GenerationRequest
    future: Future
    submitted: float
    state: Optional[RequestState] = None


class Engine:
    """Owns a runner (the model on one device) and serves `GenerationRequest`s from a bounded queue."""

    def __init__(
        self,
        runner: Runner,
        scheduler: Scheduler,
        metrics: Optional[EngineMetrics] = None,
        check_invariance: bool = True,
    ):
        self.runner, self.scheduler = runner, scheduler
        self.metrics = metrics or EngineMetrics()
        self.check_invariance = check_invariance
        self.batch_invariant = False  # verified by start() on this host
        self._tickets: dict[str, Ticket] = {}  # every unanswered job, by key
        self._requests: dict[str, list[str]] = {}  # the unanswered jobs' keys of every request id in flight
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # a job arrived, or stop
        self._idle = threading.Condition(self._lock)  # a job was answered
        self._accepting = False
        self.worker_died = False
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @classmethod
    def build(
        cls,
        denoiser: Denoiser,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        max_batch_rows: int = 64,
        max_queue: int = 256,
        mode: str = "step",
        static_wait_ms: float = 20.0,
        metrics: Optional[EngineMetrics] = None,
        batch_invariant: bool = True,
        decoder: Optional[Decoder] = None,
        cuda_graphs: bool = True,
    ) -> Engine:
        """The usual assembly: a runner with serving's execution (or plain GEMMs), on CUDA one graph per
        row bucket up to `max_batch_rows` unless `cuda_graphs` is off, and a scheduler by mode."""
        execution = SERVING if batch_invariant else Execution(row_tile=None)
        return cls(
            Runner(denoiser, device, dtype, execution, decoder, max_rows=max_batch_rows, cuda_graphs=cuda_graphs),
            Scheduler(max_batch_rows, max_queue, policy(mode, static_wait_ms)),
            metrics,
        )

    # What the HTTP layer reads about the model (read once at start: never a device sync).
    @property
    def config(self):
        return self.runner.config

    @property
    def max_batch_rows(self) -> int:
        return self.scheduler.max_batch_rows

    # ---------------------------------------------------------- lifecycle ----
    def start(self) -> Engine:
        self.runner.warm_up()  # CUDA graphs captured before any request (the check below replays them)
        if self.check_invariance:
            self.batch_invariant = self.runner.check_batch_invariance(self.scheduler.max_batch_rows)
            if not self.batch_invariant:
                log.warning("a row's output depends on its batch-mates on this host (batch_invariant=False)")
        with self._lock:
            self._accepting = True
        self._thread = threading.Thread(target=self._run, name="racedit-engine", daemon=True)
        self._thread.start()
        return self

    @property
    def ready(self) -> bool:
        return self._accepting and self._thread is not None and self._thread.is_alive()

    @property
    def accepting(self) -> bool:
        return self._accepting

    def begin_drain(self) -> None:
        """Stop admission; in-flight and queued requests still finish."""
        with self._lock:
            self._accepting = False

    def wait_idle(self, timeout: Optional[float] = None) -> bool:
        """Block until no request is queued or active."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._idle:
            while self._tickets:
                remaining = None if end is None else end - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._idle.wait(remaining if remaining is not None else 0.5)
        return True

    def stop(self, drain: bool = True, timeout: float = 60.0) -> None:
        self.begin_drain()
        if drain:
            self.wait_idle(timeout)
        self._stop.set()
        with self._work:
            self._work.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        self._answer_all(ShuttingDown("the engine stopped before this request finished"))

    def _answer_all(self, error: EngineError) -> None:
        """The final sweep: fail every unanswered request. Submission is closed (same lock)."""
        with self._lock:
            self._accepting = False
            tickets = [t for t in map(self._pop, self.scheduler.drain()) if t is not None]
        for ticket in tickets:
            self._answer_error(ticket, error)
        self._update_gauges()

    # ------------------------------------------------------------ submit ----
    def submit(self, request: GenerationRequest) -> Future:
        """Queue a request; the future resolves to a GenerationResult or fails with an EngineError."""
        return self.submit_all([request])[0]

    def submit_all(self, requests: Sequence[GenerationRequest]) -> list[Future]:
        """Queue the jobs of one request, all under its one id (a KServe request's rows): all of them or,
        on an error (ShuttingDown, DuplicateRequest, QueueFull), none."""
        request_id = requests[0].request_id
        for request in requests:
            if request.request_id != request_id:
                raise ValueError(f"the jobs of one request share its id: {request.request_id!r} != {request_id!r}")
            self.runner.check(request)
        now = time.monotonic()
        tickets = [Ticket(f"{request_id}#{i}", r, Future(), now) for i, r in enumerate(requests)]
        with self._lock:
            if not self._accepting:
                self.metrics.rejected.labels(reason="draining").inc()
                raise ShuttingDown("the server is shutting down and admits no new requests")
            if request_id in self._requests:
                raise DuplicateRequest(f"a request with id {request_id!r} is already in flight")
            try:
                dropped = self.scheduler.submit_all(
                    [Job(t.key, t.request.rows, now, t.request.timeout_s) for t in tickets], now
                )
            except QueueFull:
                self.metrics.rejected.labels(reason="queue_full").inc()
                raise
            for ticket in tickets:
                self._tickets[ticket.key] = ticket
            self._requests[request_id] = [t.key for t in tickets]
            dropped_tickets = self._take(dropped)
            self._work.notify()
        self._answer_dropped(dropped_tickets)
        self._update_gauges()
        return [t.future for t in tickets]

    def cancel(self, request_id: str) -> bool:
        """The client went away: a request's queued jobs leave the queue now, its running ones at the next
        step. Only the request that holds the id in flight is touched."""
        with self._lock:
            keys = list(self._requests.get(request_id, ()))
            left = [key for key in keys if self.scheduler.cancel(key)]
            tickets = [t for t in map(self._pop, left) if t is not None]
        for ticket in tickets:
            self._answer_error(ticket, Cancelled("client disconnected"))
        if tickets:
            self._update_gauges()
        return bool(keys)

    def queue_depth(self) -> int:
        """Requests waiting for rows, the head that waits for room included."""
        return self.scheduler.queue_depth()

    def active_rows(self) -> int:
        return self.scheduler.active_rows()

    def _update_gauges(self) -> None:
        self.metrics.queue_depth.set(self.queue_depth())
        self.metrics.active_rows.set(self.active_rows())

    # ------------------------------------------------------------ worker ----
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    self._iteration()
                except Exception as exc:  # a bug outside any one request's work: fail what was running
                    log.exception("engine iteration failed")
                    with self._lock:
                        running = [self._tickets[job.id] for job in self.scheduler.active if job.id in self._tickets]
                    for ticket in running:
                        self._fail(
                            ticket,
                            StepFailed(
                                f"request {ticket.request.request_id}: engine error: {type(exc).__name__}: {exc}"
                            ),
                        )
        finally:
            if not self._stop.is_set():
                self.worker_died = True
                log.error("engine worker died; answering every waiting request")
                self._answer_all(ShuttingDown("the engine's worker stopped; retry on another replica"))

    def _iteration(self) -> None:
        """Plan, start the admitted, run one evaluation for everything active, hand back the finished."""
        with self._work:
            if self.scheduler.idle():  # wait briefly for work instead of spinning
                self._work.wait(0.05)
            wake = self.scheduler.wake_in(time.monotonic())
            if wake:  # the static policy's gathering window
                self._work.wait(wake)
            plan = self.scheduler.plan(time.monotonic())
            dropped = self._take(plan.dropped)
            tickets = {i: self._tickets[i] for i in plan.running}
        self._answer_dropped(dropped)
        for key in plan.started:
            self._start(tickets[key])
        running = [t for t in (tickets[i] for i in plan.running) if t.state is not None and not t.future.done()]
        if running:
            self._step_isolated(running)
            self._retire([t for t in running if t.state.sampler.done and not t.future.done()])
        self._update_gauges()

    def _start(self, ticket: Ticket) -> None:
        request = ticket.request
        if not ticket.future.set_running_or_notify_cancel():
            self._fail(ticket, None)
            return
        try:
            ticket.state = self.runner.start(request)
        except Exception as exc:
            log.exception("could not start request %s", request.request_id)
            self._fail(ticket, StepFailed(f"request {request.request_id} could not start: {type(exc).__name__}: {exc}"))
            return
        self.metrics.queue_seconds.observe(ticket.state.started - ticket.submitted)

    def _step_isolated(self, tickets: list[Ticket]) -> None:
        """One evaluation for all; if it raises, re-run each request alone and fail only those that fail again."""
        try:
            self._step(tickets)
        except Exception:
            log.exception("engine step failed; isolating its requests")
            for ticket in tickets:
                try:
                    self._step([ticket])
                except Exception as exc:
                    self._fail(
                        ticket,
                        StepFailed(
                            f"request {ticket.request.request_id}: denoising step failed: {type(exc).__name__}: {exc}"
                        ),
                    )

    def _step(self, tickets: list[Ticket]) -> None:
        start = time.perf_counter()
        report = self.runner.step([t.state for t in tickets])
        self.metrics.step_seconds.observe(time.perf_counter() - start)
        self.metrics.rows_per_step.observe(report.rows)
        self.metrics.experts_per_token.observe(report.mean_experts_per_token)
        for state, progress in report.progress:
            try:
                state.request.on_step(progress)
            except Exception:
                log.exception("progress listener of request %s failed; the request goes on", progress.request_id)

    def _retire(self, finished: list[Ticket]) -> None:
        """Finished requests leave at once; each is answered on its own (a failure answers only it)."""
        images, decode_ms = self.runner.decode([t.state for t in finished])
        if finished and self.runner.decoder is not None:
            self.metrics.decode_seconds.observe(decode_ms / 1000)
        for ticket in finished:
            request_id = ticket.request.request_id
            try:
                result = self.runner.result(ticket.state, images.get(id(ticket.state)), ticket.submitted, decode_ms)
            except Exception as exc:
                log.exception("could not finish request %s", request_id)
                self._fail(
                    ticket, StepFailed(f"request {request_id} could not be finished: {type(exc).__name__}: {exc}")
                )
                continue
            with self._lock:
                self.scheduler.finish(ticket.key)
                owned = self._pop(ticket.key) is not None
            if owned:
                self.metrics.images.inc(ticket.request.num_images)
                self.metrics.record_usage(result.expert_usage)
                ticket.future.set_result(result)

    # ----------------------------------------------------------- answers ----
    def _pop(self, key: str) -> Optional[Ticket]:
        """Take a job out of the unanswered ones (caller holds the lock): whoever gets it answers it, once."""
        ticket = self._tickets.pop(key, None)
        if ticket is not None:
            keys = self._requests[ticket.request.request_id]
            keys.remove(key)
            if not keys:
                del self._requests[ticket.request.request_id]
            self._idle.notify_all()
        return ticket

    def _take(self, dropped: list[tuple[str, EngineError]]) -> list[tuple[Ticket, EngineError]]:
        """Tickets of jobs that left the scheduler (caller holds the lock)."""
        return [
            (ticket, error)
            for ticket, error in ((self._pop(key), error) for key, error in dropped)
            if ticket is not None
        ]

    def _answer_dropped(self, dropped: list[tuple[Ticket, EngineError]]) -> None:
        for ticket, error in dropped:
            self._answer_error(ticket, error)

    def _fail(self, ticket: Ticket, error: Optional[EngineError]) -> None:
        """Take a job out of the scheduler and answer it with `error` (None: its future was cancelled),
        unless another path (cancel, the final sweep) took it first."""
        with self._lock:
            self.scheduler.finish(ticket.key)
            owned = self._pop(ticket.key) is not None
        if owned and error is not None:
            self._answer_error(ticket, error)

    def _answer_error(self, ticket: Ticket, error: EngineError) -> None:
        """Called once per ticket: only the one who took it out of `_tickets` answers it."""
        self.metrics.request_errors.labels(kind=type(error).__name__).inc()
        if isinstance(error, Cancelled):
            self.metrics.cancelled.inc()
        future = ticket.future
        if not future.done() and (future.running() or future.set_running_or_notify_cancel()):
            future.set_exception(error)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str, dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """`auto` device: CUDA when present, else CPU. `auto` dtype: bf16 on CUDA, fp32 on the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA device is available")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ValueError(f"device must be auto, cpu or cuda, got {name!r}")
    device = torch.device(name)
    if dtype == "auto":
        return device, (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be auto, {', '.join(DTYPES)}, got {dtype!r}")
    return device, DTYPES[dtype]
