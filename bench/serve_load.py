"""Load test: a real `racedit serve` process under concurrency 1, 4, 16, 64, in both batching modes,
against the engine's direct (in-process, no HTTP) throughput at the same batch size.

Closed loop (`--concurrency`): each client sends its next request when the last is answered;
each client's first answer is a warm-up and not measured. Open loop (`--rates`): Poisson
arrivals at a fixed rate, how traffic from many independent users looks.

    python bench/serve_load.py [--checkpoint PATH] [--steps 25] [--max-batch-rows 64] [--rates 1.5 2.5]
    python bench/serve_load.py --preset B/2 --device cuda --concurrency 1 16 64   # GPU figures, random weights
    python bench/serve_load.py --preset XL/2 --moe 4in32 --device cuda --concurrency 1 16 64
    python bench/serve_load.py --no-batch-invariant ...   # the same without exactness, for its cost
    python bench/serve_load.py --preset tiny --ray-replicas 1 2 --concurrency 32   # Ray Serve scale-out

With `--ray-replicas`, step batching is measured on the plain server and on `racedit serve
--ray` with each replica count (the host's cores split evenly between replicas), instead of
step against static batching. Prints and saves
bench/results/serve_load[-ray][-<preset>-<device>].{json,md}. Per cell and at saturation it
reports the TFLOP/s the served forwards reached and, off a CPU, their share of the GPU's bf16
dense peak (`--peak-tflops`, default 989: an H100 SXM or an H200), counting activated FLOPs as
bench/flops.py does (adaLN and the timestep MLP once per sample, not per token), 2 rows per
guided image and step, at the experts per token the answers report.
All traffic stays on loopback, bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import random_model, save  # noqa: E402
from flops import BF16_PEAK_TFLOPS, forward_flops  # noqa: E402

from racedit.model import DEFAULT_CHECKPOINT, load, read_config
from racedit.model.config import ModelConfig


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    checkpoint: str,
    batching: str,
    max_batch_rows: int,
    device: str,
    dtype: str = "auto",
    batch_invariant: bool = True,
    ray_replicas: Optional[int] = None,
) -> tuple[subprocess.Popen, str]:
    """`racedit serve` (or, with `ray_replicas`, `racedit serve --ray` on a local Ray) on loopback."""
    import tempfile

    port = free_port()
    extra, env = [], dict(os.environ)
    if ray_replicas:
        cpus = (os.cpu_count() or 1) / ray_replicas
        extra = ["--ray", "--replicas", str(ray_replicas), "--replica-cpus", f"{cpus:g}"]
        env.update(
            RAY_TMPDIR=tempfile.mkdtemp(prefix="rd", dir="/tmp"), RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0"
        )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "racedit.cli",
            "serve",
            "--checkpoint",
            checkpoint,
            "--port",
            str(port),
            "--batching",
            batching,
            "--max-batch-rows",
            str(max_batch_rows),
            "--max-queue",
            "1024",
            "--log-level",
            "warning",
            "--device",
            device,
            "--dtype",
            dtype,
            "--batch-invariant" if batch_invariant else "--no-batch-invariant",
            *extra,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    while time.time() < deadline:
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not become ready")


def closed_label(concurrency: int) -> str:
    return f"closed c={concurrency}"


def open_label(rate: float) -> str:
    return f"poisson {rate:g}/s"


def request_body(index: int, steps: list[int]) -> dict:
    """Request `index` of a run: classes and step counts cycle, so both modes see the same workload."""
    return {"class_label": index % 10, "cfg_scale": 4.0, "num_steps": steps[index % len(steps)], "seed": index}


@dataclass
class Answers:
    """What a cell's answers say: each measured latency, and the work of every answered image."""

    latencies: list[float] = field(default_factory=list)
    images: int = 0
    steps: int = 0  # denoising steps over the answered images
    expert_steps: float = 0.0  # their mean experts per token weighted by steps

    async def post(self, http: httpx.AsyncClient, url: str, body: dict, measured: bool = True) -> None:
        start = time.monotonic()
        r = await http.post(url + "/generate", json=body)
        r.raise_for_status()
        if measured:
            self.latencies.append(time.monotonic() - start)
        self.images += 1
        self.steps += body["num_steps"]
        self.expert_steps += body["num_steps"] * r.json()["expert_usage"]["mean_experts_per_token"]

    def summary(self, wall: float) -> dict:
        return {
            **summarize(self.latencies, self.images, wall),
            "mean_steps": self.steps / self.images,
            "experts_per_token": self.expert_steps / self.steps,
        }


def summarize(latencies: list[float], images: int, wall: float) -> dict:
    latencies = sorted(latencies)

    def pct(q: float) -> float:
        return 1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))]

    return {
        "images": images,
        "measured": len(latencies),
        "wall_s": wall,
        "images_per_s": images / wall,
        "p50_ms": 1000 * statistics.median(latencies),
        "p95_ms": pct(0.95),
        "p99_ms": pct(0.99),
    }


async def closed_loop(
    url: str, concurrency: int, requests_per_client: int, warmup_per_client: int, steps: list[int], time_limit: float
) -> dict:
    """`concurrency` clients, each sending its next request when the last one is answered.

    The first `warmup_per_client` answers of each client are not measured: they start as one
    synchronised burst, which is not the steady state the percentiles should describe.
    """
    answers = Answers()
    stop = time.monotonic() + time_limit

    async def client(index: int, http: httpx.AsyncClient) -> None:
        for i in range(requests_per_client):
            if time.monotonic() > stop:
                return
            body = request_body(index + i * concurrency, steps)
            await answers.post(http, url, body, measured=i >= warmup_per_client)

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency + 4)) as http:
        start = time.monotonic()
        await asyncio.gather(*(client(c, http) for c in range(concurrency)))
        wall = time.monotonic() - start
    return answers.summary(wall)


async def open_loop(url: str, rate: float, requests: int, steps: list[int], seed: int = 0) -> dict:
    """Poisson arrivals at `rate` requests/s, whatever the answers: how traffic from many users looks."""
    gaps = random.Random(seed)
    answers = Answers()

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=requests + 4)) as http:
        start = time.monotonic()
        tasks = []
        for i in range(requests):
            tasks.append(asyncio.create_task(answers.post(http, url, request_body(i, steps))))
            await asyncio.sleep(gaps.expovariate(rate))
        await asyncio.gather(*tasks)
        wall = time.monotonic() - start
    return answers.summary(wall)


def direct_engine(
    checkpoint: str,
    max_batch_rows: int,
    steps: list[int],
    requests: int,
    device: str,
    dtype: str = "auto",
    batch_invariant: bool = True,
) -> float:
    """Images/s of the engine alone at saturation (every request queued at once)."""
    from racedit.server.engine import Engine, GenerationRequest, pick_device

    torch_device, torch_dtype = pick_device(device, dtype)
    engine = Engine.build(
        load(checkpoint),
        torch_device,
        torch_dtype,
        max_batch_rows=max_batch_rows,
        max_queue=requests + 1,
        batch_invariant=batch_invariant,
    ).start()
    start = time.monotonic()
    futures = [engine.submit(GenerationRequest(**request_body(i, steps))) for i in range(requests)]
    for f in futures:
        f.result()
    rate = requests / (time.monotonic() - start)
    engine.stop()
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    parser.add_argument("--preset", default=None, help="serve a randomly initialised preset instead (e.g. B/2)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    parser.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16 (auto: bf16 on CUDA)")
    parser.add_argument(
        "--batch-invariant",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="whole row tiles for every GEMM (exact bytes whatever the batch)",
    )
    parser.add_argument("--moe", default=None, help="MoE spec for --preset (e.g. 4in32 for XL/2)")
    parser.add_argument("--peak-tflops", type=float, default=BF16_PEAK_TFLOPS, help="bf16 dense peak of the GPU")
    parser.add_argument(
        "--steps",
        type=int,
        nargs="+",
        default=[10, 25, 40],
        help="step counts, cycled over requests (a mix, as real traffic has); one value for a uniform load",
    )
    parser.add_argument("--max-batch-rows", type=int, default=64)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument(
        "--requests",
        type=int,
        default=96,
        help="measured requests per closed-loop cell (at least 2 per client) and per open-loop rate",
    )
    parser.add_argument("--warmup-per-client", type=int, default=1, help="unmeasured first answers of each client")
    parser.add_argument(
        "--rates",
        type=float,
        nargs="*",
        default=[],
        help="open-loop Poisson arrival rates (requests/s) to run after the closed-loop sweep",
    )
    parser.add_argument("--time-limit", type=float, default=90.0, help="seconds per closed-loop cell")
    parser.add_argument(
        "--ray-replicas",
        type=int,
        nargs="*",
        default=[],
        help="measure Ray Serve with these replica counts against the plain server (step batching)",
    )
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    if args.preset:
        args.checkpoint = random_checkpoint(args.preset, args.moe)
    if args.ray_replicas:
        return ray_scale_out(args)
    name = (
        "serve_load"
        + (f"-{args.preset.replace('/', '_')}{'-' + args.moe if args.moe else ''}-{args.device}" if args.preset else "")
        + ("-mixed" if len(args.steps) > 1 else "-uniform")
        + ("" if args.batch_invariant else "-not-invariant")
    )
    header = {
        "checkpoint": args.checkpoint,
        "preset": args.preset,
        "moe": args.moe,
        "device": args.device,
        "dtype": args.dtype,
        "batch_invariant": args.batch_invariant,
        "steps": args.steps,
        "max_batch_rows": args.max_batch_rows,
    }
    gpu = args.device != "cpu"
    config = ModelConfig.from_dict(read_config(args.checkpoint)["model"])
    saturation_requests = max(args.requests, 2 * max(args.concurrency))
    direct = direct_engine(
        args.checkpoint,
        args.max_batch_rows,
        args.steps,
        saturation_requests,
        args.device,
        args.dtype,
        args.batch_invariant,
    )
    print(f"direct engine: {direct:.2f} images/s ({saturation_requests} requests at once)")
    rows = []
    for batching in ("step", "static"):
        proc, url = start_server(
            args.checkpoint, batching, args.max_batch_rows, args.device, args.dtype, args.batch_invariant
        )
        try:

            def record(arrivals: str, concurrency: Optional[int], result: dict) -> None:
                result["TFLOP/s"] = result["images_per_s"] * image_flops(config, result) / 1e12
                if gpu:
                    result["share of bf16 peak"] = result["TFLOP/s"] / args.peak_tflops
                rows.append({"batching": batching, "arrivals": arrivals, "concurrency": concurrency, **result})
                save(name, {**header, "summary": {"direct_engine_images_per_s": direct, "partial": True}}, rows)
                print(
                    f"{batching:6s} {arrivals}: {result['images_per_s']:.2f} images/s, p50 {result['p50_ms']:.0f} ms, "
                    f"p95 {result['p95_ms']:.0f} ms ({result['measured']} measured of {result['images']})"
                )

            for c in args.concurrency:
                record(closed_label(c), c, run_closed(args, url, c))
            for rate in args.rates:
                record(open_label(rate), None, asyncio.run(open_loop(url, rate, args.requests, args.steps)))
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    top = max(args.concurrency)
    step_top = next(r for r in rows if r["batching"] == "step" and r["concurrency"] == top)

    def static_over_step(arrivals: str, key: str) -> Optional[float]:
        value = {r["batching"]: r[key] for r in rows if r["arrivals"] == arrivals}
        return value["static"] / value["step"] if len(value) == 2 else None

    summary = {
        "direct_engine_images_per_s": direct,
        "server_over_direct_at_saturation": step_top["images_per_s"] / direct,
    }
    for arrivals in [closed_label(c) for c in args.concurrency] + [open_label(rate) for rate in args.rates]:
        for key in ("p50_ms", "p95_ms"):
            summary[f"{key[:3]} static / step, {arrivals}"] = static_over_step(arrivals, key)
    summary["experts_per_token_at_saturation"] = step_top["experts_per_token"]
    summary["tflops_at_saturation"] = step_top["TFLOP/s"]
    if gpu:
        summary["bf16_peak_share_at_saturation"] = step_top["share of bf16 peak"]
    print(summary)
    save(name, {**header, "summary": summary}, rows)


def run_closed(args: argparse.Namespace, url: str, concurrency: int) -> dict:
    per_client = args.warmup_per_client + max(2, -(-args.requests // concurrency))
    return asyncio.run(closed_loop(url, concurrency, per_client, args.warmup_per_client, args.steps, args.time_limit))


def ray_scale_out(args: argparse.Namespace) -> None:
    """Step batching on the plain server and on Ray Serve with each of `args.ray_replicas`."""
    rows = []
    for replicas in [None, *args.ray_replicas]:
        server = f"ray x{replicas}" if replicas else "plain"
        proc, url = start_server(
            args.checkpoint,
            "step",
            args.max_batch_rows,
            args.device,
            args.dtype,
            args.batch_invariant,
            ray_replicas=replicas,
        )
        try:
            for c in args.concurrency:
                result = run_closed(args, url, c)
                rows.append({"server": server, "replicas": replicas or 1, "concurrency": c, **result})
                print(
                    f"{server:8s} c={c}: {result['images_per_s']:.2f} images/s, p50 {result['p50_ms']:.0f} ms, "
                    f"p95 {result['p95_ms']:.0f} ms ({result['measured']} measured of {result['images']})"
                )
        finally:
            proc.terminate()
            proc.wait(timeout=120)
    top = max(args.concurrency)
    rate = {r["server"]: r["images_per_s"] for r in rows if r["concurrency"] == top}
    summary = {"cores": os.cpu_count(), "concurrency": top, "images_per_s": rate}
    if "ray x1" in rate:
        summary["ray_x1_over_plain"] = rate["ray x1"] / rate["plain"]
        for replicas in (r for r in args.ray_replicas if r != 1):
            summary[f"ray_x{replicas}_over_ray_x1"] = rate[f"ray x{replicas}"] / rate["ray x1"]
    print(summary)
    name = "serve_load-ray" + (f"-{args.preset.replace('/', '_')}-{args.device}" if args.preset else "")
    save(
        name,
        {
            "checkpoint": args.checkpoint,
            "preset": args.preset,
            "device": args.device,
            "dtype": args.dtype,
            "steps": args.steps,
            "max_batch_rows": args.max_batch_rows,
            "ray_replicas": args.ray_replicas,
            "summary": summary,
        },
        rows,
    )


def random_checkpoint(preset: str, moe: Optional[str] = None) -> str:
    """A randomly initialised preset (thresholds set by a race, common.random_model) for speed figures."""
    import tempfile

    import torch

    from racedit.model import save as save_checkpoint

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # XL/2's forwards take a while on a CPU
    model = random_model(preset, moe, device)
    # bf16 weights where a GPU will serve them in bf16 anyway: half the bytes to write and read (XL/2-4in32: 4.8 GB)
    return str(
        save_checkpoint(
            model.cpu(),
            Path(tempfile.mkdtemp()) / "racedit-random",
            weights_dtype=torch.bfloat16 if device.type == "cuda" else None,
        )
    )


def image_flops(config: ModelConfig, cell: dict) -> float:
    """Activated FLOPs of one guided image of a cell: its mean steps, 2 rows a step, at the cell's
    experts per token (exact for the cell's total: the count is linear in steps and experts)."""
    return 2 * cell["mean_steps"] * forward_flops(config, cell["experts_per_token"]).per_row


if __name__ == "__main__":
    main()
