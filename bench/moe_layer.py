"""MoE layer speed (variants timed round-robin, so load changes hit all alike): racedit's served dispatch
(sorted groups on a CPU; on CUDA the device path, model/kernels.py: the whole layer with threshold
routing, its threshold set so tokens take k experts on average; one grouped GEMM per matrix from
host-read sizes too, with and without row tiles) against the
per-expert NonZero loop (the export path), a DiT-MoE-style argsort loop, and a dense MLP of equal
activated FLOPs -- both as a dense DiT runs it (Linear, GELU, Linear) and with the experts' own
kernels (addmm, GELU in place, addmm).

    python bench/moe_layer.py [--tokens 4096] [--dim 256] [--spec 2in8] [--device cpu|cuda] [--compile] [--head-to-head]

All variants compute the same selected (token, expert) pairs: the top B*L*k of an expert race,
so the experts do exactly the dense MLP's activated FLOPs (the MoE layer variants add their
router's). With --compile, the dense MLP is also compiled (torch.compile, dynamic=False) and timed
round-robin against the served dispatch and layer in a second table, saved after the first.
At XL/2 widths (issue #28's goal: the MoE layer at most 1.5x the dense MLP):

    python bench/moe_layer.py --device cuda --compile --spec 4in32 --dim 1152 --tokens 16384

A CPU variant's time includes the page faults of the buffers it allocates, and how many there
are follows what ran before in the process (glibc returns large freed buffers to the OS or
keeps them): the table counts them per call. --head-to-head times only the served dispatch and
the dense MLPs; running under MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=1073741824
keeps every buffer mapped, which leaves arithmetic and memory traffic alone to compare.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_ratio, save, time_rounds  # noqa: E402
from flops import expert_flops  # noqa: E402

from racedit.model.config import MoEConfig
from racedit.model.exact import ROW_TILE, SERVING
from racedit.model.moe import Experts, MoELayer, expert_race, grouped_dispatch, loop_dispatch, sorted_dispatch
from racedit.server.engine import pick_device

LAYER = "MoE layer (MLP router, served dispatch)"
DEVICE_LAYER = "MoE layer, device path (MLP router, threshold routing; served on CUDA)"
COMPILED = "dense MLP, torch.compile"


def reference_loop(
    x: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor, experts: list[nn.Module]
) -> torch.Tensor:
    """The DiT-MoE way: sort pairs by expert, loop over experts (host offsets), scatter_reduce into a cache."""
    token_index, expert_index = mask.nonzero(as_tuple=True)
    order = expert_index.argsort()
    token_index, expert_index = token_index[order], expert_index[order]
    pair_weights = weights[token_index, expert_index]
    ends = expert_index.bincount(minlength=len(experts)).cumsum(0).tolist()
    out = torch.zeros_like(x)
    start = 0
    for e, end in enumerate(ends):
        if end > start:
            idx = token_index[start:end]
            y = (experts[e](x[idx]) * pair_weights[start:end, None]).to(x.dtype)
            out.scatter_reduce_(0, idx[:, None].expand(-1, x.shape[1]), y, reduce="sum")
        start = end
    return out


def dense_gelu_in_place(x: torch.Tensor, dense: nn.Sequential) -> torch.Tensor:
    """The dense MLP computed as the experts are (addmm, GELU in place, addmm): the same kernels."""
    first, last = dense[0], dense[2]
    h = torch.ops.aten.gelu_(torch.addmm(first.bias, x, first.weight.t()), approximate="tanh")
    return torch.addmm(last.bias, h, last.weight.t())


def page_faults_per_call(fns: dict[str, Callable[[], object]], repeats: int = 5) -> dict[str, float]:
    """Minor page faults per call of each variant, round-robin: fresh pages the allocator had to map
    (glibc hands large buffers back to the OS and maps them again depending on what ran before),
    the one cost here that follows the process's history rather than the variant's arithmetic."""
    faults = dict.fromkeys(fns, 0)
    for _ in range(repeats):
        for name, fn in fns.items():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            fn()
            faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    return {name: count / repeats for name, count in faults.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--spec", default="2in8")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 (auto: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--compile", action="store_true", help="also time the dense MLP under torch.compile")
    parser.add_argument(
        "--head-to-head",
        action="store_true",
        help="only the served dispatch and the two dense MLPs, so no other variant's buffers "
        "shape the allocator's heap (saved as moe_layer-<device>-head-to-head)",
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    device, dtype = pick_device(args.device, args.dtype)
    cuda = device.type == "cuda"
    cfg = MoEConfig(spec=args.spec)
    d, n, k, e = args.dim, args.tokens, cfg.k, cfg.num_experts
    layer_linear = MoELayer(d, 4.0, MoEConfig(spec=args.spec, router="linear", inference="topk"), 16).to(device).eval()
    layer_mlp = MoELayer(d, 4.0, MoEConfig(spec=args.spec, router="mlp", inference="topk"), 16).to(device).eval()
    layer_served = MoELayer(d, 4.0, MoEConfig(spec=args.spec, router="mlp"), 16).to(device).eval()
    hidden = layer_linear.expert_hidden
    dense = (
        nn.Sequential(nn.Linear(d, hidden * k), nn.GELU(approximate="tanh"), nn.Linear(hidden * k, d)).to(device).eval()
    )
    experts: Experts = layer_linear.experts
    modules = [
        nn.Sequential(nn.Linear(d, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, d)).to(device)
        for _ in range(e)
    ]
    x = torch.randn(1, n, d, device=device)
    with torch.no_grad():
        scores = layer_linear.router(x, None, False)[0]
    mask, _ = expert_race(scores, k)
    with torch.no_grad():  # the served layer's threshold: its own race's K-th gate, so k experts a token on average
        layer_served.threshold.fill_(float(expert_race(layer_served.router(x, None, False)[0], k)[1]))
    for module in (
        layer_linear,
        layer_mlp,
        layer_served,
        dense,
        *modules,
    ):  # matmuls in `dtype`, as set_precision serves them
        for p in module.parameters():
            p.data = p.data.to(dtype)
    flat_x, flat_w, flat_m = x[0], scores[0], mask[0]
    dense_x = flat_x.to(dtype)  # the dense MLPs and the DiT-MoE loop take activations in `dtype`
    assert int(flat_m.sum()) == n * k
    dense_name = "dense MLP (equal activated FLOPs)"
    served_exe = SERVING.resolve(device)
    served = DEVICE_LAYER if served_exe.dispatch == "device" else "sorted dispatch, row tiles (served on CPU)"
    with torch.no_grad():
        variants = {
            dense_name: lambda: dense(dense_x),
            "sorted dispatch, row tiles (served on CPU)": lambda: sorted_dispatch(
                flat_x, flat_w, flat_m, experts, ROW_TILE
            ),
            "sorted dispatch, no tiles": lambda: sorted_dispatch(flat_x, flat_w, flat_m, experts, None),
            "dense MLP, GELU in place (the experts' kernels)": lambda: dense_gelu_in_place(dense_x, dense),
            "grouped dispatch, row tiles": lambda: grouped_dispatch(flat_x, flat_w, flat_m, experts, ROW_TILE),
            "grouped dispatch, no tiles (torch._grouped_mm on CUDA)": lambda: grouped_dispatch(
                flat_x, flat_w, flat_m, experts, None
            ),
            "per-expert NonZero loop (export path)": lambda: loop_dispatch(flat_x, flat_w, flat_m, experts),
            "DiT-MoE-style argsort loop + scatter_reduce": lambda: reference_loop(dense_x, flat_w, flat_m, modules),
            "MoE layer (linear router, served dispatch)": lambda: layer_linear(x, served_exe),
            LAYER: lambda: layer_mlp(x, served_exe),
        }
        if served == DEVICE_LAYER:
            variants[DEVICE_LAYER] = lambda: layer_served(x, served_exe)
        if args.head_to_head:
            keep = {dense_name, "dense MLP, GELU in place (the experts' kernels)", served}
            variants = {name: fn for name, fn in variants.items() if name in keep}
        rounds = time_rounds(variants, args.repeats, cuda=cuda)
        faults = page_faults_per_call(variants)
    rows = table("eager", rounds, dense_name, faults)
    pairs = {
        "served_dispatch_over_dense": (served, dense_name),
        "served_dispatch_over_per_expert_loop": (served, "per-expert NonZero loop (export path)"),
        "served_dispatch_over_argsort_loop": (served, "DiT-MoE-style argsort loop + scatter_reduce"),
        "served_dispatch_over_dense_gelu_in_place": (served, "dense MLP, GELU in place (the experts' kernels)"),
        "row_tile_cost_sorted": ("sorted dispatch, row tiles (served on CPU)", "sorted dispatch, no tiles"),
        "layer_mlp_router_over_dense": (LAYER, dense_name),
    }
    ratios = {key: median_ratio(rounds, a, b) for key, (a, b) in pairs.items() if a in rounds and b in rounds}
    for key, value in ratios.items():
        print(f"{key}: {value:.3f}")
    name = f"moe_layer-{device.type}" + ("-head-to-head" if args.head_to_head else "")
    header = {
        "tokens": n,
        "dim": d,
        "spec": args.spec,
        "dtype": str(dtype).removeprefix("torch."),
        "expert_hidden": hidden,
        "row_tile": ROW_TILE,
        "experts_gflop": n * k * expert_flops(d, hidden, "gelu") / 1e9,  # the selected pairs' (the dense MLP's too)
        "ratios": ratios,
    }
    print(f"saved {save(name, header, rows)}", flush=True)
    if args.compile:  # after the eager figures are saved: compiling takes a while
        compiled = torch.compile(dense, dynamic=False)
        against = {
            COMPILED: lambda: compiled(dense_x),
            **{v: variants[v] for v in (dense_name, served, LAYER) if v in variants},
        }
        try:
            with torch.no_grad():
                second = time_rounds(against, args.repeats, cuda=cuda)
        except Exception as error:  # a compile that fails is a finding: record it
            header["compile_error"] = f"{type(error).__name__}: {str(error)[:300]}"
            print(f"torch.compile of the dense MLP failed: {header['compile_error']}")
        else:
            rows += table("compiled", second, COMPILED, {})
            for key, variant in (("served_dispatch", served), ("layer_mlp_router", LAYER), ("dense", dense_name)):
                if variant not in second:
                    continue
                ratios[f"{key}_over_dense_compiled"] = median_ratio(second, variant, COMPILED)
                print(f"{key}_over_dense_compiled: {ratios[f'{key}_over_dense_compiled']:.3f}")
        print(f"saved {save(name, header, rows)}", flush=True)


def table(
    round_name: str, rounds: dict[str, list[float]], base: str, faults: dict[str, float]
) -> list[dict[str, object]]:
    """One row per variant of a round-robin: its median ms, and the median over rounds of its time
    over `base`'s in the same round (the load drifts between rounds and moves every variant of a
    round alike), not a ratio of medians."""
    rows = []
    for name, values in rounds.items():
        row = {
            "round": round_name,
            "variant": name,
            "ms": statistics.median(values) * 1000,
            "vs dense": median_ratio(rounds, name, base),  # the round's dense MLP: eager, or compiled
            "page faults per call": faults.get(name, float("nan")),
        }
        print(
            f"{round_name:8s} {name:55s} {row['ms']:8.3f} ms  {row['vs dense']:.3f}x {base}  "
            f"{row['page faults per call']:6.0f} page faults per call"
        )
        rows.append(row)
    return rows


if __name__ == "__main__":
    main()
