"""Batch-invariant GEMMs for CUDA, in Triton (imported only when a GEMM runs on a GPU).

Why: cuBLAS and CUTLASS choose their kernel -- tile shape, split-K, stream-K -- from the shape of
the call, so on a GPU a row's result can follow how many rows share it: padding rows to whole
tiles (model/exact.py), enough for a CPU's BLAS, does not pin the reduction order there. Here one
fixed configuration computes every GEMM: each output tile is one program that walks K in the same
order in BLOCK_K steps, accumulating in fp32, and a row's bytes depend on its own values and the
weights only -- whatever M is, wherever the row sits, whatever shares the call. The same kernel
runs the experts as one grouped GEMM: each BLOCK_M-row tile of the sorted, tile-padded rows
belongs to one expert, whose weights it reads; it gathers those rows from the tokens by index,
and adds bias and GELU before rounding -- or, for SwiGLU experts, computes the gate and up halves
of one GEMM of width 2H side by side (the same K walk for both) and stores silu(gate) * up.
It also does `exact.operand` and `exact.rounded` itself: fp32 activations are rounded to the
weights' dtype as they are loaded, results to that dtype as they are stored. `combine` then sums
each token's gated expert outputs in expert order, one program per token (no atomics). Measured
on an H200: bench/results/gpu-h200-2026-11-26/.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

# One fixed configuration per (use, dtype) -- the point of the kernel: (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages).
# The grouped kernel's BLOCK_M is the experts' group tile (GPU_GROUP_TILE in model/exact.py).
CONFIGS = {
    ("dense", torch.bfloat16): (128, 256, 64, 8, 3),
    ("dense", torch.float16): (128, 256, 64, 8, 3),
    ("grouped", torch.bfloat16): (None, 128, 64, 4, 4),
    ("grouped", torch.float16): (None, 128, 64, 4, 4),
}
FP32_CONFIG = (64, 64, 32, 4, 3)  # full-precision fp32 FMAs (no TF32): small tiles fit shared memory


@triton.jit(do_not_specialize=["M"])  # one compiled kernel whatever the row count
def _tiled_mm(
    a_ptr,
    a_index_ptr,
    b_ptr,
    bias_ptr,
    c_ptr,
    tile_group_ptr,
    M,
    N,
    K: tl.constexpr,
    stride_am,
    stride_ak,
    stride_bg,
    stride_bk,
    stride_bn,
    stride_cm,
    stride_cn,
    HAS_BIAS: tl.constexpr,
    GELU: tl.constexpr,
    SWIGLU: tl.constexpr,
    GROUPED: tl.constexpr,
    GATHER: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """C[m, n] = act(sum_k A[r(m), k] B[g, k, n] (+ bias[g, n])), rounded to B's dtype, stored as C's.

    g = tile_group[m // BLOCK_M] when GROUPED, else 0; r(m) = a_index[m] when GATHER (-1: a padding
    row of zeros), else m; act = GELU (tanh form) or none. A is read in any float dtype and rounded
    to B's, as `exact.operand` does; C may be fp32 holding B-dtype values, as `exact.rounded` gives.
    SWIGLU: B (and bias) are 2N wide, [gate | up]; C[m, n] = silu(G[m, n]) * U[m, n] with G and U the
    sums above over columns n and N + n, accumulated together in the same order.
    """
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    if GROUPED:
        g = tl.load(tile_group_ptr + pid_m).to(tl.int64)
    else:
        g = 0
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    if GATHER:
        source = tl.load(a_index_ptr + rows, mask=rows < M, other=-1).to(tl.int64)
        a_rows = source >= 0
    else:
        source = rows.to(tl.int64)
        a_rows = rows < M
    a = a_ptr + source[:, None] * stride_am + ks[None, :] * stride_ak
    b = b_ptr + g * stride_bg + ks[:, None] * stride_bk + cols[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # SWIGLU's up half (unused otherwise)
    for step in range(0, tl.cdiv(K, BLOCK_K)):  # K is fixed per layer (constexpr): one kernel per width
        left = K - step * BLOCK_K
        a_tile = tl.load(a, mask=a_rows[:, None] & (ks[None, :] < left), other=0.0).to(b_ptr.dtype.element_ty)
        b_mask = (ks[:, None] < left) & (cols[None, :] < N)
        b_tile = tl.load(b, mask=b_mask, other=0.0)
        if IEEE:  # fp32 GEMMs in full fp32, as torch's default (no TF32)
            acc = tl.dot(a_tile, b_tile, acc, input_precision="ieee")
        else:
            acc = tl.dot(a_tile, b_tile, acc)
        if SWIGLU:  # the up projection's columns sit N columns to the right of the gate's
            up_tile = tl.load(b + N * stride_bn, mask=b_mask, other=0.0)
            if IEEE:
                acc_up = tl.dot(a_tile, up_tile, acc_up, input_precision="ieee")
            else:
                acc_up = tl.dot(a_tile, up_tile, acc_up)
        a += BLOCK_K * stride_ak
        b += BLOCK_K * stride_bk
    if HAS_BIAS:
        if SWIGLU:
            acc += tl.load(bias_ptr + g * 2 * N + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
            acc_up += tl.load(bias_ptr + g * 2 * N + N + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        else:
            acc += tl.load(bias_ptr + g * N + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    if GELU:  # 0.5 z (1 + tanh(u)), tanh(u) = 2 sigmoid(2u) - 1
        u = 0.7978845608028654 * (acc + 0.044715 * acc * acc * acc)
        acc = 0.5 * acc * (2.0 * tl.sigmoid(2.0 * u))
    if SWIGLU:  # silu(gate) * up, in fp32, rounded once below
        acc = acc * tl.sigmoid(acc) * acc_up
    c = c_ptr + rows[:, None].to(tl.int64) * stride_cm + cols[None, :] * stride_cn
    out = acc.to(b_ptr.dtype.element_ty).to(c_ptr.dtype.element_ty)
    tl.store(c, out, mask=(rows[:, None] < M) & (cols[None, :] < N))


def _launch(
    a: torch.Tensor,
    b: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_dtype: Optional[torch.dtype],
    tile_group: Optional[torch.Tensor] = None,
    tile: Optional[int] = None,
    a_index: Optional[torch.Tensor] = None,
    gelu: bool = False,
    swiglu: bool = False,
) -> torch.Tensor:
    k = a.shape[1]
    m = a_index.shape[0] if a_index is not None else a.shape[0]
    n = b.shape[-1] // 2 if swiglu else b.shape[-1]
    b3 = b if b.dim() == 3 else b.unsqueeze(0)  # [G, K, N]
    config_m, block_n, block_k, warps, stages = CONFIGS.get(
        ("grouped" if tile_group is not None else "dense", b.dtype), FP32_CONFIG
    )
    block_m = tile or config_m
    if swiglu:  # two accumulators (gate, up) per output tile: half as many columns keep the registers
        block_n = max(32, block_n // 2)
    out = a.new_empty(m, n, dtype=out_dtype or b.dtype)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _tiled_mm[grid](
        a,
        a_index if a_index is not None else a,
        b3,
        bias.contiguous() if bias is not None else a,
        out,
        tile_group if tile_group is not None else a,
        m,
        n,
        k,
        a.stride(0),
        a.stride(1),
        b3.stride(0),
        b3.stride(1),
        b3.stride(2),
        out.stride(0),
        out.stride(1),
        HAS_BIAS=bias is not None,
        GELU=gelu,
        SWIGLU=swiglu,
        GROUPED=tile_group is not None,
        GATHER=a_index is not None,
        IEEE=b.dtype == torch.float32,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=warps,
        num_stages=stages,
    )
    return out


def matmul(
    a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor] = None, out_dtype: Optional[torch.dtype] = None
) -> torch.Tensor:
    """a [M, K] (any float dtype, rounded to b's) @ b [K, N] (+ bias [N]), rounded to b's dtype and
    returned as `out_dtype` (default b's) -- row by row the same for any M."""
    return _launch(a, b, bias, out_dtype)


def grouped_matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    tile_group: torch.Tensor,
    tile: int,
    bias: Optional[torch.Tensor] = None,
    gelu: bool = False,
    a_index: Optional[torch.Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
    swiglu: bool = False,
) -> torch.Tensor:
    """For each `tile`-row tile t of the rows: rows @ b[g] (+ bias[g], then GELU if asked), g = tile_group[t]
    (int32 [R / tile]). The rows are a's, or with `a_index` [R] the rows a[a_index] (-1: a row of zeros),
    gathered in the kernel. With `swiglu`, b[g] (and bias[g]) are [gate | up] of width 2H and the result
    silu(gate) * up, [R, H]. Rounded to b's dtype, returned as `out_dtype` (default b's)."""
    rows = a_index.shape[0] if a_index is not None else a.shape[0]
    if tile not in (16, 32, 64, 128) or rows != tile_group.shape[0] * tile:
        raise ValueError(
            f"grouped rows must be whole tiles of 16, 32, 64 or 128 rows, got {rows} rows "
            f"for {tile_group.shape[0]} tiles of {tile}"
        )
    if gelu and swiglu:
        raise ValueError("one activation: gelu or swiglu")
    if swiglu and b.shape[-1] % 2:
        raise ValueError(f"swiglu needs [gate | up] weights of even width, got {b.shape[-1]}")
    return _launch(a, b, bias, out_dtype, tile_group, tile, a_index, gelu, swiglu)


@triton.jit
def _combine(y_ptr, row_ptr, gate_ptr, start_ptr, out_ptr, D, stride_y, stride_out, BLOCK_D: tl.constexpr):
    """out[t] = sum of gate[p] * y[row[p]] over token t's pairs p = start[t] .. start[t+1]-1, in that order (fp32)."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    begin = tl.load(start_ptr + t)
    end = tl.load(start_ptr + t + 1)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for p in range(begin, end):
        row = tl.load(row_ptr + p).to(tl.int64)
        acc += tl.load(y_ptr + row * stride_y + cols, mask=cols < D, other=0.0) * tl.load(gate_ptr + p)
    tl.store(out_ptr + t * stride_out + cols, acc, mask=cols < D)


def combine(y: torch.Tensor, row: torch.Tensor, gate: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """Each token's gated expert outputs summed in expert order: y [R, D] fp32 (the experts' rows), per pair
    (sorted by token, then expert) its row of y and gate value, start [N + 1] each token's first pair -> [N, D]."""
    tokens, dim = start.shape[0] - 1, y.shape[1]
    out = y.new_empty(tokens, dim)
    block_d = 256
    _combine[(tokens, triton.cdiv(dim, block_d))](
        y, row, gate, start, out, dim, y.stride(0), out.stride(0), BLOCK_D=block_d, num_warps=4
    )
    return out
