"""`racedit export onnx|aot|triton [--checkpoint PATH] --out DIR [--dtype] [--opset] [--device]`.

torch and the exporters are imported after the flags are parsed, so `--help` answers at once.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Optional


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="racedit export", description="Export a checkpoint for other runtimes")
    parser.add_argument(
        "format",
        choices=["onnx", "aot", "triton"],
        help="onnx: model.onnx; aot: model.pt2 (torch.export + AOTInductor); triton: a model repository",
    )
    parser.add_argument("--checkpoint", default=None, help="checkpoint folder (default: the bundled shapes10 model)")
    parser.add_argument("--out", required=True, help="output folder (required)")
    parser.add_argument(
        "--dtype",
        default="float32",
        help="onnx, aot: precision of the exported network, float32 or float16 (default: %(default)s)",
    )
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset, 16..20 (default: %(default)s)")
    parser.add_argument(
        "--device",
        default="cpu",
        choices=["cpu", "cuda"],
        help="aot: compile for this device; triton: the denoiser's instance kind (KIND_CPU or "
        "KIND_GPU) (default: %(default)s)",
    )
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    from racedit.model import CheckpointError, bundled, load

    from .onnx_export import ExportError, check_opset

    checkpoint = args.checkpoint or bundled()
    try:
        check_opset(args.opset)
        model = load(checkpoint)
        out = Path(args.out)
        if args.format == "onnx":
            from .onnx_export import export_onnx

            path = export_onnx(model, out / "model.onnx", opset=args.opset, dtype=args.dtype)
        elif args.format == "aot":
            from .aot import export_aot

            path = export_aot(model, out / "model.pt2", dtype=args.dtype, device=args.device)
        else:
            from .triton_repo import build_triton_repo

            path = build_triton_repo(model, checkpoint, out, opset=args.opset, device=args.device)
    except (ExportError, CheckpointError) as exc:
        print(f"racedit export: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0
