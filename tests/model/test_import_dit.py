"""racedit import-dit: published DiT weights (diffusers DiTTransformer2DModel folders and DiT .pt state
dicts, here tiny and random, built with diffusers: no download) become racedit checkpoints."""

import json
import subprocess
import sys

import pytest
import torch
from tiny_dits import dit_state_dict

from racedit.model import CheckpointError, generate, load, read_config
from racedit.model.config import MoEConfig
from racedit.model.sampling import ObjectiveError
from racedit.model.training.import_dit import import_dit


def tiny_dit(learn_sigma: bool = True, tied: bool = True, seed: int = 0):
    """A random diffusers DiT; its zero-initialised parts perturbed so every weight matters. `tied`: one
    conditioning embedding copied into every block, as the published conversions are."""
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
        num_embeds_ada_norm=10,
    ).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        if tied:
            for block in model.transformer_blocks[1:]:
                block.norm1.emb.load_state_dict(model.transformer_blocks[0].norm1.emb.state_dict())
    return model


def inputs(n: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 8, 8, generator=g)
    t = torch.tensor([0, 1, 250, 500, 998, 999])[:n]  # DiT's integer timesteps
    y = torch.tensor([0, 3, 9, 10, 5, 1])[:n]  # 10 = the null class
    return x, t, y


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_diffusers_folder_imports_with_forward_parity(tmp_path, learn_sigma):
    source = tiny_dit(learn_sigma)
    source.save_pretrained(tmp_path / "dit")
    model = import_dit(tmp_path / "dit")
    assert model.config.objective == "ddpm_eps" and model.config.moe is None
    x, t, y = inputs()
    with torch.no_grad():
        want = source(x, timestep=t, class_labels=y).sample[:, :4]  # the noise half
        got = model(x, t.float() / 1000, y).prediction
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 1e-4


def test_untied_conditioning_embeddings_are_refused(tmp_path):
    tiny_dit(tied=False).save_pretrained(tmp_path / "dit")
    with pytest.raises(CheckpointError, match="conditioning embedding differs"):
        import_dit(tmp_path / "dit")


def test_dit_pt_state_dict_imports_with_forward_parity(tmp_path):
    source = tiny_dit()
    # DiT's own code: timestep frequencies over half (not half - 1) and LayerNorm eps 1e-6 before the MLP
    for block in source.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
        block.norm3.eps = 1e-6
    torch.save({"model": dit_state_dict(source)}, tmp_path / "DiT-tiny.pt")
    model = import_dit(tmp_path / "DiT-tiny.pt", num_heads=2)
    assert (model.config.hidden_size, model.config.depth, model.config.num_classes) == (32, 2, 10)
    x, t, y = inputs()
    with torch.no_grad():
        want = source(x, timestep=t, class_labels=y).sample[:, :4]
        assert (model(x, t.float() / 1000, y).prediction - want).abs().max() <= 1e-4
    with pytest.raises(CheckpointError, match="--num-heads"):
        import_dit(tmp_path / "DiT-tiny.pt")  # width 32 is none of DiT's sizes


def test_a_pt_holding_code_is_never_unpickled(tmp_path):
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")  # a pickled object, not a state dict
    with pytest.raises(CheckpointError, match="never unpickles"):
        import_dit(tmp_path / "module.pt")


@pytest.mark.parametrize("split", [1, 2])
def test_upcycled_experts_come_from_the_dense_mlp(tmp_path, split):
    tiny_dit().save_pretrained(tmp_path / "dit")
    dense = import_dit(tmp_path / "dit")
    moe = import_dit(tmp_path / "dit", moe=MoEConfig(spec="2in8", hidden_split=split))
    layer, mlp = moe.blocks[1].mlp, dense.blocks[1].mlp
    part = mlp.fc1.weight.shape[0] // split
    for e in range(8):
        cols = slice((e % split) * part, (e % split + 1) * part)
        assert torch.equal(layer.experts.w1[e], mlp.fc1.weight[cols].T)
        assert torch.allclose(layer.experts.w2[e], mlp.fc2.weight[:, cols].T * split / 2 / 0.5)
    assert layer.router.gate_head.weight.abs().max() < 1e-2  # routing starts near uniform
    # a token that takes k = 2 experts of gate 1/2 (copies), or one of each slice (slices), gets the dense MLP
    h = torch.randn(1, 64, 32)
    with torch.no_grad():
        scores = torch.full((1, 64, 8), 0.5)
        mask = torch.zeros(1, 64, 8, dtype=torch.bool)
        mask[..., 0] = mask[..., 1] = True  # expert 0 and 1: two copies, or slices 0 and 1
        from racedit.model.moe import DISPATCH

        out = DISPATCH["loop"](h.reshape(-1, 32), scores.reshape(-1, 8), mask.reshape(-1, 8), layer.experts, None)
        assert torch.allclose(out.view(1, 64, 32), mlp(h, dense.execution.resolve(h.device)), atol=1e-5)
    thresholds = [float(layer.threshold) for layer in moe.moe_layers]
    assert all(abs(tau - 0.5) < 0.01 for tau in thresholds)  # the race's K-th gate, near 1/k


def test_cli_imports_upcycles_and_fine_tuning_makes_it_servable(tmp_path):
    from conftest import tiny_vae

    tiny_dit().save_pretrained(tmp_path / "dit")
    tiny_vae().save_pretrained(tmp_path / "vae")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "racedit.cli",
            "import-dit",
            str(tmp_path / "dit"),
            "--out",
            str(tmp_path / "imported"),
            "--moe",
            "2in8",
            "--autoencoder",
            str(tmp_path / "vae"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    document = read_config(tmp_path / "imported")
    assert document["model"]["objective"] == "ddpm_eps" and document["model"]["moe"]["spec"] == "2in8"
    report = document["metadata"]["upcycling"]
    assert 0 < report["relative_error_output"] < 1 and 1 < report["experts_per_token"] < 3
    assert document["autoencoder"]["path"] == "vae"
    with pytest.raises(ObjectiveError):
        generate(load(tmp_path / "imported"), [1], num_steps=2)
    serve = subprocess.run(
        [sys.executable, "-m", "racedit.cli", "serve", "--checkpoint", str(tmp_path / "imported"), "--port", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert serve.returncode == 2 and "ddpm_eps" in serve.stderr
    # fine-tune into rectified flow on a folder of images, in the VAE's latent space
    from PIL import Image

    names = [f"class{c}" for c in range(10)]  # as many classes as the DiT was trained on
    for c, name in enumerate(names):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (16, 16), (20 * c, 60 * i, 90)).save(tmp_path / "images" / name / f"{i}.png")
    config = {
        "model": {"checkpoint": str(tmp_path / "imported")},
        "data": {"name": "imagefolder", "root": str(tmp_path / "images"), "vae": str(tmp_path / "vae")},
        "optim": {
            "steps": 4,
            "batch_size": 4,
            "warmup_steps": 1,
            "log_every": 2,
            "checkpoint_every": 4,
            "sample_every": 4,
            "threads": 1,
        },
        "calibration": {"num_images": 4, "num_steps": 3, "iterations": 1},
    }
    (tmp_path / "ft.json").write_text(json.dumps(config))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "racedit.cli",
            "train",
            "--config",
            str(tmp_path / "ft.json"),
            "--init",
            str(tmp_path / "imported"),
            "--out",
            str(tmp_path / "ft"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    tuned = load(tmp_path / "ft" / "checkpoint")
    assert tuned.config.objective == "rectified_flow" and tuned.autoencoder is not None
    assert tuned.config.class_names == names
    latents, _ = generate(tuned, [3], num_steps=2, as_float=True)
    assert latents.shape == (1, 4, 8, 8) and torch.isfinite(latents).all()
