"""Helpers shared by the benchmarks: timing, saving results as JSON and markdown, random models."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch

from racedit.model import RaceDiT, build

RESULTS = Path(__file__).resolve().parent / "results"


def time_call(fn: Callable[[], Any], repeats: int = 20, warmup: int = 3, cuda: bool = False) -> float:
    """Median seconds of `fn()` over `repeats` runs."""
    return time_interleaved({"fn": fn}, repeats, warmup, cuda)["fn"]


def time_interleaved(
    fns: dict[str, Callable[[], Any]], repeats: int = 20, warmup: int = 3, cuda: bool = False
) -> dict[str, float]:
    """Median seconds of each `fn()`, timed round-robin (one call of each per round), so that
    a change in the machine's load during the run hits every variant alike."""
    return {name: statistics.median(values) for name, values in time_rounds(fns, repeats, warmup, cuda).items()}


def median_ratio(rounds: dict[str, list[float]], name: str, base: str) -> float:
    """The median over rounds of `name`'s time over `base`'s in the same round: robust to the load
    drifting between rounds, which moves both alike."""
    return statistics.median(a / b for a, b in zip(rounds[name], rounds[base]))


def time_rounds(
    fns: dict[str, Callable[[], Any]], repeats: int = 20, warmup: int = 3, cuda: bool = False
) -> dict[str, list[float]]:
    """Seconds of each `fn()` in each of `repeats` rounds (one call of each per round)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize()
            samples[name].append(time.perf_counter() - start)
    return samples


def machine() -> dict[str, Any]:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def save(name: str, payload: dict[str, Any], table: list[dict[str, Any]]) -> Path:
    """Write bench/results/NAME.json and NAME.md (a markdown table of `table`)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"), **payload, "rows": table}
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    if table:
        keys = list(table[0])
        lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        for row in table:
            lines.append("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()) + " |")
        (RESULTS / f"{name}.md").write_text(
            f"# {name}\n\n{json.dumps(payload['machine'])}\n\n" + "\n".join(lines) + "\n"
        )
    return RESULTS / f"{name}.json"


def random_model(preset: str, moe: Optional[str], device: torch.device) -> RaceDiT:
    """A randomly initialised preset (built on `device`: XL/2-4in32 has 2.4 B parameters) in eval
    mode, its thresholds set by two training forwards of a race on random inputs, so threshold
    routing activates about k experts per token as a trained model's does."""
    with torch.device(device):
        model = build(preset, **({"moe": {"spec": moe}} if moe else {})).train()
    with torch.no_grad():
        for _ in range(2):
            model(*random_inputs(model, 8, device))
    return model.eval()


def random_inputs(model: RaceDiT, rows: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, t, y) of `rows` random samples for `model`."""
    cfg = model.config
    return (
        torch.randn(rows, cfg.in_channels, cfg.image_size, cfg.image_size, device=device),
        torch.rand(rows, device=device),
        torch.randint(0, cfg.num_classes, (rows,), device=device),
    )
