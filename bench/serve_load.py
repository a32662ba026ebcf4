"""Load test: a real `racedit serve` process under concurrency 1, 4, 16, 64, in both batching modes,
against the engine's direct (in-process, no HTTP) throughput at the same batch size.

    python bench/serve_load.py [--checkpoint PATH] [--steps 25] [--max-batch-rows 64]
    python bench/serve_load.py --preset B/2 --device cuda --concurrency 1 16 64   # GPU figures, random weights

Prints and saves bench/results/serve_load[-<preset>-<device>].{json,md}. On CUDA it also
reports the share of the GPU's bf16 dense peak that the served forwards reached
(`--peak-tflops`, default 989 for an H100 SXM). All traffic stays on loopback,
bounded in count and time.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save  # noqa: E402

from racedit.model import DEFAULT_CHECKPOINT, load


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint: str, batching: str, max_batch_rows: int, device: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "racedit.model.cli", "serve", "--checkpoint", checkpoint,
                             "--port", str(port), "--batching", batching, "--max-batch-rows", str(max_batch_rows),
                             "--max-queue", "1024", "--log-level", "warning", "--device", device],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not become ready")


def steps_for(index: int, steps: list[int]) -> int:
    """Step count of request `index`: cycles through the mix, so both modes see the same workload."""
    return steps[index % len(steps)]


async def run_load(url: str, concurrency: int, requests_per_client: int, steps: list[int], time_limit: float) -> dict:
    latencies: list[float] = []
    images = 0
    stop = time.monotonic() + time_limit

    async def client(index: int, http: httpx.AsyncClient) -> None:
        nonlocal images
        for i in range(requests_per_client):
            if time.monotonic() > stop:
                return
            body = {"class_label": (index + i) % 10, "cfg_scale": 4.0, "num_steps": steps_for(index + i, steps),
                    "seed": index * 1000 + i}
            start = time.monotonic()
            r = await http.post(url + "/generate", json=body)
            r.raise_for_status()
            latencies.append(time.monotonic() - start)
            images += 1

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency + 4)) as http:
        start = time.monotonic()
        await asyncio.gather(*(client(c, http) for c in range(concurrency)))
        wall = time.monotonic() - start
    latencies.sort()
    return {"images": images, "wall_s": wall, "images_per_s": images / wall,
            "p50_ms": 1000 * statistics.median(latencies),
            "p95_ms": 1000 * latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))]}


def direct_engine(checkpoint: str, max_batch_rows: int, steps: list[int], requests: int, device: str) -> float:
    """Images/s of the engine alone at saturation (every request queued at once)."""
    from racedit.server.engine import Engine, GenerationRequest, pick_device

    torch_device, dtype = pick_device(device)
    engine = Engine(load(checkpoint), torch_device, dtype, max_batch_rows=max_batch_rows, max_queue=requests + 1).start()
    start = time.monotonic()
    futures = [engine.submit(GenerationRequest(class_label=i % 10, cfg_scale=4.0, num_steps=steps_for(i, steps), seed=i))
               for i in range(requests)]
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
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak of the GPU")
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 25, 40],
                        help="step counts, cycled over requests (a mix, as real traffic has); one value for a uniform load")
    parser.add_argument("--max-batch-rows", type=int, default=64)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--rounds", type=int, default=2, help="requests per client at the highest concurrency")
    parser.add_argument("--time-limit", type=float, default=240.0, help="seconds per (mode, concurrency) cell")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    if args.preset:
        args.checkpoint = random_checkpoint(args.preset)
    saturation_requests = max(args.concurrency) * args.rounds
    direct = direct_engine(args.checkpoint, args.max_batch_rows, args.steps, saturation_requests, args.device)
    print(f"direct engine: {direct:.2f} images/s ({saturation_requests} requests at once)")
    rows = []
    for batching in ("step", "static"):
        proc, url = start_server(args.checkpoint, batching, args.max_batch_rows, args.device)
        try:
            for c in args.concurrency:
                per_client = max(args.rounds, saturation_requests // c // 4) if c < max(args.concurrency) else args.rounds
                result = asyncio.run(run_load(url, c, per_client, args.steps, args.time_limit))
                row = {"batching": batching, "concurrency": c, **result}
                rows.append(row)
                print(f"{batching:6s} c={c:3d}: {result['images_per_s']:.2f} images/s, "
                      f"p50 {result['p50_ms']:.0f} ms, p95 {result['p95_ms']:.0f} ms ({result['images']} images)")
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    top = max(args.concurrency)
    step_top = next(r for r in rows if r["batching"] == "step" and r["concurrency"] == top)
    p95_16 = {r["batching"]: r["p95_ms"] for r in rows if r["concurrency"] == 16}
    summary = {"direct_engine_images_per_s": direct,
               "server_over_direct_at_saturation": step_top["images_per_s"] / direct,
               "p95_static_over_step_at_c16": (p95_16["static"] / p95_16["step"]) if len(p95_16) == 2 else None}
    if args.device != "cpu":
        flops = flops_per_image(args.checkpoint, args.steps)
        summary["bf16_peak_share_at_saturation"] = step_top["images_per_s"] * flops / (args.peak_tflops * 1e12)
    print(summary)
    name = "serve_load" + (f"-{args.preset.replace('/', '_')}-{args.device}" if args.preset else "") \
        + ("-mixed" if len(args.steps) > 1 else "-uniform")
    save(name, {"checkpoint": args.checkpoint, "preset": args.preset, "device": args.device, "steps": args.steps,
                "max_batch_rows": args.max_batch_rows, "summary": summary}, rows)


def random_checkpoint(preset: str) -> str:
    """A randomly initialised preset (thresholds set by a few training forwards) for speed figures."""
    import tempfile

    import torch

    from racedit.model import build, save as save_checkpoint

    model = build(preset).train()
    cfg = model.config
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, cfg.in_channels, cfg.image_size, cfg.image_size), torch.rand(8),
                  torch.randint(0, cfg.num_classes, (8,)))
    return str(save_checkpoint(model.eval(), Path(tempfile.mkdtemp()) / "racedit-random"))


def flops_per_image(checkpoint: str, steps: list[int]) -> float:
    """Matmul FLOPs of one guided image (2 rows per step): 2 x activated parameters x tokens, roughly."""
    from racedit.model import parameter_counts, read_config
    from racedit.model.config import ModelConfig

    config = ModelConfig.from_dict(read_config(checkpoint)["model"])
    _, activated = parameter_counts(config)
    return 2.0 * activated * config.num_tokens * 2 * sum(steps) / len(steps)


if __name__ == "__main__":
    main()
