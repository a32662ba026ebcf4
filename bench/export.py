"""Per-step (one denoiser forward) latency of eager PyTorch, torch.compile, ONNX Runtime and AOTInductor.

    python bench/export.py [--checkpoint PATH] [--batches 1 16 64] [--device cpu|cuda]

Prints and saves bench/results/export-<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save, time_call  # noqa: E402

from racedit.export.aot import export_aot, load_aot
from racedit.export.onnx_export import ServedDenoiser, example_inputs, export_onnx
from racedit.model import DEFAULT_CHECKPOINT, load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--skip", nargs="*", default=[], choices=["compile", "onnxruntime", "aot"])
    args = parser.parse_args()
    import onnxruntime as ort

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    model = load(args.checkpoint).to(device)
    served = ServedDenoiser(model)
    work = Path(tempfile.mkdtemp(prefix="racedit-bench-"))
    runners = {"eager": served}
    build_seconds = {}
    if "compile" not in args.skip:
        runners["torch.compile"] = torch.compile(served, dynamic=True)
    if "onnxruntime" not in args.skip:
        start = time.time()
        onnx_path = export_onnx(load(args.checkpoint), work / "model.onnx")
        build_seconds["onnxruntime"] = time.time() - start
        providers = ["CUDAExecutionProvider"] if cuda else ["CPUExecutionProvider"]
        session = ort.InferenceSession(str(onnx_path), providers=providers)

        def run_ort(x, t, y):
            return session.run(None, {"x": x.cpu().numpy(), "t": t.cpu().numpy(), "y": y.cpu().numpy()})

        runners["onnxruntime"] = run_ort
    if "aot" not in args.skip:
        start = time.time()
        runners["aotinductor"] = load_aot(export_aot(load(args.checkpoint), work / "model.pt2", device=args.device))
        build_seconds["aotinductor"] = time.time() - start
    rows = []
    with torch.no_grad():
        for batch in args.batches:
            x, t, y = (i.to(device) for i in example_inputs(model, batch, seed=batch))
            eager_ms = None
            for name, fn in runners.items():
                ms = 1000 * time_call(lambda: fn(x, t, y), args.repeats, warmup=3, cuda=cuda)
                eager_ms = eager_ms or ms
                rows.append({"batch": batch, "runtime": name, "ms_per_step": ms, "vs_eager": ms / eager_ms})
                print(f"batch {batch:3d} {name:14s} {ms:9.2f} ms/step  {ms / eager_ms:.3f}x eager", flush=True)
    save(f"export-{device.type}", {"checkpoint": args.checkpoint, "build_seconds": build_seconds}, rows)


if __name__ == "__main__":
    main()
