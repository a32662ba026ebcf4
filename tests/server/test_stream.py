"""POST /generate/stream over a real uvicorn process: events, errors, disconnects, the SDK and the CLI."""

import asyncio
import base64
import io
import json
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from conftest import metric
from PIL import Image

from racedit_client import AsyncClient, Client, GenerateResult, Preview, ProgressEvent
from racedit_client.errors import Overloaded, ServerError, ValidationError


@pytest.fixture(scope="module")
def server(server_factory):
    return server_factory("--max-steps", "4000", "--max-batch-rows", "32", faults={"FAULT_LABEL": 9})


def events_of(response: httpx.Response) -> list[tuple[str, dict]]:
    """(event, data) pairs of a text/event-stream body."""
    out = []
    for block in response.text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        out.append((lines["event"], json.loads(lines["data"])))
    return out


def test_the_result_event_is_the_generate_answer(server):
    body = {"class_label": "star", "cfg_scale": 3.0, "num_steps": 7, "seed": 21, "num_images": 2}
    for fmt in ("png", "npy"):
        plain = httpx.post(server.url + "/generate", json={**body, "output_format": fmt}, timeout=60).json()
        streamed = httpx.post(
            server.url + "/generate/stream", timeout=60, json={**body, "output_format": fmt, "preview_every": 3}
        )
        assert streamed.status_code == 200 and streamed.headers["content-type"].startswith("text/event-stream")
        events = events_of(streamed)
        names = [name for name, _ in events]
        assert names == ["progress"] * 3 + ["preview"] + ["progress"] * 3 + ["preview", "progress", "preview", "result"]
        progress = [data for name, data in events if name == "progress"]
        assert [p["step"] for p in progress] == list(range(1, 8)) and progress[0]["t"] == 1.0
        assert all(a["t"] > b["t"] for a, b in zip(progress, progress[1:]))
        result = events[-1][1]
        assert [i["data"] for i in result["images"]] == [i["data"] for i in plain["images"]]  # the same bytes
        assert result["expert_usage"] == plain["expert_usage"] and result["request"] == plain["request"]
        assert progress[-1]["mean_experts_per_token"] == pytest.approx(result["expert_usage"]["mean_experts_per_token"])
    previews = [data for name, data in events if name == "preview"]
    assert [p["step"] for p in previews] == [3, 6, 7]  # every 3 steps, and the last
    with Image.open(io.BytesIO(base64.b64decode(previews[-1]["images"][0]["data"]))) as image:
        assert image.format == "PNG" and image.size == (16, 16)
        assert np.asarray(image).std() > 0


def test_errors_before_the_stream_are_plain_answers(server, server_factory):
    r = httpx.post(server.url + "/generate/stream", json={"class_label": "blob", "num_steps": 0})
    assert r.status_code == 422 and {d["loc"][-1] for d in r.json()["detail"]} == {"class_label", "num_steps"}
    r = httpx.post(server.url + "/generate/stream", json={"class_label": 1, "preview_every": -1})
    assert r.status_code == 422 and "preview_every" in r.text
    tight = server_factory(
        "--max-queue", "1", "--max-batch-rows", "2", "--max-steps", "100000", env={"RACEDIT_API_KEY": "k"}
    )
    assert httpx.post(tight.url + "/generate/stream", json={"class_label": 1}).status_code == 401
    key = {"Authorization": "Bearer k"}
    long = {"class_label": 1, "num_steps": 3000}
    with httpx.Client(headers=key, timeout=60) as http:
        with http.stream("POST", tight.url + "/generate/stream", json=long) as first:
            lines = first.iter_lines()  # kept: a collected line iterator closes the connection
            next(lines)  # admitted and running: it holds the batch's two rows
            with http.stream("POST", tight.url + "/generate/stream", json=long) as second:
                assert second.status_code == 200  # accepted into the one-place queue: the stream has begun
                refused = http.post(tight.url + "/generate/stream", json={"class_label": 1})
                assert refused.status_code == 429 and refused.headers["retry-after"]
                with Client(tight.url, api_key="k", max_retries=0) as client, pytest.raises(Overloaded):
                    list(client.stream(1, num_steps=3))  # the SDK raises as generate() does


def test_an_error_after_the_start_is_an_error_event(server):
    """Class 9's steps fail in this server (tests/faulty_serve.py): the stream has begun (200), so the
    500 /generate would answer comes as the stream's one `error` event."""
    r = httpx.post(server.url + "/generate/stream", json={"class_label": 9, "num_steps": 6}, timeout=60)
    events = events_of(r)
    assert r.status_code == 200 and [name for name, _ in events] == ["error"]
    assert events[-1][1]["status"] == 500 and "denoising step failed" in events[-1][1]["detail"]
    assert events[-1][1]["request_id"] == r.headers["x-request-id"]
    with Client(server.url) as client, pytest.raises(ServerError, match="denoising step failed"):
        list(client.stream(9, num_steps=6))


def test_a_client_that_leaves_mid_stream_has_its_rows_dropped(server):
    before = metric(httpx.get(server.url + "/metrics").text, "racedit_cancelled_requests_total")
    with httpx.stream(
        "POST", server.url + "/generate/stream", json={"class_label": 2, "num_steps": 3000}, timeout=60
    ) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("event: progress")
    deadline = time.time() + 20
    while time.time() < deadline:
        text = httpx.get(server.url + "/metrics").text
        if metric(text, "racedit_cancelled_requests_total") == before + 1 and metric(text, "racedit_active_rows") == 0:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the abandoned stream's rows were not dropped")


def test_sdk_streams_typed_events_sync_and_async(server):
    with Client(server.url) as client:
        events = list(client.stream("ring", num_steps=5, seed=4, preview_every=5, output_format="npy"))
        alone = client.generate("ring", num_steps=5, seed=4, output_format="npy")
        with pytest.raises(ValidationError, match="class_label"):
            list(client.stream("blob"))
    assert [type(e) for e in events] == [ProgressEvent] * 5 + [Preview, GenerateResult]
    assert events[5].images[0].size == (16, 16)
    assert events[-1].arrays[0].tobytes() == alone.arrays[0].tobytes()

    async def run():
        async with AsyncClient(server.url) as client:
            return [event async for event in client.stream("ring", num_steps=5, seed=4, output_format="npy")]

    async_events = asyncio.run(run())
    assert [type(e) for e in async_events] == [ProgressEvent] * 5 + [GenerateResult]
    assert async_events[-1].arrays[0].tobytes() == alone.arrays[0].tobytes()


def test_cli_stream_draws_a_bar_and_writes_the_images(server, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "racedit_client.cli",
            "--url",
            server.url,
            "generate",
            "--class",
            "star",
            "--steps",
            "5",
            "--seed",
            "3",
            "-n",
            "2",
            "--stream",
            "-o",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "5/5" in result.stderr and "[" in result.stderr
    assert sorted(f.name for f in tmp_path.glob("*.png")) == ["star-3.png", "star-4.png"]
