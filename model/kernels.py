"""The device path's kernels, in Triton: batch-invariant GEMMs, and routing and dispatch on the device.

Imported only where the device path runs: on CUDA, or on CPU tensors in Triton's interpreter with
RACEDIT_TRITON_ON_CPU=1 (model/exact.py), which is how CPU CI checks these very programs.

Why a GEMM of our own: cuBLAS and CUTLASS choose their kernel -- tile shape, split-K, stream-K --
from the shape of the call, so on a GPU a row's result can follow how many rows share it. Here one
fixed configuration computes every GEMM: each output tile walks K in the same order in BLOCK_K
steps, accumulating in fp32, so a row's bytes depend on its own values and the weights only --
whatever M is, wherever the row sits, whichever program computes its tile. The kernel rounds fp32
activations to the weights' dtype as it loads them and its results as it stores them (what
`exact.operand` and `exact.rounded` do on a CPU), and its epilogues add bias, GELU or SwiGLU, or a
block's gate and residual.

Why routing on the device: one MoE layer is six or seven launches, none shaped by the routing and
none waiting on the host, so a forward can be captured in a CUDA graph:

    route            the router's gate-head GEMM with routing in its epilogue: logits, gating,
                     threshold (per sample: the compute dial) or top-k, the mask, and each block of
                     tokens' count per expert (before it, the MLP router's hidden GEMM, GELU fused)
    layout           one program: tokens per expert, each expert's group padded to whole tiles,
                     each block's first slot per expert, each tile's expert and valid rows, the tile count
    scatter          each selected pair's slot (its expert's group, in token order) and each slot's token
    grouped GEMM x2  persistent: a fixed grid walks the tiles the device counted; the first gathers
                     its rows from the tokens, the second writes each pair's output
    combine          each token's gated expert outputs summed in expert order (no atomics), plus the
                     shared expert, times the block's gate, plus the residual

Buffers are sized for the worst case (every token may take every expert under threshold routing:
`moe.worst_case_tiles`); only the tiles the device counted are computed. Every launcher is a
`torch.library` custom op with a fake implementation, so a forward traces under fake tensors
(a proof that no shape follows the routing and nothing reads the device) and compiles without
graph breaks.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from .exact import output_width

# One fixed configuration per (use, dtype) -- the point of the kernel: (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages).
# The grouped kernel's BLOCK_M is the experts' group tile (GPU_GROUP_TILE in model/exact.py).
CONFIGS = {
    ("dense", torch.bfloat16): (128, 256, 64, 8, 3),
    ("dense", torch.float16): (128, 256, 64, 8, 3),
    ("grouped", torch.bfloat16): (None, 128, 64, 4, 4),
    ("grouped", torch.float16): (None, 128, 64, 4, 4),
}
FP32_CONFIG = (64, 64, 32, 4, 3)  # full-precision fp32 FMAs (no TF32): small tiles fit shared memory
# Pinned on every launch: contracting a * b + c into one FMA changes a result's last bits, and Triton's
# default for it changes in 3.10, so served bytes would follow the Triton version.
FIXED = dict(enable_fp_fusion=False)
ACTIVATIONS = {"none": 0, "gelu_tanh": 1, "gelu": 2, "swiglu": 3, "silu": 4}
GATINGS = {"identity": 0, "sigmoid": 1, "softmax": 2}


@functools.cache
def persistent_programs(device: torch.device) -> int:
    """Programs of a persistent grouped GEMM: as many as run at once (two per SM: a program's tiles
    take about 96 KB of shared memory), a few in the interpreter."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _expert_block(experts: int) -> int:
    """Columns of a tile holding every expert of a token (tl.dot and tl.arange want a power of two >= 16)."""
    return max(16, triton.next_power_of_2(experts))


def on_device_of(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it `t`'s (a model served on cuda:1)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


# ------------------------------------------------------------------ GEMM ----
@triton.jit
def _accumulate(
    a_ptr,
    source,
    real,
    b_ptr,
    bias_ptr,
    g,
    cols,
    N,
    K: tl.constexpr,
    stride_am,
    stride_ak,
    stride_bg,
    stride_bk,
    stride_bn,
    ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One output tile in fp32, before rounding: act(sum_k A[source, k] B[g, k, cols] (+ bias[g, cols])) over
    the `real` rows, K walked in BLOCK_K steps in order. A is read in any float dtype and rounded to B's.
    ACT: 1 GELU (tanh), 2 GELU (erf), 3 SwiGLU: B (and bias) are 2N wide, [gate | up], -> silu(G) * U; 4 SiLU."""
    ks = tl.arange(0, BLOCK_K)
    a = a_ptr + source[:, None] * stride_am + ks[None, :] * stride_ak
    b = b_ptr + g * stride_bg + ks[:, None] * stride_bk + cols[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # SwiGLU's up half (unused otherwise)
    for step in range(0, tl.cdiv(K, BLOCK_K)):  # K is fixed per layer (constexpr): one kernel per width
        left = K - step * BLOCK_K
        a_tile = tl.load(a, mask=real[:, None] & (ks[None, :] < left), other=0.0).to(b_ptr.dtype.element_ty)
        b_mask = (ks[:, None] < left) & (cols[None, :] < N)
        b_tile = tl.load(b, mask=b_mask, other=0.0)
        if IEEE:  # fp32 GEMMs in full fp32, as torch's default (no TF32)
            acc = tl.dot(a_tile, b_tile, acc, input_precision="ieee")
        else:
            acc = tl.dot(a_tile, b_tile, acc)
        if ACT == 3:  # the up projection's columns sit N columns to the right of the gate's
            up_tile = tl.load(b + N * stride_bn, mask=b_mask, other=0.0)
            if IEEE:
                acc_up = tl.dot(a_tile, up_tile, acc_up, input_precision="ieee")
            else:
                acc_up = tl.dot(a_tile, up_tile, acc_up)
        a += BLOCK_K * stride_ak
        b += BLOCK_K * stride_bk
    if HAS_BIAS:
        width = 2 * N if ACT == 3 else N
        acc += tl.load(bias_ptr + g * width + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        if ACT == 3:
            acc_up += tl.load(bias_ptr + g * width + N + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    if ACT == 1:  # 0.5 z (1 + tanh(u)), tanh(u) = 2 sigmoid(2u) - 1
        u = 0.7978845608028654 * (acc + 0.044715 * acc * acc * acc)
        acc = 0.5 * acc * (2.0 * tl.sigmoid(2.0 * u))
    elif ACT == 2:
        acc = 0.5 * acc * (1.0 + tl.erf(acc * 0.7071067811865476))
    elif ACT == 3:  # silu(gate) * up, in fp32, rounded once by the caller
        acc = acc * tl.sigmoid(acc) * acc_up
    elif ACT == 4:
        acc = acc * tl.sigmoid(acc)
    return acc


@triton.jit(do_not_specialize=["M", "rows_per_gate"])  # one compiled kernel whatever the row count
def _tiled_mm(
    a_ptr,
    a_index_ptr,
    b_ptr,
    bias_ptr,
    c_ptr,
    tile_group_ptr,
    tile_rows_ptr,
    num_tiles_ptr,
    res_ptr,
    gate_ptr,
    M,
    N,
    K: tl.constexpr,
    rows_per_gate,
    stride_am,
    stride_ak,
    stride_bg,
    stride_bk,
    stride_bn,
    stride_cm,
    stride_cn,
    stride_gate,
    ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    GROUPED: tl.constexpr,
    GATHER: tl.constexpr,
    RESIDUAL: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """C[m, n] = epilogue(`_accumulate` rounded to B's dtype), stored as C's.

    Dense: one output tile per program. GROUPED: a persistent grid walks the first tile count
    (`num_tiles`, read on the device) tiles; tile t belongs to group g = tile_group[t] and its first
    tile_rows[t] rows are real. r(m) = a_index[m] when GATHER, else m. RESIDUAL: C = res[m, n] +
    gate[m // rows_per_gate, n] * that (fp32), a block's gated residual.
    """
    n_blocks = tl.cdiv(N, BLOCK_N)
    if GROUPED:
        total = tl.load(num_tiles_ptr) * n_blocks
    else:
        total = tl.cdiv(M, BLOCK_M) * n_blocks
    for work in range(tl.program_id(0), total, tl.num_programs(0)):
        pid_m = work // n_blocks
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = (work % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
        if GROUPED:
            g = tl.load(tile_group_ptr + pid_m).to(tl.int64)
            real = tl.arange(0, BLOCK_M) < tl.load(tile_rows_ptr + pid_m)
        else:
            g = 0
            real = rows < M
        if GATHER:
            source = tl.load(a_index_ptr + rows, mask=real, other=0).to(tl.int64)
        else:
            source = rows.to(tl.int64)
        acc = _accumulate(
            a_ptr, source, real, b_ptr, bias_ptr, g, cols, N, K, stride_am, stride_ak, stride_bg, stride_bk,
            stride_bn, ACT, HAS_BIAS, IEEE, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip
        out = acc.to(b_ptr.dtype.element_ty)
        keep = real[:, None] & (cols[None, :] < N)
        wide = rows.to(tl.int64)
        if RESIDUAL:  # row pointers first, then the tile: fewer registers than a tile of int64 offsets
            res_rows = res_ptr + wide * N
            gate_rows = gate_ptr + (wide // rows_per_gate) * stride_gate
            res = tl.load(res_rows[:, None] + cols[None, :], mask=keep, other=0.0)
            gate = tl.load(gate_rows[:, None] + cols[None, :], mask=keep, other=0.0)
            out = res + gate * out.to(tl.float32)
        c_rows = c_ptr + wide * stride_cm
        tl.store(c_rows[:, None] + cols[None, :] * stride_cn, out.to(c_ptr.dtype.element_ty), mask=keep)


def _config(b: torch.Tensor, grouped: bool) -> tuple:
    return CONFIGS.get(("grouped" if grouped else "dense", b.dtype), FP32_CONFIG)


@torch.library.custom_op("racedit::linear", mutates_args=())
def linear(
    a: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_dtype: torch.dtype,
    activation: str,
    residual: Optional[torch.Tensor],
    gate: Optional[torch.Tensor],
    rows_per_gate: int,
) -> torch.Tensor:
    """a [M, K] (any float dtype, rounded to the weight's) @ weight [N, K]^T (+ bias), activated, rounded
    to the weight's dtype, row by row the same for any M -> [M, N] as `out_dtype`. With `residual` [M, N]
    and `gate` [M / rows_per_gate, N] (fp32): residual + gate * that, in fp32."""
    m, k = a.shape
    b = weight.t()
    n = output_width(b.shape[1], activation)
    block_m, block_n, block_k, warps, stages = _config(weight, grouped=False)
    if activation != "none" or residual is not None:  # an epilogue's temporaries (SwiGLU's up half, erf,
        block_n = max(32, block_n // 2)  # residual and gate) beside the tile: half as many columns keep
        # the registers from spilling (ptxas for sm_90: 248 bytes of stack for erf-GELU at 128 x 256)
    out = a.new_empty(m, n, dtype=out_dtype)
    if m == 0:
        return out
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    with on_device_of(a):
        _tiled_mm[grid](
            a, a, b, bias if bias is not None else a, out, a, a, a,
            residual if residual is not None else a, gate if gate is not None else a,
            m, n, k, rows_per_gate,
            a.stride(0), a.stride(1), 0, b.stride(0), b.stride(1), out.stride(0), out.stride(1),
            gate.stride(0) if gate is not None else 0,
            ACT=ACTIVATIONS[activation], HAS_BIAS=bias is not None, GROUPED=False, GATHER=False,
            RESIDUAL=residual is not None, IEEE=weight.dtype == torch.float32,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages, **FIXED,
        )  # fmt: skip
    return out


@linear.register_fake
def _(a, weight, bias, out_dtype, activation, residual, gate, rows_per_gate):
    n = output_width(weight.shape[0], activation)
    return a.new_empty(a.shape[0], n, dtype=out_dtype)


@torch.library.custom_op("racedit::grouped_linear", mutates_args=())
def grouped_linear(
    a: torch.Tensor,
    a_index: Optional[torch.Tensor],
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    tile_group: torch.Tensor,
    tile_rows: torch.Tensor,
    num_tiles: torch.Tensor,
    tile: int,
    activation: str,
) -> torch.Tensor:
    """The experts' GEMM over tile-padded groups: tile t (of `tile` rows; the first num_tiles [1] are
    real, read on the device) is rows @ weight[tile_group[t]] (+ bias, activated); its first
    tile_rows[t] rows are a[a_index[r]] (or a[r]), the rest padding, left unwritten. weight [G, K, N]
    (SwiGLU: [gate | up], 2H wide) -> [tile_group.numel() * tile, N or H] in the weight's dtype."""
    if tile not in (16, 32, 64, 128):
        raise ValueError(f"grouped rows come in tiles of 16, 32, 64 or 128 rows, got {tile}")
    if activation == "swiglu" and weight.shape[-1] % 2:
        raise ValueError(f"swiglu needs [gate | up] weights of even width, got {weight.shape[-1]}")
    rows = tile_group.shape[0] * tile
    n = output_width(weight.shape[-1], activation)
    _, block_n, block_k, warps, stages = _config(weight, grouped=True)
    if activation == "swiglu":
        block_n = max(32, block_n // 2)
    out = weight.new_empty(rows, n)
    work = tile_group.shape[0] * triton.cdiv(n, block_n)
    if work == 0:
        return out
    grid = (min(work, persistent_programs(a.device)),)
    with on_device_of(a):
        _tiled_mm[grid](
            a, a_index if a_index is not None else a, weight, bias if bias is not None else a, out,
            tile_group, tile_rows, num_tiles, a, a,
            rows, n, a.shape[1], 1,
            a.stride(0), a.stride(1), weight.stride(0), weight.stride(1), weight.stride(2),
            out.stride(0), out.stride(1), 0,
            ACT=ACTIVATIONS[activation], HAS_BIAS=bias is not None, GROUPED=True, GATHER=a_index is not None,
            RESIDUAL=False, IEEE=weight.dtype == torch.float32,
            BLOCK_M=tile, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages, **FIXED,
        )  # fmt: skip
    return out


@grouped_linear.register_fake
def _(a, a_index, weight, bias, tile_group, tile_rows, num_tiles, tile, activation):
    n = output_width(weight.shape[-1], activation)
    return weight.new_empty(tile_group.shape[0] * tile, n)


# ----------------------------------------------------------- layer norm ----
@triton.jit(do_not_specialize=["rows_per_sample"])
def _norm_modulate(x_ptr, shift_ptr, scale_ptr, out_ptr, D, rows_per_sample, stride_mod, eps, BLOCK_D: tl.constexpr):
    """out[m] = LayerNorm(x[m]) * (1 + scale[s]) + shift[s], s = m // rows_per_sample, in fp32, stored as out's."""
    m = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    keep = cols < D
    x = tl.load(x_ptr + m * D + cols, mask=keep, other=0.0)
    mean = tl.sum(x, axis=0) / D
    centred = tl.where(keep, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / D + eps)
    s = m // rows_per_sample
    shift = tl.load(shift_ptr + s * stride_mod + cols, mask=keep, other=0.0)
    scale = tl.load(scale_ptr + s * stride_mod + cols, mask=keep, other=0.0)
    y = centred * rstd * (1.0 + scale) + shift
    tl.store(out_ptr + m * D + cols, y.to(out_ptr.dtype.element_ty), mask=keep)


@torch.library.custom_op("racedit::norm_modulate", mutates_args=())
def norm_modulate(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float, out_dtype: torch.dtype
) -> torch.Tensor:
    """adaLN's LayerNorm (no affine) and modulation of x [B, L, D] by shift and scale [B, D] (fp32), one
    program per row, emitted once in the next GEMM's input dtype -> [B, L, D]."""
    batch, seq_len, dim = x.shape
    out = x.new_empty(x.shape, dtype=out_dtype)
    if x.numel() == 0:
        return out
    with on_device_of(x):
        _norm_modulate[(batch * seq_len,)](
            x, shift, scale, out, dim, seq_len, shift.stride(0), eps,
            BLOCK_D=triton.next_power_of_2(dim), num_warps=4, **FIXED,
        )  # fmt: skip
    return out


@norm_modulate.register_fake
def _(x, shift, scale, eps, out_dtype):
    return x.new_empty(x.shape, dtype=out_dtype)


# --------------------------------------------------------------- routing ----
@triton.jit
def _select(z, rows, cols, real, valid, tau_ptr, stride_tau, rows_per_sample, GATING: tl.constexpr, TOPK: tl.constexpr):
    """Gate values and selected pairs of a tile of logits z [T, BLOCK_E] (fp32): score > tau[sample]
    (TOPK 0; one threshold per sample, the compute dial), or each token's TOPK best (lowest index on a tie)."""
    z = tl.where(valid, z, float("-inf"))
    if GATING == 1:
        s = tl.sigmoid(z)
    elif GATING == 2:
        e = tl.exp(z - tl.max(z, axis=1)[:, None])
        s = e / tl.sum(e, axis=1)[:, None]
    else:
        s = z
    if TOPK == 0:
        tau = tl.load(tau_ptr + (rows // rows_per_sample).to(tl.int64) * stride_tau, mask=real, other=0.0)
        selected = (s > tau[:, None]) & valid
    else:
        selected = valid & (cols[None, :] < 0)  # all false, the tile's shape
        left = tl.where(valid, s, float("-inf"))
        for _ in tl.static_range(TOPK):
            best = tl.argmax(left, axis=1)
            hit = cols[None, :] == best[:, None]
            selected = selected | hit
            left = tl.where(hit, float("-inf"), left)
        selected = selected & valid
    return s, selected


@triton.jit(do_not_specialize=["M", "rows_per_sample"], do_not_specialize_on_alignment=["tau_ptr"])
def _router_mm(
    a_ptr,
    b_ptr,
    bias_ptr,
    tau_ptr,
    logits_ptr,
    scores_ptr,
    mask_ptr,
    block_counts_ptr,
    M,
    E,
    K: tl.constexpr,
    rows_per_sample,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    stride_tau,
    HAS_BIAS: tl.constexpr,
    GATING: tl.constexpr,
    TOPK: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """The router's last GEMM with routing in its epilogue: one program per BLOCK_M tokens, all E experts
    in one tile: logits (rounded to the weights' dtype), gate values, selected pairs and the block's
    count per expert."""
    block = tl.program_id(0)
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_E)
    real = rows < M
    acc = _accumulate(
        a_ptr, rows.to(tl.int64), real, b_ptr, bias_ptr, 0, cols, E, K, stride_am, stride_ak, 0, stride_bk,
        stride_bn, 0, HAS_BIAS, IEEE, BLOCK_M, BLOCK_E, BLOCK_K,
    )  # fmt: skip
    z = acc.to(b_ptr.dtype.element_ty).to(tl.float32)
    valid = real[:, None] & (cols < E)[None, :]
    s, selected = _select(z, rows, cols, real, valid, tau_ptr, stride_tau, rows_per_sample, GATING, TOPK)
    offsets = rows[:, None].to(tl.int64) * E + cols[None, :]
    tl.store(logits_ptr + offsets, z, mask=valid)
    tl.store(scores_ptr + offsets, s, mask=valid)
    tl.store(mask_ptr + offsets, selected.to(tl.int8), mask=valid)
    tl.store(block_counts_ptr + block * E + cols, tl.sum(selected.to(tl.int32), axis=0), mask=cols < E)


def route_block(weight: torch.Tensor) -> int:
    """Tokens per program of `route` (the router GEMM's BLOCK_M): the granularity of the block counts."""
    return _config(weight, grouped=False)[0]


@torch.library.custom_op("racedit::route", mutates_args=())
def route(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    thresholds: Optional[torch.Tensor],
    rows_per_sample: int,
    gating: str,
    top_k: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The router's gate head and routing as one kernel: x [N, D] @ weight [E, D]^T (+ bias) -> logits
    [N, E] (fp32 holding the weights' dtype), gate values [N, E] fp32, the selected pairs [N, E] bool
    and each block of `route_block` tokens' count per expert [blocks, E] int32. Selection: threshold
    routing by thresholds [N / rows_per_sample] (one per sample; a stride-0 view for one threshold),
    or with thresholds None each token's top `top_k`."""
    tokens, experts = x.shape[0], weight.shape[0]
    block_m, _, block_k, warps, stages = _config(weight, grouped=False)
    blocks = triton.cdiv(tokens, block_m)
    logits = x.new_empty(tokens, experts, dtype=torch.float32)
    scores = torch.empty_like(logits)
    mask = x.new_empty(tokens, experts, dtype=torch.int8)
    block_counts = x.new_empty(blocks, experts, dtype=torch.int32)
    if blocks:
        b = weight.t()
        with on_device_of(x):
            _router_mm[(blocks,)](
                x, b, bias if bias is not None else x, thresholds if thresholds is not None else x,
                logits, scores, mask, block_counts, tokens, experts, x.shape[1], rows_per_sample,
                x.stride(0), x.stride(1), b.stride(0), b.stride(1),
                thresholds.stride(0) if thresholds is not None else 0,
                HAS_BIAS=bias is not None, GATING=GATINGS[gating], TOPK=top_k if thresholds is None else 0,
                IEEE=weight.dtype == torch.float32, BLOCK_M=block_m, BLOCK_E=_expert_block(experts),
                BLOCK_K=block_k, num_warps=4, num_stages=stages, **FIXED,
            )  # fmt: skip
    return logits, scores, mask.view(torch.bool), block_counts


@route.register_fake
def _(x, weight, bias, thresholds, rows_per_sample, gating, top_k):
    tokens, experts = x.shape[0], weight.shape[0]
    blocks = -(-tokens // route_block(weight))
    logits = x.new_empty(tokens, experts, dtype=torch.float32)
    return (
        logits,
        torch.empty_like(logits),
        torch.empty_like(logits, dtype=torch.bool),
        x.new_empty(blocks, experts, dtype=torch.int32),
    )


@triton.jit(do_not_specialize=["M"])
def _count_pairs(mask_ptr, block_counts_ptr, M, E, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    """Each block of BLOCK_T tokens' count per expert of a mask chosen elsewhere."""
    block = tl.program_id(0)
    rows = block * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    valid = (rows < M)[:, None] & (cols < E)[None, :]
    selected = tl.load(mask_ptr + rows[:, None].to(tl.int64) * E + cols[None, :], mask=valid, other=0) != 0
    tl.store(block_counts_ptr + block * E + cols, tl.sum(selected.to(tl.int32), axis=0), mask=cols < E)


@torch.library.custom_op("racedit::count_pairs", mutates_args=())
def count_pairs(mask: torch.Tensor, block: int) -> torch.Tensor:
    """mask [N, E] bool (a routing decided in torch: expert choice, a race) -> each block of `block`
    tokens' count per expert [blocks, E] int32, as `route` gives."""
    tokens, experts = mask.shape
    block_counts = mask.new_empty(triton.cdiv(tokens, block), experts, dtype=torch.int32)
    if tokens:
        with on_device_of(mask):
            _count_pairs[(block_counts.shape[0],)](
                mask.view(torch.int8), block_counts, tokens, experts, BLOCK_T=block,
                BLOCK_E=_expert_block(experts), **FIXED,
            )  # fmt: skip
    return block_counts


@count_pairs.register_fake
def _(mask, block):
    return mask.new_empty(-(-mask.shape[0] // block), mask.shape[1], dtype=torch.int32)


# ---------------------------------------------------------------- layout ----
@triton.jit(do_not_specialize=["NB", "max_tiles"])
def _layout(
    block_counts_ptr,
    block_offsets_ptr,
    tile_expert_ptr,
    tile_rows_ptr,
    num_tiles_ptr,
    counts_ptr,
    NB,
    E,
    max_tiles,
    TILE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_TILES: tl.constexpr,
):
    """One program: from each block's count per expert, each expert's group (whole tiles, experts in
    order), each block's first slot in each group, and each tile's expert and real rows."""
    cols = tl.arange(0, BLOCK_E)
    experts = cols < E
    counts = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for start in range(0, NB, BLOCK_B):
        b = start + tl.arange(0, BLOCK_B)
        keep = (b < NB)[:, None] & experts[None, :]
        counts += tl.sum(tl.load(block_counts_ptr + b[:, None] * E + cols[None, :], mask=keep, other=0), axis=0)
    tiles = (counts + TILE - 1) // TILE
    ends = tl.cumsum(tiles, axis=0)  # each expert's tiles end here (its group's last tile + 1)
    starts = ends - tiles
    num_tiles = tl.sum(tiles, axis=0)
    tl.store(counts_ptr + cols, counts, mask=experts)
    tl.store(num_tiles_ptr, num_tiles)
    carry = starts * TILE  # the next free slot of each expert's group
    for start in range(0, NB, BLOCK_B):
        b = start + tl.arange(0, BLOCK_B)
        keep = (b < NB)[:, None] & experts[None, :]
        offsets = b[:, None] * E + cols[None, :]
        c = tl.load(block_counts_ptr + offsets, mask=keep, other=0)
        tl.store(block_offsets_ptr + offsets, carry[None, :] + tl.cumsum(c, axis=0) - c, mask=keep)
        carry += tl.sum(c, axis=0)
    for start in range(0, tl.minimum(num_tiles, max_tiles), BLOCK_TILES):
        t = start + tl.arange(0, BLOCK_TILES)
        expert = tl.sum(((ends[None, :] <= t[:, None]) & experts[None, :]).to(tl.int32), axis=1)
        mine = cols[None, :] == expert[:, None]
        first = tl.sum(tl.where(mine, starts[None, :], 0), axis=1)
        count = tl.sum(tl.where(mine, counts[None, :], 0), axis=1)
        keep = t < num_tiles
        tl.store(tile_expert_ptr + t, expert, mask=keep)
        tl.store(tile_rows_ptr + t, tl.minimum(count - (t - first) * TILE, TILE), mask=keep)


@torch.library.custom_op("racedit::dispatch_layout", mutates_args=())
def dispatch_layout(
    block_counts: torch.Tensor, tile: int, max_tiles: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """block_counts [blocks, E] -> (block_offsets [blocks, E]: each block's first slot per expert,
    tile_expert [max_tiles], tile_rows [max_tiles] (the first num_tiles written), num_tiles [1],
    tokens per expert [E]), all int32 and on the device."""
    blocks, experts = block_counts.shape
    block_offsets = torch.empty_like(block_counts)
    tile_expert = block_counts.new_empty(max_tiles)
    tile_rows = block_counts.new_empty(max_tiles)
    num_tiles = block_counts.new_empty(1)
    counts = block_counts.new_empty(experts)
    with on_device_of(block_counts):
        _layout[(1,)](
            block_counts, block_offsets, tile_expert, tile_rows, num_tiles, counts, blocks, experts, max_tiles,
            TILE=tile, BLOCK_B=64, BLOCK_E=_expert_block(experts), BLOCK_TILES=256, num_warps=4,
            **FIXED,
        )  # fmt: skip
    return block_offsets, tile_expert, tile_rows, num_tiles, counts


@dispatch_layout.register_fake
def _(block_counts, tile, max_tiles):
    one = block_counts.new_empty
    return torch.empty_like(block_counts), one(max_tiles), one(max_tiles), one(1), one(block_counts.shape[1])


@triton.jit(do_not_specialize=["M"])
def _scatter(mask_ptr, block_offsets_ptr, slot_ptr, source_ptr, M, E, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    """Each selected pair's slot: its block's first slot in its expert's group plus its rank among the
    block's tokens of that expert (token order); -1 for pairs not selected. Each slot's token."""
    block = tl.program_id(0)
    rows = block * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    valid = (rows < M)[:, None] & (cols < E)[None, :]
    offsets = rows[:, None].to(tl.int64) * E + cols[None, :]
    selected = tl.load(mask_ptr + offsets, mask=valid, other=0).to(tl.int32)
    rank = tl.cumsum(selected, axis=0) - selected
    first = tl.load(block_offsets_ptr + block * E + cols, mask=cols < E, other=0)
    slot = first[None, :] + rank
    chosen = (selected != 0) & valid
    tl.store(slot_ptr + offsets, tl.where(chosen, slot, -1), mask=valid)
    tl.store(source_ptr + slot, rows[:, None] + cols[None, :] * 0, mask=chosen)


@torch.library.custom_op("racedit::scatter_pairs", mutates_args=())
def scatter_pairs(
    mask: torch.Tensor, block_offsets: torch.Tensor, block: int, max_tiles: int, tile: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """mask [N, E] bool -> (slot [N, E] int32: each pair's row in the grouped buffer, -1 if not
    selected; source [max_tiles * tile] int32: each real row's token, padding rows unwritten)."""
    tokens, experts = mask.shape
    slot = mask.new_empty(tokens, experts, dtype=torch.int32)
    source = mask.new_empty(max_tiles * tile, dtype=torch.int32)
    if tokens:
        with on_device_of(mask):
            _scatter[(triton.cdiv(tokens, block),)](
                mask.view(torch.int8), block_offsets, slot, source, tokens, experts,
                BLOCK_T=block, BLOCK_E=_expert_block(experts), **FIXED,
            )  # fmt: skip
    return slot, source


@scatter_pairs.register_fake
def _(mask, block_offsets, block, max_tiles, tile):
    return mask.new_empty(mask.shape, dtype=torch.int32), mask.new_empty(max_tiles * tile, dtype=torch.int32)


# --------------------------------------------------------------- combine ----
@triton.jit(do_not_specialize=["M", "rows_per_gate"])
def _combine(
    y_ptr,
    slot_ptr,
    score_ptr,
    extra_ptr,
    res_ptr,
    gate_ptr,
    out_ptr,
    M,
    D,
    E,
    rows_per_gate,
    stride_y,
    stride_gate,
    HAS_EXTRA: tl.constexpr,
    RESIDUAL: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """h[t] = sum over experts e in order of score[t, e] * y[slot[t, e]] (selected pairs only, fp32),
    (+ extra[t]); out = res[t] + gate[t // rows_per_gate] * h when RESIDUAL, else h."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    live = rows < M
    keep = live[:, None] & (cols < D)[None, :]
    wide = rows.to(tl.int64)
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for e in range(E):
        slot = tl.load(slot_ptr + wide * E + e, mask=live, other=-1).to(tl.int64)
        weight = tl.load(score_ptr + wide * E + e, mask=live, other=0.0)
        chosen = (slot >= 0)[:, None] & keep
        y = tl.load(y_ptr + slot[:, None] * stride_y + cols[None, :], mask=chosen, other=0.0).to(tl.float32)
        acc = tl.where(chosen, acc + y * weight[:, None], acc)
    if HAS_EXTRA:
        acc = acc + tl.load(extra_ptr + wide[:, None] * D + cols[None, :], mask=keep, other=0.0)
    if RESIDUAL:
        res = tl.load(res_ptr + wide[:, None] * D + cols[None, :], mask=keep, other=0.0)
        sample = wide // rows_per_gate
        gate = tl.load(gate_ptr + sample[:, None] * stride_gate + cols[None, :], mask=keep, other=0.0)
        acc = res + gate * acc
    tl.store(out_ptr + wide[:, None] * D + cols[None, :], acc, mask=keep)


@torch.library.custom_op("racedit::combine", mutates_args=())
def combine(
    y: torch.Tensor,
    slot: torch.Tensor,
    scores: torch.Tensor,
    extra: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    gate: Optional[torch.Tensor],
    rows_per_gate: int,
) -> torch.Tensor:
    """Each token's gated expert outputs summed in expert order: y [R, D] (the grouped rows), slot and
    scores [N, E] -> [N, D] fp32 (+ extra [N, D], the shared expert's output); with residual [N, D] and
    gate [N / rows_per_gate, D]: residual + gate * that."""
    tokens, experts = slot.shape
    dim = y.shape[1]
    out = y.new_empty(tokens, dim, dtype=torch.float32)
    if tokens == 0:
        return out
    block_t, block_d = 16, 128
    with on_device_of(y):
        _combine[(triton.cdiv(tokens, block_t), triton.cdiv(dim, block_d))](
            y, slot, scores, extra if extra is not None else out, residual if residual is not None else out,
            gate if gate is not None else out, out, tokens, dim, experts, rows_per_gate, y.stride(0),
            gate.stride(0) if gate is not None else 0,
            HAS_EXTRA=extra is not None, RESIDUAL=residual is not None, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4,
            **FIXED,
        )  # fmt: skip
    return out


@combine.register_fake
def _(y, slot, scores, extra, residual, gate, rows_per_gate):
    return y.new_empty(slot.shape[0], y.shape[1], dtype=torch.float32)
