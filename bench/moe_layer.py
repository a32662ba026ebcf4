"""MoE layer speed: racedit's sparse dispatch vs a dense MLP of equal activated FLOPs vs a
per-expert loop in the style of the DiT-MoE reference (argsort, loop, scatter_reduce).

    python bench/moe_layer.py [--tokens 4096] [--dim 256] [--spec 2in8] [--device cpu|cuda]

All three compute the same selected (token, expert) pairs: top B*L*k of an
expert race, so the MoE does exactly the dense MLP's activated FLOPs.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save, time_call  # noqa: E402

from racedit.model.config import MoEConfig
from racedit.model.moe import Experts, MoELayer, expert_race, sparse_dispatch


def reference_loop(x: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor, experts: list[nn.Module]) -> torch.Tensor:
    """The DiT-MoE way: sort pairs by expert, loop over experts, scatter_reduce into a cache."""
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
            y = experts[e](x[idx]) * pair_weights[start:end, None]
            out.scatter_reduce_(0, idx[:, None].expand(-1, x.shape[1]), y, reduce="sum")
        start = end
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--spec", default="2in8")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    cfg = MoEConfig(spec=args.spec)
    d, n, k, e = args.dim, args.tokens, cfg.k, cfg.num_experts
    layer_linear = MoELayer(d, 4.0, MoEConfig(spec=args.spec, router="linear", inference="topk"), 16).to(device).eval()
    layer_mlp = MoELayer(d, 4.0, MoEConfig(spec=args.spec, router="mlp", inference="topk"), 16).to(device).eval()
    hidden = layer_linear.expert_hidden
    dense = nn.Sequential(nn.Linear(d, hidden * k), nn.GELU(approximate="tanh"), nn.Linear(hidden * k, d)).to(device).eval()
    experts: Experts = layer_linear.experts
    modules = [nn.Sequential(nn.Linear(d, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, d)).to(device)
               for _ in range(e)]
    x = torch.randn(1, n, d, device=device)
    scores = layer_linear.router(x, False)[0]
    mask, _ = expert_race(scores, k)
    flat_x, flat_w, flat_m = x[0], scores[0], mask[0]
    assert int(flat_m.sum()) == n * k
    rows = []
    with torch.no_grad():
        timings = {
            "dense MLP (equal activated FLOPs)": time_call(lambda: dense(flat_x), args.repeats, cuda=cuda),
            "racedit sparse dispatch": time_call(lambda: sparse_dispatch(flat_x, flat_w, flat_m, experts), args.repeats, cuda=cuda),
            "racedit MoE layer, linear router": time_call(lambda: layer_linear(x), args.repeats, cuda=cuda),
            "racedit MoE layer, MLP router": time_call(lambda: layer_mlp(x), args.repeats, cuda=cuda),
            "DiT-MoE-style loop + scatter_reduce": time_call(lambda: reference_loop(flat_x, flat_w, flat_m, modules), args.repeats, cuda=cuda),
        }
    base = timings["dense MLP (equal activated FLOPs)"]
    for name, seconds in timings.items():
        rows.append({"variant": name, "ms": seconds * 1000, "vs dense": seconds / base})
    ratios = {
        "dispatch_over_dense": timings["racedit sparse dispatch"] / base,
        "layer_linear_router_over_dense": timings["racedit MoE layer, linear router"] / base,
        "layer_mlp_router_over_dense": timings["racedit MoE layer, MLP router"] / base,
        "dispatch_over_reference_loop": timings["racedit sparse dispatch"] / timings["DiT-MoE-style loop + scatter_reduce"],
    }
    for row in rows:
        print(f"{row['variant']:40s} {row['ms']:8.3f} ms  {row['vs dense']:.3f}x dense")
    for key, value in ratios.items():
        print(f"{key}: {value:.3f}")
    path = save(f"moe_layer-{device.type}", {"tokens": n, "dim": d, "spec": args.spec, "expert_hidden": hidden,
                                             "ratios": ratios}, rows)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
