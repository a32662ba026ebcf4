"""Which GPU kernels make a row depend on its batch-mates, and what the batch-invariant ones cost.

For each kernel at a DiT's shapes: the first sample's rows computed alone and inside batches of
2 to 128 samples, compared to the bit (bf16 and fp32), and the time of the largest batch.
Kernels: cuBLAS (F.linear) and the Triton kernel of model/kernels.py for the linears; torch's
grouped GEMM and the Triton grouped kernel for the experts (tile-padded groups); the whole MoE
layer on the device path (model/kernels.py: routing, layout, grouped GEMMs, combine), as served;
SDPA on each attention backend. The adaLN case has one row per sample (M = 1 to 128), where
cuBLAS's choice of kernel (split-K for a short M) is likeliest to change with the batch.

    python bench/kernel_invariance.py [--dim 1152] [--heads 16] [--tokens 256] [--hidden 4608]

Prints and saves bench/results/kernel_invariance-cuda-<dim>.{json,md}. CUDA only.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save, time_call  # noqa: E402

from racedit.model import kernels  # noqa: E402
from racedit.model.config import MoEConfig  # noqa: E402
from racedit.model.exact import GPU_GROUP_TILE, SERVING, padded  # noqa: E402
from racedit.model.moe import MoELayer  # noqa: E402

BATCHES = [1, 2, 3, 4, 8, 16, 32, 64, 128]


def check(fn: Callable[[torch.Tensor], torch.Tensor], sample: Callable[[int], torch.Tensor], repeats: int) -> dict:
    """fn on batches of samples; whether the first sample's output is the same bytes in each, and the time."""
    big = sample(BATCHES[-1])
    alone = fn(big[:1])
    worst, differs = 0.0, []
    for b in BATCHES[1:]:
        out = fn(big[:b])[:1]
        if not torch.equal(out, alone):
            differs.append(b)
            worst = max(worst, (out.float() - alone.float()).abs().max().item())
    return {
        "invariant": not differs,
        "differs_at_batch": differs,
        "max_abs_diff": worst,
        f"ms_at_batch_{BATCHES[-1]}": time_call(lambda: fn(big), repeats, cuda=True) * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=1152)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=4608, help="the dense MLP's width (k experts' together)")
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("kernel_invariance.py needs a CUDA GPU")
    device, d, n = torch.device("cuda"), args.dim, args.tokens
    g = torch.Generator(device=device).manual_seed(0)
    rows = []
    for dtype in (torch.bfloat16, torch.float32):

        def tokens(b: int) -> torch.Tensor:
            return torch.randn(b, n, d, device=device, generator=g).to(dtype)

        w = (torch.randn(args.hidden, d, device=device, generator=g) / d**0.5).to(dtype)
        bias = torch.randn(args.hidden, device=device, generator=g).to(dtype)
        hidden_e = args.hidden // args.k
        w_e = (torch.randn(args.experts, d, hidden_e, device=device, generator=g) / d**0.5).to(dtype)
        # Each expert's group: tokens of the batch routed to it, padded to whole tiles, as grouped_dispatch sorts them.
        route = torch.randint(0, args.experts, (BATCHES[-1], n), device=device, generator=g)

        def grouped(x: torch.Tensor, invariant: bool) -> torch.Tensor:
            flat, experts = x.reshape(-1, d), route[: x.shape[0]].reshape(-1)
            order = experts.argsort(stable=True)
            counts = experts.bincount(minlength=args.experts).tolist()
            tile = GPU_GROUP_TILE if invariant else 1
            sizes = [padded(c, tile) for c in counts]
            slot = torch.cat(
                [
                    torch.arange(c, device=device) + s
                    for c, s in zip(counts, [0, *torch.tensor(sizes).cumsum(0).tolist()][:-1])
                ]
            )
            buffer = flat.new_zeros(sum(sizes), d).index_copy_(0, slot, flat[order])
            if invariant:
                tiles = torch.tensor(sizes, device=device) // tile
                tile_group = torch.arange(args.experts, device=device).repeat_interleave(tiles).to(torch.int32)
                full = [min(tile, c - i * tile) for c, n_tiles in zip(counts, tiles.tolist()) for i in range(n_tiles)]
                tile_rows = torch.tensor(full, device=device, dtype=torch.int32)
                num_tiles = torch.tensor([len(full)], device=device, dtype=torch.int32)
                y = kernels.grouped_linear(buffer, None, w_e, None, tile_group, tile_rows, num_tiles, tile, "none")
            else:
                y = torch._grouped_mm(buffer, w_e, offs=torch.tensor(sizes, device=device).cumsum(0).to(torch.int32))
            out = torch.empty(flat.shape[0], hidden_e, device=device, dtype=y.dtype)
            out[order] = y[slot]
            return out.view(x.shape[0], n, -1)

        def attention(backend: SDPBackend) -> Callable[[torch.Tensor], torch.Tensor]:
            def fn(x: torch.Tensor) -> torch.Tensor:
                q = x.view(x.shape[0], n, args.heads, -1).transpose(1, 2)
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, q * 0.5, q)

            return fn

        layer = MoELayer(d, 4.0, MoEConfig(spec=f"{args.k}in{args.experts}"), 4).to(device).eval()
        for p in layer.parameters():
            p.data = p.data.to(dtype)
        execution = SERVING.resolve(device)

        def moe_layer(x: torch.Tensor) -> torch.Tensor:  # the served layer: routing and dispatch on the device
            return layer(x.float(), execution)[0]

        w_ada = (torch.randn(6 * d, d, device=device, generator=g) / d**0.5).to(dtype)  # adaLN: one row per sample

        def conditions(b: int) -> torch.Tensor:
            return torch.randn(b, d, device=device, generator=g).to(dtype)

        cases: dict[str, tuple[Callable, Callable]] = {
            "adaLN linear (M = samples), cuBLAS": (lambda c: F.linear(c, w_ada), conditions),
            "adaLN linear (M = samples), Triton fixed tiles": (
                lambda c: kernels.linear(c, w_ada, None, dtype, "none", None, None, 1),
                conditions,
            ),
            "linear, cuBLAS (F.linear)": (lambda x: F.linear(x, w, bias), tokens),
            "linear, Triton fixed tiles": (
                lambda x: kernels.linear(x.reshape(-1, d), w, bias, dtype, "none", None, None, 1).view(
                    x.shape[0], n, -1
                ),
                tokens,
            ),
            f"experts, Triton grouped, tiles of {GPU_GROUP_TILE}": (lambda x: grouped(x, True), tokens),
            "MoE layer, device path (threshold routing, layout, grouped GEMMs, combine)": (moe_layer, tokens),
        }
        if dtype == torch.bfloat16:
            cases["experts, torch._grouped_mm"] = (lambda x: grouped(x, False), tokens)
        for backend in (
            SDPBackend.FLASH_ATTENTION,
            SDPBackend.EFFICIENT_ATTENTION,
            SDPBackend.CUDNN_ATTENTION,
            SDPBackend.MATH,
        ):
            cases[f"attention, SDPA {backend.name}"] = (attention(backend), tokens)
        for name, (fn, sample) in cases.items():
            try:
                with torch.no_grad():
                    row = {
                        "dtype": str(dtype).removeprefix("torch."),
                        "kernel": name,
                        **check(fn, sample, args.repeats),
                    }
            except Exception as error:  # a backend this GPU or dtype lacks
                row = {
                    "dtype": str(dtype).removeprefix("torch."),
                    "kernel": name,
                    "error": str(error).splitlines()[0][:120],
                }
            rows.append(row)
            print(row, flush=True)
    save(
        f"kernel_invariance-cuda-{d}",
        {
            "dim": d,
            "heads": args.heads,
            "tokens": n,
            "hidden": args.hidden,
            "experts": args.experts,
            "k": args.k,
            "batches": BATCHES,
        },
        rows,
    )


if __name__ == "__main__":
    main()
