"""Start from published DiT weights: a diffusers `DiTTransformer2DModel` folder or a
facebookresearch/DiT `.pt` state dict becomes a racedit checkpoint of the same backbone.

Dense, the imported network's forward equals the source's (the noise half of its output, with
DiT's timestep t_DiT = 1000 t). With `moe`, it is sparsely upcycled: each expert is built from
the block's dense MLP (whole copies, or slices of its hidden units when `hidden_split` > 1), and
the router starts near uniform. DiT predicts DDPM noise, so the checkpoint records
`objective: ddpm_eps`; `racedit train --init` fine-tunes it into racedit's rectified flow.

Nothing here unpickles code: `.pt` files are read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

import torch

from ..checkpoint import CheckpointError
from ..config import ModelConfig, MoEConfig
from ..dit import RaceDiT, sincos_pos_embed_2d
from ..moe import gating

# DiT's published sizes have no head count in their weights: width -> heads (DiT Table 1).
DIT_HEADS = {384: 6, 768: 12, 1024: 16, 1152: 16}


def read_source(source: Union[str, Path]) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    """(state dict, diffusers config or {}, kind) of a diffusers folder or a DiT .pt file."""
    path = Path(source)
    if path.is_dir():
        config_path = path / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{path}: not a diffusers DiTTransformer2DModel folder (no config.json)")
        config = json.loads(config_path.read_text())
        # facebook/DiT-XL-2-256 was published as a Transformer2DModel with adaLN-Zero, which diffusers reads as DiT
        legacy = config.get("_class_name") == "Transformer2DModel" and config.get("norm_type") == "ada_norm_zero"
        if config.get("_class_name") not in (None, "DiTTransformer2DModel") and not legacy:
            raise CheckpointError(f"{config_path}: a {config['_class_name']}, not a DiTTransformer2DModel")
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{path}: no .safetensors weights (save the model with safe_serialization=True)")
        from safetensors.torch import load_file

        state: dict[str, torch.Tensor] = {}
        for f in files:
            state.update(load_file(str(f)))
        return state, config, "diffusers"
    if path.is_file():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(
                f"{path}: not a plain tensor state dict ({type(exc).__name__}: {exc}); racedit never unpickles code"
            ) from exc
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]  # DiT's training checkpoints nest the weights ({"model", "ema", "opt"})
        if not isinstance(state, dict) or "x_embedder.proj.weight" not in state:
            raise CheckpointError(f"{path}: not a facebookresearch/DiT state dict (no x_embedder.proj.weight)")
        return state, {}, "dit"
    raise CheckpointError(f"{path}: no such file or folder")


def dense_config(
    state: dict[str, torch.Tensor], config: dict[str, Any], kind: str, num_heads: Optional[int] = None
) -> ModelConfig:
    """The racedit config of the source backbone (dense: moe=None), objective ddpm_eps."""
    if kind == "diffusers":
        if config.get("activation_fn", "gelu-approximate") != "gelu-approximate" or config.get(
            "norm_elementwise_affine"
        ):
            raise CheckpointError("only DiT's own block (gelu-approximate MLP, LayerNorms without affine) imports")
        hidden = config["num_attention_heads"] * config["attention_head_dim"]
        in_channels = config.get("in_channels", 4)
        out_channels = config.get("out_channels") or in_channels
        fc1 = state["transformer_blocks.0.ff.net.0.proj.weight"]
        return ModelConfig(
            image_size=config.get("sample_size", 32),
            in_channels=in_channels,
            patch_size=config.get("patch_size", 2),
            hidden_size=hidden,
            depth=config.get("num_layers", 28),
            num_heads=config["num_attention_heads"],
            mlp_ratio=fc1.shape[0] / hidden,
            num_classes=config.get("num_embeds_ada_norm", 1000),
            moe=None,
            objective="ddpm_eps",
            learn_sigma=out_channels == 2 * in_channels,
            timestep_freq_shift=1,
            mlp_norm_eps=float(config.get("norm_eps", 1e-5)),
            position_order="col_row",
        )
    weight = state["x_embedder.proj.weight"]  # [D, C, p, p]
    hidden, in_channels, patch = weight.shape[0], weight.shape[1], weight.shape[2]
    tokens = state["pos_embed"].shape[1]
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    heads = num_heads or DIT_HEADS.get(hidden)
    if heads is None:
        raise CheckpointError(f"a DiT of width {hidden} is none of DiT's sizes: give its head count (--num-heads)")
    out = state["final_layer.linear.weight"].shape[0] // patch**2
    return ModelConfig(
        image_size=int(round(tokens**0.5)) * patch,
        in_channels=in_channels,
        patch_size=patch,
        hidden_size=hidden,
        depth=depth,
        num_heads=heads,
        mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / hidden,
        num_classes=state["y_embedder.embedding_table.weight"].shape[0] - 1,
        moe=None,
        objective="ddpm_eps",
        learn_sigma=out == 2 * in_channels,
        timestep_freq_shift=0,
        mlp_norm_eps=1e-6,
        position_order="col_row",
    )


def racedit_state(state: dict[str, torch.Tensor], kind: str, depth: int) -> dict[str, torch.Tensor]:
    """The source's tensors under racedit's (dense) names."""
    if kind == "dit":
        out = {
            k.replace("x_embedder.proj.", "x_embedder.").replace("y_embedder.embedding_table", "y_embedder.table"): v
            for k, v in state.items()
            if k != "pos_embed"
        }
        return out
    emb = "transformer_blocks.{}.norm1.emb."
    for i in range(1, depth):  # diffusers keeps a copy of the conditioning embedding in every block
        for name in ("timestep_embedder.linear_1.weight", "class_embedder.embedding_table.weight"):
            if not torch.equal(state[emb.format(0) + name], state[emb.format(i) + name]):
                raise CheckpointError(
                    f"block {i}'s conditioning embedding differs from block 0's: "
                    "racedit shares one embedding across blocks"
                )
    e = emb.format(0)
    out = {
        "x_embedder.weight": state["pos_embed.proj.weight"],
        "x_embedder.bias": state["pos_embed.proj.bias"],
        "t_embedder.mlp.0.weight": state[e + "timestep_embedder.linear_1.weight"],
        "t_embedder.mlp.0.bias": state[e + "timestep_embedder.linear_1.bias"],
        "t_embedder.mlp.2.weight": state[e + "timestep_embedder.linear_2.weight"],
        "t_embedder.mlp.2.bias": state[e + "timestep_embedder.linear_2.bias"],
        "y_embedder.table.weight": state[e + "class_embedder.embedding_table.weight"],
        "final_layer.adaLN_modulation.1.weight": state["proj_out_1.weight"],
        "final_layer.adaLN_modulation.1.bias": state["proj_out_1.bias"],
        "final_layer.linear.weight": state["proj_out_2.weight"],
        "final_layer.linear.bias": state["proj_out_2.bias"],
    }
    for i in range(depth):
        b = f"transformer_blocks.{i}."
        for part in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{part}"] = torch.cat([state[b + f"attn1.to_{n}.{part}"] for n in "qkv"])
            out[f"blocks.{i}.attn.proj.{part}"] = state[b + f"attn1.to_out.0.{part}"]
            out[f"blocks.{i}.mlp.fc1.{part}"] = state[b + f"ff.net.0.proj.{part}"]
            out[f"blocks.{i}.mlp.fc2.{part}"] = state[b + f"ff.net.2.{part}"]
            out[f"blocks.{i}.adaLN_modulation.1.{part}"] = state[b + f"norm1.linear.{part}"]
    return out


def import_dit(
    source: Union[str, Path], moe: Optional[MoEConfig] = None, num_heads: Optional[int] = None, seed: int = 0
) -> RaceDiT:
    """A racedit model holding the source DiT's weights: dense, or upcycled into `moe`'s experts."""
    state, config, kind = read_source(source)
    dense = dense_model(state, config, kind, num_heads, source)
    return upcycle(dense, moe, seed) if moe is not None else dense


def dense_model(
    state: dict[str, torch.Tensor],
    config: dict[str, Any],
    kind: str,
    num_heads: Optional[int],
    source: Union[str, Path],
    **overrides: Any,
) -> RaceDiT:
    """The dense racedit network holding a DiT's weights (`overrides` replace config fields, e.g. the
    conventions of the family the weights come from)."""
    dense_cfg = dense_config(state, config, kind, num_heads)
    if overrides:
        dense_cfg = ModelConfig.from_dict({**dense_cfg.to_dict(), **overrides})
    dense = RaceDiT(dense_cfg)
    weights = {k: v.float() for k, v in racedit_state(state, kind, dense_cfg.depth).items()}
    if kind == "dit" and not torch.allclose(
        state["pos_embed"].float()[0],
        sincos_pos_embed_2d(dense_cfg.hidden_size, dense_cfg.grid_size, "col_row"),
        atol=1e-5,
    ):
        raise CheckpointError(f"{source}: its pos_embed is not DiT's fixed 2-D sin-cos embedding")
    missing, unexpected = dense.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{source}: does not map onto a DiT (missing {missing[:4]}, unexpected {unexpected[:4]})")
    return dense.eval()


def model_times(config: ModelConfig, s: torch.Tensor) -> torch.Tensor:
    """Times across the path (s in (0, 1), 1 noise) as the model's network reads them: racedit's s,
    SiT's 1 - s, or a DiT chain's integer timestep."""
    family = config.family
    if family.discrete:
        total = family.schedule.num_train_timesteps
        return (s * total).floor().clamp(max=total - 1)
    return 1 - s if family.time == "noise_at_0" else s


@torch.no_grad()
def upcycle(dense: RaceDiT, moe: MoEConfig, seed: int = 0, calibration_batches: int = 4) -> RaceDiT:
    """Sparse upcycling: every MoE block's experts from the dense MLP, routers near uniform.

    Expert e of a block is the dense MLP whole (`hidden_split` 1) or slice e mod S of its hidden
    units (S = hidden_split, the slices' output biases divided by S). Each router's gate head starts
    at tiny random weights and the bias whose gate value g makes k experts of gate g add up to the
    dense MLP (copies) or to its slices' share; the experts' outputs are scaled by 1/(k g) (so 1 for
    identity gating). Thresholds come from races over random inputs across t.
    """
    cfg = ModelConfig.from_dict({**dense.config.to_dict(), "moe": moe.__dict__})
    model = RaceDiT(cfg)
    own = model.state_dict()
    shared = {k: v for k, v in dense.state_dict().items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(shared, strict=False)
    generator = torch.Generator().manual_seed(seed)
    k, split = moe.k, moe.split
    bias = 1.0 / k if moe.gating == "identity" else 0.0
    g = float(gating(torch.full((1, moe.num_experts), bias), moe.gating)[0, 0])
    for block, dense_block in zip(model.blocks, dense.blocks):
        fc1, fc2 = dense_block.mlp.fc1, dense_block.mlp.fc2
        width = fc1.weight.shape[0]
        if width % split:
            raise CheckpointError(f"hidden_split {split} does not divide the MLP width {width}")
        part = width // split
        experts = block.mlp.experts
        for e in range(moe.num_experts):
            cols = slice((e % split) * part, (e % split + 1) * part)
            experts.w1[e] = fc1.weight[cols].T
            experts.b1[e] = fc1.bias[cols]
            experts.w2[e] = fc2.weight[:, cols].T * (split / (k * g))
            experts.b2[e] = fc2.bias * (1 / (k * g))
        head = block.mlp.router.gate_head
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * 1e-3)
        head.bias.fill_(bias)
    # thresholds: the race's K-th value over random noisy inputs at every t (what training's EMA would start from)
    model.train()
    for _ in range(calibration_batches):
        x = torch.randn(16, cfg.in_channels, cfg.image_size, cfg.image_size, generator=generator)
        t = model_times(cfg, (torch.arange(16) + 0.5) / 16)
        y = torch.randint(0, cfg.num_classes, (16,), generator=generator)
        model(x, t, y)
    return model.eval()


@torch.no_grad()
def upcycling_report(dense: RaceDiT, upcycled: RaceDiT, num_inputs: int = 64, seed: int = 1) -> dict[str, float]:
    """What the upcycled model reproduces of the dense one at step 0, on random noisy inputs across t:
    the relative L2 error of its output and of each MoE block's MLP output, and its experts per token."""
    cfg = dense.config
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_inputs, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
    t = model_times(cfg, (torch.arange(num_inputs) + 0.5) / num_inputs)
    y = torch.randint(0, cfg.num_classes, (num_inputs,), generator=g)
    mlp_in = []  # each MoE block's input, as the upcycled model routes it
    hooks = [b.mlp.register_forward_hook(lambda m, i, o: mlp_in.append(i[0])) for b in upcycled.blocks]
    result = upcycled(x, t, y, return_stats=True)
    out, stats = result.prediction, result.stats
    for h in hooks:
        h.remove()
    reference = dense(x, t, y).prediction
    errors = []
    for block, dense_block, h in zip(upcycled.blocks, dense.blocks, mlp_in):
        moe_out, _ = block.mlp(h, upcycled.execution.resolve(h.device))
        want = dense_block.mlp(h, dense.execution.resolve(h.device))
        errors.append(float((moe_out - want).norm() / want.norm()))
    return {
        "relative_error_output": round(float((out - reference).norm() / reference.norm()), 4),
        "relative_error_mlp_mean": round(sum(errors) / len(errors), 4),
        "experts_per_token": round(float(stats.experts_per_token.float().mean()), 3),
        "num_inputs": num_inputs,
    }
