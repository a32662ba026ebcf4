"""The `racedit` command: train, eval, calibrate, pack, import-dit, serve, export.

It lives outside the three packages it dispatches to (racedit.model, racedit.server,
racedit.export), so none of them depends on another through it. Each subcommand imports
its code when it runs, so no `--help` imports torch and each answers at once
(tests/e2e/test_cli_help.py).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Optional


def _train(args: argparse.Namespace) -> int:
    from racedit.model.config import ConfigError
    from racedit.model.training.config import is_pipeline, load_config, load_pipeline
    from racedit.model.training.train import train, train_pipeline

    out = Path(args.out or Path("runs") / Path(args.config).stem)
    if is_pipeline(args.config):
        if args.resume or args.init:
            raise ConfigError(
                f"{args.config} is a pipeline (stages): it resumes itself when run again with the "
                "same --out, and its first stage starts from scratch; drop --resume/--init"
            )
        path = train_pipeline(*load_pipeline(args.config), out)
    else:
        path = train(
            load_config(args.config),
            out,
            resume=Path(args.resume) if args.resume else None,
            init=Path(args.init) if args.init else None,
        )
    print(f"checkpoint: {path}")
    return 0


def _pack(args: argparse.Namespace) -> int:
    import torch

    from racedit.model.checkpoint import load, save

    model = load(args.checkpoint)
    path = save(
        model,
        args.out,
        metadata=model.metadata,
        weights_dtype=getattr(torch, args.dtype),
        autoencoder=model.autoencoder,
    )
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    print(f"packed {args.checkpoint} -> {path} ({size / 2**20:.1f} MiB, parameters in {args.dtype})")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    import json

    import torch

    from racedit.model.checkpoint import load, read_config, save
    from racedit.model.training.calibrate import budget_table, calibrate_thresholds
    from racedit.model.training.config import Calibration

    model = load(args.checkpoint)
    calibration = Calibration(
        num_images=args.num_images, cfg_scale=args.cfg_scale, num_steps=args.num_steps, iterations=args.iterations
    )
    record = model.metadata.get("threshold_calibration", {})
    if args.iterations:  # 0 keeps the thresholds and the record of how they were set
        record = calibrate_thresholds(model, calibration)
        model.metadata = {**model.metadata, "threshold_calibration": record}
    if args.budgets:  # the compute dial's table, on the thresholds just calibrated
        record = {**record, "budget_table": budget_table(model, calibration, args.budgets)}
    weights_dtype = getattr(torch, read_config(args.checkpoint).get("weights_dtype", "float32"))
    out = save(
        model,
        args.out or args.checkpoint,
        metadata=model.metadata,
        weights_dtype=weights_dtype,
        autoencoder=model.autoencoder,
    )
    print(json.dumps(record, indent=2))
    print(f"thresholds written to {out}")
    return 0


def _import_dit(args: argparse.Namespace) -> int:
    import json

    from racedit.model.checkpoint import save
    from racedit.model.config import MoEConfig
    from racedit.model.training.import_dit import import_dit, upcycle, upcycling_report

    moe = None
    if args.moe:
        moe = MoEConfig(spec=args.moe, hidden_split=args.hidden_split, gating=args.gating)
        moe.validate()
    dense = import_dit(args.source, num_heads=args.num_heads)  # read once; upcycled from it when asked
    model = upcycle(dense, moe) if moe else dense
    metadata = {"imported_from": str(args.source), "objective": model.config.objective}
    if moe:
        metadata["upcycling"] = upcycling_report(dense, model)
        print(json.dumps(metadata["upcycling"], indent=2))
    path = save(model, args.out, metadata=metadata, autoencoder=args.autoencoder)
    print(
        f"imported {args.source} -> {path} ({'upcycled to ' + args.moe if moe else 'dense'}, objective "
        f"{model.config.objective}: fine-tune with `racedit train --init {path}` before serving)"
    )
    return 0


def _eval(args: argparse.Namespace) -> int:
    from racedit.model.training.evaluate import main as evaluate_main

    return evaluate_main(args)


def _train_classifier(args: argparse.Namespace) -> int:
    from racedit.model.training.evaluate import train_classifier_main

    return train_classifier_main(args)


def _serve(args: Sequence[str]) -> int:
    from racedit.server.cli import main as serve_main

    return serve_main(list(args))


def _export(args: Sequence[str]) -> int:
    from racedit.export.cli import main as export_main

    return export_main(list(args))


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        return _dispatch(list(sys.argv[1:] if argv is None else argv))
    except BrokenPipeError:  # piped into `head`: the reader left; say nothing more
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


BUDGETS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5)  # racedit.model.training.calibrate.BUDGETS, without importing torch here


class _Help(argparse.HelpFormatter):
    """Appends "(default: X)" to a flag's help, unless it is required, has no default, or says it in words."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            action.option_strings
            and not action.required
            and action.default not in (None, argparse.SUPPRESS)
            and "default" not in text
        ):
            text += " (default: %(default)s)"
        return text


def parser() -> argparse.ArgumentParser:
    """The `racedit` command line; serve and export parse their own flags (`racedit serve --help`)."""
    parser = argparse.ArgumentParser(prog="racedit", description="Race-DiT training, evaluation, serving and export")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, func=None) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help[0].upper() + help[1:], formatter_class=_Help)
        p.set_defaults(func=func)
        return p

    command("serve", "serve a checkpoint over HTTP (racedit serve --help)")
    command("export", "export ONNX / AOTInductor / Triton (racedit export --help)")
    p = command("train", "train a model from a YAML config", _train)
    p.add_argument(
        "--config", required=True, help="YAML training config, or a pipeline of stages (configs/*.yaml; required)"
    )
    p.add_argument("--out", help="output folder (default: runs/<config name>)")
    p.add_argument("--resume", help="checkpoint folder of an earlier run to continue exactly (default: start anew)")
    p.add_argument(
        "--init",
        help="start from this checkpoint's weights with a fresh optimizer, for fine-tuning "
        "(default: random initialisation)",
    )
    p = command("eval", "class fidelity, Frechet distance, sample grid and Fig. 6 plot", _eval)
    p.add_argument("--checkpoint", default=None, help="checkpoint folder (default: the bundled shapes10 model)")
    p.add_argument("--num-samples", type=int, default=500, help="samples to draw, the classes in turn")
    p.add_argument("--cfg-scale", type=float, default=4.0, help="guidance scale of the samples")
    p.add_argument("--num-steps", type=int, default=25, help="Euler steps per sample")
    p.add_argument("--batch-size", type=int, default=100, help="samples generated at once")
    p.add_argument("--out", default="eval-out", help="folder for report.json and the figures")
    p.add_argument("--classifier", default=None, help="classifier folder (default: the bundled one)")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="precision of the network's matmuls (thresholds, timesteps and latents stay fp32)",
    )
    p = command("calibrate", "re-estimate the learned thresholds on the checkpoint's own weights", _calibrate)
    p.add_argument("checkpoint", help="checkpoint folder")
    p.add_argument("--out", default=None, help="write here (default: update the checkpoint in place)")
    p.add_argument("--num-images", type=int, default=40, help="calibration samples (classes in turn)")
    p.add_argument("--cfg-scale", type=float, default=4.0, help="guidance of the calibration samples")
    p.add_argument("--num-steps", type=int, default=25, help="Euler steps: the time grid calibrated over")
    p.add_argument(
        "--iterations",
        type=int,
        default=2,
        help="passes towards the fixed point (0 keeps the thresholds, e.g. to add a budget table)",
    )
    p.add_argument(
        "--budgets",
        type=float,
        nargs="*",
        default=list(BUDGETS),
        help="expert budgets of the compute-dial table (must include 1.0; none: no table)",
    )
    p = command("import-dit", "a racedit checkpoint from DiT weights (diffusers folder or DiT .pt)", _import_dit)
    p.add_argument(
        "source", help="a diffusers DiTTransformer2DModel folder (safetensors) or a facebookresearch/DiT .pt"
    )
    p.add_argument("--out", required=True, help="checkpoint folder to write (required)")
    p.add_argument("--moe", default=None, help="upcycle every MLP into experts, e.g. 2in8 (default: dense)")
    p.add_argument(
        "--hidden-split",
        type=int,
        default=1,
        help="1: each expert a copy of the dense MLP; S > 1: experts are slices of its width / S",
    )
    p.add_argument(
        "--gating", default="identity", choices=["identity", "sigmoid", "softmax"], help="gate of the upcycled routers"
    )
    p.add_argument(
        "--num-heads",
        type=int,
        default=None,
        help="attention heads (default: from the width, for DiT's sizes; needed for a .pt of other sizes)",
    )
    p.add_argument(
        "--autoencoder",
        default=None,
        help="VAE folder (save_pretrained) to carry, e.g. sd-vae-ft-ema (default: none, a pixel model)",
    )
    p = command("pack", "copy a checkpoint for shipping: weights only, parameters in float16", _pack)
    p.add_argument("--checkpoint", required=True, help="checkpoint folder to copy (required)")
    p.add_argument("--out", required=True, help="folder to write (required)")
    p.add_argument(
        "--dtype",
        default="float16",
        choices=["float16", "bfloat16", "float32"],
        help="type of the stored parameters (buffers such as thresholds stay exact)",
    )
    p = command("train-classifier", "train the shapes10 classifier used by eval", _train_classifier)
    p.add_argument("--out", default=None, help="classifier folder (default: the bundled one, replaced)")
    p.add_argument("--steps", type=int, default=600, help="training steps")
    return parser


def _dispatch(argv: list[str]) -> int:
    # serve and export own their flags (typed settings); hand them the rest of the line.
    if argv[:1] == ["serve"]:
        return _serve(argv[1:])
    if argv[:1] == ["export"]:
        return _export(argv[1:])
    args = parser().parse_args(argv)
    from racedit.model.autoencoder import AutoencoderError
    from racedit.model.checkpoint import CheckpointError
    from racedit.model.config import ConfigError

    try:
        return args.func(args)
    except (ConfigError, CheckpointError, AutoencoderError) as exc:
        print(f"racedit {args.command}: error: {exc}", file=sys.stderr)
        return 2
