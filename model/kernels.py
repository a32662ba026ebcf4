"""Batch-invariant GEMMs for CUDA, in Triton (imported only when a GEMM runs on a GPU).

Why: cuBLAS and CUTLASS choose their kernel -- tile shape, split-K, stream-K -- from the shape of
the call, so on a GPU a row's result can follow how many rows share it: padding rows to whole
tiles (model/exact.py), enough for a CPU's BLAS, does not pin the reduction order there. Here one
fixed configuration computes every GEMM: each output tile is one program that walks K in the same
order in BLOCK_K steps, accumulating in fp32, and a row's bytes depend on its own values and the
weights only -- whatever M is, wherever the row sits, whatever shares the call. The same kernel
runs the experts as one grouped GEMM: each BLOCK_M-row tile of the sorted, tile-padded rows
belongs to one expert, whose weights it reads.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

BLOCK_N, BLOCK_K = 128, 64  # with BLOCK_M, fixed for every call: the point of the kernel
DENSE_BLOCK_M = 64


@triton.jit(do_not_specialize=["M"])  # one compiled kernel whatever the row count
def _tiled_mm(a_ptr, b_ptr, bias_ptr, c_ptr, tile_group_ptr, M, N, K: tl.constexpr,
              stride_am, stride_ak, stride_bg, stride_bk, stride_bn, stride_cm, stride_cn,
              HAS_BIAS: tl.constexpr, GROUPED: tl.constexpr, IEEE: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """C[m, n] = sum_k A[m, k] B[g, k, n] (+ bias[g, n]), g = tile_group[m // BLOCK_M] when GROUPED else 0."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    if GROUPED:
        g = tl.load(tile_group_ptr + pid_m).to(tl.int64)
    else:
        g = 0
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    a = a_ptr + rows[:, None].to(tl.int64) * stride_am + ks[None, :] * stride_ak
    b = b_ptr + g * stride_bg + ks[:, None] * stride_bk + cols[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(0, tl.cdiv(K, BLOCK_K)):  # K is fixed per layer (constexpr): one kernel per width
        left = K - step * BLOCK_K
        a_tile = tl.load(a, mask=(rows[:, None] < M) & (ks[None, :] < left), other=0.0)
        b_tile = tl.load(b, mask=(ks[:, None] < left) & (cols[None, :] < N), other=0.0)
        if IEEE:  # fp32 GEMMs in full fp32, as torch's default (no TF32)
            acc = tl.dot(a_tile, b_tile, acc, input_precision="ieee")
        else:
            acc = tl.dot(a_tile, b_tile, acc)
        a += BLOCK_K * stride_ak
        b += BLOCK_K * stride_bk
    if HAS_BIAS:
        acc += tl.load(bias_ptr + g * N + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    c = c_ptr + rows[:, None].to(tl.int64) * stride_cm + cols[None, :] * stride_cn
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=(rows[:, None] < M) & (cols[None, :] < N))


def _launch(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor], tile_group: Optional[torch.Tensor],
            block_m: int) -> torch.Tensor:
    m, k = a.shape
    n = b.shape[-1]
    b3 = b if b.dim() == 3 else b.unsqueeze(0)  # [G, K, N]
    out = a.new_empty(m, n)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, BLOCK_N))
    _tiled_mm[grid](a, b3, bias if bias is not None else a, out, tile_group if tile_group is not None else a,
                    m, n, k, a.stride(0), a.stride(1), b3.stride(0), b3.stride(1), b3.stride(2),
                    out.stride(0), out.stride(1),
                    HAS_BIAS=bias is not None, GROUPED=tile_group is not None, IEEE=a.dtype == torch.float32,
                    BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=4, num_stages=3)
    return out


def matmul(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """a [M, K] @ b [K, N] (+ bias [N]) in a's dtype, row by row the same for any M."""
    if bias is not None:
        bias = bias.contiguous()
    return _launch(a, b, bias, None, DENSE_BLOCK_M)


def grouped_matmul(a: torch.Tensor, b: torch.Tensor, tile_group: torch.Tensor, tile: int) -> torch.Tensor:
    """a [R, K] @ b[g] [K, N] for each `tile`-row tile of a, g = tile_group[tile index] (int32 [R / tile])."""
    if tile not in (16, 32, 64, 128) or a.shape[0] != tile_group.shape[0] * tile:
        raise ValueError(f"grouped rows must be whole tiles of 16, 32, 64 or 128 rows, got {a.shape[0]} rows "
                         f"for {tile_group.shape[0]} tiles of {tile}")
    return _launch(a, b, None, tile_group, tile)
