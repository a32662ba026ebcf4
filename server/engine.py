"""The inference engine: one worker thread owns the model and batches denoising steps.

Step-level continuous batching: every iteration runs ONE denoising step for all
active requests as one batch (two rows per image under guidance, one when
cfg_scale == 1, at most `max_batch_rows`). New requests join at the next
iteration; finished ones leave at once. Threshold routing makes rows
independent and each image's noise comes from its own seed, so a request's
images never depend on its batch-mates or on when it joined.

`static` mode is the baseline: wait up to `static_wait_ms` for requests, run
them together to completion, and only then admit more.

The engine knows nothing of HTTP: it takes `GenerationRequest`s and resolves
`concurrent.futures.Future`s with `GenerationResult`s or engine errors.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from racedit.model.dit import RaceDiT
from racedit.model.sampling import (UsageAccumulator, euler_update, guided_velocity, initial_noise, new_usage,
                                    time_grid, to_uint8)

from .metrics import EngineMetrics

log = logging.getLogger("racedit.engine")


class EngineError(Exception):
    """Base of the errors a request's future can fail with."""


class QueueFull(EngineError):
    """The bounded queue is full: the caller should retry later."""


class ShuttingDown(EngineError):
    """The engine stopped admitting requests (draining or stopped)."""


class DeadlineExceeded(EngineError):
    """The request was not finished before its deadline."""


class Cancelled(EngineError):
    """The caller went away; the request's rows were dropped."""


class StepFailed(EngineError):
    """A denoising step raised for this request (others in the step were retried alone)."""


@dataclass
class GenerationRequest:
    class_label: int
    cfg_scale: float = 4.0
    num_steps: int = 25
    seed: int = 0
    num_images: int = 1
    timeout_s: Optional[float] = None
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def rows(self) -> int:
        """Forward rows per step: one per image, two under guidance."""
        return self.num_images * (1 if self.cfg_scale == 1.0 else 2)

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.num_images)]


@dataclass
class GenerationResult:
    request_id: str
    images: np.ndarray  # uint8 [N, H, W, 3]
    seeds: list[int]
    expert_usage: dict
    queue_ms: float
    inference_ms: float
    total_ms: float


@dataclass
class _Job:
    request: GenerationRequest
    future: Future
    submitted: float
    deadline: Optional[float]
    x: Optional[torch.Tensor] = None  # [n_images, C, H, W] current latents
    step: int = 0
    started: Optional[float] = None
    usage: list[UsageAccumulator] = field(default_factory=list)
    grid: list[float] = field(default_factory=list)
    cancelled: bool = False


class Engine:
    """Owns a model on one device and serves `GenerationRequest`s from a bounded queue."""

    def __init__(self, model: RaceDiT, device: torch.device, dtype: torch.dtype = torch.float32,
                 max_batch_rows: int = 64, max_queue: int = 256, mode: str = "step",
                 static_wait_ms: float = 20.0, metrics: Optional[EngineMetrics] = None,
                 fault_label: Optional[int] = None):
        if mode not in ("step", "static"):
            raise ValueError(f"batching mode must be 'step' or 'static', got {mode!r}")
        self.model = model.to(device=device, dtype=dtype).eval()
        self.device, self.dtype = device, dtype
        self.max_batch_rows, self.mode, self.static_wait_ms = max_batch_rows, mode, static_wait_ms
        self.metrics = metrics or EngineMetrics()
        self.fault_label = fault_label  # fault injection for resilience tests: steps with this label raise
        # The bound is checked in submit() against `_waiting`, a count kept under the lock, not by
        # queue.Queue: a job held for room waits outside the queue, and the worker moving a job
        # between the queue and `_held` must never open a window in which the count looks lower.
        self.max_queue = max_queue
        self._queue: "queue.Queue[_Job]" = queue.Queue()
        self._waiting = 0  # submitted, not yet activated or failed: queued plus held
        self._active: list[_Job] = []
        self._held: Optional[_Job] = None  # taken from the queue but did not fit: first in line next time
        self._jobs: dict[str, _Job] = {}
        self._lock = threading.Lock()
        self._accepting = False
        self._stop = threading.Event()
        self._idle = threading.Condition(self._lock)
        self._thread: Optional[threading.Thread] = None
        cfg = model.config
        self.image_shape = (cfg.in_channels, cfg.image_size, cfg.image_size)

    # ---------------------------------------------------------- lifecycle ----
    def start(self) -> "Engine":
        self.warmup()
        self._accepting = True
        self._thread = threading.Thread(target=self._run, name="racedit-engine", daemon=True)
        self._thread.start()
        return self

    @torch.no_grad()
    def warmup(self) -> None:
        """One tiny step so the first request does not pay for lazy initialisation."""
        x = torch.zeros(1, *self.image_shape, device=self.device, dtype=self.dtype)
        self.model(x, torch.ones(1, device=self.device, dtype=self.dtype), torch.zeros(1, dtype=torch.long, device=self.device))

    @property
    def ready(self) -> bool:
        return self._accepting and self._thread is not None and self._thread.is_alive()

    @property
    def accepting(self) -> bool:
        return self._accepting

    def begin_drain(self) -> None:
        """Stop admission; in-flight and queued requests still finish."""
        self._accepting = False

    def wait_idle(self, timeout: Optional[float] = None) -> bool:
        """Block until no request is queued or active."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._idle:
            while self._jobs:
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
        if self._thread is not None:
            self._thread.join(timeout=10)
        with self._lock:
            leftover = list(self._jobs.values())
            self._jobs.clear()
            self._waiting = 0
        for job in leftover:
            self._fail(job, ShuttingDown("the engine stopped before this request finished"))

    # ------------------------------------------------------------ submit ----
    def submit(self, request: GenerationRequest) -> Future:
        """Queue a request; the future resolves to a GenerationResult or fails with an EngineError."""
        if not self._accepting:
            self.metrics.rejected.labels(reason="draining").inc()
            raise ShuttingDown("the server is shutting down and admits no new requests")
        if request.rows > self.max_batch_rows:
            raise ValueError(f"request needs {request.rows} rows per step but max_batch_rows is {self.max_batch_rows}")
        now = time.monotonic()
        job = _Job(request, Future(), now, now + request.timeout_s if request.timeout_s else None)
        with self._lock:
            if self._waiting >= self.max_queue:
                self.metrics.rejected.labels(reason="queue_full").inc()
                raise QueueFull(f"queue full ({self.max_queue} requests waiting)")
            self._waiting += 1
            self._queue.put_nowait(job)
            self._jobs[request.request_id] = job
        self.metrics.queue_depth.set(self.queue_depth())
        return job.future

    def cancel(self, request_id: str) -> bool:
        """Drop a request's rows at the next iteration (the client disconnected)."""
        with self._lock:
            job = self._jobs.get(request_id)
        if job is None:
            return False
        job.cancelled = True
        return True

    def queue_depth(self) -> int:
        """Requests waiting for rows, the one held for room included."""
        return self._waiting

    def active_rows(self) -> int:
        return sum(j.request.rows for j in self._active)

    # ------------------------------------------------------------ worker ----
    def _run(self) -> None:
        while not self._stop.is_set():
            self._admit()
            self._expire()
            if not self._active:
                continue
            try:
                self._step(self._active)
            except Exception:  # isolate: re-run each job's step alone, fail only those that fail again
                log.exception("engine step failed; isolating its requests")
                for job in list(self._active):
                    try:
                        self._step([job])
                    except Exception as exc:
                        self._finish_failed(job, StepFailed(f"denoising step failed: {type(exc).__name__}: {exc}"))
            self._retire()

    def _admit(self) -> None:
        """Move queued jobs into the active set while their rows fit."""
        static = self.mode == "static"
        if static and self._active:
            return
        block = not self._active  # idle: wait briefly for work instead of spinning
        deadline = None  # static mode: when the gathering window closes
        while True:
            try:
                if self._held is not None:
                    job, self._held = self._held, None
                elif block:
                    job = self._queue.get(timeout=0.05)
                elif deadline is not None:
                    job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                else:
                    job = self._queue.get_nowait()
            except queue.Empty:
                break
            if block:
                block = False
                if static:
                    deadline = time.monotonic() + self.static_wait_ms / 1000
            if self.active_rows() + job.request.rows > self.max_batch_rows and self._active:
                self._held = job
                break
            with self._lock:
                self._waiting -= 1
            self._activate(job)
        self.metrics.queue_depth.set(self.queue_depth())

    def _activate(self, job: _Job) -> None:
        if job.cancelled:
            self._fail(job, Cancelled("client disconnected"))
            return
        if job.deadline is not None and time.monotonic() > job.deadline:
            self._fail(job, DeadlineExceeded(f"waited in the queue past its {job.request.timeout_s} s deadline"))
            return
        if not job.future.set_running_or_notify_cancel():
            self._forget(job)
            return
        r = job.request
        job.started = time.monotonic()
        job.grid = time_grid(r.num_steps)
        job.x = torch.stack([initial_noise(s, self.image_shape) for s in r.seeds]).to(self.device, self.dtype)
        job.usage = [new_usage(self.model) for _ in range(r.num_images)]
        self._active.append(job)
        self.metrics.queue_seconds.observe(job.started - job.submitted)

    def _expire(self) -> None:
        now = time.monotonic()
        for job in list(self._active):
            if job.cancelled:
                self._active.remove(job)
                self._fail(job, Cancelled("client disconnected"))
                self.metrics.cancelled.inc()
            elif job.deadline is not None and now > job.deadline:
                self._active.remove(job)
                self._fail(job, DeadlineExceeded(f"not finished within {job.request.timeout_s} s"))
        self.metrics.active_rows.set(self.active_rows())

    @torch.no_grad()
    def _step(self, jobs: list[_Job]) -> None:
        """One denoising step for every image of `jobs`, as one batch."""
        start = time.perf_counter()
        xs, ts, t_next, labels, scales, owners = [], [], [], [], [], []
        for job in jobs:
            r, n = job.request, job.request.num_images
            xs.append(job.x)
            ts += [job.grid[job.step]] * n
            t_next += [job.grid[job.step + 1]] * n
            labels += [r.class_label] * n
            scales += [r.cfg_scale] * n
            owners.append(n)
        if self.fault_label is not None and self.fault_label in labels:
            raise RuntimeError(f"injected fault for class label {self.fault_label}")
        x = torch.cat(xs)
        t = torch.tensor(ts, device=self.device, dtype=self.dtype)
        v, ept, load, owner = guided_velocity(
            self.model, x, t, torch.tensor(labels, device=self.device),
            torch.tensor(scales, device=self.device, dtype=torch.float32))
        x = euler_update(x, v, t, torch.tensor(t_next, device=self.device, dtype=self.dtype))
        ept, load, owner = ept.cpu(), load.cpu(), owner.cpu()
        offset = 0
        for job, n in zip(jobs, owners):
            job.x = x[offset:offset + n]
            for i in range(n):
                rows = (owner == offset + i).nonzero().squeeze(1)
                job.usage[i].add(ept[:, rows], load[:, rows])
            job.step += 1
            offset += n
        rows = int(owner.numel())
        self.metrics.step_seconds.observe(time.perf_counter() - start)
        self.metrics.rows_per_step.observe(rows)
        self.metrics.experts_per_token.observe(float(ept.float().mean()) if ept.numel() else 0.0)

    def _retire(self) -> None:
        """Finished jobs leave at once; their images are handed back without further work here."""
        for job in [j for j in self._active if j.step >= j.request.num_steps]:
            self._active.remove(job)
            now = time.monotonic()
            total = new_usage(self.model)
            for u in job.usage:
                total.merge(u)
            summary = total.summary()
            images = to_uint8(job.x).permute(0, 2, 3, 1).numpy()
            result = GenerationResult(
                request_id=job.request.request_id, images=images, seeds=job.request.seeds, expert_usage=summary,
                queue_ms=(job.started - job.submitted) * 1000, inference_ms=(now - job.started) * 1000,
                total_ms=(now - job.submitted) * 1000)
            self.metrics.images.inc(job.request.num_images)
            self.metrics.record_usage(summary)
            self._forget(job)
            job.future.set_result(result)
        self.metrics.active_rows.set(self.active_rows())

    def _finish_failed(self, job: _Job, error: EngineError) -> None:
        if job in self._active:
            self._active.remove(job)
        self._fail(job, error)

    def _fail(self, job: _Job, error: EngineError) -> None:
        self.metrics.request_errors.labels(kind=type(error).__name__).inc()
        self._forget(job)
        if not job.future.done():
            if job.future.running() or job.future.set_running_or_notify_cancel():
                job.future.set_exception(error)

    def _forget(self, job: _Job) -> None:
        with self._idle:
            self._jobs.pop(job.request.request_id, None)
            self._idle.notify_all()


def pick_device(name: str) -> tuple[torch.device, torch.dtype]:
    """`auto`: CUDA in bf16 when present, else CPU in fp32."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA device is available")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ValueError(f"device must be auto, cpu or cuda, got {name!r}")
    device = torch.device(name)
    return device, (torch.bfloat16 if device.type == "cuda" else torch.float32)
