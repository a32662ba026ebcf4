"""The HTTP service, against real `racedit serve` processes on loopback."""

import base64
import io
import json
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from conftest import metric
from PIL import Image

from racedit.model import generate, load
from racedit.server.cli import settings_from_args


def decode(image: dict) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(image["data"]))) as im:
        assert im.format == {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP"}[image["mime_type"]]
        return np.asarray(im.convert("RGB"))


@pytest.fixture(scope="module")
def server(server_factory):
    return server_factory("--max-steps", "4000", "--max-batch-rows", "32", faults={"FAULT_LABEL": 9})


def post(server, body, **kw):
    return httpx.post(server.url + "/generate", json=body, timeout=60, **kw)


def test_generate_png_matches_the_library(server, tiny_checkpoint):
    r = post(server, {"class_label": "star", "cfg_scale": 3.0, "num_steps": 6, "seed": 11, "num_images": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["seed"] == 11 and [im["seed"] for im in body["images"]] == [11, 12]
    assert body["model"] == "racedit-tiny" and r.headers["x-request-id"] == body["id"]
    pixels = np.stack([decode(im) for im in body["images"]])
    assert pixels.shape == (2, 16, 16, 3)
    expected, usage = generate(load(tiny_checkpoint), labels=[6, 6], cfg_scale=3.0, num_steps=6, seeds=[11, 12])
    assert np.array_equal(pixels, expected.permute(0, 2, 3, 1).numpy())
    u = body["expert_usage"]
    assert u["num_moe_layers"] == 2 and u["num_experts"] == 4 and u["nominal_k"] == 2
    assert len(u["per_step"]) == 6 and len(u["token_map"]) == 4
    assert u["activated_pairs"] == sum(sum(layer["expert_load"]) for layer in u["per_layer"])
    assert u["nominal_pairs"] == 2 * 2 * 6 * 16 * 2 * 2  # 2 images x 2 rows x 6 steps x 16 tokens x k 2 x 2 layers
    assert u["activated_pairs"] == sum(x.activated_pairs for x in usage)
    assert (
        set(body["timing"]) == {"queue_ms", "inference_ms", "total_ms", "decode_ms"}
        and body["timing"]["decode_ms"] == 0
    )


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_other_formats_decode(server, fmt):
    r = post(server, {"class_label": 1, "num_steps": 3, "seed": 1, "output_format": fmt})
    assert r.status_code == 200
    assert decode(r.json()["images"][0]).shape == (16, 16, 3)


def test_same_pixels_alone_and_among_concurrent_requests(server):
    target = {"class_label": 4, "cfg_scale": 4.0, "num_steps": 20, "seed": 99}
    alone = post(server, target).json()["images"][0]
    others = [
        {"class_label": c, "cfg_scale": s, "num_steps": n, "seed": 1000 + c, "num_images": m}
        for c, s, n, m in [
            (0, 1.0, 300, 1),
            (1, 2.5, 100, 2),
            (2, 7.0, 250, 1),
            (3, 1.0, 400, 3),
            (5, 4.0, 150, 1),
            (6, 0.0, 350, 2),
            (7, 12.0, 200, 1),
            (8, 3.0, 500, 1),
        ]
    ]
    with ThreadPoolExecutor(9) as pool:
        steps_before = metric(httpx.get(server.url + "/metrics").text, "racedit_rows_per_step_count")
        futures = [pool.submit(post, server, body) for body in others[:4]]
        while metric(httpx.get(server.url + "/metrics").text, "racedit_rows_per_step_count") < steps_before + 3:
            time.sleep(0.005)  # the target joins while the others are mid-flight
        mine = pool.submit(post, server, target)
        futures += [pool.submit(post, server, body) for body in others[4:]]
        together = mine.result()
        overlapped = not all(f.done() for f in futures[:4])
        responses = [f.result() for f in futures]
    assert overlapped  # it joined after the first four started and finished before all of them: it shared steps
    assert all(r.status_code == 200 for r in responses)
    assert together.status_code == 200
    assert np.array_equal(decode(together.json()["images"][0]), decode(alone))
    # Routing is per token: the request's expert usage is exactly what it gets alone.
    assert together.json()["expert_usage"] == post(server, target).json()["expert_usage"]


@pytest.mark.parametrize(
    "body, field",
    [
        ({"class_label": 10}, "class_label"),
        ({"class_label": -1}, "class_label"),
        ({"class_label": "blob"}, "class_label"),
        ({"class_label": 1, "num_steps": 0}, "num_steps"),
        ({"class_label": 1, "num_steps": 4001}, "num_steps"),
        ({"class_label": 1, "cfg_scale": 20.5}, "cfg_scale"),
        ({"class_label": 1, "cfg_scale": -1}, "cfg_scale"),
        ({"class_label": 1, "num_images": 9}, "num_images"),
        ({"class_label": 1, "num_images": 0}, "num_images"),
        ({"class_label": 1, "seed": -5}, "seed"),
        ({"class_label": 1, "output_format": "gif"}, "output_format"),
        ({"class_label": 1, "num_steps": "many"}, "num_steps"),
        ({"cfg_scale": 2.0}, "class_label"),
        ({"class_label": 1, "colour": "red"}, "colour"),
        # Booleans are not numbers, and neither floats nor strings are integers.
        ({"class_label": True}, "class_label"),
        ({"class_label": 6.0}, "class_label"),
        ({"class_label": "5"}, "class_label"),
        ({"class_label": 1, "seed": False}, "seed"),
        ({"class_label": 1, "num_steps": 5.0}, "num_steps"),
        ({"class_label": 1, "num_images": True}, "num_images"),
        ({"class_label": 1, "cfg_scale": True}, "cfg_scale"),
    ],
)
def test_bad_inputs_get_422_naming_the_field(server, body, field):
    r = post(server, body)
    assert r.status_code == 422, r.text
    assert field in json.dumps(r.json()["detail"])


def test_non_finite_cfg_and_malformed_json(server):
    r = httpx.post(
        server.url + "/generate",
        content=b'{"class_label": 1, "cfg_scale": NaN}',
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 422 and "cfg_scale" in r.text and "finite" in r.text
    r = httpx.post(
        server.url + "/generate", content=b'{"class_label": 1,', headers={"content-type": "application/json"}
    )
    assert r.status_code == 422 and "json" in r.text.lower()


def test_every_bad_field_is_listed(server):
    r = post(server, {"class_label": 99, "num_steps": 0, "cfg_scale": 50})
    assert r.status_code == 422
    fields = {d["loc"][-1] for d in r.json()["detail"]}
    assert fields == {"class_label", "num_steps", "cfg_scale"}
    # A type error in one field does not hide the range errors of the others.
    r = post(server, {"class_label": 1, "seed": "x", "num_steps": 0, "num_images": 99})
    assert {d["loc"][-1] for d in r.json()["detail"]} == {"seed", "num_steps", "num_images"}


def test_body_too_large(server):
    r = httpx.post(
        server.url + "/generate", content=b"{" + b" " * 70000 + b"}", headers={"content-type": "application/json"}
    )
    assert r.status_code == 413


def test_a_request_names_its_sampler_and_gets_the_library_s_bytes(server, tiny_checkpoint):
    card = httpx.get(server.url + "/v1/models").json()["data"][0]
    assert card["samplers"] == ["euler", "heun", "ddim", "ddpm", "dpmpp_2m", "sde_euler"]
    assert (card["default_sampler"], card["default_num_steps"], card["default_cfg_scale"]) == ("euler", 25, 4.0)
    assert card["family"] == "racedit"
    model = load(tiny_checkpoint)
    for sampler in ("heun", "ddpm", "sde_euler", None):
        body = {"class_label": 3, "cfg_scale": 2.5, "num_steps": 4, "seed": 21, "output_format": "npy"}
        r = post(server, {**body, "sampler": sampler} if sampler else body)
        assert r.status_code == 200, r.text
        assert r.json()["request"]["sampler"] == (sampler or "euler")
        want, _ = generate(
            model, [3], cfg_scale=2.5, num_steps=4, seeds=[21], sampler=sampler or "euler", as_float=True
        )
        got = np.load(io.BytesIO(base64.b64decode(r.json()["images"][0]["data"])), allow_pickle=False)
        assert got.tobytes() == want[0].numpy().tobytes(), sampler
    r = post(server, {"class_label": 3, "sampler": "lms"})
    assert r.status_code == 422 and "sampler" in r.text and "'dpmpp_2m' or 'sde_euler'" in r.text


def test_models_and_health(server):
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
    assert httpx.get(server.url + "/readyz").status_code == 200
    card = httpx.get(server.url + "/v1/models").json()["data"][0]
    assert card["id"] == "racedit-tiny" and card["classes"][6] == "star" and card["image_size"] == 16
    assert card["routing"]["routing"] == "expert_race" and len(card["thresholds"]) == 2
    assert card["parameters_total"] > card["parameters_activated"] > 0
    graphs = card["cuda_graphs"]  # on by default: on CUDA one captured graph per row bucket up to 32 rows
    if torch.cuda.is_available():
        assert graphs["enabled"] and graphs["buckets"] == graphs["captured"] == [8, 16, 32], graphs
        assert graphs["memory_bytes"] > 0 and graphs["moe_buffer_bytes"] > 0
    else:
        assert graphs == {
            "enabled": False,
            "reason": "no CUDA device (serving on cpu)",
            "buckets": [],
            "captured": [],
            "memory_bytes": 0,
            "moe_buffer_bytes": 0,  # the CPU path sizes its buffers by the pairs selected
        }


def test_cuda_graphs_are_a_flag_and_a_variable(monkeypatch):
    assert settings_from_args([]).cuda_graphs is True
    assert settings_from_args(["--no-cuda-graphs"]).cuda_graphs is False
    monkeypatch.setenv("RACEDIT_CUDA_GRAPHS", "false")
    assert settings_from_args([]).cuda_graphs is False
    assert settings_from_args(["--cuda-graphs"]).cuda_graphs is True  # flags win


def test_injected_step_failure_fails_only_its_request(server):
    with ThreadPoolExecutor(2) as pool:
        bad = pool.submit(post, server, {"class_label": 9, "num_steps": 50, "seed": 1})
        good = pool.submit(post, server, {"class_label": 2, "num_steps": 50, "seed": 1})
        bad, good = bad.result(), good.result()
    assert bad.status_code == 500
    assert bad.json()["request_id"] == bad.headers["x-request-id"] and "injected fault" in bad.json()["detail"]
    assert bad.headers["x-request-id"] in bad.json()["detail"]  # the engine names the request that failed
    assert good.status_code == 200
    assert post(server, {"class_label": 2, "num_steps": 3}).status_code == 200


def test_disconnect_frees_rows(server):
    before = metric(httpx.get(server.url + "/metrics").text, "racedit_cancelled_requests_total")
    body = json.dumps({"class_label": 3, "num_steps": 4000, "seed": 5}).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(
        b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    deadline = time.time() + 10
    while metric(httpx.get(server.url + "/metrics").text, "racedit_active_rows") == 0 and time.time() < deadline:
        time.sleep(0.02)
    assert metric(httpx.get(server.url + "/metrics").text, "racedit_active_rows") == 2
    sock.close()
    deadline = time.time() + 5
    while time.time() < deadline:
        text = httpx.get(server.url + "/metrics").text
        if metric(text, "racedit_active_rows") == 0:
            break
        time.sleep(0.02)
    assert metric(text, "racedit_active_rows") == 0
    assert metric(text, "racedit_cancelled_requests_total") == before + 1


def raw_post(port: int, body: dict) -> socket.socket:
    """A request on a raw socket, so the test can go away without reading the answer."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(
        b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    return sock


def wait_for_metric(server, name: str, value: float, timeout: float = 10) -> None:
    deadline = time.time() + timeout
    while metric(httpx.get(server.url + "/metrics").text, name) != value:
        assert time.time() < deadline, f"{name} never reached {value}"
        time.sleep(0.02)


def test_abandoned_queued_requests_free_their_queue_places(server_factory):
    server = server_factory("--max-queue", "4", "--max-batch-rows", "2", "--max-steps", "100000")
    running = raw_post(server.port, {"class_label": 1, "num_steps": 100000, "seed": 1})
    wait_for_metric(server, "racedit_active_rows", 2)
    abandoned = [raw_post(server.port, {"class_label": 2, "num_steps": 2, "seed": i}) for i in range(4)]
    wait_for_metric(server, "racedit_queue_depth", 4)
    assert post(server, {"class_label": 3, "num_steps": 2}).status_code == 429
    for sock in abandoned:
        sock.close()
    wait_for_metric(server, "racedit_queue_depth", 0)  # while the long request still runs
    assert metric(httpx.get(server.url + "/metrics").text, "racedit_cancelled_requests_total") == 4
    with ThreadPoolExecutor(1) as pool:
        fifth = pool.submit(post, server, {"class_label": 3, "num_steps": 2})
        wait_for_metric(server, "racedit_queue_depth", 1)  # accepted, waiting behind the long one
        running.close()
        assert fifth.result().status_code == 200


@pytest.mark.filterwarnings("ignore")
def test_a_dead_worker_answers_everyone_503_and_readyz_turns_503(server_factory):
    server = server_factory("--max-batch-rows", "2", "--max-steps", "100000", faults={"FATAL_LABEL": 7})
    with ThreadPoolExecutor(3) as pool:
        doomed = pool.submit(post, server, {"class_label": 7, "num_steps": 3000})  # kills the worker half-way
        wait_for_metric(server, "racedit_active_rows", 2)
        queued = [pool.submit(post, server, {"class_label": c, "num_steps": 5}) for c in (1, 2)]
        answers = [f.result(timeout=60) for f in (doomed, *queued)]
    assert [a.status_code for a in answers] == [503, 503, 503], [a.text for a in answers]
    assert all("worker stopped" in a.json()["detail"] for a in answers)
    ready = httpx.get(server.url + "/readyz")
    assert ready.status_code == 503 and ready.json()["detail"] == "engine worker stopped"
    assert post(server, {"class_label": 1, "num_steps": 2}).status_code == 503


def test_metrics_exposed(server):
    post(server, {"class_label": 1, "num_steps": 2})
    text = httpx.get(server.url + "/metrics").text
    for name in (
        "racedit_queue_depth",
        "racedit_active_rows",
        "racedit_rows_per_step_bucket",
        "racedit_step_seconds_bucket",
        "racedit_images_generated_total",
        "racedit_experts_per_token_bucket",
        "racedit_expert_tokens_total",
        "http_requests_total",
        "http_request_duration_seconds_bucket",
    ):
        assert name in text, name
    assert metric(text, "racedit_images_generated_total") >= 1


def test_openapi_documents_the_wire_models(server):
    schema = httpx.get(server.url + "/openapi.json").json()
    assert {"GenerateRequest", "GenerateResponse", "ExpertUsage"} <= set(schema["components"]["schemas"])


def test_tritonclient_http_infer(server):
    import tritonclient.http as triton

    client = triton.InferenceServerClient(f"127.0.0.1:{server.port}")
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("racedit-tiny")
    meta = client.get_model_metadata("racedit-tiny")
    names = ["class_label", "cfg_scale", "num_steps", "seed", "expert_budget", "sampler"]
    assert [i["name"] for i in meta["inputs"]] == names and meta["inputs"][-1]["datatype"] == "BYTES"
    inputs = []
    for name, dtype, values in [
        ("class_label", "INT64", np.array([6, 1], dtype=np.int64)),
        ("cfg_scale", "FP32", np.array([3.0, 1.0], dtype=np.float32)),
        ("num_steps", "INT32", np.array([6, 4], dtype=np.int32)),
        ("seed", "INT64", np.array([11, 3], dtype=np.int64)),
    ]:
        item = triton.InferInput(name, [2], dtype)
        item.set_data_from_numpy(values)
        inputs.append(item)
    result = client.infer(
        "racedit-tiny",
        inputs,
        outputs=[triton.InferRequestedOutput("image"), triton.InferRequestedOutput("mean_experts_per_token")],
    )
    images = result.as_numpy("image")
    assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8
    via_generate = post(server, {"class_label": 6, "cfg_scale": 3.0, "num_steps": 6, "seed": 11}).json()
    assert np.array_equal(images[0], decode(via_generate["images"][0]))
    assert result.as_numpy("mean_experts_per_token").shape == (2,)
    assert [o["name"] for o in meta["outputs"]] == ["image", "mean_experts_per_token", "seed"]
    unseeded = triton.InferInput("class_label", [2], "INT64")
    unseeded.set_data_from_numpy(np.array([1, 1], dtype=np.int64))
    steps = triton.InferInput("num_steps", [2], "INT32")
    steps.set_data_from_numpy(np.array([3, 3], dtype=np.int32))
    seeds = client.infer("racedit-tiny", [unseeded, steps]).as_numpy("seed")
    assert seeds.dtype == np.int64 and seeds[0] != seeds[1]  # drawn at random and echoed, as /generate does
    # JSON (non-binary) tensors work too, and bad input is a 400 with a message.
    item = triton.InferInput("class_label", [1], "INT64")
    item.set_data_from_numpy(np.array([2], dtype=np.int64), binary_data=False)
    out = client.infer("racedit-tiny", [item], outputs=[triton.InferRequestedOutput("image", binary_data=False)])
    assert out.as_numpy("image").shape == (1, 16, 16, 3)
    item.set_data_from_numpy(np.array([42], dtype=np.int64))
    with pytest.raises(triton.InferenceServerException, match="class_label"):
        client.infer("racedit-tiny", [item])
    with pytest.raises(triton.InferenceServerException, match="unknown model"):
        client.infer("other", [item])
    # A sampler per row: an optional BYTES input, binary (length-prefixed) or JSON.
    for binary in (True, False):
        label = triton.InferInput("class_label", [2], "INT64")
        label.set_data_from_numpy(np.array([6, 6], dtype=np.int64))
        seed = triton.InferInput("seed", [2], "INT64")
        seed.set_data_from_numpy(np.array([11, 11], dtype=np.int64))
        sampler = triton.InferInput("sampler", [2], "BYTES")
        sampler.set_data_from_numpy(np.array([b"ddpm", b"euler"], dtype=np.object_), binary_data=binary)
        images = client.infer("racedit-tiny", [label, seed, sampler]).as_numpy("image")
        ddpm = post(server, {"class_label": 6, "seed": 11, "sampler": "ddpm"}).json()
        assert np.array_equal(images[0], decode(ddpm["images"][0])) and not np.array_equal(images[0], images[1])
    sampler = triton.InferInput("sampler", [1], "BYTES")
    sampler.set_data_from_numpy(np.array([b"lms"], dtype=np.object_))
    with pytest.raises(triton.InferenceServerException, match="sampler"):
        client.infer("racedit-tiny", [item, sampler])


# ----------------------------------------------- a server with tight limits ----
@pytest.fixture(scope="module")
def tight(server_factory):
    return server_factory(
        "--max-queue",
        "1",
        "--max-batch-rows",
        "2",
        "--max-steps",
        "100000",
        "--request-timeout-s",
        "1.5",
        "--no-cuda-graphs",
        env={"RACEDIT_API_KEY": "s3cret"},
    )


def test_api_key(tight):
    assert httpx.get(tight.url + "/healthz").status_code == 200
    assert httpx.get(tight.url + "/readyz").status_code == 200
    r = httpx.post(tight.url + "/generate", json={"class_label": 1, "num_steps": 2})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(tight.url + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(tight.url + "/metrics").status_code == 401
    ok = httpx.post(
        tight.url + "/generate", json={"class_label": 1, "num_steps": 2}, headers={"Authorization": "Bearer s3cret"}
    )
    assert ok.status_code == 200


def test_no_cuda_graphs_says_so_in_the_model_card(tight):
    card = httpx.get(tight.url + "/v1/models", headers={"Authorization": "Bearer s3cret"}).json()["data"][0]
    assert card["cuda_graphs"] == {
        "enabled": False,
        "reason": "turned off",
        "buckets": [],
        "captured": [],
        "memory_bytes": 0,
        "moe_buffer_bytes": 0,
    }


def test_full_queue_gives_429_and_deadline_gives_504(tight):
    auth = {"Authorization": "Bearer s3cret"}
    slow = {"class_label": 1, "num_steps": 100000, "seed": 1}  # far longer than the 1.5 s deadline
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(httpx.post, tight.url + "/generate", json=slow, headers=auth, timeout=30)]
        time.sleep(0.3)
        futures += [
            pool.submit(httpx.post, tight.url + "/generate", json=slow, headers=auth, timeout=30) for _ in range(3)
        ]
        statuses = sorted(f.result().status_code for f in futures)
        rejected = [f.result() for f in futures if f.result().status_code == 429]
    assert statuses.count(429) >= 1 and rejected[0].headers["retry-after"] == "1"
    assert statuses.count(504) >= 1
    assert set(statuses) <= {429, 504}


def test_too_many_rows_for_the_batch_is_422(tight):
    r = httpx.post(
        tight.url + "/generate", json={"class_label": 1, "num_images": 2}, headers={"Authorization": "Bearer s3cret"}
    )
    assert r.status_code == 422 and "num_images" in r.text


# ----------------------------------------------------- static mode, SIGTERM ----
def test_static_mode_serves_the_same_pixels_and_sigterm_drains(server_factory, server):
    static = server_factory("--batching", "static", "--max-steps", "4000")
    body = {"class_label": 4, "cfg_scale": 4.0, "num_steps": 20, "seed": 99}
    assert np.array_equal(
        decode(post(static, body).json()["images"][0]), decode(post(server, body).json()["images"][0])
    )
    results = {}

    def long_request():
        results["long"] = post(static, {"class_label": 2, "num_steps": 1500, "seed": 2})

    thread = threading.Thread(target=long_request)
    thread.start()
    deadline = time.time() + 10
    while metric(httpx.get(static.url + "/metrics").text, "racedit_active_rows") == 0 and time.time() < deadline:
        time.sleep(0.02)
    static.proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    late = post(static, {"class_label": 1, "num_steps": 2})
    assert late.status_code == 503 and late.headers["retry-after"] == "1"
    assert httpx.get(static.url + "/readyz").status_code == 503
    thread.join(60)
    assert results["long"].status_code == 200
    assert static.proc.wait(timeout=30) == 0


def test_serve_refuses_a_busy_port_before_loading_the_model():
    """The bind is checked first, with a hint, not after minutes of loading."""
    import subprocess
    import sys

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "racedit.cli", "serve", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 2
    assert f"127.0.0.1:{port}" in result.stderr and "in use" in result.stderr and "--port" in result.stderr


def test_serve_help_lists_the_choices():
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "racedit.cli", "serve", "--help"], capture_output=True, text=True, timeout=60
    )
    assert "{auto,float32,bfloat16,float16}" in result.stdout and "{step,static}" in result.stdout
