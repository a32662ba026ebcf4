"""The engine in-process: row cap, admission order, static mode (no HTTP)."""
import threading
import time

import numpy as np
import pytest
import torch

from racedit.model import generate, load
from racedit.server.engine import (Cancelled, DeadlineExceeded, DuplicateRequest, Engine, GenerationRequest,
                                   QueueFull, ShuttingDown, StepFailed)


def traced(engine: Engine) -> list[list[str]]:
    """Record which requests each engine step ran."""
    steps: list[list[str]] = []
    original = engine._step

    def step(jobs):
        steps.append([job.request.request_id for job in jobs])
        return original(jobs)

    engine._step = step
    return steps


def requests() -> list[GenerationRequest]:
    return [GenerationRequest(class_label=i, cfg_scale=2.0 + i, num_steps=3 + i % 3, seed=10 * i, request_id=f"r{i}")
            for i in range(5)]


@pytest.mark.parametrize("mode", ["step", "static"])
def test_row_cap_first_come_first_served_and_same_pixels(tiny_checkpoint, mode):
    engine = Engine(load(tiny_checkpoint), torch.device("cpu"), max_batch_rows=4, mode=mode, static_wait_ms=200)
    steps = traced(engine)
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
        expected, _ = generate(model, labels=[request.class_label], cfg_scale=request.cfg_scale,
                               num_steps=request.num_steps, seeds=[request.seed])
        assert np.array_equal(result.images, expected.permute(0, 2, 3, 1).numpy())


def test_new_requests_join_a_running_batch_at_the_next_step(tiny_checkpoint):
    engine = Engine(load(tiny_checkpoint), torch.device("cpu"), max_batch_rows=64)
    steps = traced(engine)
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
    engine = Engine(load(checkpoint), torch.device("cpu"), max_batch_rows=2, **kw).start()
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
        abandoned = [engine.submit(GenerationRequest(class_label=1, num_steps=2, request_id=f"gone{i}")) for i in range(4)]
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


def test_an_exception_while_starting_a_request_fails_only_that_request(tiny_checkpoint, monkeypatch):
    import racedit.server.engine as engine_module

    real = engine_module.initial_noise
    monkeypatch.setattr(engine_module, "initial_noise",
                        lambda seed, shape: (_ for _ in ()).throw(MemoryError("no room")) if seed == 13 else real(seed, shape))
    engine = Engine(load(tiny_checkpoint), torch.device("cpu")).start()
    try:
        bad = engine.submit(GenerationRequest(class_label=1, num_steps=3, seed=13, request_id="bad"))
        good = engine.submit(GenerationRequest(class_label=1, num_steps=3, seed=14, request_id="good"))
        error = bad.exception(timeout=30)
        assert isinstance(error, StepFailed) and "bad" in str(error) and "MemoryError" in str(error)
        assert good.result(timeout=30).images.shape[0] == 1
        assert engine.ready
    finally:
        engine.stop()


def test_an_exception_while_finishing_a_request_fails_only_that_request(tiny_checkpoint, monkeypatch):
    import racedit.server.engine as engine_module

    real = engine_module.to_uint8
    monkeypatch.setattr(engine_module, "to_uint8",
                        lambda x: (_ for _ in ()).throw(ValueError("bad pixels")) if x.shape[0] == 3 else real(x))
    engine = Engine(load(tiny_checkpoint), torch.device("cpu")).start()
    try:
        bad = engine.submit(GenerationRequest(class_label=1, num_steps=3, num_images=3, request_id="three"))
        good = engine.submit(GenerationRequest(class_label=1, num_steps=3, request_id="one"))
        error = bad.exception(timeout=30)
        assert isinstance(error, StepFailed) and "three" in str(error)
        assert good.result(timeout=30).images.shape[0] == 1
    finally:
        engine.stop()


def test_an_exception_elsewhere_in_an_iteration_fails_the_running_requests_and_the_engine_goes_on(tiny_checkpoint):
    engine, running = busy_engine(tiny_checkpoint)
    real, calls = engine._sweep, []

    def sweep_once_broken():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("bookkeeping bug")
        real()

    engine._sweep = sweep_once_broken
    try:
        error = running.exception(timeout=30)
        assert isinstance(error, StepFailed) and "running" in str(error) and "bookkeeping bug" in str(error)
        assert engine.submit(GenerationRequest(class_label=1, num_steps=2)).result(timeout=30).images.shape[0] == 1
    finally:
        engine.stop()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the dying thread's SystemExit
def test_when_the_worker_dies_every_waiting_request_is_answered_at_once(tiny_checkpoint):
    engine, running = busy_engine(tiny_checkpoint)
    queued = [engine.submit(GenerationRequest(class_label=1, num_steps=2)) for _ in range(3)]

    def die():
        raise SystemExit("worker killed")  # no iteration guard catches it

    engine._iteration = die
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
    engine = Engine(load(tiny_checkpoint), torch.device("cpu"), max_batch_rows=2, max_queue=100_000).start()
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


def test_cancel_and_the_final_sweep_answer_a_queued_job_once(tiny_checkpoint):
    """cancel() has taken a queued job out of the queue and is about to answer it when stop()'s final sweep
    answers it: the job is answered and counted once. The interleaving is forced with events around this
    engine's `_fail` (wrapped on the instance by the test), not with sleeps."""
    engine, running = busy_engine(tiny_checkpoint)
    queued = engine.submit(GenerationRequest(class_label=1, num_steps=2, request_id="queued"))
    errors = engine.metrics.request_errors
    before = {kind: errors.labels(kind=kind)._value.get() for kind in ("ShuttingDown", "Cancelled")}
    taken, swept = threading.Event(), threading.Event()
    real_fail = engine._fail

    def fail(job, error):
        if threading.current_thread().name == "canceller" and not taken.is_set():
            taken.set()  # cancel() holds the job, out of the queue, not yet answered ...
            assert swept.wait(timeout=30)  # ... until the final sweep has run
        real_fail(job, error)

    engine._fail = fail
    canceller = threading.Thread(target=engine.cancel, args=("queued",), name="canceller")
    canceller.start()
    try:
        assert taken.wait(timeout=30)
        engine.stop(drain=False)
    finally:
        swept.set()
        canceller.join(timeout=30)
    assert not canceller.is_alive()
    assert isinstance(queued.exception(timeout=5), ShuttingDown)
    assert isinstance(running.exception(timeout=5), ShuttingDown)
    after = {kind: errors.labels(kind=kind)._value.get() for kind in before}
    assert after == {"ShuttingDown": before["ShuttingDown"] + 2, "Cancelled": before["Cancelled"]}
    assert engine.metrics.cancelled._value.get() == 0


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
