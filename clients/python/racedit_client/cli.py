"""`racedit-client generate|models`: talk to a racedit server from the shell."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from .client import Client, GenerateResult
from .errors import RaceditError
from .models import ProgressEvent

SPARK = " .:-=+*#%@"


def usage_summary(result: GenerateResult) -> str:
    u = result.expert_usage
    lines = [
        f"request {result.id}: {len(result.arrays or result.images)} {'array' if result.arrays else 'image'}(s), "
        f"seeds {result.seeds}, "
        f"{result.timing.total_ms:.0f} ms (queue {result.timing.queue_ms:.0f} ms)",
        f"experts per token: {u.mean_experts_per_token:.3f} (nominal k = {u.nominal_k} of {u.num_experts}); "
        f"pairs computed {u.activated_pairs} / {u.nominal_pairs} nominal = {u.compute_ratio:.3f}",
        "per layer: " + "  ".join(f"L{i}={layer.mean_experts_per_token:.2f}" for i, layer in enumerate(u.per_layer)),
    ]
    if u.num_moe_layers == 0:  # a dense network (DiT, SiT, REPA as published): no experts to report
        lines[1:] = ["a dense network: no experts"]
    elif u.per_step:
        hi = max(u.per_step) or 1.0
        lines.append(
            "per step (t=1 -> 0): "
            + "".join(SPARK[min(9, int(v / hi * 9))] for v in u.per_step)
            + f"  [{min(u.per_step):.2f} .. {max(u.per_step):.2f}]"
        )
    return "\n".join(lines)


def progress_bar(event: ProgressEvent, width: int = 30) -> str:
    done = round(width * event.step / event.num_steps)
    return (
        f"\r[{'#' * done}{'.' * (width - done)}] {event.step}/{event.num_steps} t={event.t:.2f} "
        f"experts/token {event.mean_experts_per_token:.2f} {event.elapsed_ms / 1000:.1f}s"
    )


def streamed(client: Client, label: Any, options: dict) -> GenerateResult:
    """Generate through the stream, drawing a progress bar on stderr; returns the final result."""
    for event in client.stream(label, **options):
        if isinstance(event, ProgressEvent):
            print(progress_bar(event), end="", file=sys.stderr, flush=True)
        elif isinstance(event, GenerateResult):
            print(file=sys.stderr)
            return event
    raise RaceditError("the stream ended without a result")


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        return _run(argv)
    except BrokenPipeError:  # piped into `head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _run(argv: Optional[Sequence[str]]) -> int:
    defaults = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(
        prog="racedit-client", description="Client of a racedit server", formatter_class=defaults
    )
    parser.add_argument(
        "--url", default=os.environ.get("RACEDIT_URL", "http://127.0.0.1:8000"), help="server address (env RACEDIT_URL)"
    )
    parser.add_argument("--api-key", default=os.environ.get("RACEDIT_API_KEY"), help="bearer key (env RACEDIT_API_KEY)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for an answer")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate images and save them", formatter_class=defaults)
    g.add_argument("--class", dest="class_label", required=True, help="class name or index")
    g.add_argument("--cfg", type=float, default=None, help="guidance scale; None: the model's own (4, REPA's 1.8)")
    g.add_argument("--steps", type=int, default=None, help="sampler steps; None: the model's own (25, DiT's 250)")
    g.add_argument(
        "--sampler",
        default=None,
        help="euler, heun, ... (racedit-client models lists the model's; default: the model's own)",
    )
    g.add_argument("--seed", type=int, default=None, help="seed of the first image (None: the server draws one)")
    g.add_argument("-n", "--num-images", type=int, default=1, help="images to generate")
    g.add_argument(
        "--format",
        default="png",
        choices=["png", "jpeg", "webp", "npy"],
        help="npy: the final float32 samples, saved as .npy files",
    )
    g.add_argument("-o", "--out", default=".", help="output folder")
    g.add_argument(
        "--budget",
        type=float,
        default=1.0,
        help="expert budget: about budget * k experts per token (the model's calibrated range)",
    )
    g.add_argument(
        "--stream",
        action="store_true",
        help="stream progress (a bar on stderr) through POST /generate/stream; the images are the same",
    )
    sub.add_parser("models", help="list the served models")
    args = parser.parse_args(argv)
    label = int(args.class_label) if getattr(args, "class_label", "").isdigit() else getattr(args, "class_label", None)
    try:
        with Client(args.url, api_key=args.api_key, timeout=args.timeout) as client:
            if args.command == "models":
                for card in client.models().data:
                    space = f" (latents {'x'.join(map(str, card.latent_shape))})" if card.latent_shape else ""
                    print(
                        f"{card.id}: {card.image_shape[1]}x{card.image_shape[2]}{space}, "
                        f"classes {', '.join(card.classes)}; {card.parameters_activated / 1e6:.1f} M of "
                        f"{card.parameters_total / 1e6:.1f} M parameters active"
                    )
                return 0
            options = dict(
                cfg_scale=args.cfg,
                num_steps=args.steps,
                seed=args.seed,
                num_images=args.num_images,
                output_format=args.format,
                expert_budget=args.budget,
                sampler=args.sampler,
            )
            if args.stream:
                result = streamed(client, label, options)
            else:
                result = client.generate(label, **options)
    except RaceditError as exc:
        print(f"racedit-client: error: {exc}", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    extension = {"png": "png", "jpeg": "jpg", "webp": "webp", "npy": "npy"}[args.format]
    name = result.request.class_name if result.request else args.class_label  # `--class Star` or `6`: star-<seed>
    for item, seed in zip(result.arrays or result.images, result.seeds):
        path = out / f"{name}-{seed}.{extension}"
        if args.format == "npy":
            import numpy as np

            np.save(path, item, allow_pickle=False)
        else:
            item.save(path)
        print(f"saved {path}")
    print(usage_summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
