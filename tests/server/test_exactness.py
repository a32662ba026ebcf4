"""Batch invariance to the bit, over HTTP: a request's npy bytes alone equal its bytes among any mix
of concurrent requests (classes, scales, step counts, image counts, cfg-1 rows, samplers), whatever
step it joins at, in step and static batching, for several --max-batch-rows, in fp32 and bf16, on the
tiny preset and on the bundled model -- the stochastic samplers (ddpm, sde_euler) included, whose
every noise comes from the image's own generator."""

import base64
import io
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from conftest import metric

from racedit.model import DEFAULT_CHECKPOINT, generate, load


def post(server, body):
    return httpx.post(server.url + "/generate", json={**body, "output_format": "npy"}, timeout=300)


def samples(response) -> list[bytes]:
    assert response.status_code == 200, response.text
    images = response.json()["images"]
    assert all(im["mime_type"] == "application/x-npy" for im in images)
    return [base64.b64decode(im["data"]) for im in images]


def rows_of(body) -> int:
    return body.get("num_images", 1) * (1 if body.get("cfg_scale", 4.0) == 1.0 else 2)


def steps_above(server, rows: int) -> float:
    """Engine steps so far that ran more than `rows` rows (from the rows-per-step histogram)."""
    text = httpx.get(server.url + "/metrics").text
    return metric(text, "racedit_rows_per_step_count") - metric(
        text, f'racedit_rows_per_step_bucket{{le="{float(rows)}"}}'
    )


def run_among_others(server, target, others, static: bool):
    """Send `others`, then the target: in step mode once they are running (it joins mid-flight).
    Returns the target's answer and whether it finished while others were still running."""
    before = metric(httpx.get(server.url + "/metrics").text, "racedit_rows_per_step_count")
    with ThreadPoolExecutor(len(others) + 1) as pool:
        futures = [pool.submit(post, server, body) for body in others]
        if not static:
            deadline = time.time() + 30
            while metric(httpx.get(server.url + "/metrics").text, "racedit_rows_per_step_count") < before + 3:
                assert time.time() < deadline
                time.sleep(0.01)
        together = pool.submit(post, server, target).result()
        still_running = not all(f.done() for f in futures)
        answers = [f.result() for f in futures]
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers if r.status_code != 200]
    return together, still_running


MIXES = [  # long enough on the tiny model that the target starts and ends among them
    {"class_label": 0, "cfg_scale": 1.0, "num_steps": 300, "seed": 3, "num_images": 2},
    {"class_label": 2, "cfg_scale": 7.0, "num_steps": 90, "seed": 40},
    {"class_label": 5, "cfg_scale": 2.5, "num_steps": 400, "seed": 41, "num_images": 2},
    {"class_label": 8, "cfg_scale": 0.0, "num_steps": 120, "seed": 42},
]
TARGET = {"class_label": "star", "cfg_scale": 4.0, "num_steps": 8, "seed": 1234, "num_images": 2}


# On a CUDA GPU the same guarantee rests on other kernels (model/kernels.py); where none is, these say so.
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this host")


@pytest.mark.parametrize(
    "flags",
    [
        ("--max-batch-rows", "32"),
        ("--max-batch-rows", "6", "--dtype", "bfloat16"),
        ("--max-batch-rows", "64", "--batching", "static", "--static-wait-ms", "300"),
        pytest.param(("--device", "cuda", "--max-batch-rows", "32", "--dtype", "bfloat16"), marks=CUDA),
        pytest.param(("--device", "cuda", "--max-batch-rows", "6", "--dtype", "float32"), marks=CUDA),
        pytest.param(
            (
                "--device",
                "cuda",
                "--dtype",
                "bfloat16",
                "--max-batch-rows",
                "64",
                "--batching",
                "static",
                "--static-wait-ms",
                "300",
            ),
            marks=CUDA,
        ),
    ],
    ids=["step-fp32", "step-bf16-6rows", "static-fp32", "cuda-step-bf16", "cuda-step-fp32-6rows", "cuda-static-bf16"],
)
def test_tiny_npy_bytes_are_the_same_alone_and_among_others(server_factory, flags):
    server = server_factory("--device", "cpu", "--dtype", "float32", "--max-steps", "1000", *flags)
    card = httpx.get(server.url + "/v1/models").json()["data"][0]
    assert card["batch_invariant"] is True and card["dtype"] == ("bfloat16" if "bfloat16" in flags else "float32")
    alone = samples(post(server, TARGET))
    static = "static" in flags
    shared_before = steps_above(server, 8)  # every request here has at most 4 rows: > 8 means shared steps
    together, still_running = run_among_others(server, TARGET, MIXES, static)
    if static:
        assert steps_above(server, 8) > shared_before  # one static batch held the target and the others
    elif "32" in flags:
        assert still_running  # joined mid-flight and finished first: every one of its steps was shared
    assert samples(together) == alone
    sample = np.load(io.BytesIO(alone[0]), allow_pickle=False)
    assert sample.dtype == np.float32 and sample.shape == (3, 16, 16) and np.abs(sample).max() > 0.05


@pytest.mark.parametrize(
    "device, dtype", [("cpu", "float32"), ("cpu", "bfloat16"), pytest.param("cuda", "bfloat16", marks=CUDA)]
)
def test_bundled_model_npy_bytes_are_the_same_alone_among_others_and_in_the_library(server_factory, device, dtype):
    server = server_factory(
        "--device", device, "--dtype", dtype, "--max-batch-rows", "16", checkpoint=DEFAULT_CHECKPOINT
    )
    target = {"class_label": "hexagon", "cfg_scale": 4.0, "num_steps": 5, "seed": 77}
    # The others run many more steps than the target, so it surely shares steps with them under load.
    others = [
        {"class_label": 1, "cfg_scale": 1.0, "num_steps": 30, "seed": 5, "num_images": 3},
        {"class_label": 6, "cfg_scale": 3.0, "num_steps": 40, "seed": 6, "num_images": 2},
    ]
    alone = samples(post(server, target))
    together, still_running = run_among_others(server, target, others, static=False)
    assert still_running  # it ran while the longer requests were still running: they shared steps
    assert samples(together) == alone
    # The library's generate(), which batches differently, gives the same bytes.
    model = load(DEFAULT_CHECKPOINT).set_precision(getattr(torch, dtype)).to(device)
    expected, _ = generate(model, labels=[5], cfg_scale=4.0, num_steps=5, seeds=[77], as_float=True)
    assert np.load(io.BytesIO(alone[0]), allow_pickle=False).tobytes() == expected[0].cpu().numpy().tobytes()


SAMPLER_MIXES = [  # every sampler at once around the target, guided and not
    {"class_label": 0, "cfg_scale": 1.0, "num_steps": 300, "seed": 3, "num_images": 2, "sampler": "sde_euler"},
    {"class_label": 2, "cfg_scale": 7.0, "num_steps": 90, "seed": 40, "sampler": "heun"},
    {"class_label": 5, "cfg_scale": 2.5, "num_steps": 400, "seed": 41, "num_images": 2, "sampler": "ddpm"},
    {"class_label": 8, "cfg_scale": 0.0, "num_steps": 120, "seed": 42, "sampler": "dpmpp_2m"},
]


def test_stochastic_samplers_npy_bytes_are_the_same_alone_and_among_others(server_factory, tiny_checkpoint):
    """ddpm and sde_euler draw a fresh noise per step: from the image's generator, so a request's bytes are
    still its own -- alone, among other samplers mid-flight, and in the library's generate()."""
    server = server_factory("--device", "cpu", "--dtype", "float32", "--max-steps", "1000", "--max-batch-rows", "32")
    model = load(tiny_checkpoint)
    for sampler in ("ddpm", "sde_euler"):
        target = {**TARGET, "sampler": sampler}
        alone = samples(post(server, target))
        together, still_running = run_among_others(server, target, SAMPLER_MIXES, static=False)
        assert still_running and samples(together) == alone, sampler
        expected, _ = generate(
            model, [6, 6], cfg_scale=4.0, num_steps=8, seeds=[1234, 1235], sampler=sampler, as_float=True
        )
        assert [e.numpy().tobytes() for e in expected] == [
            np.load(io.BytesIO(a), allow_pickle=False).tobytes() for a in alone
        ], sampler


def test_the_device_path_serves_over_http_on_a_cpu(server_factory, tiny_checkpoint):
    """`racedit serve` under RACEDIT_TRITON_ON_CPU=1: the engine's steps on the device path (its Triton
    programs in the interpreter), a request among another that shares its steps, against the library's
    torch path; the model card names the worst-case MoE buffers the device path allocates."""
    server = server_factory("--device", "cpu", "--dtype", "float32", env={"RACEDIT_TRITON_ON_CPU": "1"})
    card = httpx.get(server.url + "/v1/models").json()["data"][0]
    assert card["cuda_graphs"]["moe_buffer_bytes"] > 0 and not card["cuda_graphs"]["enabled"]
    target = {"class_label": "star", "cfg_scale": 4.0, "num_steps": 3, "seed": 1234, "num_images": 2}
    other = {"class_label": 2, "cfg_scale": 1.0, "num_steps": 12, "seed": 5}
    together, still_running = run_among_others(server, target, [other], static=False)
    assert still_running
    served = [np.load(io.BytesIO(s), allow_pickle=False) for s in samples(together)]
    expected, usage = generate(load(tiny_checkpoint), [6, 6], 4.0, 3, seeds=[1234, 1235], as_float=True)
    assert max(np.abs(s - e.numpy()).max() for s, e in zip(served, expected)) < 1e-4
    # Its own arithmetic (activations before rounding, its own LayerNorm), so not the torch path's bytes:
    # the server did run the kernels.
    assert all(s.tobytes() != e.numpy().tobytes() for s, e in zip(served, expected))
    answered = together.json()["expert_usage"]["mean_experts_per_token"]
    assert abs(answered - np.mean([u.mean_experts_per_token for u in usage])) < 0.05
