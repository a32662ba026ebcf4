"""ms per denoising step: the served Race-DiT forward against a dense DiT of equal activated FLOPs
(same preset, dense MLP), eager and under torch.compile, and the served forward replayed from CUDA graphs.

    python bench/engine_step.py --preset B/2 --rows 16 64 256                          # eager and compiled
    python bench/engine_step.py --preset XL/2 --moe 4in32 --rows 64 256 16 --repeats 5
    python bench/engine_step.py --preset B/2 --phases graphs                           # graph replay vs eager
    python bench/engine_step.py --preset tiny --device cpu --rows 4 --no-compile

For each row count, phase by phase, each saved as soon as it is timed (a run cut by its time
limit keeps what it had):

    eager     the served forward and the dense DiT, both eager       ratio: served / dense
    compiled  the served forward (eager) and the dense DiT under torch.compile, one graph per
              row count (dynamic=False: the strongest baseline)     ratio: served / compiled dense
              (issue #28's goal: at most 1.3 for B/2 at 64 rows)
    graphs    the served forward eager and replayed from CUDA graphs (racedit.model.graphs'
              GraphedDenoiser, rows padded to a bucket; CUDA only) ratio: replay / eager

The variants of a phase are timed round-robin and each ratio is the median of per-round ratios,
so load changes hit both alike. TFLOP/s and the share of the bf16 peak count activated FLOPs
(bench/flops.py: per token, plus adaLN and the timestep MLP once per sample), the served forward's
at the experts per token it measured. The first call of a compiled or graphed variant (compiling,
capturing) is timed apart. Random weights, thresholds set by a race (common.random_model).
Saves bench/results/engine_step[-graphs]-<preset>[-<moe>]-<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_ratio, random_inputs, random_model, save, time_rounds  # noqa: E402
from flops import BF16_PEAK_TFLOPS, forward_flops, peak_share  # noqa: E402

from racedit.model import SERVING, Execution, RaceDiT, build
from racedit.server.engine import pick_device

SERVED, GRAPHED = "served forward, eager", "served forward, graph replay"
DENSE, COMPILED = "dense DiT, eager", "dense DiT, torch.compile"
# phase -> (its variants, the variant its ratios divide by)
PHASES = {
    "eager": ([SERVED, DENSE], DENSE),
    "compiled": ([SERVED, COMPILED], COMPILED),
    "graphs": ([SERVED, GRAPHED], SERVED),
}


def graph_replay(model: RaceDiT, max_rows: int) -> tuple[Optional[Callable[..., Any]], str]:
    """The served forward replayed from one CUDA graph per row bucket, or None and why not."""
    try:
        from racedit.model.graphs import GraphedDenoiser, row_buckets
    except ImportError as error:
        return None, f"graphs: not available in this checkout ({error})"
    if next(model.parameters()).device.type != "cuda":
        return None, "graphs: CUDA only"
    try:
        return GraphedDenoiser(model, row_buckets(max_rows), graphs=True), f"graphs: buckets {row_buckets(max_rows)}"
    except Exception as error:  # a wrapper that cannot be built is a finding: the saved file says why
        return None, f"graphs: GraphedDenoiser failed: {type(error).__name__}: {str(error)[:300]}"


def experts_per_token(model: RaceDiT, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> float:
    """The mean experts a token took in one forward of these inputs (threshold routing: about k)."""
    with torch.no_grad():
        return float(model(x, t, y, return_stats=True).stats.experts_per_token.float().mean())


def first_call_seconds(fn: Callable[[], Any], cuda: bool) -> float:
    """Seconds of a variant's first call: what compiling or capturing it costs."""
    start = time.perf_counter()
    with torch.no_grad():
        fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="shapes10")
    parser.add_argument("--moe", default=None, help="MoE spec override, e.g. 4in32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--rows", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--phases", nargs="+", choices=list(PHASES), default=["eager", "compiled"])
    parser.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=True, help="--no-compile: no compiled phase"
    )
    parser.add_argument("--peak-tflops", type=float, default=BF16_PEAK_TFLOPS, help="the GPU's bf16 dense peak")
    args = parser.parse_args()
    phases = [p for p in args.phases if args.compile or p != "compiled"]
    device, dtype = pick_device(args.device, args.dtype)
    cuda = device.type == "cuda"
    moe = random_model(args.preset, args.moe, device).set_precision(dtype).with_execution(SERVING)
    cfg = moe.config
    # The baseline is a plain dense DiT: the library's own kernels (cuBLAS, FlashAttention on a GPU), no row tiles.
    with torch.device(device):
        dense = build(args.preset, moe=None).eval().set_precision(dtype).with_execution(Execution(row_tile=None))
    dense_flops = forward_flops(dense.config)
    nets: dict[str, Optional[Callable[..., Any]]] = {SERVED: moe, DENSE: dense, GRAPHED: None, COMPILED: None}
    header: dict[str, Any] = {
        "preset": args.preset,
        "moe": args.moe,
        "dtype": str(dtype).removeprefix("torch."),
        "peak_tflops": args.peak_tflops,
        "flops": "bench/flops.py (adaLN and the timestep MLP once per sample)",
        "experts_per_token": {},
        "first_call_seconds": {},
        "errors": {},
    }
    if "compiled" in phases:
        nets[COMPILED] = torch.compile(dense, dynamic=False)
    if "graphs" in phases:
        nets[GRAPHED], header["graphs"] = graph_replay(moe, max(args.rows))
        print(header["graphs"], flush=True)
    stem = f"{args.preset.replace('/', '_')}{'-' + args.moe if args.moe else ''}-{device.type}"
    tables: dict[str, list[dict[str, Any]]] = {f"engine_step-{stem}": [], f"engine_step-graphs-{stem}": []}
    if "graphs" in phases and nets[GRAPHED] is None:
        save(f"engine_step-graphs-{stem}", header, [])  # the run says why it has no graph replay
    for batch in args.rows:
        x, t, y = random_inputs(moe, batch, device)
        m = experts_per_token(moe, x, t, y)
        header["experts_per_token"][str(batch)] = m
        flops = {SERVED: forward_flops(cfg, m).forward(batch), DENSE: dense_flops.forward(batch)}
        flops[GRAPHED], flops[COMPILED] = flops[SERVED], flops[DENSE]
        for phase in phases:
            names, base = PHASES[phase]
            if any(nets[name] is None for name in names):
                continue  # graphs not available here: said once above
            fns = {name: lambda net=nets[name]: net(x, t, y) for name in names}
            name = f"engine_step-{'graphs-' if phase == 'graphs' else ''}{stem}"
            try:
                for slow in {GRAPHED, COMPILED} & set(names):
                    header["first_call_seconds"][f"{slow}, {batch} rows"] = first_call_seconds(fns[slow], cuda)
                with torch.no_grad():
                    rounds = time_rounds(fns, args.repeats, cuda=cuda)
            except Exception as error:  # a compile or a capture that fails is a finding: record it, go on
                header["errors"][f"{phase}, {batch} rows"] = f"{type(error).__name__}: {str(error)[:300]}"
                print(f"rows {batch:4d}  {phase} failed: {header['errors'][f'{phase}, {batch} rows']}", flush=True)
                save(name, header, tables[name])
                continue
            for variant in names:
                seconds = statistics.median(rounds[variant])
                row = {
                    "rows": batch,
                    "phase": phase,
                    "variant": variant,
                    "ms": seconds * 1000,
                    "TFLOP/s": flops[variant] / seconds / 1e12,
                    "share of bf16 peak": peak_share(flops[variant], seconds, args.peak_tflops) if cuda else None,
                    "ratio": median_ratio(rounds, variant, base),
                    "ratio to": base,
                }
                tables[name].append(row)
                print(
                    f"rows {batch:4d}  {variant:30s} {row['ms']:9.2f} ms  {row['TFLOP/s']:7.2f} TFLOP/s  "
                    f"{row['ratio']:.3f}x {base}",
                    flush=True,
                )
            save(name, header, tables[name])  # after each phase of each row count


if __name__ == "__main__":
    main()
