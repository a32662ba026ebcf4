"""Published DiT-MoE weights (feizc/DiT-MoE, Fei et al. 2024, arXiv 2407.11633) served as they are.

A DiT-MoE is a DiT whose every MLP is a mixture of experts (`blocks.{i}.moe`):

    gate    logits = x W_gate^T (W_gate `moe.gate.weight` [E, D], no bias), G = softmax over all E
    select  each token's top-k experts (k = 2 in every published model), weighted by G as it is:
            the k weights are not renormalised
    expert  SwiGLU without biases, hidden H = 4D: down(silu(gate_proj x) * up_proj x)
    shared  one more SwiGLU of hidden 2D (`moe.shared_experts`) that every token takes, added unweighted

Two attention layouts were published, told apart by their keys:

    timm   (S/2, B/2: `dit_moe_s_8E2A`, `_s_16E2A`, `_b_8E2A`)  `attn.qkv`, `attn.proj`;
           DDPM noise with DiT's learned variance and integer timesteps 0..999
    fused  (XL/2, G/2: `dit_moe_xl_8E2A`, `_g_16E2A`)  `attn.Wqkv`, `attn.q_norm`, `attn.k_norm`,
           `attn.out_proj`: q and k each pass a LayerNorm over the head dim (affine, eps 1e-6);
           rectified flow in racedit's convention (t = 1 at noise, v = eps - x0) with t fed unscaled

The rest is DiT's (patch embedding, DiT's sin-cos positions, adaLN-Zero, a final layer with a
second output half that the forward drops). Each maps onto `RaceDiT` with the MoE options of
`MoEConfig` (`expert_kind: swiglu`, `expert_bias: false`, `shared_expert_hidden`, `router:
linear`, `router_bias: false`, `gating: softmax`, `routing: token_choice`) and `ModelConfig`
(`qk_norm`, `conventions`, `objective`, `learn_sigma`). Its flash-attention path casts q and k
to fp16; that belongs to the kernel, not the model: in fp32 nothing is cast.

The gate and up projections of an expert become one [D, 2H] matrix (the gate's columns first),
so a GPU computes them as one GEMM whose epilogue applies silu(gate) * up (model/kernels.py).
Nothing here unpickles code: `.pt` files are read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal, Optional, Union

import torch

from ..checkpoint import CheckpointError
from ..config import Conventions, ModelConfig, MoEConfig, NoiseSchedule
from ..dit import RaceDiT, sincos_pos_embed_2d

Layout = Literal["timm", "fused"]

# Head counts of the published sizes (width -> heads), which timm-layout weights do not record.
DIT_MOE_HEADS = {384: 6, 768: 12, 1024: 16, 1152: 16, 1408: 16}

# Keys of one block, per layout; {e} runs over the experts.
_COMMON_BLOCK = [
    "adaLN_modulation.1.weight",
    "adaLN_modulation.1.bias",
    "moe.gate.weight",
    "moe.shared_experts.gate_proj.weight",
    "moe.shared_experts.up_proj.weight",
    "moe.shared_experts.down_proj.weight",
]
_EXPERT = ["moe.experts.{e}.gate_proj.weight", "moe.experts.{e}.up_proj.weight", "moe.experts.{e}.down_proj.weight"]
_ATTENTION = {
    "timm": ["attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias"],
    "fused": [
        "attn.Wqkv.weight",
        "attn.Wqkv.bias",
        "attn.q_norm.weight",
        "attn.q_norm.bias",
        "attn.k_norm.weight",
        "attn.k_norm.bias",
        "attn.out_proj.weight",
        "attn.out_proj.bias",
    ],
}
_TOP = [
    "x_embedder.proj.weight",
    "x_embedder.proj.bias",
    "pos_embed",
    "t_embedder.mlp.0.weight",
    "t_embedder.mlp.0.bias",
    "t_embedder.mlp.2.weight",
    "t_embedder.mlp.2.bias",
    "y_embedder.embedding_table.weight",
    "final_layer.adaLN_modulation.1.weight",
    "final_layer.adaLN_modulation.1.bias",
    "final_layer.linear.weight",
    "final_layer.linear.bias",
]
# Where a fused-layout attention key goes in racedit (the fused projection's output is laid out
# [3, heads, d_head] as racedit's `Attention.qkv` is: the same matrix under another name).
_FUSED_NAMES = {"Wqkv": "qkv", "out_proj": "proj", "q_norm": "q_norm", "k_norm": "k_norm"}


def read_state_dict(source: Union[str, Path]) -> dict[str, torch.Tensor]:
    """The tensors of a `.pt` (plain tensors only: racedit never unpickles code) or `.safetensors` state
    dict (DiT, SiT, REPA, DiT-MoE); a training checkpoint's `ema` weights (else its `model`) when it nests
    them, as the families' own samplers load."""
    path = Path(source)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: unreadable safetensors file ({exc})") from exc
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{path}: not a plain tensor state dict ({type(exc).__name__}: {exc}); racedit never unpickles code"
        ) from exc
    for nest in ("ema", "model"):
        if isinstance(state, dict) and isinstance(state.get(nest), dict):
            state = state[nest]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    return state


def expected_keys(layout: Layout, depth: int, num_experts: int) -> set[str]:
    """Every key a DiT-MoE of this layout, depth and expert count has."""
    keys = set(_TOP)
    for i in range(depth):
        block = [*_COMMON_BLOCK, *_ATTENTION[layout]]
        block += [k.format(e=e) for e in range(num_experts) for k in _EXPERT]
        keys.update(f"blocks.{i}.{k}" for k in block)
    return keys


def _shape_of(state: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(depth, experts) as the keys say."""
    blocks = [int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))]
    experts = [int(m.group(1)) for k in state if (m := re.match(r"blocks\.\d+\.moe\.experts\.(\d+)\.", k))]
    return (1 + max(blocks) if blocks else 0), (1 + max(experts) if experts else 0)


def detect_layout(state: dict[str, torch.Tensor]) -> Layout:
    """Which DiT-MoE layout the keys are; an error naming the keys that fit neither."""
    depth, experts = _shape_of(state)
    keys = set(state)
    misfits = {}
    for layout in ("timm", "fused"):
        want = expected_keys(layout, depth, experts)
        if keys == want and depth and experts:
            return layout
        misfits[layout] = (sorted(want - keys), sorted(keys - want))
    layout = min(misfits, key=lambda name: sum(map(len, misfits[name])))
    missing, unexpected = misfits[layout]

    def some(names: list[str]) -> str:
        return ", ".join(names[:6]) + (f" (+{len(names) - 6} more)" if len(names) > 6 else "") if names else "none"

    raise CheckpointError(
        "not a DiT-MoE state dict: tried the timm (S/B: attn.qkv, attn.proj) and fused (XL/G: attn.Wqkv, "
        f"q_norm, k_norm, out_proj) layouts; nearest, {layout}: missing {some(missing)}; "
        f"unexpected {some(unexpected)}"
    )


def dit_moe_config(
    state: dict[str, torch.Tensor], layout: Layout, num_heads: Optional[int] = None, experts_per_token: int = 2
) -> ModelConfig:
    """The racedit config of a DiT-MoE state dict of the given layout."""
    weight = state["x_embedder.proj.weight"]  # [D, C, p, p]
    hidden, in_channels, patch = weight.shape[0], weight.shape[1], weight.shape[2]
    depth, num_experts = _shape_of(state)
    tokens = state["pos_embed"].shape[-2]
    grid = int(round(tokens**0.5))
    if grid * grid != tokens:
        raise CheckpointError(f"pos_embed has {tokens} positions: not a square grid")
    if layout == "fused":  # the head dim is the q_norm's width
        heads = hidden // state["blocks.0.attn.q_norm.weight"].shape[0]
        if num_heads is not None and num_heads != heads:
            raise CheckpointError(f"--num-heads {num_heads} disagrees with the q_norm width ({heads} heads)")
    else:
        heads = num_heads or DIT_MOE_HEADS.get(hidden)
        if heads is None:
            raise CheckpointError(f"a DiT-MoE of width {hidden} is none of the published sizes: give its head count")
    expert_hidden = state["blocks.0.moe.experts.0.gate_proj.weight"].shape[0]
    shared_hidden = state["blocks.0.moe.shared_experts.gate_proj.weight"].shape[0]
    out = state["final_layer.linear.weight"].shape[0] // patch**2
    if out not in (in_channels, 2 * in_channels):
        raise CheckpointError(f"the final layer gives {out} channels per pixel for {in_channels} input channels")
    rectified_flow = layout == "fused"
    return ModelConfig(
        image_size=grid * patch,
        in_channels=in_channels,
        patch_size=patch,
        hidden_size=hidden,
        depth=depth,
        num_heads=heads,
        mlp_ratio=expert_hidden / hidden,
        num_classes=state["y_embedder.embedding_table.weight"].shape[0] - 1,
        moe=MoEConfig(
            spec=f"{experts_per_token}in{num_experts}",
            hidden_split=1,
            routing="token_choice",
            gating="softmax",
            router="linear",
            router_bias=False,
            shared_expert=True,
            shared_expert_hidden=shared_hidden,
            expert_kind="swiglu",
            expert_bias=False,
        ),
        objective="rectified_flow" if rectified_flow else "ddpm_eps",
        learn_sigma=out == 2 * in_channels,
        timestep_freq_shift=0,
        mlp_norm_eps=1e-6,
        position_order="col_row",
        conventions=dit_moe_conventions(rectified_flow, out == 2 * in_channels, in_channels),
        qk_norm=rectified_flow,
    )


def dit_moe_conventions(rectified_flow: bool, learn_sigma: bool, in_channels: int) -> Conventions:
    """DiT-MoE's own: S/B are DiT's DDPM (integer timesteps, learned range, guidance on 3 channels, 250
    ancestral steps); XL/G rectified flow in racedit's time with t fed unscaled, Euler, 50 steps, all channels."""
    if rectified_flow:
        return Conventions(
            family="dit-moe",
            prediction="velocity",
            time="noise_at_1",
            time_scale=1.0,
            default_sampler="euler",
            default_steps=50,
            default_cfg_scale=4.0,
        )
    return Conventions(
        family="dit-moe",
        prediction="noise_learned_range" if learn_sigma else "noise",
        time="timesteps",
        time_scale=1.0,
        schedule=NoiseSchedule(arithmetic="dit"),
        guidance_channels=min(3, in_channels),
        default_sampler="ddpm",
        default_steps=250,
        default_cfg_scale=4.0,
    )


def racedit_state(state: dict[str, torch.Tensor], layout: Layout, config: ModelConfig) -> dict[str, torch.Tensor]:
    """The DiT-MoE tensors under racedit's names and shapes (each expert's gate and up as one [D, 2H])."""
    out = {
        "x_embedder.weight": state["x_embedder.proj.weight"],
        "x_embedder.bias": state["x_embedder.proj.bias"],
        "y_embedder.table.weight": state["y_embedder.embedding_table.weight"],
    }
    for name in _TOP:
        if name.startswith(("t_embedder.", "final_layer.")):
            out[name] = state[name]
    num_experts = config.moe.num_experts
    for i in range(config.depth):
        b = f"blocks.{i}."  # the block's prefix in both
        out[b + "adaLN_modulation.1.weight"] = state[b + "adaLN_modulation.1.weight"]
        out[b + "adaLN_modulation.1.bias"] = state[b + "adaLN_modulation.1.bias"]
        for key in _ATTENTION[layout]:
            module, part = key.split(".")[1:]
            out[f"{b}attn.{_FUSED_NAMES.get(module, module)}.{part}"] = state[b + key]
        moe = b + "moe."
        out[b + "mlp.router.gate_head.weight"] = state[moe + "gate.weight"]
        out[b + "mlp.experts.w1"] = torch.stack(
            [
                torch.cat([state[f"{moe}experts.{e}.gate_proj.weight"], state[f"{moe}experts.{e}.up_proj.weight"]]).T
                for e in range(num_experts)
            ]
        )  # [E, D, 2H]
        out[b + "mlp.experts.w2"] = torch.stack(
            [state[f"{moe}experts.{e}.down_proj.weight"].T for e in range(num_experts)]
        )  # [E, H, D]
        shared = moe + "shared_experts."
        out[b + "mlp.shared_expert.0.weight"] = torch.cat(
            [state[shared + "gate_proj.weight"], state[shared + "up_proj.weight"]]
        )  # [2H_s, D]
        out[b + "mlp.shared_expert.2.weight"] = state[shared + "down_proj.weight"]
    return out


def import_dit_moe(
    source: Union[str, Path, dict[str, torch.Tensor]],
    num_heads: Optional[int] = None,
    experts_per_token: int = 2,
    dtype: torch.dtype = torch.float32,
) -> RaceDiT:
    """A racedit model holding a DiT-MoE's weights (a `.pt`/`.safetensors` file or a state dict), its
    layout detected from the keys; parameters in `dtype`. Built on the meta device and filled with
    the mapped tensors, so a 16.5 B-parameter G/2 is never allocated twice. Its `metadata` names
    the family and layout (pass it on to `save`)."""
    state = read_state_dict(source) if not isinstance(source, dict) else source
    layout = detect_layout(state)
    config = dit_moe_config(state, layout, num_heads, experts_per_token)
    config.validate()
    if not torch.allclose(
        state["pos_embed"].float().reshape(-1, config.hidden_size),
        sincos_pos_embed_2d(config.hidden_size, config.grid_size, "col_row"),
        atol=1e-5,
    ):
        raise CheckpointError("its pos_embed is not DiT's fixed 2-D sin-cos embedding")
    weights = {k: v.to(dtype).contiguous() for k, v in racedit_state(state, layout, config).items()}
    with torch.device("meta"):
        model = RaceDiT(config)
    own = model.state_dict()
    wrong = [k for k, v in weights.items() if k not in own or own[k].shape != v.shape]
    if wrong:
        shapes = [f"{k} {tuple(weights[k].shape)} vs {tuple(own[k].shape) if k in own else 'absent'}" for k in wrong]
        raise CheckpointError(f"does not map onto the network it describes: {'; '.join(shapes[:4])}")
    buffers = {name: torch.zeros_like(buffer, device="cpu") for name, buffer in own.items() if name not in weights}
    missing = [name for name in buffers if not name.endswith(("mlp.threshold", "mlp.threshold_updates"))]
    if missing:
        raise CheckpointError(f"no weights for {missing[:4]}")
    model.load_state_dict({**weights, **buffers}, assign=True)
    model.compute_buffers()  # the non-persistent buffers, computed from the config
    model.metadata = {"imported_from": {"family": "dit-moe", "layout": layout}}
    return model.eval()
