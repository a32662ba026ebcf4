"""The engine in-process: row cap, admission order, static mode (no HTTP)."""
import time

import numpy as np
import pytest
import torch

from racedit.model import generate, load
from racedit.server.engine import Engine, GenerationRequest


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


def test_a_request_held_for_room_counts_against_the_queue(tiny_checkpoint):
    from racedit.server.engine import QueueFull

    engine = Engine(load(tiny_checkpoint), torch.device("cpu"), max_batch_rows=2, max_queue=1).start()
    try:
        running = engine.submit(GenerationRequest(class_label=0, num_steps=1000, request_id="running"))
        deadline = time.monotonic() + 10
        while engine.active_rows() < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        waiting = engine.submit(GenerationRequest(class_label=1, num_steps=2, request_id="waiting"))
        while engine._held is None and time.monotonic() < deadline:  # the worker took it, found no room
            time.sleep(0.005)
        assert engine.queue_depth() == 1
        with pytest.raises(QueueFull):
            engine.submit(GenerationRequest(class_label=2, num_steps=2))
        engine.cancel("running")
        assert waiting.result(timeout=30).images.shape[0] == 1
        assert running.exception(timeout=30) is not None
    finally:
        engine.stop()
