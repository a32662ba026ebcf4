"""The Python SDK and CLI against real server processes."""

import asyncio
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from conftest import metric
from PIL import Image

import racedit_client
from racedit_client import AsyncClient, Client
from racedit_client.models import WIRE_MODELS, GenerateRequest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server(server_factory):
    return server_factory("--max-steps", "100000", "--max-batch-rows", "16")


def test_sync_generate_models_health(server):
    with Client(server.url) as client:
        result = client.generate("star", cfg_scale=3.0, num_steps=5, seed=7, num_images=2)
        assert [im.size for im in result.images] == [(16, 16), (16, 16)] and result.seeds == [7, 8]
        assert result.expert_usage.num_experts == 4 and len(result.expert_usage.per_step) == 5
        assert 0 < result.expert_usage.compute_ratio and result.timing.total_ms > 0
        assert result.request.model_dump() == {
            "class_label": 6,
            "class_name": "star",
            "cfg_scale": 3.0,
            "num_steps": 5,
            "num_images": 2,
            "seed": 7,
            "expert_budget": 1.0,
            "sampler": "euler",
            "output_format": "png",
        }
        drawn = client.generate(1, num_steps=2)  # defaults and the random seed are echoed
        assert drawn.request.class_name == "square" and drawn.request.cfg_scale == 4.0
        assert drawn.request.seed == drawn.seeds[0]
        assert client.models().data[0].id == "racedit-tiny"
        assert client.health().status == "ok" and client.ready()


def test_async_generate_four_concurrent(server):
    async def run():
        async with AsyncClient(server.url) as client:
            results = await asyncio.gather(*(client.generate(c, num_steps=4, seed=c) for c in range(4)))
            assert (await client.health()).status == "ok" and await client.ready()
            assert (await client.models()).data[0].classes[0] == "circle"
            return results

    results = asyncio.run(run())
    assert [r.seeds for r in results] == [[0], [1], [2], [3]]
    with Client(server.url) as client:  # same pixels as the sync client
        assert client.generate(2, num_steps=4, seed=2).images[0].tobytes() == results[2].images[0].tobytes()


def test_typed_validation_errors_are_not_retried(server):
    with Client(server.url, max_retries=3) as client:
        start = time.monotonic()
        with pytest.raises(racedit_client.ValidationError) as info:
            client.generate("blob", num_steps=0)
        assert time.monotonic() - start < 2
    err = info.value
    assert err.status == 422 and err.request_id and "class_label" in err.message and "num_steps" in err.message


def test_connection_errors_retry_then_fail():
    with Client("http://127.0.0.1:9", max_retries=2, backoff=0.01) as client:
        with pytest.raises(racedit_client.ConnectionFailed):
            client.health()


def test_retries_on_429_honour_retry_after(server_factory):
    # Two blockers that never finish on their own: the first runs, the second is held for room,
    # so the queue (max 1) is full until the 12 s request deadline ends both with a 504 (long enough
    # that a loaded CI host fills the queue well before it: 5 s was once too short).
    tight = server_factory(
        "--max-queue", "1", "--max-batch-rows", "2", "--max-steps", "100000", "--request-timeout-s", "12"
    )
    slow = {"class_label": 1, "num_steps": 100000}
    with ThreadPoolExecutor(2) as pool:
        blockers = [pool.submit(httpx.post, tight.url + "/generate", json=slow, timeout=60) for _ in range(2)]
        deadline = time.monotonic() + 10
        while True:
            text = httpx.get(tight.url + "/metrics").text
            if (metric(text, "racedit_queue_depth"), metric(text, "racedit_active_rows")) == (1, 2):
                break
            assert time.monotonic() < deadline, "the blockers did not fill the queue"
            time.sleep(0.02)
        # Without retries the full queue is an immediate, typed Overloaded error ...
        with Client(tight.url, max_retries=0) as impatient:
            with pytest.raises(racedit_client.Overloaded) as info:
                impatient.generate(1, num_steps=2)
        assert info.value.status == 429 and info.value.retry_after == 1.0
        # ... with retries the same call waits (Retry-After: 1 s) and then succeeds.
        with Client(tight.url, max_retries=20, max_retry_seconds=60) as patient:
            start = time.monotonic()
            result = patient.generate(1, num_steps=2)
            waited = time.monotonic() - start
        assert result.images and waited >= 1.0
        assert [f.result().status_code for f in blockers] == [504, 504]


def test_the_served_schema_is_the_sdk_models_plus_the_servers_limits(server):
    """One definition of the wire format: the served OpenAPI components are the SDK's models, whole
    (types, defaults, descriptions, limits), with only the ranges that are runtime settings (and the
    served model's samplers) added."""
    served = httpx.get(server.url + "/openapi.json").json()["components"]["schemas"]
    limits = {
        "cfg_scale": (0.0, 20.0),
        "num_steps": (1, 100_000),
        "num_images": (1, 8),  # the fixture's settings
        "expert_budget": (1.0, 1.0),
    }  # the tiny checkpoint has no budget table
    for model in WIRE_MODELS:
        mine = model.model_json_schema(ref_template="#/components/schemas/{model}")
        mine.pop("$defs", None)
        theirs = served[model.__name__]
        for schema in (mine, theirs):
            for prop in schema.get("properties", {}).values():
                if "default" in prop and prop["default"] is None:
                    del prop["default"]  # FastAPI's OpenAPI leaves out null defaults
        if issubclass(model, GenerateRequest):  # and the stream's request
            for name, (low, high) in limits.items():
                mine["properties"][name].update(minimum=low, maximum=high)
            served_samplers = ["euler", "heun", "ddim", "ddpm", "dpmpp_2m", "sde_euler"]  # the served model's
            mine["properties"]["sampler"]["anyOf"][0]["enum"] = served_samplers
        assert theirs == mine, model.__name__


def test_cli_writes_decodable_pngs(server, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "racedit_client.cli",
            "--url",
            server.url,
            "generate",
            "--class",
            "Star",
            "--cfg",
            "4",
            "--steps",
            "5",
            "--seed",
            "1",
            "-n",
            "3",
            "-o",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    files = sorted(tmp_path.glob("*.png"))
    assert [f.name for f in files] == ["star-1.png", "star-2.png", "star-3.png"]  # the class's own name
    for f in files:
        with Image.open(f) as im:
            assert im.format == "PNG" and im.size == (16, 16)
    assert "3 image(s)" in result.stdout and "experts per token" in result.stdout and "per layer" in result.stdout
    arrays = subprocess.run(
        [
            sys.executable,
            "-m",
            "racedit_client.cli",
            "--url",
            server.url,
            "generate",
            "--class",
            "6",
            "--steps",
            "2",
            "--seed",
            "5",
            "-n",
            "2",
            "--format",
            "npy",
            "-o",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert arrays.returncode == 0, arrays.stderr
    assert "2 array(s)" in arrays.stdout
    assert sorted(f.name for f in tmp_path.glob("*.npy")) == ["star-5.npy", "star-6.npy"]
    models = subprocess.run(
        [sys.executable, "-m", "racedit_client.cli", "--url", server.url, "models"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert models.returncode == 0 and "racedit-tiny" in models.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "racedit_client.cli", "--url", server.url, "generate", "--class", "blob"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 1 and "unknown class 'blob'" in bad.stderr


def test_triton_example(server, tmp_path):
    out = tmp_path / "t.png"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "clients" / "triton_example.py"),
            "--url",
            f"127.0.0.1:{server.port}",
            "--model",
            "racedit-tiny",
            "--class",
            "6",
            "--steps",
            "5",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    with Image.open(out) as im:
        assert im.size == (16, 16)
    assert "mean experts per token" in result.stdout


def test_cli_piped_into_a_reader_that_leaves_says_nothing(server):
    """`racedit-client models | head -0`: no BrokenPipeError traceback."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "racedit_client.cli", "--url", server.url, "models"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()  # the reader is gone before the first line is written
    _, stderr = proc.communicate(timeout=60)
    assert b"Traceback" not in stderr and b"BrokenPipe" not in stderr, stderr.decode()[-1000:]


def test_cli_help_shows_defaults():
    result = subprocess.run(
        [sys.executable, "-m", "racedit_client.cli", "generate", "--help"], capture_output=True, text=True, timeout=60
    )
    assert "(default: None)" in result.stdout and "the model's own (25, DiT's 250)" in result.stdout
    assert "(default: png)" in result.stdout
