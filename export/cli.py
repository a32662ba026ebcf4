"""`racedit export onnx|aot|triton --checkpoint PATH --out DIR [--dtype] [--opset]`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from racedit.model import DEFAULT_CHECKPOINT, CheckpointError, load

from .onnx_export import DTYPES, ExportError


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="racedit export", description="Export a checkpoint for other runtimes")
    parser.add_argument("format", choices=["onnx", "aot", "triton"])
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (16..20)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="aot: compile for this device; triton: the denoiser's instance kind (KIND_CPU or "
                             "KIND_GPU) (default: %(default)s)")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        from .onnx_export import check_opset

        check_opset(args.opset)
        model = load(args.checkpoint)
        out = Path(args.out)
        if args.format == "onnx":
            from .onnx_export import export_onnx

            path = export_onnx(model, out / "model.onnx", opset=args.opset, dtype=args.dtype)
        elif args.format == "aot":
            from .aot import export_aot

            path = export_aot(model, out / "model.pt2", dtype=args.dtype, device=args.device)
        else:
            from .triton_repo import build_triton_repo

            path = build_triton_repo(model, args.checkpoint, out, opset=args.opset, device=args.device)
    except (ExportError, CheckpointError) as exc:
        print(f"racedit export: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0
