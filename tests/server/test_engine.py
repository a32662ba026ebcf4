"""The engine in-process over a real checkpoint: row cap, admission order, static mode, failures (no HTTP).

Scheduling decisions alone are tested with fake jobs in test_scheduler.py; here the engine is
assembled from a real runner and scheduler, and tests observe or break it through subclasses of
those two parts, never through the engine's private methods.
"""

import threading
import time
import warnings

import numpy as np
import pytest
import torch

from racedit.model import generate, load
from racedit.server.engine import (
    Cancelled,
    DeadlineExceeded,
    DuplicateRequest,
    Engine,
    GenerationRequest,
    QueueFull,
    ShuttingDown,
    StepFailed,
)
from racedit.server.metrics import EngineMetrics
from racedit.server.runner import Runner
from racedit.server.scheduler import Scheduler, policy


class TracingRunner(Runner):
    """Records which requests each step ran."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps: list[list[str]] = []

    def step(self, states):
        self.steps.append([state.request.request_id for state in states])
        return super().step(states)


def engine_for(
    checkpoint,
    runner: type[Runner] = Runner,
    scheduler: type[Scheduler] = Scheduler,
    max_batch_rows: int = 64,
    max_queue: int = 256,
    mode: str = "step",
    static_wait_ms: float = 20.0,
    metrics=None,
) -> Engine:
    return Engine(
        runner(load(checkpoint), torch.device("cpu")),
        scheduler(max_batch_rows, max_queue, policy(mode, static_wait_ms)),
        metrics,
    )


def requests() -> list[GenerationRequest]:
    return [
        GenerationRequest(class_label=i, cfg_scale=2.0 + i, num_steps=3 + i % 3, seed=10 * i, request_id=f"r{i}")
        for i in range(5)
    ]


@pytest.mark.parametrize("mode", ["step", "static"])
def test_row_cap_first_come_first_served_and_same_pixels(tiny_checkpoint, mode):
    engine = engine_for(tiny_checkpoint, TracingRunner, max_batch_rows=4, mode=mode, static_wait_ms=200)
    steps = engine.runner.steps
    batch = requests()  # two rows each under guidance: at most two requests per step
    engine.start()
    try:
        futures = [engine.submit(r) for r in batch]
        results = [f.result(timeout=60) for f in futures]
    finally:
        engine.stop()
    assert all(len(ids) <= 2 for ids in steps)
    first_step = {rid: next(i for i, ids in enumerate(steps) if rid in ids) for rid in (r.request_id for r in batch)}
    assert sorted(first_step, key=first_step.get) == [r.request_id for r in batch]  # admitted in arrival order
    if mode == "static":  # a batch runs to completion before the next is admitted
        assert all(set(ids) <= set(steps[0]) for ids in steps[:4]) and len(steps[0]) == 2
    model = load(tiny_checkpoint)
    for request, result in zip(batch, results):
        expected, _ = generate(
            model,
            labels=[request.class_label],
            cfg_scale=request.cfg_scale,
            num_steps=request.num_steps,
            seeds=[request.seed],
        )
        assert np.array_equal(result.images, expected.permute(0, 2, 3, 1).numpy())


def test_steps_padded_to_row_buckets_give_each_request_its_unpadded_samples_and_usage(tiny_checkpoint):
    """The rows CUDA graphs replay, run eagerly on a CPU: every step runs on a bucket, and a request's
    samples and expert usage are what it gets from today's unpadded steps (the CPU default)."""
    mixed = [
        GenerationRequest(class_label=1, cfg_scale=4.0, num_steps=4, seed=1, num_images=2, request_id="a"),
        GenerationRequest(class_label=2, cfg_scale=1.0, num_steps=6, seed=2, request_id="b"),
        GenerationRequest(class_label=3, cfg_scale=2.0, num_steps=3, seed=3, request_id="c", sampler="sde_euler"),
        GenerationRequest(class_label=4, cfg_scale=3.0, num_steps=2, seed=4, num_images=3, request_id="d"),
    ]
    answers, rows = {}, {}
    for padding in (False, True):
        runner = Runner(load(tiny_checkpoint), torch.device("cpu"), max_rows=16, padding=padding)
        network = getattr(runner.denoiser, "denoiser", runner.denoiser)  # the RaceDiT, wrapped or not
        seen = rows[padding] = []
        network.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
        engine = Engine(runner, Scheduler(16, 256, policy("step")))
        engine.start()
        seen.clear()  # the start-up check's forwards
        try:
            answers[padding] = [f.result(timeout=60) for f in [engine.submit(r) for r in mixed]]
        finally:
            engine.stop()
        report = runner.graph_report()
        assert not report.enabled and report.reason.startswith("no CUDA device")
        assert report.buckets == ([8, 16] if padding else [])
    assert set(rows[True]) <= {8, 16} and set(rows[False]) - {8, 16}  # padded, and there was padding to do
    for plain, padded in zip(answers[False], answers[True]):
        assert padded.samples.tobytes() == plain.samples.tobytes(), plain.request_id
        assert padded.expert_usage == plain.expert_usage, plain.request_id


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this host")
@pytest.mark.parametrize("cuda_graphs", [True, False], ids=["graphs", "eager"])
def test_a_cuda_step_waits_on_the_device_once(tiny_checkpoint, cuda_graphs):
    """At most one host sync per engine step, its results' copy: inputs go over from pinned memory without
    blocking, the guided rows are decided on the host, and the forward (replayed or not) never syncs."""
    runner = Runner(load(tiny_checkpoint), torch.device("cuda"), max_rows=16, cuda_graphs=cuda_graphs)
    runner.warm_up()
    assert runner.graph_report().enabled == cuda_graphs, runner.graph_report()
    mixed = [
        GenerationRequest(class_label=1, cfg_scale=4.0, num_steps=4, seed=1, num_images=2),
        GenerationRequest(class_label=2, cfg_scale=1.0, num_steps=4, seed=2),
        GenerationRequest(class_label=3, cfg_scale=2.0, num_steps=4, seed=3, sampler="sde_euler"),
        GenerationRequest(class_label=4, cfg_scale=3.0, num_steps=4, seed=4, sampler="heun"),
    ]
    states = [runner.start(r) for r in mixed]
    runner.step(states)  # the first step of every kind of sampler, outside the count
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            runner.step(states)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchronizing" in str(w.message)]
    assert len(syncs) == 1, syncs


def test_new_requests_join_a_running_batch_at_the_next_step(tiny_checkpoint):
    engine = engine_for(tiny_checkpoint, TracingRunner, max_batch_rows=64)
    steps = engine.runner.steps
    engine.start()
    try:
        long = engine.submit(GenerationRequest(class_label=0, num_steps=400, request_id="long"))
        while len(steps) < 3:
            time.sleep(0.005)
        short = engine.submit(GenerationRequest(class_label=1, num_steps=2, request_id="short"))
        short.result(timeout=60)
        assert not long.done()  # the short one joined and left while the long one kept going
        engine.cancel("long")
    finally:
        engine.stop()
    joined = [i for i, ids in enumerate(steps) if "short" in ids]
    assert len(joined) == 2 and all("long" in steps[i] for i in joined)


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


def busy_engine(checkpoint, **kw) -> tuple[Engine, object]:
    """An engine whose two rows are taken by a long request, so what comes next waits in the queue."""
    engine = engine_for(checkpoint, max_batch_rows=2, **kw).start()
    running = engine.submit(GenerationRequest(class_label=0, num_steps=100_000, request_id="running"))
    wait_until(lambda: engine.active_rows() == 2)
    return engine, running


def test_a_request_waiting_for_room_counts_against_the_queue(tiny_checkpoint):
    engine, running = busy_engine(tiny_checkpoint, max_queue=1)
    try:
        waiting = engine.submit(GenerationRequest(class_label=1, num_steps=2, request_id="waiting"))
        time.sleep(0.05)  # the worker has seen it and found no room
        assert engine.queue_depth() == 1
        with pytest.raises(QueueFull):
            engine.submit(GenerationRequest(class_label=2, num_steps=2))
        engine.cancel("running")
        assert waiting.result(timeout=30).images.shape[0] == 1
        assert isinstance(running.exception(timeout=30), Cancelled)
    finally:
        engine.stop()


def test_abandoned_and_overdue_queued_requests_free_their_places_at_once(tiny_checkpoint):
    engine, running = busy_engine(tiny_checkpoint, max_queue=4)
    try:
        cancelled_before = engine.metrics.cancelled._value.get()
        abandoned = [
            engine.submit(GenerationRequest(class_label=1, num_steps=2, request_id=f"gone{i}")) for i in range(4)
        ]
        with pytest.raises(QueueFull):
            engine.submit(GenerationRequest(class_label=1, num_steps=2))
        for i in range(4):
            engine.cancel(f"gone{i}")
        assert engine.queue_depth() == 0  # at once, not when they reach the head of the queue
        assert all(isinstance(f.exception(timeout=1), Cancelled) for f in abandoned)
        assert engine.metrics.cancelled._value.get() == cancelled_before + 4
        overdue = [engine.submit(GenerationRequest(class_label=1, num_steps=2, timeout_s=0.05)) for _ in range(4)]
        time.sleep(0.1)
        fifth = engine.submit(GenerationRequest(class_label=1, num_steps=2, request_id="fifth"))  # no 429
        assert all(isinstance(f.exception(timeout=5), DeadlineExceeded) for f in overdue)
        engine.cancel("running")
        assert fifth.result(timeout=30).images.shape[0] == 1
    finally:
        engine.stop()


class RunnerOutOfMemoryForSeed13(Runner):
    def start(self, request):
        if request.seed == 13:
            raise MemoryError("no room")
        return super().start(request)


def test_an_exception_while_starting_a_request_fails_only_that_request(tiny_checkpoint):
    engine = engine_for(tiny_checkpoint, RunnerOutOfMemoryForSeed13).start()
    try:
        bad = engine.submit(GenerationRequest(class_label=1, num_steps=3, seed=13, request_id="bad"))
        good = engine.submit(GenerationRequest(class_label=1, num_steps=3, seed=14, request_id="good"))
        error = bad.exception(timeout=30)
        assert isinstance(error, StepFailed) and "bad" in str(error) and "MemoryError" in str(error)
        assert good.result(timeout=30).images.shape[0] == 1
        assert engine.ready
    finally:
        engine.stop()


class RunnerFailingOnThreeImages(Runner):
    def result(self, state, image, submitted, decode_ms):
        if image is not None and image.shape[0] == 3:
            raise ValueError("bad pixels")
        return super().result(state, image, submitted, decode_ms)


def test_an_exception_while_finishing_a_request_fails_only_that_request(tiny_checkpoint):
    engine = engine_for(tiny_checkpoint, RunnerFailingOnThreeImages).start()
    try:
        bad = engine.submit(GenerationRequest(class_label=1, num_steps=3, num_images=3, request_id="three"))
        good = engine.submit(GenerationRequest(class_label=1, num_steps=3, request_id="one"))
        error = bad.exception(timeout=30)
        assert isinstance(error, StepFailed) and "three" in str(error)
        assert good.result(timeout=30).images.shape[0] == 1
    finally:
        engine.stop()


class SchedulerThatBreaks(Scheduler):
    """Its next plan raises `failure`, once, when `armed` is set."""

    failure: BaseException = RuntimeError("bookkeeping bug")

    def __init__(self, *args):
        super().__init__(*args)
        self.armed = threading.Event()

    def plan(self, now):
        if self.armed.is_set():
            self.armed.clear()
            raise self.failure
        return super().plan(now)


def test_an_exception_elsewhere_in_an_iteration_fails_the_running_requests_and_the_engine_goes_on(tiny_checkpoint):
    engine, running = busy_engine(tiny_checkpoint, scheduler=SchedulerThatBreaks)
    engine.scheduler.armed.set()
    try:
        error = running.exception(timeout=30)
        assert isinstance(error, StepFailed) and "running" in str(error) and "bookkeeping bug" in str(error)
        assert engine.submit(GenerationRequest(class_label=1, num_steps=2)).result(timeout=30).images.shape[0] == 1
    finally:
        engine.stop()


class SchedulerThatKillsTheWorker(SchedulerThatBreaks):
    failure = SystemExit("worker killed")  # no iteration guard catches it


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the dying thread's SystemExit
def test_when_the_worker_dies_every_waiting_request_is_answered_at_once(tiny_checkpoint):
    engine, running = busy_engine(tiny_checkpoint, scheduler=SchedulerThatKillsTheWorker)
    queued = [engine.submit(GenerationRequest(class_label=1, num_steps=2)) for _ in range(3)]
    engine.scheduler.armed.set()
    try:
        started = time.monotonic()
        for future in [running, *queued]:
            assert isinstance(future.exception(timeout=5), ShuttingDown)
        assert time.monotonic() - started < 5
        wait_until(lambda: not engine.ready)
        with pytest.raises(ShuttingDown):
            engine.submit(GenerationRequest(class_label=1, num_steps=2))
    finally:
        engine.stop()


def test_nothing_is_accepted_after_the_final_sweep_of_stop(tiny_checkpoint):
    engine = engine_for(tiny_checkpoint, max_batch_rows=2, max_queue=100_000).start()
    accepted, stopped = [], threading.Event()

    def submitter():
        while not stopped.is_set():
            try:
                accepted.append(engine.submit(GenerationRequest(class_label=1, num_steps=50)))
            except ShuttingDown:
                return

    threads = [threading.Thread(target=submitter) for _ in range(2)]
    for thread in threads:
        thread.start()
    wait_until(lambda: len(accepted) > 50)
    engine.stop(drain=False)
    stopped.set()
    for thread in threads:
        thread.join(10)
    assert accepted and all(f.done() for f in accepted)  # every accepted request got an answer
    with pytest.raises(ShuttingDown):
        engine.submit(GenerationRequest(class_label=1, num_steps=2))


class ErrorCountThatWaits:
    """Stands in for the `racedit_request_errors` counter: the first answer blocks inside it until `release`,
    holding the answering thread in the window between taking a request and answering it."""

    def __init__(self):
        self.counts: dict[str, int] = {}
        self.entered, self.release = threading.Event(), threading.Event()

    def labels(self, kind: str):
        counts, entered, release = self.counts, self.entered, self.release

        class Child:
            def inc(self, amount: int = 1) -> None:
                first = not entered.is_set()
                entered.set()
                if first:
                    assert release.wait(10)
                counts[kind] = counts.get(kind, 0) + amount

        return Child()


def test_cancel_and_the_final_sweep_answer_a_queued_request_once(tiny_checkpoint):
    """cancel() takes a queued request and is held before answering it; stop()'s final sweep runs in
    that window. The request is answered once (Cancelled), and counted once."""
    metrics = EngineMetrics()
    engine, running = busy_engine(tiny_checkpoint, metrics=metrics)
    queued = engine.submit(GenerationRequest(class_label=1, num_steps=2, request_id="queued"))
    errors = metrics.request_errors = ErrorCountThatWaits()
    canceller = threading.Thread(target=engine.cancel, args=("queued",))
    canceller.start()
    assert errors.entered.wait(10)  # cancel() has taken the request and is answering it
    stopper = threading.Thread(target=engine.stop, kwargs={"drain": False})
    stopper.start()
    assert isinstance(running.exception(timeout=30), ShuttingDown)  # the sweep ran (the running one is its)
    assert not queued.done()  # the sweep left the taken request to its taker
    errors.release.set()
    canceller.join(10)
    stopper.join(30)
    assert isinstance(queued.exception(timeout=1), Cancelled)
    assert errors.counts == {"Cancelled": 1, "ShuttingDown": 1}


def test_the_jobs_of_one_request_share_its_id_all_or_none(tiny_checkpoint):
    """A KServe request's rows are jobs under its one id: a second request with that id is refused whole
    before anything of it is queued, and cancelling the id reaches only the owner's jobs."""
    engine, running = busy_engine(tiny_checkpoint, max_queue=3)
    try:
        rows = [GenerationRequest(class_label=c, num_steps=2, request_id="k") for c in (1, 2)]
        owner = engine.submit_all(rows)
        with pytest.raises(DuplicateRequest):
            engine.submit_all([GenerationRequest(class_label=3, num_steps=2, request_id="k")])
        with pytest.raises(QueueFull):  # two more rows do not fit the one place left: none is queued
            engine.submit_all([GenerationRequest(class_label=3, num_steps=2, request_id="j") for _ in range(2)])
        assert engine.queue_depth() == 2
        assert engine.cancel("k") and all(isinstance(f.exception(timeout=5), Cancelled) for f in owner)
        assert not engine.cancel("k") and not running.done()
    finally:
        engine.stop(drain=False)
