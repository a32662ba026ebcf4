"""`racedit export onnx|aot|triton [--checkpoint PATH] --out DIR [--dtype] [--opset] [--device]`.

torch and the exporters are imported after the flags are parsed, so `--help` answers at once.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from racedit.cli.flags import POSITIONAL, add_flags, errors, parse


class ExportOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Literal["onnx", "aot", "triton"] = Field(
        ...,
        description="onnx: model.onnx; aot: model.pt2 (torch.export + AOTInductor); triton: a model repository",
        json_schema_extra=POSITIONAL,
    )
    checkpoint: Optional[Path] = Field(None, description="checkpoint folder (default: the bundled shapes10 model)")
    out: Path = Field(..., description="output folder")
    dtype: Literal["float32", "float16"] = Field("float32", description="onnx, aot: precision of the exported network")
    opset: int = Field(17, description="ONNX opset, 16..20")
    device: Literal["cpu", "cuda"] = Field(
        "cpu", description="aot: compile for this device; triton: the denoiser's instance kind (KIND_CPU or KIND_GPU)"
    )


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="racedit export", description="Export a checkpoint for other runtimes")
    add_flags(parser, ExportOptions)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        args = parse(ExportOptions, parser().parse_args(list(sys.argv[1:] if argv is None else argv)))
    except ValidationError as exc:
        for line in errors(exc):
            print(f"racedit export: error: {line}", file=sys.stderr)
        return 2
    from racedit.model import CheckpointError, bundled, load

    from .onnx_export import ExportError, check_opset

    checkpoint = args.checkpoint or bundled()
    try:
        check_opset(args.opset)
        model = load(checkpoint)
        out = args.out
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
