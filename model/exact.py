"""Batch-invariant, precision-safe building blocks: every GEMM of the network goes through here.

Why: a request's samples must not depend on the rows that share its batch. Routing by a
per-token threshold makes *which* experts a token uses independent of its batch-mates,
but that is not enough for bytes: BLAS libraries pick a GEMM kernel by the row count M
(measured with MKL on a 2-core AVX2 host: M < 8 takes another kernel than M >= 8, and
row 0 of a fp32 GEMM then differs in the last bits), and an expert's group size follows
the batch-mates. So:

  * every GEMM is called with a row count that is a multiple of `ROW_TILE` (rows are
    zero-padded; padding rows are discarded), so the same kernel computes every row,
    whatever the batch -- a row's result never depends on how many rows share the call;
  * experts run over groups sorted by expert, each padded to whole tiles, and the
    per-token sum over its experts is added in expert order, the same for every batch;
  * parameters may be stored in bf16/fp16, but activations enter and leave every GEMM
    in fp32: thresholds, timesteps, latents, norms and the sampler stay fp32, and only
    the matmuls run in the reduced type. On a CPU without native reduced-precision GEMMs
    (AVX2: torch's fallback bf16 GEMM measured 10-16x slower than fp32) the GEMM is
    emulated as a native one computes it: operands rounded to the reduced type, products
    accumulated in fp32, the result rounded to the reduced type.

On a CUDA GPU, padding is not enough: cuBLAS and CUTLASS pick tile shapes, split-K and
stream-K from the call's shape, so there every GEMM with a row tile runs on one fixed-config
Triton kernel instead (model/kernels.py), and attention on a kernel without split-KV. That is
the *device path*: CUDA tensors with no autograd; or CPU tensors with RACEDIT_TRITON_ON_CPU=1,
which runs the same Triton programs in Triton's interpreter (it sets TRITON_INTERPRET=1), so a
machine without a GPU tests the code a GPU runs.

The engine checks the whole forward end to end at start-up (`Engine.batch_invariant`),
because no library documents these kernel choices as a contract.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, replace
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

ROW_TILE = 32  # rows per GEMM tile; a multiple of every micro-kernel height we know of (4..16)
GPU_GROUP_TILE = 64  # rows per expert tile on a GPU: the grouped Triton kernel's BLOCK_M (one warpgroup's wgmma)


def padded(count: int, tile: Optional[int]) -> int:
    """`count` rounded up to whole tiles (unchanged without a tile)."""
    return count + ((-count) % tile if tile else 0)


def pad_rows(rows: torch.Tensor, tile: Optional[int]) -> torch.Tensor:
    """Zero-pad [M, K] to a multiple of `tile` rows (no-op without a tile)."""
    extra = padded(rows.shape[0], tile) - rows.shape[0]
    return F.pad(rows, (0, 0, 0, extra)) if extra else rows


def gather_rows(
    x: torch.Tensor, index: torch.Tensor, tile: Optional[int], buffer: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """x[index] ([M, K]) zero-padded to a multiple of `tile` rows. Without autograd the rows are
    gathered straight into the padded buffer (the first rows of `buffer` when given), saving the
    copy that padding afterwards makes."""
    if x.requires_grad and torch.is_grad_enabled():
        return pad_rows(x.index_select(0, index), tile)
    count = index.shape[0]
    size = padded(count, tile)
    rows = x.new_empty(size, x.shape[1]) if buffer is None else buffer[:size]
    rows[count:].zero_()
    torch.index_select(x, 0, index, out=rows[:count])
    return rows


REDUCED = (torch.bfloat16, torch.float16)
_CPU_NATIVE_REDUCED = torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def emulated(weight: torch.Tensor) -> bool:
    """Whether GEMMs with this (reduced-precision) weight are emulated in fp32 on this host."""
    return weight.dtype in REDUCED and weight.device.type == "cpu" and not _CPU_NATIVE_REDUCED


def gemm_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype GEMMs with this weight run in: its own, or fp32 when emulated."""
    return torch.float32 if emulated(weight) else weight.dtype


def operand(t: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`t` rounded to the weight's dtype, held in the dtype the GEMM runs in (fp32 when emulated)."""
    return t.to(weight.dtype).to(gemm_dtype(weight))


def rounded(y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A GEMM's result as the weight's dtype gives it, handed on in fp32."""
    return y.to(weight.dtype).float()


TRITON_ON_CPU = os.environ.get("RACEDIT_TRITON_ON_CPU", "") == "1"
if TRITON_ON_CPU:  # Triton reads this when a kernel is defined: before model/kernels.py is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")


def kernel_device(device: torch.device) -> bool:
    """Whether the device path's Triton kernels run on `device`: CUDA, or the CPU under RACEDIT_TRITON_ON_CPU=1."""
    return device.type == "cuda" or (TRITON_ON_CPU and device.type == "cpu")


def device_path(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether work on these tensors (None: absent) takes the device path (model/kernels.py): on a kernel
    device, and no autograd (the kernels have no backward; training takes the torch path)."""
    present = [t for t in tensors if t is not None]
    if not kernel_device(present[0].device):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in present))


Activation = Literal["none", "gelu_tanh", "gelu", "swiglu", "silu"]


def swiglu(h: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """silu(gate) * up of h = [gate | up] along its last dim (2H -> H); `inplace` writes into gate's half."""
    gate_half, up = h.chunk(2, dim=-1)
    return F.silu(gate_half, inplace=True).mul_(up) if inplace else F.silu(gate_half) * up


def output_width(width: int, activation: Activation) -> int:
    """Columns a GEMM of `width` output columns gives after its activation: SwiGLU halves them."""
    return width // 2 if activation == "swiglu" else width


def activate(h: torch.Tensor, activation: Activation) -> torch.Tensor:
    """The activation a GEMM's epilogue applies on the device path, here on its rounded result (fp32)."""
    if activation == "gelu_tanh":
        return F.gelu(h, approximate="tanh")
    if activation == "gelu":
        return F.gelu(h)
    if activation == "swiglu":
        return swiglu(h)
    if activation == "silu":
        return F.silu(h)
    return h


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    tile: Optional[int],
    activation: Activation = "none",
    residual: Optional[torch.Tensor] = None,
    gate: Optional[torch.Tensor] = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """y = act(x W^T + b) in the weight's dtype, on whole row tiles; x: [..., K] -> [..., N], fp32 (or
    `out_dtype`, holding the same values: what the next GEMM reads). With `residual` [B, L, N] and `gate`
    [B, N]: residual + gate * y, a block's gated residual (fp32). On the device path, one kernel: the
    activation acts on the fp32 sum before rounding; elsewhere on the rounded result."""
    lead = x.shape[:-1]
    width = output_width(weight.shape[0], activation)
    if tile is not None and device_path(x, weight, bias, residual, gate):  # rows independent in the kernel: no padding
        from . import kernels  # Triton: only on the device path

        rows = x.reshape(-1, x.shape[-1])
        per_gate = rows.shape[0] // gate.shape[0] if gate is not None else 1
        res = residual.reshape(rows.shape[0], width) if residual is not None else None
        dtype = torch.float32 if residual is not None else out_dtype
        out = kernels.linear(rows, weight, bias, dtype, activation, res, gate, per_gate)
        return out.view(*lead, width)
    bias = operand(bias, weight) if bias is not None else None
    rows = operand(x.reshape(-1, x.shape[-1]), weight)
    out = F.linear(pad_rows(rows, tile), operand(weight, weight), bias)[: rows.shape[0]]
    out = activate(rounded(out, weight), activation).view(*lead, width)
    if residual is not None:
        return residual + gate.unsqueeze(1) * out
    return out.to(out_dtype)


class Linear(nn.Linear):
    """nn.Linear (same parameters and state-dict keys) computed by `linear`: batch-invariant on whole
    row tiles (`tile`, from the model's `Execution`), fp32 in and out, and `linear`'s epilogues."""

    def forward(self, x: torch.Tensor, tile: Optional[int], **epilogue) -> torch.Tensor:
        return linear(x, self.weight, self.bias, tile, **epilogue)


Dispatch = Literal["device", "grouped", "sorted", "loop"]


@dataclass(frozen=True)
class Execution:
    """How one forward runs, decided once and handed down the network (never stored in its modules).

    row_tile: GEMMs on whole tiles of this many rows (batch-invariant); None: plain GEMMs whose
        kernels may follow the batch (exports keep a shape-generic graph that way).
    dispatch: how the experts run (model/moe.py); "auto" resolves by device: "device" (routing and
        dispatch on the device, model/kernels.py) where the kernels run, sorted groups one after
        another on a CPU; "grouped", one grouped GEMM per matrix from host-read sizes; "loop" for exports.
    attention: "efficient" pins SDPA's memory-efficient kernel (batch-invariant on a GPU: no split-KV);
        "default" lets PyTorch choose; "auto" resolves to "efficient" on CUDA with a row tile.
    """

    row_tile: Optional[int] = ROW_TILE
    dispatch: Literal["auto", "device", "grouped", "sorted", "loop"] = "auto"
    attention: Literal["auto", "efficient", "default"] = "auto"

    @property
    def batch_invariant(self) -> bool:
        return self.row_tile is not None

    def resolve(self, device: torch.device) -> Execution:
        """The concrete setting on `device` (no "auto" left)."""
        cuda = device.type == "cuda"
        dispatch = self.dispatch if self.dispatch != "auto" else ("device" if kernel_device(device) else "sorted")
        attention = (
            self.attention
            if self.attention != "auto"
            else ("efficient" if cuda and self.batch_invariant else "default")
        )
        return replace(self, dispatch=dispatch, attention=attention)


SERVING = Execution()  # batch-invariant; what training and `generate` use too
EXPORT = Execution(row_tile=None, dispatch="loop")  # shape-generic graphs, true sparse compute


def grouped_mm(rows: torch.Tensor, weights: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """rows [R, K] @ weights[g] for the rows of group g, the groups `sizes` rows long in order (R their sum) -> [R, N].

    One grouped GEMM (`torch._grouped_mm`) on CUDA for bf16 on Hopper and newer; elsewhere
    the groups one after another (their sizes are already on the host: no sync). Not batch-
    invariant on a GPU: the device path (model/kernels.py) is what serves there.
    """
    if rows.is_cuda and rows.dtype == torch.bfloat16 and torch.cuda.get_device_capability(rows.device) >= (9, 0):
        ends = torch.tensor(sizes, device=rows.device).cumsum(0).to(torch.int32)
        return torch._grouped_mm(rows, weights, offs=ends)
    starts = [0, *itertools.accumulate(sizes)][:-1]
    return torch.cat(
        [rows[start : start + size] @ weights[g] for g, (start, size) in enumerate(zip(starts, sizes)) if size]
    )
