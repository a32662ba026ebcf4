"""racedit on Ray Serve, for real: a local Ray on loopback, `racedit serve --ray`, the SDK."""

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import free_port, metric

pytest.importorskip("ray.serve", reason="Ray Serve is the racedit[ray] extra (scripts/setup.sh --dev installs it)")

from racedit_client import AsyncClient, Client  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def descendants(pid: int) -> dict[int, str]:
    """{pid: start time} of every process below `pid`, read from /proc."""
    children: dict[int, list[int]] = {}
    starts: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry.name))
            starts[int(entry.name)] = fields[19]
    found, todo = {}, [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found[child] = starts[child]
            todo.append(child)
    return found


def left_behind(processes: dict[int, str], seconds: float = 30.0) -> list[int]:
    """Those of `processes` still running once `seconds` have passed (Ray's daemons take a moment)."""
    deadline = time.time() + seconds
    while (running := alive(processes)) and time.time() < deadline:
        time.sleep(0.5)
    return running


def alive(processes: dict[int, str]) -> list[int]:
    """Those of `processes` still running (same pid and start time, not a zombie)."""
    left = []
    for pid, start in processes.items():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[19] == start and fields[0] != "Z":
            left.append(pid)
    return left


class RayServer:
    """`racedit serve --ray` (or another Ray command) in its own process, with its own short Ray temp dir."""

    def __init__(
        self,
        checkpoint: Path,
        log: Path,
        *flags: str,
        command: list[str] | None = None,
        port: int | None = None,
        ready_line: str | None = "racedit ready on Ray Serve",
    ):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.tmp = tempfile.mkdtemp(prefix="rd", dir="/tmp")  # Ray's socket paths must stay short
        env = {
            **os.environ,
            "RAY_TMPDIR": self.tmp,
            "OMP_NUM_THREADS": "1",
            "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        command = command or [
            sys.executable,
            "-m",
            "racedit.cli",
            "serve",
            "--ray",
            "--checkpoint",
            str(checkpoint),
            "--port",
            str(self.port),
            "--log-level",
            "warning",
            "--replica-cpus",
            "0.5",
            *flags,
        ]
        self.proc = subprocess.Popen(command, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 150
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{command[:4]} exited: {log.read_text()[-3000:]}")
            if ready_line is not None and ready_line in log.read_text():
                break
            if ready_line is None:  # no line to wait for: ask the proxy
                try:
                    if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
            time.sleep(0.5)
        else:
            self.stop()
            raise RuntimeError(f"racedit serve --ray not ready: {log.read_text()[-3000:]}")
        self.processes = descendants(self.proc.pid)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 90) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


REQUESTS = [
    dict(class_label=i % 4, cfg_scale=[1.0, 3.0][i % 2], num_steps=6 + i % 5, seed=100 + i, num_images=1 + i % 2)
    for i in range(16)
]


def test_two_replicas_answer_like_one_server(tiny_checkpoint, server_factory, tmp_path):
    plain = server_factory()
    with Client(plain.url) as client:
        expected = [client.generate(**r, output_format="npy").arrays for r in REQUESTS]

    metrics_port = free_port()
    ray = RayServer(
        tiny_checkpoint, tmp_path / "ray.log", "--replicas", "2", "--replica-metrics-port", str(metrics_port)
    )
    try:
        assert len(ray.processes) >= 4, "a local Ray runs under the launcher (GCS, raylet, proxy, replicas)"

        async def all_at_once():
            async with AsyncClient(ray.url, timeout=120) as client:
                return await asyncio.gather(*(client.generate(**r, output_format="npy") for r in REQUESTS))

        results = asyncio.run(all_at_once())
        assert {r.replica for r in results} and None not in {r.replica for r in results}
        assert len({r.replica for r in results}) == 2, "both replicas must have served some requests"
        for result, arrays in zip(results, expected):
            assert len(result.arrays) == len(arrays)
            for got, want in zip(result.arrays, arrays):
                assert got.tobytes() == want.tobytes()  # bit-identical through Ray
        with Client(ray.url) as client:  # every route of the app is there, KServe v2 included
            assert client.ready() and client.models().data[0].classes
            assert httpx.get(ray.url + "/v2/health/ready").status_code == 200
            bad = httpx.post(ray.url + "/generate", json={"class_label": 99})
            assert bad.status_code == 422 and bad.headers["x-racedit-replica"]
            assert bad.headers["x-request-id"] == bad.json()["request_id"]  # one id, not two
        # Each replica's engine series on its own port (metrics port + rank on the node): together they
        # count every image generated through Ray.
        scraped = [httpx.get(f"http://127.0.0.1:{metrics_port + rank}/metrics").text for rank in (0, 1)]
        generated = [metric(text, "racedit_images_generated_total") for text in scraped]
        assert all(count > 0 for count in generated)
        assert sum(generated) == sum(len(r.arrays) for r in results)
    finally:
        code = ray.stop()
    assert code == 0, ray.log.read_text()[-2000:]
    assert left_behind(ray.processes) == [], "Ray left processes behind"


def test_full_queues_answer_429_with_retry_after_and_sigterm_drains(tiny_checkpoint, tmp_path):
    ray = RayServer(
        tiny_checkpoint, tmp_path / "ray.log", "--max-queue", "1", "--max-batch-rows", "2", "--retry-after-s", "3"
    )
    try:

        def post(seed: int) -> httpx.Response:
            return httpx.post(
                ray.url + "/generate",
                timeout=120,
                json={"class_label": 1, "num_steps": 60, "seed": seed, "num_images": 1},
            )

        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(10) as pool:
            answers = list(pool.map(post, range(10)))
        codes = sorted(a.status_code for a in answers)
        assert set(codes) == {200, 429}, codes
        refused = [a for a in answers if a.status_code == 429]
        assert all(a.headers["retry-after"] == "3" for a in refused)

        with ThreadPoolExecutor(1) as pool:  # a request in flight when SIGTERM comes is still answered
            in_flight = pool.submit(post, 7)
            time.sleep(1.5)
            ray.proc.send_signal(signal.SIGTERM)
            answer = in_flight.result()
        assert answer.status_code == 200 and len(answer.json()["images"]) == 1
    finally:
        code = ray.stop()
    assert code == 0, ray.log.read_text()[-2000:]
    assert left_behind(ray.processes) == []


def test_serve_run_on_the_shipped_cpu_config(tiny_checkpoint, tmp_path):
    """`serve run deploy/ray/racedit-cpu.yaml`, changed only where this machine differs (port, model, size)."""
    config = yaml.safe_load((ROOT / "deploy" / "ray" / "racedit-cpu.yaml").read_text())
    port = free_port()
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    (application,) = config["applications"]
    application["args"]["checkpoint"] = str(tiny_checkpoint)
    (deployment,) = application["deployments"]
    deployment.update(num_replicas=1, ray_actor_options={"num_cpus": 0.5, "num_gpus": 0})
    path = tmp_path / "racedit.yaml"
    path.write_text(yaml.safe_dump(config))
    serve_cli = Path(sys.executable).with_name("serve")
    ray = RayServer(
        tiny_checkpoint,
        tmp_path / "serve-run.log",
        command=[str(serve_cli), "run", str(path)],
        port=port,
        ready_line=None,
    )
    try:
        with Client(ray.url) as client:
            result = client.generate(class_label="star", num_steps=4, seed=5, output_format="npy")
            assert result.replica and result.arrays[0].shape == (3, 16, 16)
            assert client.models().data[0].id == "racedit-tiny"
    finally:
        ray.stop(signal.SIGINT, timeout=30)  # serve run shuts the application down on Ctrl-C (slowly under load)
        # `serve run` leaves its local Ray's daemons to exit on their own (seconds to minutes under
        # load); `ray stop` is how Ray says to end a local cluster.
        subprocess.run(
            [str(Path(sys.executable).with_name("ray")), "stop"],
            capture_output=True,
            timeout=120,
            env={**os.environ, "RAY_TMPDIR": ray.tmp},
        )
    assert left_behind(ray.processes) == []


def test_ray_configs_name_real_settings_and_agree():
    """deploy/ray and the KubeRay RayService build the same application from ServeSettings fields."""
    from racedit.server.settings import ServeSettings

    configs = [yaml.safe_load(p.read_text()) for p in sorted((ROOT / "deploy" / "ray").glob("*.yaml"))]
    rayservice = yaml.safe_load((ROOT / "deploy" / "kuberay" / "rayservice.yaml").read_text())
    assert rayservice["kind"] == "RayService"
    configs.append(yaml.safe_load(rayservice["spec"]["serveConfigV2"]))
    assert len(configs) >= 3
    for config in configs:
        (application,) = config["applications"]
        assert application["import_path"] == "racedit.server.ray_serve:app_builder"
        ServeSettings(**application["args"])  # every key is a setting with a valid value
        (deployment,) = application["deployments"]
        assert deployment["name"] == "racedit"
        assert ("num_replicas" in deployment) != ("autoscaling_config" in deployment)
        gpus = deployment["ray_actor_options"]["num_gpus"]
        assert gpus == (1 if application["args"].get("device", "auto").startswith("cuda") else 0)
