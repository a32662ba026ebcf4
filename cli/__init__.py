"""The `racedit` command: train, eval, calibrate, pack, import-dit, serve, export.

It lives outside the three packages it dispatches to (racedit.model, racedit.server,
racedit.export), so none of them depends on another through it. Each command's flags are the
fields of its typed options (cli/options.py, made into flags by cli/flags.py); each imports its code
when it runs, so no `--help` imports torch and each answers at once (tests/e2e/test_cli_help.py).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

from pydantic import ValidationError

from .flags import add_flags, errors, parse
from .options import (
    CalibrateOptions,
    ClassifierOptions,
    EvalOptions,
    ImportDitOptions,
    ImportOptions,
    Options,
    PackOptions,
    TrainOptions,
)


def _train(options: TrainOptions) -> int:
    from racedit.model.config import ConfigError
    from racedit.model.training.config import is_pipeline, load_config, load_pipeline
    from racedit.model.training.train import train, train_pipeline

    out = options.out or Path("runs") / options.config.stem
    if is_pipeline(str(options.config)):
        if options.resume or options.init:
            raise ConfigError(
                f"{options.config} is a pipeline (stages): it resumes itself when run again with the "
                "same --out, and its first stage starts from scratch; drop --resume/--init"
            )
        path = train_pipeline(*load_pipeline(str(options.config)), out)
    else:
        path = train(load_config(str(options.config)), out, resume=options.resume, init=options.init)
    print(f"checkpoint: {path}")
    return 0


def _pack(options: PackOptions) -> int:
    import torch

    from racedit.model.checkpoint import load, save

    model = load(options.checkpoint)
    path = save(
        model,
        options.out,
        metadata=model.metadata,
        weights_dtype=getattr(torch, options.dtype),
        autoencoder=model.autoencoder,
    )
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    print(f"packed {options.checkpoint} -> {path} ({size / 2**20:.1f} MiB, parameters in {options.dtype})")
    return 0


def _calibrate(options: CalibrateOptions) -> int:
    import json

    import torch

    from racedit.model.checkpoint import load, read_config, save
    from racedit.model.config import ConfigError
    from racedit.model.training.calibrate import calibrate
    from racedit.model.training.config import Calibration

    model = load(options.checkpoint)
    calibration = Calibration(
        num_images=options.num_images,
        cfg_scale=options.cfg_scale,
        num_steps=options.num_steps,
        iterations=options.iterations,
        seed=options.seed,
    )
    try:
        record = calibrate(model, calibration, options.routing, options.budgets)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    weights_dtype = getattr(torch, read_config(options.checkpoint).get("weights_dtype", "float32"))
    out = save(
        model,
        options.out or options.checkpoint,
        metadata=model.metadata,
        weights_dtype=weights_dtype,
        autoencoder=model.autoencoder,
    )
    print(json.dumps(record, indent=2))
    print(f"thresholds written to {out}")
    return 0


def _import(options: ImportOptions) -> int:
    import json

    from racedit.model.training.import_families import import_checkpoint

    path, record = import_checkpoint(**options.model_dump())
    print(json.dumps(record, indent=2))
    serving = record["serving"]
    print(
        f"imported {options.source} -> {path} ({record['family']}): serve with `racedit serve --checkpoint {path}` "
        f"(default sampler {serving['default_sampler']}, {serving['default_steps']} steps)"
    )
    return 0


def _import_dit(options: ImportDitOptions) -> int:
    import json

    from racedit.model.checkpoint import save
    from racedit.model.config import MoEConfig
    from racedit.model.training.import_dit import import_dit, upcycle, upcycling_report

    moe = None
    if options.moe:
        moe = MoEConfig(spec=options.moe, hidden_split=options.hidden_split, gating=options.gating)
        moe.validate()
    dense = import_dit(options.source, num_heads=options.num_heads)  # read once; upcycled from it when asked
    model = upcycle(dense, moe) if moe else dense
    metadata = {"imported_from": str(options.source), "objective": model.config.objective}
    if moe:
        metadata["upcycling"] = upcycling_report(dense, model)
        print(json.dumps(metadata["upcycling"], indent=2))
    path = save(model, options.out, metadata=metadata, autoencoder=options.autoencoder)
    print(
        f"imported {options.source} -> {path} ({'upcycled to ' + options.moe if moe else 'dense'}, objective "
        f"{model.config.objective}: fine-tune with `racedit train --init {path}` before serving)"
    )
    return 0


def _eval(options: EvalOptions) -> int:
    import json

    from racedit.model import bundled
    from racedit.model.training.evaluate import evaluate

    report = evaluate(
        options.checkpoint or bundled(),
        options.num_samples,
        options.cfg_scale,
        options.num_steps,
        options.batch_size,
        options.out,
        options.classifier,
        options.dtype,
    )
    print(json.dumps({k: v for k, v in report.items() if k != "experts_per_token_by_t"}, indent=2))
    print(f"wrote {options.out}/report.json, samples.png, experts_per_timestep.png")
    return 0


def _train_classifier(options: ClassifierOptions) -> int:
    from racedit.model.training.evaluate import DEFAULT_CLASSIFIER, train_classifier

    accuracy = train_classifier(options.out or DEFAULT_CLASSIFIER, steps=options.steps)
    print(f"val accuracy {accuracy:.4f}")
    return 0 if accuracy >= 0.98 else 1


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


COMMANDS: dict[str, tuple[type[Options], Callable[[Any], int]]] = {
    "train": (TrainOptions, _train),
    "eval": (EvalOptions, _eval),
    "calibrate": (CalibrateOptions, _calibrate),
    "import": (ImportOptions, _import),
    "import-dit": (ImportDitOptions, _import_dit),
    "pack": (PackOptions, _pack),
    "train-classifier": (ClassifierOptions, _train_classifier),
}


def parser() -> argparse.ArgumentParser:
    """The `racedit` command line; serve and export parse their own flags (`racedit serve --help`)."""
    parser = argparse.ArgumentParser(prog="racedit", description="Race-DiT training, evaluation, serving and export")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("serve", help="serve a checkpoint over HTTP (racedit serve --help)")
    sub.add_parser("export", help="export ONNX / AOTInductor / Triton (racedit export --help)")
    for name, (options, _) in COMMANDS.items():
        summary = options.__doc__.strip().rstrip(".")
        add_flags(sub.add_parser(name, help=summary[0].lower() + summary[1:], description=summary), options)
    return parser


def _dispatch(argv: list[str]) -> int:
    # serve and export own their flags (typed settings); hand them the rest of the line.
    if argv[:1] == ["serve"]:
        return _serve(argv[1:])
    if argv[:1] == ["export"]:
        return _export(argv[1:])
    args = parser().parse_args(argv)
    model, run = COMMANDS[args.command]
    try:
        options = parse(model, args)
    except ValidationError as exc:
        for line in errors(exc):
            print(f"racedit {args.command}: error: {line}", file=sys.stderr)
        return 2
    from racedit.model.autoencoder import AutoencoderError
    from racedit.model.checkpoint import CheckpointError
    from racedit.model.config import ConfigError

    try:
        return run(options)
    except (ConfigError, CheckpointError, AutoencoderError) as exc:
        print(f"racedit {args.command}: error: {exc}", file=sys.stderr)
        return 2
