"""Race-DiT: a DiT (Peebles & Xie, 2023) whose MLPs are Expert-Race MoE layers.

x [B, C, H, W] --patchify--> tokens [B, L, D] + fixed 2-D sin-cos positions
c = t_emb(t) + y_emb(y)                         [B, D]
N x block:  x += gate_msa * Attn(modulate(LN(x), shift, scale))
            x += gate_mlp * MoE (modulate(LN(x), shift, scale))   (adaLN-Zero)
final:      adaLN, Linear -> p*p*C, unpatchify  -> v [B, C, H, W]
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .budget import BudgetTable
from .config import ModelConfig
from .denoiser import DenoiserOutput, ForwardStats
from .exact import SERVING, Execution, Linear, device_path, kernel_device, linear
from .moe import MoELayer, Routing


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def norm_modulate(
    x: torch.Tensor,
    norm: nn.LayerNorm,
    shift: torch.Tensor,
    scale: torch.Tensor,
    out_dtype: torch.dtype,
    exe: Execution,
) -> torch.Tensor:
    """modulate(norm(x), shift, scale): x [B, L, D] fp32, shift and scale [B, D]. On the device path one
    kernel that emits the next GEMM's input dtype (`out_dtype`) once; elsewhere (exports too) fp32."""
    if exe.dispatch == "device" and device_path(x, shift, scale):
        from . import kernels  # Triton: only on the device path

        return kernels.norm_modulate(x, shift, scale, norm.eps, out_dtype)
    return modulate(norm(x), shift, scale)


# ------------------------------------------------------------ embeddings ----
class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of t (256-d) through a 2-layer SiLU MLP."""

    def __init__(self, dim: int, frequency_dim: int = 256, freq_shift: int = 0, scale: float = 1000.0):
        super().__init__()
        self.frequency_dim, self.freq_shift, self.scale = frequency_dim, freq_shift, scale
        self.mlp = nn.Sequential(Linear(frequency_dim, dim), nn.SiLU(), Linear(dim, dim))
        self.register_buffer("freqs", self.frequencies(frequency_dim, shift=freq_shift), persistent=False)

    @staticmethod
    def frequencies(dim: int, max_period: float = 10000.0, shift: int = 0) -> torch.Tensor:
        half = dim // 2
        exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32)
        return torch.exp(exponent / (half - shift))

    @staticmethod
    def sinusoid(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        args = t.float()[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor, tile: Optional[int]) -> torch.Tensor:
        # racedit's flow-matching time lives in [0, 1], scaled to DiT's 0..1000 range for the frequencies;
        # a published family's time goes in as its network reads it (scale 1: DiT's integer timesteps exactly).
        freq = self.sinusoid(t * self.scale, self.freqs)
        return self.mlp[2](self.mlp[0](freq, tile, activation="silu"), tile)


class LabelEmbedder(nn.Module):
    """Class table with one extra row, the null class used for classifier-free guidance."""

    def __init__(self, num_classes: int, dim: int, dropout_prob: float):
        super().__init__()
        self.num_classes, self.dropout_prob = num_classes, dropout_prob
        self.table = nn.Embedding(num_classes + 1, dim)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(y.shape, device=y.device) < self.dropout_prob
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return self.table(y).float()


def sincos_pos_embed_2d(dim: int, grid: int, order: str = "row_col") -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding [grid*grid, dim] (half the width per axis; the first half
    encodes the row with "row_col", the column with "col_row" as DiT's own code does)."""

    def axis(d: int, pos: torch.Tensor) -> torch.Tensor:
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2.0))
        out = pos.reshape(-1)[:, None] * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    coords = torch.arange(grid, dtype=torch.float64)
    gw, gh = torch.meshgrid(coords, coords, indexing="xy")
    first, second = (gh, gw) if order == "row_col" else (gw, gh)
    return torch.cat([axis(dim // 2, first), axis(dim // 2, second)], dim=1).float()


def positions(config: ModelConfig) -> torch.Tensor:
    """The model's fixed position table [1, L, D] (a buffer computed, never saved)."""
    return sincos_pos_embed_2d(config.hidden_size, config.grid_size, config.position_order)[None]


# ----------------------------------------------------------------- block ----
def attention_backend(kind: str):
    """`efficient`: SDPA on the memory-efficient kernel, one program per (query block, head, sample)
    walking all keys, where FlashAttention may split the keys over programs when a batch is too small
    to fill the GPU -- a reduction order that then follows the batch size. `default`: PyTorch's choice."""
    return sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION) if kind == "efficient" else nullcontext()


class Attention(nn.Module):
    """Multi-head self-attention: one fused projection to (q, k, v) laid out [3, heads, d_head] along
    its output, SDPA, an output projection. `qk_norm`: q and k each pass a LayerNorm over the head
    dim (affine, eps 1e-6, in fp32) first, as DiT-MoE's XL/G attention does."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = Linear(dim, 3 * dim)
        self.proj = Linear(dim, dim)
        head_dim = dim // num_heads
        self.q_norm = nn.LayerNorm(head_dim, eps=1e-6) if qk_norm else None
        self.k_norm = nn.LayerNorm(head_dim, eps=1e-6) if qk_norm else None

    @staticmethod
    def _norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
        # fp32 whatever the parameters' dtype (norms stay fp32, model/exact.py)
        return F.layer_norm(x, norm.normalized_shape, norm.weight.float(), norm.bias.float(), norm.eps)

    def forward(self, x: torch.Tensor, exe: Execution, residual: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """residual + gate * Attn(x): x [B, L, D], gate [B, D] (the proj GEMM's epilogue on the device path)."""
        b, n, d = x.shape
        dtype = self.qkv.weight.dtype  # attention's matmuls run in the parameters' dtype
        qkv = self.qkv(x, exe.row_tile, out_dtype=dtype)  # [B, L, 3 * D]: q, k, v as SDPA reads them
        qkv = qkv.view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        if self.q_norm is not None:
            q, k = self._norm(qkv[0].float(), self.q_norm), self._norm(qkv[1].float(), self.k_norm)
            qkv = torch.stack([q, k, qkv[2].float()]).to(dtype)
        with attention_backend(exe.attention):
            out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # [B, heads, L, d_head], per sample
        return self.proj(out.transpose(1, 2).reshape(b, n, d), exe.row_tile, residual=residual, gate=gate)


class MLP(nn.Module):
    """The dense DiT MLP, used when the model has no MoE (baselines)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = Linear(dim, hidden), Linear(hidden, dim)

    def forward(
        self,
        x: torch.Tensor,
        exe: Execution,
        residual: Optional[torch.Tensor] = None,
        gate: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """MLP(x), or with `residual` and `gate` residual + gate * MLP(x), as `Attention.forward`."""
        h = self.fc1(x, exe.row_tile, activation="gelu_tanh", out_dtype=self.fc2.weight.dtype)
        return self.fc2(h, exe.row_tile, residual=residual, gate=gate)


class Block(nn.Module):
    """adaLN-Zero transformer block; the MLP is an MoE layer when configured."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        d = config.hidden_size
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(d, config.num_heads, config.qk_norm)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=config.mlp_norm_eps)
        target_dim = config.patch_size**2 * config.in_channels  # PLR predicts the patch's clean target
        self.mlp = (
            MoELayer(d, config.mlp_ratio, config.moe, target_dim) if config.moe else MLP(d, int(d * config.mlp_ratio))
        )
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(d, 6 * d))

    def forward(
        self,
        x: torch.Tensor,
        modulation: torch.Tensor,
        exe: Execution,
        predict_target: bool,
        thresholds: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, Optional[Routing]]:
        """x [B, L, D] fp32, modulation [B, 6D] (this block's adaLN output, `RaceDiT.modulations`)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = modulation.chunk(6, dim=1)
        h = norm_modulate(x, self.norm1, shift1, scale1, self.attn.qkv.weight.dtype, exe)
        x = self.attn(h, exe, residual=x, gate=gate1)
        h = norm_modulate(x, self.norm2, shift2, scale2, self.mlp_input_dtype, exe)
        if isinstance(self.mlp, MoELayer):
            return self.mlp(h, exe, predict_target, thresholds, residual=x, gate=gate2)
        return self.mlp(h, exe, residual=x, gate=gate2), None

    @property
    def mlp_input_dtype(self) -> torch.dtype:
        """The dtype the MLP's first GEMMs round their input to (router and experts share it)."""
        return self.mlp.experts.w1.dtype if isinstance(self.mlp, MoELayer) else self.mlp.fc1.weight.dtype


class FinalLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        d = config.hidden_size
        self.norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.linear = Linear(d, config.patch_size**2 * config.out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(d, 2 * d))

    def forward(self, x: torch.Tensor, modulation: torch.Tensor, exe: Execution) -> torch.Tensor:
        shift, scale = modulation.chunk(2, dim=1)
        h = norm_modulate(x, self.norm, shift, scale, self.linear.weight.dtype, exe)
        return self.linear(h, exe.row_tile)


# ----------------------------------------------------------------- model ----
class RaceDiT(nn.Module):
    """The network, and a `Denoiser` (model/denoiser.py): what the samplers and the engine call."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.execution: Execution = SERVING  # how forwards run: `with_execution`, never per module
        self.metadata: dict = {}  # a loaded checkpoint's metadata (calibration, budget table, history)
        self.autoencoder = None  # a latent checkpoint's VAE (model/autoencoder.py), set by load
        self._fused_modulation: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # `fuse_modulations`
        c, p, d = config.in_channels, config.patch_size, config.hidden_size
        self.x_embedder = nn.Conv2d(c, d, kernel_size=p, stride=p)
        self.t_embedder = TimestepEmbedder(d, freq_shift=config.timestep_freq_shift, scale=config.family.time_scale)
        self.y_embedder = LabelEmbedder(config.num_classes, d, config.class_dropout_prob)
        self.register_buffer("pos_embed", positions(config), persistent=False)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.final_layer = FinalLayer(config)
        self.initialize_weights()

    def compute_buffers(self) -> RaceDiT:
        """Make the buffers that are computed from the config, never saved (the position table, the
        timestep frequencies), on the CPU: after an init on the meta device, which leaves them empty."""
        t_emb = self.t_embedder
        self.pos_embed = positions(self.config)
        t_emb.freqs = TimestepEmbedder.frequencies(t_emb.frequency_dim, shift=t_emb.freq_shift)
        return self

    @property
    def moe_layers(self) -> list[MoELayer]:
        return [b.mlp for b in self.blocks if isinstance(b.mlp, MoELayer)]

    def device_buffer_bytes(self, rows: int) -> int:
        """Worst-case bytes of the MoE buffers of a forward of `rows` rows on the device path (one layer's
        at a time: the allocator reuses them layer after layer), what a CUDA graph of it holds beyond
        the activations."""
        return max((layer.device_buffer_bytes(rows * self.config.num_tokens) for layer in self.moe_layers), default=0)

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def learned_thresholds(self) -> list[float]:
        """Each MoE layer's routing threshold (one host read per layer: read once, at start)."""
        return [float(layer.threshold) for layer in self.moe_layers]

    @property
    def budget_table(self) -> Optional[BudgetTable]:
        """The compute dial's table loaded with the checkpoint, if it has one."""
        return BudgetTable.from_metadata(self.metadata)

    @property
    def modulation_layers(self) -> list[Linear]:
        """Every block's adaLN linear, then the final layer's: functions of the condition c alone."""
        return [b.adaLN_modulation[1] for b in self.blocks] + [self.final_layer.adaLN_modulation[1]]

    def modulations(self, c: torch.Tensor, tile: Optional[int]) -> list[torch.Tensor]:
        """Every block's adaLN output [B, 6D] and the final layer's [B, 2D] from c [B, D]: one GEMM for
        all of them on the device path once `fuse_modulations` has run (a fixed-config kernel computes
        each column alike whatever the width); one per layer elsewhere."""
        layers = self.modulation_layers
        cond = F.silu(c)
        fused = self._fused_modulation
        if fused is not None and device_path(c, fused[0]):
            return list(linear(cond, *fused, tile).split([layer.out_features for layer in layers], dim=1))
        return [layer(cond, tile) for layer in layers]

    def fuse_modulations(self) -> RaceDiT:
        """Store every adaLN weight and bias in one tensor, each layer's a view of it, for `modulations`."""
        layers = self.modulation_layers
        weight = torch.cat([layer.weight.data for layer in layers])
        bias = torch.cat([layer.bias.data for layer in layers])
        start = 0
        for layer in layers:
            stop = start + layer.out_features
            layer.weight.data, layer.bias.data = weight[start:stop], bias[start:stop]
            start = stop
        self._fused_modulation = (weight, bias)
        return self

    def _apply(self, fn, recurse=True):
        # `to`, `cuda`, `half`... give the parameters new tensors: the fused adaLN weights would be stale.
        self._fused_modulation = None
        return super()._apply(fn, recurse)

    def with_execution(self, execution: Execution) -> RaceDiT:
        """How forwards run from now on (model/exact.py): serving's batch-invariant row tiles
        (`SERVING`, the default) or exports' shape-generic graph (`EXPORT`)."""
        self.execution = execution
        return self

    def prepare(self, device: torch.device, dtype: torch.dtype, execution: Execution) -> RaceDiT:
        """Ready to serve: on `device`, matmuls in `dtype`, `execution` resolved for the device, eval mode."""
        model = self.to(device).eval().set_precision(dtype).with_execution(execution.resolve(device))
        return model.fuse_modulations() if kernel_device(device) else model

    def set_precision(self, dtype: torch.dtype) -> RaceDiT:
        """Run the matmuls in `dtype`: only the parameters are cast. `Module.to(dtype)` would also cast
        the buffers -- the learned thresholds, the positions -- and the inputs would follow (t = 0.96
        becomes 0.9609 in bf16); thresholds, timesteps and activations between GEMMs stay fp32."""
        for p in self.parameters():
            p.data = p.data.to(dtype)
        self._fused_modulation = None  # the parameters are new tensors: fuse again (`prepare` does)
        return self

    def initialize_weights(self) -> None:
        """DiT initialisation: Xavier linears, zero adaLN and output (the "-Zero" of adaLN-Zero)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):  # exact.Linear included
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        w = self.x_embedder.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        nn.init.normal_(self.y_embedder.table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, L, p*p*C] in the same layout as the output head."""
        b, c, h, w = x.shape
        p = self.config.patch_size
        x = x.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(b, (h // p) * (w // p), p * p * c)

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, L, C*p*p] in the patch embedding's (conv weight's) layout."""
        b, c, h, w = x.shape
        p = self.config.patch_size
        x = x.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (h // p) * (w // p), c * p * p)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, p*p*C] -> [B, C, H, W]."""
        p, c, g = self.config.patch_size, self.config.out_channels, self.config.grid_size
        x = x.view(x.shape[0], g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(x.shape[0], c, g * p, g * p)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        thresholds: Optional[torch.Tensor] = None,
        return_stats: bool = False,
    ) -> DenoiserOutput:
        """The prediction for (x_t, t, y) in the family's terms (`config.family`: velocity, or noise, with
        DiT's learned-range variance as channels C..2C when the conventions use it), and with
        `return_stats` the routing statistics. x: [B, C, H, W], t: [B] the time as the family's network
        reads it (racedit: s in [0, 1], x 1000 inside; DiT: integer timesteps), y: [B] int (null class allowed).
        `thresholds` [n_moe_layers, B]: per-row routing thresholds instead of the learned ones (the
        compute dial, `BudgetTable.thresholds`); each row's routing still depends on it alone."""
        exe = self.execution.resolve(x.device)
        c_in = self.config.in_channels
        x = x.float()  # inputs, timesteps and the residual stream are fp32 in every precision
        # The patch embedding is a GEMM over flattened patches (a stride-p conv, but convolution kernels
        # follow the batch size on a CPU), so it runs on row tiles like every other GEMM.
        w = self.x_embedder.weight  # [D, C, p, p]
        h = linear(self.patches(x), w.reshape(w.shape[0], -1), self.x_embedder.bias, exe.row_tile)
        h = h + self.pos_embed  # [B, L, D]
        c = self.t_embedder(t.float(), exe.row_tile) + self.y_embedder(y)  # [B, D]
        *modulations, final = self.modulations(c, exe.row_tile)
        routings: list[Routing] = []
        for block, modulation in zip(self.blocks, modulations):
            layer_thresholds = (
                None if thresholds is None or not isinstance(block.mlp, MoELayer) else thresholds[len(routings)].float()
            )
            h, routing = block(h, modulation, exe, predict_target=self.training, thresholds=layer_thresholds)
            if routing is not None:
                routings.append(routing)
        out = self.unpatchify(self.final_layer(h, final, exe))
        # A DiT's variance half is dropped, unless its family's samplers use it (noise_learned_range).
        prediction = out if self.config.family.prediction == "noise_learned_range" else out[:, :c_in]
        return DenoiserOutput(prediction, self.stats(routings, x.shape[0]) if return_stats else None)

    def stats(self, routings: list[Routing], batch: int) -> ForwardStats:
        if not routings:
            empty = torch.zeros(0, batch, self.config.num_tokens, dtype=torch.int32)
            return ForwardStats(empty, torch.zeros(0, batch, 0, dtype=torch.int32), [])
        masks = torch.stack([r.mask for r in routings])  # [n, B, L, E]
        return ForwardStats(
            experts_per_token=masks.sum(-1, dtype=torch.int32),
            expert_load=masks.sum(2, dtype=torch.int32),
            routing=routings,
        )
