"""The service under hostile or careless clients (issue 26), against real `racedit serve` processes on
loopback: request heads and ids, slow connections, the API key's coverage, KServe v2 bodies, request-id
collisions, the error shape of every status, and shutdown past the drain timeout."""

import json
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from conftest import metric

MODEL = "racedit-tiny"
INFER = f"/v2/models/{MODEL}/infer"
HEX_ID = re.compile(r"^[0-9a-f]{32}$")


@pytest.fixture(scope="module")
def server(server_factory):
    """No key; small limits, so each can be reached; encoding a JPEG fails (tests/faulty_serve.py): a bug."""
    return server_factory(
        "--max-header-bytes",
        "16384",
        "--read-timeout-s",
        "2",
        "--max-images",
        "4",
        "--max-steps",
        "2000",
        "--max-batch-rows",
        "8",
        "--max-queue",
        "2",
        faults={"ENCODE_FAULT": "jpeg"},
    )


@pytest.fixture(scope="module")
def keyed(server_factory):
    return server_factory("--read-timeout-s", "2", env={"RACEDIT_API_KEY": "k"})


def rss_kb(pid: int) -> dict[str, int]:
    """The process's resident memory now and at its peak (VmRSS, VmHWM), in kB."""
    status = Path(f"/proc/{pid}/status").read_text()
    return {key: int(re.search(rf"^{key}:\s+(\d+) kB", status, re.M).group(1)) for key in ("VmRSS", "VmHWM")}


def exchange(port: int, data: bytes, timeout: float = 10) -> bytes:
    """Send `data` on a fresh connection and read one answer, or until the server closes the connection
    (b"" if it answered nothing); a server that closes while we still send counts as closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
        except OSError:
            pass
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
                head, found, body = answer.partition(b"\r\n\r\n")
                length = re.search(rb"(?im)^content-length: (\d+)", head)
                if found and length and len(body) >= int(length.group(1)):
                    break
        except OSError:
            pass
        return answer


def parse(answer: bytes) -> tuple[int, dict[str, str], dict]:
    """(status, headers, JSON body) of one raw HTTP/1.1 answer."""
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, json.loads(body)


def assert_error_shape(status: int, headers, document: dict, kserve: bool = False) -> None:
    """Every error: JSON naming the problem, and the request id in the body equal to the header's."""
    assert set(document) == ({"error", "request_id"} if kserve else {"detail", "request_id"}), document
    assert document["request_id"] and document["request_id"] == headers["x-request-id"], (status, document)


# ---------------------------------------------------------------- heads ----
def test_an_oversized_head_is_431_and_a_burst_of_them_leaves_memory_flat(server):
    big = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 20_000 + b"\r\n\r\n"  # one read: a whole head
    status, headers, document = parse(exchange(server.port, big))
    assert status == 431 and "16384" in document["detail"]
    assert_error_shape(status, headers, document)
    httpx.get(server.url + "/healthz")  # warm
    before = rss_kb(server.proc.pid)
    burst = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Request-ID: " + b"a" * (20 << 20) + b"\r\n\r\n"
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: exchange(server.port, burst, timeout=30), range(6)))
    after = rss_kb(server.proc.pid)
    grown_mb = (after["VmHWM"] - before["VmRSS"]) / 1024
    print(f"RSS before {before['VmRSS'] / 1024:.0f} MB, peak after six 20 MiB heads {after['VmHWM'] / 1024:.0f} MB")
    assert grown_mb < 30, f"the server grew by {grown_mb:.0f} MB under six 20 MiB heads"
    for answer in answers:  # answered 431, or closed before the client could read it: never served
        assert answer == b"" or answer.startswith(b"HTTP/1.1 431 "), answer[:200]
        assert b"a" * 200 not in answer  # the id is not echoed
    assert httpx.get(server.url + "/healthz").status_code == 200


def test_request_ids_are_bounded_and_never_echoed_unchecked(server):
    ok = httpx.get(server.url + "/healthz", headers={"X-Request-ID": "r" * 128})
    assert ok.status_code == 200 and ok.headers["x-request-id"] == "r" * 128
    for given, status in [("r" * 129, 431), ("two words", 400)]:
        r = httpx.get(server.url + "/healthz", headers={"X-Request-ID": given})
        assert r.status_code == status and given not in r.text and HEX_ID.match(r.headers["x-request-id"])
        assert_error_shape(status, r.headers, r.json())
        assert "X-Request-ID" in r.json()["detail"]


def test_idle_and_slow_connections_are_cut_after_the_read_timeout(server):
    started = time.monotonic()
    assert exchange(server.port, b"") == b""  # connected, sent nothing: closed
    assert 1.5 < time.monotonic() - started < 6
    status, headers, document = parse(exchange(server.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n"))  # half a head
    assert status == 408 and "head" in document["detail"]
    assert_error_shape(status, headers, document)
    slow_body = b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
    status, headers, document = parse(exchange(server.port, slow_body))
    assert status == 408 and "body" in document["detail"]
    assert_error_shape(status, headers, document)


# ------------------------------------------------------------------ auth ----
def test_the_key_covers_everything_but_the_probes_and_the_page(keyed, server):
    for path in ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", "/", "/static/playground.js"):
        assert httpx.get(keyed.url + path).status_code == 200, path
    for path in (
        "/docs",
        "/openapi.json",
        "/v1/models",
        "/metrics",
        "/v2",
        f"/v2/models/{MODEL}",
        f"/v2/models/{MODEL}/ready",
        "/no-such-route",
    ):
        r = httpx.get(keyed.url + path, headers={"Authorization": "Bearer wrong"} if path == "/v1/models" else {})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", path
        assert_error_shape(401, r.headers, r.json(), kserve=path.startswith("/v2"))
    # The key comes before the body: malformed JSON, or a body too large that is never sent, is a 401 at once.
    r = httpx.post(keyed.url + "/generate", content=b'{"class_label": 1,', headers={"content-type": "application/json"})
    assert r.status_code == 401
    status, _, _ = parse(
        exchange(
            keyed.port,
            b"POST " + INFER.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n",
            timeout=5,
        )
    )
    assert status == 401  # not 413, nor a 408 after waiting for the body
    key = {"Authorization": "Bearer k"}
    assert httpx.get(keyed.url + "/v1/models", headers=key).json()["authentication"] == "bearer"
    assert httpx.get(keyed.url + "/openapi.json", headers=key).status_code == 200
    # Without a key the server says so: in its log at start and in /v1/models.
    assert httpx.get(server.url + "/v1/models").json()["authentication"] == "none"
    assert "WITHOUT authentication" in server.log_path.read_text()
    assert "WITHOUT authentication" not in keyed.log_path.read_text()


def test_an_empty_api_key_is_refused_at_start():
    result = subprocess.run(
        [sys.executable, "-m", "racedit.cli", "serve", "--api-key", ""], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2 and "api_key" in result.stderr and "empty" in result.stderr, result.stderr


# ---------------------------------------------------------- error shape ----
def test_every_error_is_json_with_the_request_id(server):
    cases = [
        ("GET", "/no-such-route", {}, 404),
        ("GET", "/static/no-such-file.js", {}, 404),
        ("GET", "/generate", {}, 405),
        ("POST", "/generate", {"content": b"{" + b" " * 70_000 + b"}"}, 413),
        ("POST", "/generate", {"json": {"class_label": 99}}, 422),
        ("POST", "/generate", {"content": b'{"class_label": "\xff"}'}, 400),  # not UTF-8: documented 400
        ("POST", "/generate", {"json": {"class_label": 1, "num_steps": 2, "output_format": "jpeg"}}, 500),
    ]
    for method, path, kwargs, status in cases:
        r = httpx.request(method, server.url + path, headers={"content-type": "application/json"}, timeout=30, **kwargs)
        assert r.status_code == status, (path, r.status_code, r.text)
        assert r.headers["content-type"] == "application/json"
        assert_error_shape(status, r.headers, r.json())
    assert "RuntimeError" in r.json()["detail"] and "injected" not in r.text  # a bug is named, not described
    assert httpx.post(server.url + "/generate", json={"class_label": 1, "num_steps": 2}).status_code == 200


# --------------------------------------------------------------- KServe ----
def tensor(name: str, datatype: str, data: list, shape=None) -> dict:
    return {"name": name, "datatype": datatype, "shape": [len(data)] if shape is None else shape, "data": data}


def label(*values) -> dict:
    return tensor("class_label", "INT64", list(values))


MALFORMED = [  # (body, Inference-Header-Content-Length, a word the answer names)
    ({"inputs": [tensor("class_label", "INT8", [300])]}, None, "datatype INT8"),
    ({"inputs": [tensor("class_label", "FP32", [6.9])]}, None, "expected INT64"),
    ({"inputs": [label(6.9)]}, None, "integer"),
    ({"inputs": [label(True)]}, None, "integer"),
    ({"inputs": [label(2**63)]}, None, "less than or equal"),
    ({"inputs": [label(1), tensor("num_steps", "INT32", [2.9])]}, None, "integer"),
    ({"inputs": [label(1), tensor("num_steps", "INT32", [2001])]}, None, "num_steps"),  # --max-steps
    ({"inputs": [label(1), tensor("cfg_scale", "FP32", [float("nan")])]}, None, "finite"),
    ({"inputs": [label(1), tensor("seed", "INT64", [-1])]}, None, "seed"),
    ({"inputs": [label(99)]}, None, "class_label"),
    ({"inputs": [{**label(1), "shape": None}]}, None, "shape"),
    ({"inputs": [{**label(1), "shape": [-5]}]}, None, "shape"),
    ({"inputs": [{**label(1), "shape": [1, 1]}]}, None, "expected [N]"),
    ({"inputs": [label()]}, None, "1 to 4"),  # zero rows
    ({"inputs": [label(1, 2, 3, 4, 5)]}, None, "--max-images"),
    ({"inputs": [label(1, 2), tensor("num_steps", "INT32", [3])]}, None, "has 1 values"),
    ({"inputs": [{**label(1), "name": ["class_label"]}]}, None, "name"),
    ({"inputs": [{**label(1), "datatype": ["INT64"]}]}, None, "datatype"),
    ({"inputs": [{**label(1), "parameters": [1]}]}, None, "parameters"),
    ({"inputs": [label(1), tensor("colour", "INT64", [1])]}, None, "unknown input"),
    ({"inputs": [label(1)], "outputs": [{"name": "latents"}]}, None, "outputs"),
    ({"inputs": [label(1)], "priority": 1}, None, "priority"),
    ({"inputs": []}, None, "inputs"),
    ([1], None, "request"),
    (b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}", None, "recursion"),
    (b'{"inputs": [{"name": "\xff"}]}', None, "JSON"),  # not UTF-8
    ({"inputs": [label(1)]}, "\u0661\u0662", "Inference-Header-Content-Length"),  # Arabic-Indic digits
    ({"inputs": [{**label(1), "data": None, "parameters": {"binary_data_size": 16}}]}, "0", "binary"),
]


def test_malformed_kserve_requests_are_400_naming_the_problem_before_any_inference(server):
    steps = metric(httpx.get(server.url + "/metrics").text, "racedit_rows_per_step_count")
    for body, length, named in MALFORMED:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {"content-type": "application/json"}
        if length is not None:  # "0": the whole body is the JSON head
            headers["Inference-Header-Content-Length"] = str(len(content)) if length == "0" else length.encode()
        r = httpx.post(server.url + INFER, content=content, headers=headers, timeout=30)
        assert r.status_code == 400, (body if not isinstance(body, bytes) else body[:60], r.status_code, r.text)
        assert_error_shape(400, r.headers, r.json(), kserve=True)
        assert named in r.json()["error"], (named, r.json()["error"])
    assert metric(httpx.get(server.url + "/metrics").text, "racedit_rows_per_step_count") == steps  # nothing ran
    # The rows of one request are queued all or none: three do not fit a queue of two (429, nothing queued).
    r = httpx.post(server.url + INFER, json={"inputs": [label(1, 2, 3)]})
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert_error_shape(429, r.headers, r.json(), kserve=True)


def test_a_colliding_request_id_never_touches_its_owner_on_any_route(server):
    rid = {"X-Request-ID": "owner-7"}
    owner_body = {"inputs": [label(1, 2), tensor("num_steps", "INT32", [1000, 1000])]}  # two guided rows: 4 rows
    cancelled = metric(httpx.get(server.url + "/metrics").text, "racedit_cancelled_requests_total")
    with ThreadPoolExecutor(1) as pool:
        owner = pool.submit(httpx.post, server.url + INFER, json=owner_body, headers=rid, timeout=120)
        deadline = time.monotonic() + 30
        while metric(httpx.get(server.url + "/metrics").text, "racedit_active_rows") != 4:
            assert time.monotonic() < deadline and not owner.done(), "the owner never ran"
            time.sleep(0.02)
        again = httpx.post(server.url + INFER, json={"inputs": [label(3, 4, 5)]}, headers=rid)
        generate = httpx.post(server.url + "/generate", json={"class_label": 1, "num_steps": 2}, headers=rid)
        stream = httpx.post(server.url + "/generate/stream", json={"class_label": 1, "num_steps": 2}, headers=rid)
        assert [again.status_code, generate.status_code, stream.status_code] == [409, 409, 409]
        assert_error_shape(409, again.headers, again.json(), kserve=True)
        assert "owner-7" in generate.json()["detail"]
        # The id of a row is not an id: a client may use "owner-7/0" meanwhile.
        assert (
            httpx.post(
                server.url + "/generate", json={"class_label": 1, "num_steps": 2}, headers={"X-Request-ID": "owner-7/0"}
            ).status_code
            == 200
        )
        answer = owner.result(timeout=120)
    assert answer.status_code == 200, answer.text
    assert [o["shape"] for o in answer.json()["outputs"]][0] == [2, 16, 16, 3]
    assert metric(httpx.get(server.url + "/metrics").text, "racedit_cancelled_requests_total") == cancelled


# -------------------------------------------------------------- shutdown ----
def stream_events(response: httpx.Response) -> list[tuple[str, dict]]:
    return [
        (block.split("\n")[0].removeprefix("event: "), json.loads(block.split("\n")[1].removeprefix("data: ")))
        for block in response.text.strip().split("\n\n")
    ]


def test_past_the_drain_timeout_every_waiting_request_is_answered_503_and_the_process_exits(server_factory):
    drain = 2.0
    server = server_factory("--drain-timeout-s", str(drain), "--max-batch-rows", "4", "--max-steps", "100000")
    long = {"num_steps": 100000, "cfg_scale": 1.0}  # one row each, far longer than the drain timeout
    calls = {
        "generate": lambda: httpx.post(server.url + "/generate", json={"class_label": 1, **long}, timeout=60),
        "stream": lambda: httpx.post(server.url + "/generate/stream", json={"class_label": 2, **long}, timeout=60),
        "kserve": lambda: httpx.post(
            server.url + INFER,
            timeout=60,
            json={"inputs": [label(3), tensor("num_steps", "INT32", [100000]), tensor("cfg_scale", "FP32", [1.0])]},
        ),
        "queued": lambda: httpx.post(server.url + "/generate", json={"class_label": 4, "num_images": 2}, timeout=60),
    }
    with ThreadPoolExecutor(len(calls)) as pool:
        futures = {}
        for name, call in calls.items():
            futures[name] = pool.submit(call)
            if name == "kserve":  # three rows run; the queued one needs four and waits
                deadline = time.monotonic() + 30
                while metric(httpx.get(server.url + "/metrics").text, "racedit_active_rows") != 3:
                    assert time.monotonic() < deadline, "the long requests never ran"
                    time.sleep(0.02)
        deadline = time.monotonic() + 30
        while metric(httpx.get(server.url + "/metrics").text, "racedit_queue_depth") != 1:
            assert time.monotonic() < deadline, "the last request never queued"
            time.sleep(0.02)
        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        answers = {name: future.result(timeout=60) for name, future in futures.items()}
        answered = time.monotonic() - signalled
        assert server.proc.wait(timeout=30) == 0
        exited = time.monotonic() - signalled
    print(f"drain {drain} s: answered after {answered:.1f} s, exited after {exited:.1f} s")
    for name in ("generate", "kserve", "queued"):
        r = answers[name]
        assert r.status_code == 503 and r.headers["retry-after"] == "1", (name, r.status_code, r.text)
        assert_error_shape(503, r.headers, r.json(), kserve=name == "kserve")
    events = stream_events(answers["stream"])
    assert events[-1][0] == "error" and events[-1][1]["status"] == 503, events[-1]
    assert drain <= answered < drain + 5 and exited < drain + 6
    log = server.log_path.read_text()
    assert "drain timeout" in log and "Exception in ASGI application" not in log and "Traceback" not in log


def test_a_second_signal_answers_and_exits_at_once(server_factory):
    server = server_factory("--drain-timeout-s", "60", "--max-steps", "100000")
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(
            httpx.post, server.url + "/generate", json={"class_label": 1, "num_steps": 100000}, timeout=60
        )
        deadline = time.monotonic() + 30
        while metric(httpx.get(server.url + "/metrics").text, "racedit_active_rows") == 0:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        server.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while httpx.get(server.url + "/readyz").status_code != 503:  # draining: it would wait 60 s
            assert time.monotonic() < deadline
            time.sleep(0.02)
        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGINT)
        answer = running.result(timeout=30)
        assert server.proc.wait(timeout=30) == 0
        exited = time.monotonic() - signalled
    print(f"second signal: exited after {exited:.1f} s")
    assert answer.status_code == 503 and answer.headers["retry-after"] == "1"
    assert exited < 5
