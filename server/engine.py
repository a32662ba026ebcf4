"""The inference engine: one worker thread owns the model and batches denoising steps.

Step-level continuous batching: every iteration runs ONE denoising step for all
active requests as one batch (two rows per image under guidance, one when
cfg_scale == 1, at most `max_batch_rows`). New requests join at the next
iteration; finished ones leave at once. Threshold routing makes rows
independent and each image's noise comes from its own seed, so a request's
images never depend on its batch-mates or on when it joined.

`static` mode is the baseline: wait up to `static_wait_ms` for requests, run
them together to completion, and only then admit more.

Exactness: with `batch_invariant` (the default) every GEMM runs on whole row tiles
and each expert's group is padded to whole tiles (model/exact.py, model/moe.py), so a request's
final float samples are the same bytes alone or in any batch; `start()` checks
that end to end on this host and reports it as `Engine.batch_invariant`.

Robustness: an exception in any phase of an iteration fails only the requests it
concerns; if the worker thread dies anyway, every waiting request is answered at
once and `ready` turns false. Submission and `stop()` share one lock, so nothing
is accepted after the final sweep. A job is answered exactly once: whoever takes it
out of the table of unanswered jobs (under the lock) answers it, so `cancel()`, the
worker and `stop()`'s final sweep can race for a job without answering or counting
it twice.

Ids: one id per request, however many jobs it has (a KServe request with N rows is
N jobs under its one id, `submit_all`): a second request with an id in flight is
refused before any of its jobs is queued, and `cancel(id)` reaches only the jobs of
the request that holds it.

The engine knows nothing of HTTP: it takes `GenerationRequest`s and resolves
`concurrent.futures.Future`s with `GenerationResult`s or engine errors.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from concurrent.futures import Future
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from racedit.model.calibrate import budget_range, budget_thresholds
from racedit.model.dit import RaceDiT
from racedit.model.exact import ROW_TILE
from racedit.model.sampling import (UsageAccumulator, euler_update, guided_velocity, initial_noise, new_usage,
                                    require_flow_model, time_grid, to_uint8, usage_by_image)

from .metrics import EngineMetrics

log = logging.getLogger("racedit.engine")


class EngineError(Exception):
    """Base of the errors a request's future can fail with."""


class QueueFull(EngineError):
    """The bounded queue is full: the caller should retry later."""


class ShuttingDown(EngineError):
    """The engine stopped admitting requests (draining, stopped, or its worker died)."""


class DeadlineExceeded(EngineError):
    """The request was not finished before its deadline."""


class Cancelled(EngineError):
    """The caller went away; the request's rows were dropped."""


class DuplicateRequest(EngineError):
    """A request with this id is already queued or running."""


class StepFailed(EngineError):
    """Work for this request raised (others in the same step were retried alone)."""


@dataclass
class GenerationRequest:
    class_label: int
    cfg_scale: float = 4.0
    num_steps: int = 25
    seed: int = 0
    num_images: int = 1
    timeout_s: Optional[float] = None
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    # Called on the engine's thread after each of this request's steps (streaming); it must not block.
    on_step: Optional[Callable[["StepProgress"], None]] = None
    preview_every: int = 0  # with on_step: the predicted clean sample every n steps (and at the last)
    expert_budget: float = 1.0  # the compute dial: about expert_budget * k experts per token (1.0: learned)

    @property
    def rows(self) -> int:
        """Forward rows per step: one per image, two under guidance."""
        return self.num_images * (1 if self.cfg_scale == 1.0 else 2)

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.num_images)]


@dataclass
class StepProgress:
    """One finished denoising step of a request, for streaming. Computing it changes nothing of the result."""

    request_id: str
    step: int  # steps done, 1..num_steps
    num_steps: int
    t: float  # the time this step started from (1 = noise)
    mean_experts_per_token: float  # over this request's rows, layers and steps so far
    elapsed_ms: float  # since the request was admitted
    preview: Optional[np.ndarray] = None  # float32 [N, C, H, W]: x0 = x_t - t * v, the predicted clean sample


@dataclass
class GenerationResult:
    request_id: str
    images: np.ndarray  # uint8 [N, H, W, 3] (a latent model's samples decoded by its VAE)
    samples: np.ndarray  # float32 [N, C, H, W]: the final samples as the sampler ends them (latents: undecoded)
    seeds: list[int]
    expert_usage: dict
    queue_ms: float
    inference_ms: float
    total_ms: float
    decode_ms: float = 0.0  # the VAE decode of the iteration it finished in (latent models)


@dataclass(eq=False)
class _Job:
    request: GenerationRequest
    future: Future
    submitted: float
    deadline: Optional[float]
    x: Optional[torch.Tensor] = None  # [n_images, C, H, W] current latents, fp32
    step: int = 0
    started: Optional[float] = None
    usage: Optional[UsageAccumulator] = None
    grid: list[float] = field(default_factory=list)
    cancelled: bool = False
    thresholds: Optional[torch.Tensor] = None  # [n_moe_layers] per-layer routing thresholds of its budget


class Engine:
    """Owns a model on one device and serves `GenerationRequest`s from a bounded queue."""

    def __init__(self, model: RaceDiT, device: torch.device, dtype: torch.dtype = torch.float32,
                 max_batch_rows: int = 64, max_queue: int = 256, mode: str = "step",
                 static_wait_ms: float = 20.0, metrics: Optional[EngineMetrics] = None,
                 batch_invariant: bool = True, decoder: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        if mode not in ("step", "static"):
            raise ValueError(f"batching mode must be 'step' or 'static', got {mode!r}")
        model = model.to(device).eval()
        if isinstance(model, RaceDiT):  # external denoisers (onnxruntime) fix their own precision
            model.set_precision(dtype).set_execution(row_tile=ROW_TILE if batch_invariant else None)
        self.model, self.device, self.dtype = model, device, dtype
        # The compute dial: only the torch model takes per-row thresholds (external denoisers serve 1.0).
        self.budget_range = budget_range(getattr(model, "metadata", {})) if isinstance(model, RaceDiT) else None
        self.learned_thresholds = budget_thresholds(model, [1.0])[:, 0].to(device) if isinstance(model, RaceDiT) else None
        # Read once here, so answering about the model never waits on the device the engine is using.
        self.layer_thresholds = [float(layer.threshold) for layer in model.moe_layers]
        self.max_batch_rows, self.mode, self.static_wait_ms = max_batch_rows, mode, static_wait_ms
        self.max_queue = max_queue
        self.metrics = metrics or EngineMetrics()
        self.batch_invariant = False  # verified by start() on this host
        self._queue: deque[_Job] = deque()  # waiting, in arrival order; the head waits for room
        self._active: list[_Job] = []
        self._jobs: dict[str, list[_Job]] = {}  # the unanswered jobs of every request in flight, by its id
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # a job arrived, or stop
        self._idle = threading.Condition(self._lock)  # a job was answered
        self._accepting = False
        self.worker_died = False
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        cfg = model.config
        require_flow_model(cfg)
        self.image_shape = (cfg.in_channels, cfg.image_size, cfg.image_size)  # what is denoised (maybe latents)
        # A latent model's VAE decoder (model/autoencoder.py): latents [N, C, h, w] -> images in [-1, 1].
        self.decoder = decoder
        side = decoder.image_size(cfg.image_size) if decoder is not None else cfg.image_size
        self.output_shape = (3 if decoder is not None else cfg.in_channels, side, side)  # what is answered

    # ---------------------------------------------------------- lifecycle ----
    def start(self) -> "Engine":
        self.batch_invariant = self.check_batch_invariance()
        if not self.batch_invariant:
            log.warning("a row's output depends on its batch-mates on this host (batch_invariant=False)")
        with self._lock:
            self._accepting = True
        self._thread = threading.Thread(target=self._run, name="racedit-engine", daemon=True)
        self._thread.start()
        return self

    @torch.no_grad()
    def check_batch_invariance(self) -> bool:
        """One row alone and the same row among up to 15 others must give the same bytes (also warms up)."""
        g = torch.Generator().manual_seed(0)
        n = max(2, min(16, self.max_batch_rows))
        x = torch.randn(n, *self.image_shape, generator=g).to(self.device)
        t = torch.rand(n, generator=g).to(self.device)
        y = torch.randint(0, self.model.config.num_classes + 1, (n,), generator=g).to(self.device)
        alone = self.model(x[:1], t[:1], y[:1])
        mixed = self.model(x.roll(n // 2, 0), t.roll(n // 2, 0), y.roll(n // 2, 0))[n // 2:n // 2 + 1]
        return torch.equal(alone, mixed)

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
        with self._work:
            self._work.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        self._answer_all(ShuttingDown("the engine stopped before this request finished"))

    def _answer_all(self, error: EngineError) -> None:
        """The final sweep: fail every unanswered request. Submission is closed (same lock)."""
        with self._lock:
            self._accepting = False
            leftover = [job for jobs in self._jobs.values() for job in jobs]
            self._queue.clear()
        for job in leftover:
            self._fail(job, error)
        self._update_gauges()

    # ------------------------------------------------------------ submit ----
    def submit(self, request: GenerationRequest) -> Future:
        """Queue a request; the future resolves to a GenerationResult or fails with an EngineError."""
        return self.submit_all([request])[0]

    def submit_all(self, requests: Sequence[GenerationRequest]) -> list[Future]:
        """Queue the jobs of one request (all under its one id, e.g. a KServe request's rows): all of them
        or, on an error (ShuttingDown, DuplicateRequest, QueueFull), none."""
        if not requests:
            raise ValueError("a request has at least one job")
        request_id = requests[0].request_id
        for request in requests:
            if request.request_id != request_id:
                raise ValueError(f"the jobs of one request share its id: {request.request_id!r} != {request_id!r}")
            if request.rows > self.max_batch_rows:
                raise ValueError(f"request needs {request.rows} rows per step but max_batch_rows is "
                                 f"{self.max_batch_rows}")
            low, high = self.budget_range or (1.0, 1.0)
            if not low <= request.expert_budget <= high:
                raise ValueError(f"expert_budget {request.expert_budget:g} is outside this model's range "
                                 f"{low:g}..{high:g}")
        now = time.monotonic()
        jobs = [_Job(r, Future(), now, now + r.timeout_s if r.timeout_s else None) for r in requests]
        with self._lock:
            if not self._accepting:
                self.metrics.rejected.labels(reason="draining").inc()
                raise ShuttingDown("the server is shutting down and admits no new requests")
            if request_id in self._jobs:
                raise DuplicateRequest(f"a request with id {request_id!r} is already in flight")
            expired = self._take_expired_queued(now) if len(self._queue) + len(jobs) > self.max_queue else []
            full = len(self._queue) + len(jobs) > self.max_queue
            if not full:
                self._queue.extend(jobs)
                self._jobs[request_id] = list(jobs)
                self._work.notify()
        self._fail_expired(expired)
        if full:
            self.metrics.rejected.labels(reason="queue_full").inc()
            raise QueueFull(f"queue full ({self.max_queue} places" + (f"; this request's {len(jobs)} rows take "
                                                                     f"{len(jobs)})" if len(jobs) > 1 else ")"))
        self._update_gauges()
        return [job.future for job in jobs]

    def cancel(self, request_id: str) -> bool:
        """The client went away: a request's queued jobs leave the queue now, its running ones at the next step."""
        with self._lock:
            jobs = list(self._jobs.get(request_id, ()))
            queued = [job for job in jobs if job in self._queue]
            for job in jobs:
                job.cancelled = True
            for job in queued:
                self._queue.remove(job)
        for job in queued:
            self._fail(job, Cancelled("client disconnected"))
        if queued:
            self._update_gauges()
        return bool(jobs)

    def queue_depth(self) -> int:
        """Requests waiting for rows, the head that waits for room included."""
        return len(self._queue)

    def active_rows(self) -> int:
        return sum(j.request.rows for j in self._active)

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
                    for job in list(self._active):
                        self._finish_failed(job, StepFailed(f"request {job.request.request_id}: engine error: "
                                                            f"{type(exc).__name__}: {exc}"))
        finally:
            if not self._stop.is_set():
                self.worker_died = True
                log.error("engine worker died; answering every waiting request")
                self._answer_all(ShuttingDown("the engine's worker stopped; retry on another replica"))

    def _iteration(self) -> None:
        """Admit, drop the abandoned, run one step for everything active, hand back the finished."""
        self._admit()
        self._sweep()
        if self._active:
            self._step_isolated()
            self._retire()

    def _admit(self) -> None:
        """Move queued jobs into the active set, in arrival order, while their rows fit."""
        static = self.mode == "static"
        if static and self._active:
            return
        with self._work:
            if not self._active and not self._queue:  # idle: wait briefly for work instead of spinning
                self._work.wait(0.05)
            if static and self._queue:  # gather: until the window closes or the queue fills a batch
                closes = time.monotonic() + self.static_wait_ms / 1000
                while (sum(j.request.rows for j in self._queue) < self.max_batch_rows and not self._stop.is_set()
                       and (remaining := closes - time.monotonic()) > 0):
                    self._work.wait(remaining)
            taken, rows = [], self.active_rows()
            while self._queue and (rows + self._queue[0].request.rows <= self.max_batch_rows
                                   or not (self._active or taken)):
                job = self._queue.popleft()
                taken.append(job)
                rows += job.request.rows
        for job in taken:
            try:
                self._activate(job)
            except Exception as exc:
                log.exception("could not start request %s", job.request.request_id)
                self._finish_failed(job, StepFailed(f"request {job.request.request_id} could not start: "
                                                    f"{type(exc).__name__}: {exc}"))
        self._update_gauges()

    def _activate(self, job: _Job) -> None:
        if job.cancelled:
            self._fail(job, Cancelled("client disconnected"))
            return
        if job.deadline is not None and time.monotonic() > job.deadline:
            self._fail_expired([job])
            return
        if not job.future.set_running_or_notify_cancel():
            self._forget(job)
            return
        r = job.request
        job.started = time.monotonic()
        job.grid = time_grid(r.num_steps)
        job.x = torch.stack([initial_noise(s, self.image_shape) for s in r.seeds]).to(self.device)
        if r.expert_budget != 1.0:
            job.thresholds = budget_thresholds(self.model, [r.expert_budget])[:, 0].to(self.device)
        job.usage = new_usage(self.model)
        self._active.append(job)
        self.metrics.queue_seconds.observe(job.started - job.submitted)

    def _take_expired_queued(self, now: float) -> list[_Job]:
        """Remove queued jobs whose deadline passed (caller holds the lock)."""
        expired = [j for j in self._queue if j.deadline is not None and now > j.deadline]
        for job in expired:
            self._queue.remove(job)
        return expired

    def _fail_expired(self, expired: list[_Job]) -> None:
        for job in expired:
            self._fail(job, DeadlineExceeded(f"waited in the queue past its {job.request.timeout_s} s deadline"))

    def _sweep(self) -> None:
        """Abandoned (client gone) and overdue requests leave, running or queued."""
        now = time.monotonic()
        with self._lock:
            expired = self._take_expired_queued(now)
        self._fail_expired(expired)
        for job in list(self._active):
            if job.cancelled:
                self._finish_failed(job, Cancelled("client disconnected"))
            elif job.deadline is not None and now > job.deadline:
                self._finish_failed(job, DeadlineExceeded(f"not finished within {job.request.timeout_s} s"))
        self._update_gauges()

    def _step_isolated(self) -> None:
        """One step for all active jobs; if it raises, re-run each job alone and fail only those that fail again."""
        try:
            self._step(self._active)
        except Exception:
            log.exception("engine step failed; isolating its requests")
            for job in list(self._active):
                try:
                    self._step([job])
                except Exception as exc:
                    self._finish_failed(job, StepFailed(f"request {job.request.request_id}: denoising step failed: "
                                                        f"{type(exc).__name__}: {exc}"))

    @torch.no_grad()
    def _step(self, jobs: list[_Job]) -> None:
        """One denoising step for every image of `jobs`, as one batch; one copy to the host."""
        start = time.perf_counter()
        counts = [job.request.num_images for job in jobs]
        images = torch.tensor(counts)

        def per_image(values: list) -> torch.Tensor:  # one value per job -> one per image, on the device
            return torch.tensor(values).repeat_interleave(images).to(self.device)

        t = per_image([job.grid[job.step] for job in jobs])
        t_next = per_image([job.grid[job.step + 1] for job in jobs])
        labels = per_image([job.request.class_label for job in jobs])
        scales = per_image([job.request.cfg_scale for job in jobs])
        x_t = torch.cat([job.x for job in jobs])
        dialled = any(job.request.expert_budget != 1.0 for job in jobs)  # else the learned thresholds, as ever
        thresholds = torch.cat([(self.learned_thresholds if job.thresholds is None else job.thresholds)
                                .unsqueeze(1).expand(-1, n) for job, n in zip(jobs, counts)], dim=1) if dialled else None
        v, ept, load, owner = guided_velocity(self.model, x_t, t, labels, scales, thresholds)
        x = euler_update(x_t, v, t, t_next)
        usage = usage_by_image(ept, load, owner, x.shape[0]).cpu()  # [n_layers, N, L + E + E + 1]
        offset = 0
        for job, n in zip(jobs, counts):
            job.x = x[offset:offset + n]
            job.usage.add(usage[:, offset:offset + n].sum(1), job.request.rows)
            job.step += 1
            if job.request.on_step is not None:
                self._report_step(job, x_t[offset:offset + n], v[offset:offset + n])
            offset += n
        self.metrics.step_seconds.observe(time.perf_counter() - start)
        self.metrics.rows_per_step.observe(int(owner.numel()))
        slots = int(ept.shape[0] * ept.shape[1] * ept.shape[2])
        tokens = int(usage[:, :, :ept.shape[2]].sum())
        self.metrics.experts_per_token.observe(tokens / slots if slots else 0.0)

    def _report_step(self, job: _Job, x_t: torch.Tensor, v: torch.Tensor) -> None:
        """Tell a streaming request that a step is done (its own rows only; a failing listener is ignored)."""
        r = job.request
        t = job.grid[job.step - 1]
        every = r.preview_every
        preview = None
        if every and (job.step % every == 0 or job.step == r.num_steps):
            preview = x_t.float() - t * v.float()
            preview = (self.decoder(preview) if self.decoder is not None else preview).cpu().numpy()
        try:
            r.on_step(StepProgress(request_id=r.request_id, step=job.step, num_steps=r.num_steps, t=t,
                                   mean_experts_per_token=job.usage.mean_so_far(),
                                   elapsed_ms=(time.monotonic() - job.started) * 1000, preview=preview))
        except Exception:
            log.exception("progress listener of request %s failed; the request goes on", r.request_id)

    def _decode(self, jobs: list[_Job]) -> tuple[dict[int, torch.Tensor], float]:
        """Images in [-1, 1] of the finished jobs, by id(job): a latent model's VAE decodes them all as one
        batch; a job whose batch fails is decoded alone, so only a job that fails alone fails."""
        if self.decoder is None or not jobs:
            return {id(job): job.x.float() for job in jobs}, 0.0
        start = time.perf_counter()
        try:
            decoded = self.decoder(torch.cat([job.x.float() for job in jobs]))
            out = dict(zip(map(id, jobs), decoded.split([job.request.num_images for job in jobs])))
        except Exception:
            log.exception("batched VAE decode failed; decoding each request alone")
            out = {}
            for job in jobs:
                try:
                    out[id(job)] = self.decoder(job.x.float())
                except Exception:
                    log.exception("VAE decode of request %s failed", job.request.request_id)
        seconds = time.perf_counter() - start
        self.metrics.decode_seconds.observe(seconds)
        return out, seconds * 1000

    def _retire(self) -> None:
        """Finished jobs leave at once; each is answered on its own (a failure answers only it)."""
        finished = [j for j in self._active if j.step >= j.request.num_steps]
        images, decode_ms = self._decode(finished)
        for job in finished:
            try:
                now = time.monotonic()
                summary = job.usage.summary()
                samples = job.x.float().cpu()
                if id(job) not in images:
                    raise RuntimeError("the VAE could not decode its latents")
                result = GenerationResult(
                    request_id=job.request.request_id,
                    images=to_uint8(images[id(job)].cpu()).permute(0, 2, 3, 1).numpy(),
                    samples=samples.numpy(), seeds=job.request.seeds, expert_usage=summary,
                    queue_ms=(job.started - job.submitted) * 1000, inference_ms=(now - job.started) * 1000,
                    total_ms=(now - job.submitted) * 1000, decode_ms=decode_ms)
                self.metrics.images.inc(job.request.num_images)
                self.metrics.record_usage(summary)
            except Exception as exc:
                log.exception("could not finish request %s", job.request.request_id)
                self._finish_failed(job, StepFailed(f"request {job.request.request_id} could not be finished: "
                                                    f"{type(exc).__name__}: {exc}"))
                continue
            self._active.remove(job)
            if self._forget(job):  # else the final sweep of stop() answered it already
                job.future.set_result(result)
        self._update_gauges()

    def _finish_failed(self, job: _Job, error: EngineError) -> None:
        if job in self._active:
            self._active.remove(job)
        self._fail(job, error)

    def _fail(self, job: _Job, error: EngineError) -> None:
        """Answer `job` with `error`, unless another path (cancel, the worker, the final sweep) answered it."""
        if not self._forget(job):
            return
        self.metrics.request_errors.labels(kind=type(error).__name__).inc()
        if isinstance(error, Cancelled):
            self.metrics.cancelled.inc()
        if job.future.running() or job.future.set_running_or_notify_cancel():
            job.future.set_exception(error)

    def _forget(self, job: _Job) -> bool:
        """Take `job` out of the unanswered jobs; True for the one caller that did, who answers it."""
        with self._idle:
            jobs = self._jobs.get(job.request.request_id, [])
            mine = job in jobs  # by identity (_Job has eq=False)
            if mine:
                jobs.remove(job)
                if not jobs:
                    del self._jobs[job.request.request_id]
                self._idle.notify_all()
            return mine


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
