"""Tiny random DiTs for the family tests (no download): diffusers' DiTTransformer2DModel, and its weights
under facebookresearch/DiT's names -- what DiT's, SiT's and REPA's `.pt` files hold."""

from __future__ import annotations

import torch


def tiny_transformer(classes: int = 10, learn_sigma: bool = True, seed: int = 0, dit_style: bool = True):
    """A tiny random diffusers DiT (4x8x8 latents, patch 2, width 32 in 2 heads, 2 blocks), its zero-initialised
    parts perturbed and one conditioning embedding copied into every block (as the published conversions
    are); `dit_style`: facebookresearch/DiT's own timestep frequencies (half, not half - 1) and MLP LayerNorm
    eps 1e-6, so that its weights under DiT's names are a DiT (or SiT, or REPA) network."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    model = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=8 if learn_sigma else 4,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=classes,
    ).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for block in model.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(model.transformer_blocks[0].norm1.emb.state_dict())
    if dit_style:
        for block in model.transformer_blocks:
            block.norm1.emb.time_proj.downscale_freq_shift = 0
            block.norm3.eps = 1e-6
    return model


def dit_state_dict(source) -> dict[str, torch.Tensor]:
    """The diffusers model's weights under facebookresearch/DiT's names (fused qkv, one shared embedder)."""
    s = {k: v.clone() for k, v in source.state_dict().items()}
    e = "transformer_blocks.0.norm1.emb."
    out = {
        "x_embedder.proj.weight": s["pos_embed.proj.weight"],
        "x_embedder.proj.bias": s["pos_embed.proj.bias"],
        "pos_embed": source.pos_embed.pos_embed.clone(),
        "t_embedder.mlp.0.weight": s[e + "timestep_embedder.linear_1.weight"],
        "t_embedder.mlp.0.bias": s[e + "timestep_embedder.linear_1.bias"],
        "t_embedder.mlp.2.weight": s[e + "timestep_embedder.linear_2.weight"],
        "t_embedder.mlp.2.bias": s[e + "timestep_embedder.linear_2.bias"],
        "y_embedder.embedding_table.weight": s[e + "class_embedder.embedding_table.weight"],
        "final_layer.adaLN_modulation.1.weight": s["proj_out_1.weight"],
        "final_layer.adaLN_modulation.1.bias": s["proj_out_1.bias"],
        "final_layer.linear.weight": s["proj_out_2.weight"],
        "final_layer.linear.bias": s["proj_out_2.bias"],
    }
    for i in range(len(source.transformer_blocks)):
        b = f"transformer_blocks.{i}."
        for part in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{part}"] = torch.cat([s[b + f"attn1.to_{n}.{part}"] for n in "qkv"])
            out[f"blocks.{i}.attn.proj.{part}"] = s[b + f"attn1.to_out.0.{part}"]
            out[f"blocks.{i}.mlp.fc1.{part}"] = s[b + f"ff.net.0.proj.{part}"]
            out[f"blocks.{i}.mlp.fc2.{part}"] = s[b + f"ff.net.2.{part}"]
            out[f"blocks.{i}.adaLN_modulation.1.{part}"] = s[b + f"norm1.linear.{part}"]
    return out
