"""Mixture-of-Experts layer routed by Expert Race (Yuan et al., ICML 2025).

The layer maps tokens x: [B, L, D] to sum_{e selected} G[i, e] * Expert_e(x_i).
Which (token, expert) pairs are selected is decided by one of the small
routing functions below, each returning a boolean mask [B, L, E]:

    token_choice   top-k experts of each token                  (k per token)
    expert_choice  top-(k*L/E) tokens of each (sample, expert)   (fixed per expert)
    expert_race    top-(B*L*k) pairs of the whole batch          (free allocation)
    threshold      G > tau, tau an EMA of the race's K-th value  (batch-independent), or
                   calibrated on the model's own gates (a token-choice checkpoint made to race)

Experts are GELU(tanh) MLPs with biases (Race-DiT) or SwiGLU MLPs, biases optional (DiT-MoE):
silu(x W_gate) * (x W_up) W_down, the gate and up projections one GEMM of width 2H.

Only selected pairs are computed (sparse dispatch), never all experts densely:

    on the device     serving on CUDA (`MoELayer.forward_on_device`): routing, the groups'
                      layout, two persistent grouped GEMMs and the combine as six or seven
                      Triton launches with no host sync (model/kernels.py), batch-invariant
    sorted_dispatch   serving on a CPU: the selected pairs sorted by expert, each expert's
                      group padded to whole row tiles (model/exact.py), one after another;
                      one host sync (tokens per expert)
    grouped_dispatch  the same groups as one grouped GEMM per matrix (`torch._grouped_mm`)
    loop_dispatch     exports: per expert NonZero -> gather -> expert -> scatter-add,
                      data-dependent sizes with no host sync, so ONNX and torch.export
                      keep true sparse compute
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import MoEConfig
from .exact import (
    GPU_GROUP_TILE,
    ROW_TILE,
    Execution,
    Linear,
    device_path,
    gather_rows,
    gemm_dtype,
    grouped_mm,
    operand,
    pad_rows,
    padded,
    rounded,
    swiglu,
)


# ---------------------------------------------------------------- gating ----
def gating(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """Gating function G(logits). Identity keeps the order of scores across tokens."""
    if kind == "identity":
        return logits
    if kind == "sigmoid":
        return torch.sigmoid(logits)
    if kind == "softmax":
        return torch.softmax(logits, dim=-1)
    raise ValueError(f"unknown gating {kind!r}")


# --------------------------------------------------------------- routing ----
def token_choice(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Each token takes its top-k experts. scores: [B, L, E] -> mask [B, L, E]."""
    index = scores.topk(k, dim=-1).indices
    selected = torch.ones_like(index, dtype=torch.bool)  # a tensor, not the scalar True: ONNX traces it
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, index, selected)


def expert_choice(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Each expert takes its top-(k*L/E) tokens within each sample."""
    _, seq_len, num_experts = scores.shape
    capacity = max(1, round(k * seq_len / num_experts))
    index = scores.topk(capacity, dim=1).indices  # [B, C, E]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, index, torch.ones_like(index, dtype=torch.bool))


def expert_race(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top B*L*k (token, expert) pairs of the whole batch race together.

    Returns the mask and the K-th largest score (the threshold's EMA target).
    """
    flat = scores.reshape(-1)
    num_selected = scores.shape[0] * scores.shape[1] * k
    values, index = flat.topk(num_selected)
    mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(0, index, True)
    return mask.view_as(scores), values[-1]


def threshold(scores: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """Select a pair iff its score beats the threshold: depends on the token alone. scores [B, L, E];
    tau a scalar (the layer's learned threshold) or [B], one per row (a per-request compute dial)."""
    return scores > (tau.view(-1, 1, 1) if tau.dim() == 1 else tau)


# ---------------------------------------------------------------- router ----
class Router(nn.Module):
    """Scores tokens against experts.

    `linear`: logits = W x. `mlp` (per-layer regularisation, the paper's
    default): h = GELU(W1 x), logits = W_gate h, and a target head
    y_hat = W_target h that predicts the final denoising target per token;
    its loss strengthens shallow layers (paper Fig. 5). Unused at inference.
    """

    def __init__(self, dim: int, num_experts: int, kind: str, target_dim: int, bias: bool = True):
        super().__init__()
        self.kind = kind
        if kind == "mlp":
            self.hidden = Linear(dim, dim)
            self.gate_head = Linear(dim, num_experts, bias=bias)
            self.target_head = Linear(dim, target_dim)
        else:
            self.gate_head = Linear(dim, num_experts, bias=bias)
            self.target_head = None

    def forward(
        self, x: torch.Tensor, tile: Optional[int], predict_target: bool
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if self.kind == "mlp":
            h = self.hidden(x, tile, activation="gelu", out_dtype=self.gate_head.weight.dtype)
            target = self.target_head(h, tile) if predict_target else None
            return self.gate_head(h, tile), target
        return self.gate_head(x, tile), None


# --------------------------------------------------------------- experts ----
def epilogue_activation(kind: str) -> str:
    """The device path's GEMM epilogue for an expert kind (`exact.Activation`): GELU is the tanh form."""
    return "swiglu" if kind == "swiglu" else "gelu_tanh"


class Experts(nn.Module):
    """E independent expert MLPs D -> D_e -> D, weights stacked for grouped execution: `gelu`,
    x -> GELU_tanh(x w1 + b1) w2 + b2; `swiglu`, x -> swiglu(x w1 + b1) w2 + b2 with w1 [D, 2 D_e] the
    gate's columns, then the up projection's (one GEMM; on a GPU the kernel's epilogue applies
    silu(gate) * up). Without `bias`, b1 and b2 are absent (None)."""

    def __init__(self, num_experts: int, dim: int, hidden: int, kind: str = "gelu", bias: bool = True):
        super().__init__()
        self.kind = kind
        width = 2 * hidden if kind == "swiglu" else hidden
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, width))
        self.register_parameter("b1", nn.Parameter(torch.zeros(num_experts, width)) if bias else None)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.register_parameter("b2", nn.Parameter(torch.zeros(num_experts, dim)) if bias else None)
        bound1, bound2 = 1.0 / dim**0.5, 1.0 / hidden**0.5
        nn.init.uniform_(self.w1, -bound1, bound1)
        nn.init.uniform_(self.w2, -bound2, bound2)

    def activation(self, h: torch.Tensor) -> torch.Tensor:
        """The experts' nonlinearity on the first GEMM's result (in place when no backward pass needs it)."""
        inplace = not h.requires_grad
        if self.kind == "swiglu":
            return swiglu(h, inplace)
        return torch.ops.aten.gelu_(h, approximate="tanh") if inplace else F.gelu(h, approximate="tanh")

    def workspace(self, x: torch.Tensor, max_rows: int) -> Workspace:
        """Buffers for groups of up to `max_rows` of the tokens x, the activations in the dtypes the GEMMs run in."""
        return Workspace(
            rows=x.new_empty(max_rows, x.shape[1]),
            hidden=self.w1.new_empty(max_rows, self.w1.shape[2], dtype=gemm_dtype(self.w1)),
            out=self.w2.new_empty(max_rows, self.w2.shape[2], dtype=gemm_dtype(self.w2)),
        )

    def run(self, e: int, x: torch.Tensor, workspace: Optional[Workspace] = None) -> torch.Tensor:
        """Expert e on its gathered tokens x: [n, D] -> [n, D] (fp32 in and out); its activations
        are written into the first n rows of `workspace` when one is given."""
        n = x.shape[0]
        hidden, out = (workspace.hidden[:n], workspace.out[:n]) if workspace is not None else (None, None)
        w1, w2 = operand(self.w1[e], self.w1), operand(self.w2[e], self.w2)
        x = operand(x, self.w1)
        if self.b1 is not None:
            h = torch.addmm(operand(self.b1[e], self.w1), x, w1, out=hidden)
        else:
            h = torch.mm(x, w1, out=hidden)
        # in place when no backward pass needs the pre-activation: one buffer and one pass fewer
        h = operand(self.activation(h), self.w2)
        if self.b2 is not None:
            return rounded(torch.addmm(operand(self.b2[e], self.w2), h, w2, out=out), self.w2)
        return rounded(torch.mm(h, w2, out=out), self.w2)

    def run_grouped(self, rows: torch.Tensor, sizes: list[int], tile_expert: torch.Tensor, tile: int) -> torch.Tensor:
        """All experts at once on rows sorted into groups of whole tiles: rows [R, D], group e is
        sizes[e] rows long, tile_expert [R / tile] each tile's expert -> [R, D] (fp32)."""
        h = grouped_mm(operand(rows, self.w1), operand(self.w1, self.w1), sizes)
        if self.b1 is not None:
            h = h.view(-1, tile, h.shape[1]).add_(operand(self.b1, self.w1)[tile_expert].unsqueeze(1))
        h = operand(self.activation(h.view(rows.shape[0], -1)), self.w2).contiguous()
        out = grouped_mm(h, operand(self.w2, self.w2), sizes)
        if self.b2 is not None:
            out = out.view(-1, tile, out.shape[1]).add_(operand(self.b2, self.w2)[tile_expert].unsqueeze(1))
        return rounded(out.view(rows.shape[0], -1), self.w2)

    def run_on_device(self, x: torch.Tensor, layout: Layout) -> torch.Tensor:
        """All experts over the device-side layout: row r of the groups is token layout.source[r] of x,
        gathered, rounded, biased, activated (GELU, or SwiGLU over the gate and up halves of one GEMM
        of width 2 D_e) and rounded again in one persistent Triton GEMM per matrix -> [R, D] in the
        weights' dtype (R the worst case; only the tiles the device counted are written)."""
        from . import kernels  # Triton: only on the device path

        tiles = (layout.tile_expert, layout.tile_rows, layout.num_tiles, layout.tile)
        h = kernels.grouped_linear(x, layout.source, self.w1, self.b1, *tiles, epilogue_activation(self.kind))
        return kernels.grouped_linear(h, None, self.w2, self.b2, *tiles, "none")


@dataclass
class Workspace:
    """Buffers one sorted dispatch reuses for every expert, without autograd: each expert's rows,
    hidden activations and outputs land in memory the last expert left warm in cache, where fresh
    tensors may be new pages to fault in (2 CPU threads: 0.81-0.89x the time of fresh tensors per
    expert when those fault, 0.96-0.99x when they do not; bench/results/moe_layer-workspace-ab.log)."""

    rows: torch.Tensor  # [R, D] fp32, the gathered tokens, zero-padded to whole tiles
    hidden: torch.Tensor  # [R, D_e] in the GEMM dtype
    out: torch.Tensor  # [R, D] in the GEMM dtype


def worst_case_tiles(tokens: int, experts: int, tile: int, top_k: int = 0) -> int:
    """Most tiles the selected pairs can fill, each expert's group padded to whole tiles: threshold
    routing may give a token every expert; top-k gives each exactly k."""
    every = experts * -(-tokens // tile)
    return min(every, -(-tokens * top_k // tile) + experts) if top_k else every


@dataclass
class Layout:
    """Where the selected pairs of one layer call go, all on the device (model/kernels.py): fixed shapes
    whatever the routing, so nothing waits on the host and a CUDA graph can hold it."""

    slot: torch.Tensor  # [N, E] int32: each pair's row in the grouped buffers, -1 where not selected
    source: torch.Tensor  # [R] int32: each row's token (the first tile_rows[t] rows of tile t are real)
    tile_expert: torch.Tensor  # [R / tile] int32: each tile's expert (the first num_tiles are real)
    tile_rows: torch.Tensor  # [R / tile] int32
    num_tiles: torch.Tensor  # [1] int32
    tile: int

    @classmethod
    def build(cls, mask: torch.Tensor, block_counts: torch.Tensor, block: int, tile: int, top_k: int) -> Layout:
        """The layout of mask [N, E] from each block of `block` tokens' count per expert (`kernels.route`);
        R is the worst case: every token may take every expert, or exactly `top_k` under token choice."""
        from . import kernels  # Triton: only on the device path

        tokens, experts = mask.shape
        max_tiles = worst_case_tiles(tokens, experts, tile, top_k)
        offsets, tile_expert, tile_rows, num_tiles, _ = kernels.dispatch_layout(block_counts, tile, max_tiles)
        slot, source = kernels.scatter_pairs(mask, offsets, block, max_tiles, tile)
        return cls(slot, source, tile_expert, tile_rows, num_tiles, tile)


@dataclass
class Pairs:
    """The selected (token, expert) pairs of a layer call, sorted by expert, each expert's tokens in token order."""

    counts: list[int]  # tokens per expert, on the host (the layer's one sync)
    device_counts: torch.Tensor  # [E] the same, on the device
    expert: torch.Tensor  # [P] per pair
    token: torch.Tensor  # [P]
    gate_values: torch.Tensor  # [P, 1] fp32


def sort_pairs(weights: torch.Tensor, mask: torch.Tensor) -> Pairs:
    """The selected pairs sorted by expert. Read expert-major, the mask's nonzeros come out in that
    order (no sort), and `nonzero_static` needs no sync of its own: the counts are the one host read."""
    num_tokens = mask.shape[0]
    by_expert = mask.t()  # [E, N]
    device_counts = by_expert.sum(1)
    counts = device_counts.tolist()
    pairs = torch.nonzero_static(by_expert.reshape(-1), size=sum(counts)).squeeze(1)  # flat (expert, token)
    gate_values = weights.t().reshape(-1).index_select(0, pairs).unsqueeze(1).float()
    return Pairs(counts, device_counts, pairs // num_tokens, pairs % num_tokens, gate_values)


def groups(counts: list[int]) -> Iterator[tuple[int, int, int]]:
    """(expert, start, stop) of each non-empty group of the pairs `sort_pairs` sorted by expert."""
    start = 0
    for e, count in enumerate(counts):
        if count:
            yield e, start, start + count
        start += count


def grouped_dispatch(
    x: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor, experts: Experts, row_tile: Optional[int] = ROW_TILE
) -> torch.Tensor:
    """Only the selected pairs, all experts as one grouped GEMM per matrix. x [N, D], weights and mask [N, E] -> [N, D].

    Each expert's group starts at a whole tile of a padded buffer and is zero-padded to whole
    tiles, so a row is computed by the same kernel whatever the group's size; each token sums its
    gated expert outputs in expert order, one `index_add_` per expert. A token with no expert
    receives zero. Everything but the tokens per expert (the one host read) is derived on the device.
    """
    tile = row_tile or 1
    pairs = sort_pairs(weights, mask)
    token = pairs.token
    if not token.numel():
        return torch.zeros_like(x, dtype=torch.float32)
    host_sizes = [padded(c, tile) for c in pairs.counts]
    total = sum(host_sizes)  # rows of the tile-padded buffer
    padding = (pairs.device_counts + tile - 1) // tile * tile - pairs.device_counts  # [E], on the device
    # Pair i (sorted by expert) sits at row i + (padding before its expert's group) of the buffer.
    slot = torch.arange(token.numel(), device=x.device) + (padding.cumsum(0) - padding)[pairs.expert]
    tile_expert = torch.arange(mask.shape[1], device=x.device, dtype=torch.int32).repeat_interleave(
        (pairs.device_counts + padding) // tile, output_size=total // tile
    )
    rows = x.new_zeros(total, x.shape[1]).index_copy_(0, slot, x.index_select(0, token))
    y = experts.run_grouped(rows, host_sizes, tile_expert, tile)
    y = y.index_select(0, slot).mul_(pairs.gate_values)  # [P, D]
    out = torch.zeros_like(x, dtype=torch.float32)
    for _, start, stop in groups(pairs.counts):  # expert by expert: see `sorted_dispatch`
        out.index_add_(0, token[start:stop], y[start:stop])
    return out


def sorted_dispatch(
    x: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor, experts: Experts, row_tile: Optional[int] = ROW_TILE
) -> torch.Tensor:
    """The same sorted, tile-padded groups as `grouped_dispatch`, run one after another while each
    group's rows are in cache, in one `Workspace` when no autograd runs: the faster form on a CPU
    (the one-pass form measured 1.3x slower there; cutting groups into 256-row chunks helped on one
    thread and cost 1.2x on two). The same single host sync; a token's experts are added in expert order,
    one `index_add_` per expert: within an expert a token appears once, so no call adds to a row twice
    and CUDA's atomic adds cannot make a sum of three or more experts follow thread timing."""
    pairs = sort_pairs(weights, mask)
    out = torch.zeros_like(x, dtype=torch.float32)
    training = torch.is_grad_enabled() and (x.requires_grad or experts.w1.requires_grad)
    workspace = (
        None if training or not pairs.token.numel() else experts.workspace(x, padded(max(pairs.counts), row_tile))
    )
    for e, start, stop in groups(pairs.counts):
        index = pairs.token[start:stop]
        rows = gather_rows(x, index, row_tile, workspace.rows if workspace is not None else None)
        y = experts.run(e, rows, workspace)[: stop - start]
        out.index_add_(0, index, y.mul_(pairs.gate_values[start:stop]))
    return out


def loop_dispatch(
    x: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor, experts: Experts, row_tile: Optional[int] = None
) -> torch.Tensor:
    """The export path: per expert, gather its tokens, run it, scale and scatter-add back.

    Group sizes are data-dependent tensors (no host sync), so the same code exports to
    ONNX and torch.export with true sparse compute. With a row tile, each group is padded.
    """
    out = torch.zeros_like(x, dtype=torch.float32)
    for e in range(mask.shape[1]):
        index = mask[:, e].nonzero().squeeze(1)  # tokens routed to expert e: unique, so the scatter-add is exact
        gate_e = weights[:, e].index_select(0, index).unsqueeze(1).float()
        y = experts.run(e, pad_rows(x.index_select(0, index), row_tile))[: index.shape[0]]
        out = out.index_add(0, index, y * gate_e)
    return out


DISPATCH = {"grouped": grouped_dispatch, "sorted": sorted_dispatch, "loop": loop_dispatch}


# -------------------------------------------------------------- MoE layer ----
@dataclass
class Routing:
    """What one MoE layer decided for one forward; the losses and statistics read it."""

    scores: torch.Tensor  # [B, L, E] gate values G
    mask: torch.Tensor  # [B, L, E] bool, selected pairs
    target: Optional[torch.Tensor]  # [B, L, p*p*C] per-layer-regularisation prediction, or None
    logits: torch.Tensor  # [B, L, E] router logits (balance loss)


class SwiGLU(nn.Module):
    """silu(gate) * up of [gate | up] along the last dim: the activation of a dense SwiGLU expert."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return swiglu(h)


def dense_expert(dim: int, hidden: int, kind: str, bias: bool) -> nn.Sequential:
    """One expert as dense layers (the shared expert every token takes): Linear, activation, Linear."""
    width = 2 * hidden if kind == "swiglu" else hidden
    act = SwiGLU() if kind == "swiglu" else nn.GELU(approximate="tanh")
    return nn.Sequential(Linear(dim, width, bias=bias), act, Linear(hidden, dim, bias=bias))


class MoELayer(nn.Module):
    """The MLP of a Race-DiT block: router, experts, optional shared expert, learned threshold."""

    def __init__(self, dim: int, mlp_ratio: float, config: MoEConfig, target_dim: int):
        super().__init__()
        self.config = config
        self.num_experts, self.k = config.num_experts, config.k
        self.expert_hidden = int(mlp_ratio * dim / config.split)
        self.router = Router(dim, self.num_experts, config.router, target_dim, bias=config.router_bias)
        self.experts = Experts(self.num_experts, dim, self.expert_hidden, config.expert_kind, config.expert_bias)
        self.shared_expert = (
            dense_expert(dim, config.shared_expert_hidden or self.expert_hidden, config.expert_kind, config.expert_bias)
            if config.shared_expert
            else None
        )
        # Learned threshold tau: EMA of the race's K-th largest gate value (saved in checkpoints).
        self.register_buffer("threshold", torch.zeros(()))
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.long))

    def select(self, scores: torch.Tensor, thresholds: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Choose (token, expert) pairs for scores [B, L, E]; updates tau while training a race.
        `thresholds` [B] replace the learned one row by row under threshold inference. Routing
        "threshold" (a token-choice checkpoint given calibrated thresholds) infers by threshold, or
        with `inference: topk` by its own top-k; it trains as a race."""
        routing = self.config.routing
        if not self.training and self.inference_rule == "top_k":
            return token_choice(scores, self.k)
        if not self.training and self.inference_rule == "threshold":
            return threshold(scores, self.threshold if thresholds is None else thresholds)
        if routing == "token_choice":
            return token_choice(scores, self.k)
        if routing == "expert_choice":
            return expert_choice(scores, self.k)
        mask, kth = expert_race(scores, self.k)
        if self.training:
            self._update_threshold(kth.detach())
        return mask

    @torch.no_grad()
    def _update_threshold(self, kth: torch.Tensor) -> None:
        m = self.config.threshold_momentum if int(self.threshold_updates) > 0 else 0.0
        self.threshold.mul_(m).add_((1.0 - m) * kth.float())
        self.threshold_updates.add_(1)

    def forward(
        self,
        x: torch.Tensor,
        exe: Execution,
        predict_target: bool = False,
        thresholds: Optional[torch.Tensor] = None,
        residual: Optional[torch.Tensor] = None,
        gate: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, Routing]:
        """x [B, L, D] -> [B, L, D] and the routing; `exe` resolved (model/exact.py). With `residual`
        [B, L, D] and `gate` [B, D]: residual + gate * that, the block's gated residual."""
        if exe.dispatch == "device" and device_path(x, self.experts.w1, residual, gate) and not predict_target:
            return self.forward_on_device(x, exe, thresholds, residual, gate)
        batch, seq_len, dim = x.shape
        logits, target = self.router(x, exe.row_tile, predict_target)  # [B, L, E]
        scores = gating(logits, self.config.gating)
        mask = self.select(scores, thresholds)
        dispatch = DISPATCH["sorted" if exe.dispatch == "device" else exe.dispatch]
        out = dispatch(
            x.reshape(-1, dim),
            scores.reshape(-1, self.num_experts),
            mask.reshape(-1, self.num_experts),
            self.experts,
            exe.row_tile,
        )
        out = out.view(batch, seq_len, dim)
        if self.shared_expert is not None:
            first, act, second = self.shared_expert
            out = out + second(act(first(x, exe.row_tile)), exe.row_tile)
        if residual is not None:
            out = residual + gate.unsqueeze(1) * out
        return out, Routing(scores=scores, mask=mask, target=target, logits=logits)

    @property
    def inference_rule(self) -> str:
        """How the layer selects pairs at inference (`select`; the device path the same): "top_k", each
        token's k best; "threshold", per token by the learned threshold or the dial's; "batch", over the
        batch (expert choice, or a race's top-k), decided in torch."""
        routing, inference = self.config.routing, self.config.inference
        if routing == "token_choice" or (routing == "threshold" and inference == "topk"):
            return "top_k"
        if routing != "expert_choice" and inference == "threshold":
            return "threshold"
        return "batch"

    @property
    def top_k_on_device(self) -> int:
        """k when the device path selects each token's top-k, 0 otherwise."""
        return self.k if self.inference_rule == "top_k" else 0

    def device_buffer_bytes(self, tokens: int) -> int:
        """About the bytes the device path allocates for one call over `tokens` tokens, sized for the worst
        case (every token taking every expert under threshold routing): what a CUDA graph of it holds.
        Counted: the router's hidden layer, logits, gate values, mask and slots per pair, each row's token
        and the experts' two activations per grouped row, the shared expert's and the output per token
        (not the per-block and per-tile metadata, under 1 %)."""
        experts, dim, width = self.num_experts, self.experts.w2.shape[2], self.experts.w2.shape[1]
        rows = worst_case_tiles(tokens, experts, GPU_GROUP_TILE, self.top_k_on_device) * GPU_GROUP_TILE
        element = self.experts.w1.element_size()
        per_token = experts * (4 + 4 + 1 + 4) + dim * 4  # logits, gate values, mask, slot; the output
        if self.router.kind == "mlp":
            per_token += self.router.hidden.out_features * self.router.gate_head.weight.element_size()
        if self.shared_expert is not None:
            first, _, second = self.shared_expert
            per_token += second.in_features * second.weight.element_size() + dim * 4
        return tokens * per_token + rows * (4 + (width + dim) * element)

    def forward_on_device(
        self,
        x: torch.Tensor,
        exe: Execution,
        thresholds: Optional[torch.Tensor],
        residual: Optional[torch.Tensor],
        gate: Optional[torch.Tensor],
    ) -> tuple[torch.Tensor, Routing]:
        """The layer as six launches (seven with the MLP router), none waiting on the host or shaped by
        the routing: the router's GEMM(s) with routing in the last one's epilogue, layout, scatter, two
        grouped GEMMs, combine with the shared expert, gate and residual (model/kernels.py)."""
        from . import kernels  # Triton: only on the device path

        batch, seq_len, dim = x.shape
        router, tile = self.router, exe.row_tile
        head = router.gate_head
        h = x if router.kind != "mlp" else router.hidden(x, tile, activation="gelu", out_dtype=head.weight.dtype)
        h = h.reshape(-1, h.shape[-1])
        block = kernels.route_block(head.weight)
        top_k = self.top_k_on_device
        if self.inference_rule != "batch":
            tau = None if top_k else thresholds if thresholds is not None else self.threshold.view(1).expand(batch)
            logits, scores, mask, block_counts = kernels.route(
                h, head.weight, head.bias, tau, seq_len, self.config.gating, top_k
            )
        else:  # selected over the batch, in torch; laid out here
            logits = head(h, tile)
            scores = gating(logits, self.config.gating)
            mask = self.select(scores.view(batch, seq_len, -1), thresholds).reshape(scores.shape)
            block_counts = kernels.count_pairs(mask, block)
        layout = Layout.build(mask, block_counts, block, GPU_GROUP_TILE, top_k)
        y = self.experts.run_on_device(x.reshape(-1, dim), layout)
        shared = None
        if self.shared_expert is not None:
            first, _, second = self.shared_expert
            act = epilogue_activation(self.config.expert_kind)
            hidden = first(x, exe.row_tile, activation=act, out_dtype=second.weight.dtype)
            shared = second(hidden, exe.row_tile).reshape(-1, dim)
        res = residual.reshape(-1, dim) if residual is not None else None
        out = kernels.combine(y, layout.slot, scores, shared, res, gate, seq_len)
        shape = (batch, seq_len, self.num_experts)
        return out.view(batch, seq_len, dim), Routing(
            scores=scores.view(shape), mask=mask.view(shape), target=None, logits=logits.view(shape)
        )
