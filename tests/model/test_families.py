"""Published DiT-family checkpoints served as they are (issue 25): `racedit import` of a diffusers
DiTPipeline, a DiT `.pt`, SiT and REPA state dicts (tiny and random, built here: no download), and
racedit's samplers measured against each family's own sampler on the same noise.

References: diffusers' schedulers and DiTPipeline themselves (installed); DiT's, SiT's and REPA's
samplers as re-expressed in tests/family_references.py from their published definitions. The
network inside a reference is diffusers' DiTTransformer2DModel set to the family's conventions (for
DiT, SiT and REPA: DiT's timestep frequencies and LayerNorm eps, as test_import_dit.py's parity test
does), fed the family's timesteps -- an implementation independent of racedit's. Latents are
compared before decoding, relative L2 <= 1e-5 (fp32, CPU)."""

import json

import numpy as np
import pytest
import torch
from conftest import tiny_vae
from family_references import (
    dit_p_sample_loop,
    dit_respaced_steps,
    repa_euler,
    repa_euler_maruyama,
    sit_ode_euler,
    sit_sde_euler,
)
from tiny_dits import dit_state_dict, tiny_transformer

from racedit.cli.options import ImportOptions
from racedit.model import CheckpointError, generate, load, read_config
from racedit.model.config import Conventions, NoiseSchedule
from racedit.model.samplers import make_sampler
from racedit.model.schedules import space_timesteps
from racedit.model.training.import_families import import_checkpoint

TOLERANCE = 1e-5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny networks run hundreds of steps: one thread, so that they do not fight over a shared CPU's cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


def transformer(classes: int = 10, learn_sigma: bool = True, seed: int = 0, dit_style: bool = True):
    return tiny_transformer(classes, learn_sigma, seed, dit_style)


def network(model, channels=None):
    """net(x, t, y) as the family's code calls its model; `channels` keeps the first ones (SiT drops its
    unused variance half)."""

    def net(x, t, y):
        out = model(x.float(), timestep=t, class_labels=y).sample
        return out if channels is None else out[:, :channels]

    return net


def vae():
    """A tiny AutoencoderKL without a shift (DiTPipeline divides by scaling_factor alone)."""
    return tiny_vae(seed=1, scaling_factor=0.18215, shift_factor=None)


def image_noise(seed: int, steps: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """What racedit draws for an image of `seed`: its initial noise, then one tensor per noisy step."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn((1, 4, 8, 8), generator=g), [torch.randn((1, 4, 8, 8), generator=g) for _ in range(steps)]


# ----------------------------------------------------------------- the math, alone --
@pytest.mark.parametrize(
    "config",
    [
        {"clip_sample": True, "timestep_spacing": "leading", "steps_offset": 1},
        {"clip_sample": False, "timestep_spacing": "trailing"},
        {"clip_sample": True, "clip_sample_range": 2.0, "timestep_spacing": "linspace", "set_alpha_to_one": False},
        {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "clip_sample": False},
    ],
)
def test_discrete_samplers_take_diffusers_steps_bit_for_bit(config):
    """On the same predictions and noise, ddim, ddpm (learned range and fixed) and dpmpp_2m give exactly
    what DDIMScheduler, DDPMScheduler and DPMSolverMultistepScheduler give for the config as diffusers
    reads it back (spacing, offset, clipping, the final alpha), step by step."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    from racedit.model.training.import_families import diffusers_schedule

    config = {"_class_name": "DDIMScheduler", **config}
    schedule, _ = diffusers_schedule(config, "test")
    conventions = lambda prediction: Conventions(
        family="diffusers", prediction=prediction, time="timesteps", time_scale=1.0, schedule=schedule
    )
    cases = [
        ("ddim", DDIMScheduler.from_config(config), "noise", 4),
        ("ddpm", DDPMScheduler.from_config(config, variance_type="learned_range"), "noise_learned_range", 8),
        ("ddpm", DDPMScheduler.from_config(config), "noise", 4),
        ("dpmpp_2m", DPMSolverMultistepScheduler.from_config(config), "noise", 4),
    ]
    for name, scheduler, prediction, out_channels in cases:
        for steps in (1, 7, 20):
            scheduler.set_timesteps(steps)
            g_ref, g_ours = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
            x = torch.randn((1, 4, 8, 8), generator=g_ref)
            torch.randn((1, 4, 8, 8), generator=g_ours)
            sampler = make_sampler(name, x.clone(), steps, conventions(prediction), [g_ours])
            outputs = torch.Generator().manual_seed(9)
            for t in scheduler.timesteps:
                assert sampler.query()[1] == float(t)
                output = torch.randn((1, out_channels, 8, 8), generator=outputs)
                x = scheduler.step(output, t, x, generator=g_ref).prev_sample
                sampler.update(output)
                assert torch.equal(sampler.x, x), (name, prediction, steps, int(t))
            assert sampler.done


def test_dit_respacing_and_family_sampler_lists():
    assert space_timesteps(1000, 250) == dit_respaced_steps(1000, 250) and len(space_timesteps(1000, 250)) == 250
    assert space_timesteps(1000, 25)[:4] == [0, 42, 83, 125]  # 999/24 = 41.625: 83.25 -> 83, 124.875 -> 125
    dit = Conventions(family="dit", prediction="noise", time="timesteps", time_scale=1.0, schedule=NoiseSchedule())
    assert dit.samplers == ("ddpm", "ddim", "dpmpp_2m")
    assert Conventions().samplers == ("euler", "heun", "ddim", "ddpm", "dpmpp_2m", "sde_euler")
    with pytest.raises(ValueError, match="ddpm, ddim, dpmpp_2m"):
        make_sampler("euler", torch.zeros(1, 4, 8, 8), 5, dit)


# --------------------------------------------------------- diffusers' DiTPipeline --
@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A tiny DiTPipeline saved as facebook/DiT-XL-2-256 is laid out (transformer, vae, scheduler), its
    DDIMScheduler without clipping as DiT's; 1000 classes, since the pipeline's null class is 1000."""
    from diffusers import DDIMScheduler, DiTPipeline

    folder = tmp_path_factory.mktemp("pipeline") / "DiT-tiny"
    pipe = DiTPipeline(
        transformer=transformer(classes=1000, dit_style=False), vae=vae(), scheduler=DDIMScheduler(clip_sample=False)
    )
    pipe.save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    labels = {str(i): f"class {i}, synonym" for i in range(1000)}
    (folder / "model_index.json").write_text(json.dumps({**index, "id2label": labels}))
    out, record = import_checkpoint(source=folder, out=folder.parent / "imported")
    return pipe, folder, load(out), record


def run_pipeline(pipe, scheduler, label, seed, steps, scale):
    """The pipeline's final latents of its conditional image (before decoding) and its decoded picture."""
    pipe.scheduler, final = scheduler, {}
    step = scheduler.step

    def keep(*args, **kwargs):
        final["x"] = step(*args, **kwargs).prev_sample
        return final["x"]

    scheduler.step = lambda *a, **k: type("Out", (), {"prev_sample": keep(*a, **k)})
    picture = pipe(
        class_labels=[label],
        guidance_scale=scale,
        generator=torch.Generator().manual_seed(seed),
        num_inference_steps=steps,
        output_type="np",
    ).images
    return final["x"][:1], np.round(picture * 255).astype(np.int16)


def test_a_diffusers_pipeline_imports_with_its_vae_scheduler_and_names(pipeline):
    _, folder, model, record = pipeline
    family = model.config.family
    assert record["family"] == "diffusers" and family.default_sampler == "ddim" and family.default_steps == 50
    assert family.schedule.arithmetic == "diffusers" and family.schedule.clip_sample_range is None
    assert family.schedule.spacing == family.schedule.multistep_spacing == "leading"  # the config's, as saved
    assert family.prediction == "noise_learned_range" and family.guidance_channels is None
    assert model.autoencoder is not None and model.config.class_names[7] == "class 7"
    document = read_config(folder.parent / "imported")
    assert document["model"]["conventions"]["time"] == "timesteps" and document["autoencoder"]["path"] == "vae"


@pytest.mark.parametrize("sampler, steps", [("ddim", 25), ("dpmpp_2m", 25), ("ddpm", 50)])
def test_a_served_diffusers_pipeline_equals_the_pipeline(pipeline, sampler, steps):
    """ddim equals the pipeline with its DDIMScheduler, dpmpp_2m with DPMSolverMultistepScheduler.from_config
    of it, ddpm with DDPMScheduler.from_config(..., variance_type="learned_range") stepped with the image's
    generator (the pipeline drops the variance half, so that loop is written out, as the pipeline's)."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    from racedit.model.autoencoder import Decoder
    from racedit.model.sampling import to_uint8

    pipe, folder, model, _ = pipeline
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    label, seed, scale = 7, 21, 4.0
    got, _ = generate(model, [label], cfg_scale=scale, num_steps=steps, seeds=[seed], sampler=sampler, as_float=True)
    if sampler == "ddpm":
        scheduler = DDPMScheduler.from_config(config, variance_type="learned_range")
        scheduler.set_timesteps(steps)
        g = torch.Generator().manual_seed(seed)
        x, labels = torch.randn((1, 4, 8, 8), generator=g), torch.tensor([label, 1000])
        with torch.no_grad():
            for t in scheduler.timesteps:
                out = pipe.transformer(torch.cat([x, x]), timestep=t.expand(2), class_labels=labels)
                eps, rest = out.sample[:, :4], out.sample[:, 4:]
                cond, uncond = eps.chunk(2)
                guided = torch.cat([uncond + scale * (cond - uncond), rest[:1]], dim=1)
                x = scheduler.step(guided, t, x, generator=g).prev_sample
        want = x
    else:
        cls = DDIMScheduler if sampler == "ddim" else DPMSolverMultistepScheduler
        want, picture = run_pipeline(pipe, cls.from_config(config), label, seed, steps, scale)
        ours = to_uint8(Decoder(model.autoencoder)(got)).permute(0, 2, 3, 1).numpy().astype(np.int16)
        assert np.abs(ours - picture).max() <= 1  # the PNGs within one level
    assert rel(got, want) <= TOLERANCE, rel(got, want)


# ------------------------------------------------------------------ DiT's .pt --
@pytest.fixture(scope="module")
def dit_pt(tmp_path_factory):
    source = transformer()
    folder = tmp_path_factory.mktemp("dit")
    torch.save(dit_state_dict(source), folder / "DiT-tiny.pt")
    out, record = import_checkpoint(source=folder / "DiT-tiny.pt", out=folder / "imported", num_heads=2)
    return source, load(out), record


@pytest.mark.parametrize("steps", [250, 25])
def test_a_dit_pt_samples_as_dits_p_sample_loop(dit_pt, steps):
    """ddpm over DiT's respaced chain with 3-channel guidance and learned-range variance equals DiT's
    p_sample_loop with forward_with_cfg on the same noise; DiT's integer timesteps reach the embedding."""
    source, model, record = dit_pt
    family = model.config.family
    assert record["family"] == "dit" and family.guidance_channels == 3 and family.default_steps == 250
    label, seed, scale = 3, 5, 4.0
    got, _ = generate(model, [label], cfg_scale=scale, num_steps=steps, seeds=[seed], sampler="ddpm", as_float=True)
    noise, step_noises = image_noise(seed, steps)
    want = dit_p_sample_loop(network(source), noise, torch.tensor([label]), 10, scale, steps, step_noises)
    assert rel(got, want) <= TOLERANCE, rel(got, want)
    sampler = make_sampler("ddpm", noise, steps, family, [torch.Generator()])
    assert sampler.times[0] == 999.0 and sampler.times[-1] == 0.0 and len(sampler.times) == steps


# ------------------------------------------------------------------ SiT, REPA --
@pytest.fixture(scope="module")
def sit_pt(tmp_path_factory):
    source = transformer(seed=2)
    folder = tmp_path_factory.mktemp("sit")
    torch.save({"ema": dit_state_dict(source), "model": {}}, folder / "SiT-tiny.pt")  # the EMA is what samples
    out, record = import_checkpoint(source=folder / "SiT-tiny.pt", out=folder / "imported", family="sit", num_heads=2)
    return source, load(out), record


def test_sit_samples_as_its_transport_samplers(sit_pt):
    """sde_euler equals SiT's Euler–Maruyama (sigma diffusion, last step the mean) and euler SiT's Euler ODE
    (n steps = n + 1 grid points), on the same noise, with guidance on the first 3 channels."""
    source, model, record = sit_pt
    assert record["family"] == "sit" and model.config.family.default_sampler == "sde_euler"
    net, label, seed, scale, y = network(source, channels=4), 2, 8, 4.0, torch.tensor([2])
    noise, step_noises = image_noise(seed, 40)
    got, _ = generate(model, [label], cfg_scale=scale, num_steps=40, seeds=[seed], sampler="sde_euler", as_float=True)
    assert rel(got, sit_sde_euler(net, noise, y, 10, scale, 40, step_noises)) <= TOLERANCE
    want = sit_ode_euler(net, noise, y, 10, scale, 31)
    got, _ = generate(model, [label], cfg_scale=scale, num_steps=30, seeds=[seed], sampler="euler", as_float=True)
    assert rel(got, want) <= TOLERANCE
    # ddim on the linear path is Euler's update re-rounded: through SiT's reversed time and velocity too
    got, _ = generate(model, [label], cfg_scale=scale, num_steps=30, seeds=[seed], sampler="ddim", as_float=True)
    assert rel(got, want) <= TOLERANCE


@pytest.fixture(scope="module")
def repa_pt(tmp_path_factory):
    source = transformer(seed=4, learn_sigma=False)
    state = dit_state_dict(source)
    state["projectors.0.0.weight"] = torch.randn(64, 32)  # REPA's alignment head: training only
    folder = tmp_path_factory.mktemp("repa")
    from safetensors.torch import save_file

    save_file(state, str(folder / "repa-tiny.safetensors"))
    out, record = import_checkpoint(source=folder / "repa-tiny.safetensors", out=folder / "imported", num_heads=2)
    return source, load(out), record


def test_repa_samples_as_its_samplers_with_its_guidance_interval(repa_pt):
    """auto finds REPA by its projectors; sde_euler and euler equal REPA's samplers (float64) with cfg 1.8
    applied only for t <= 0.7, and the unguided steps run one row per image."""
    source, model, record = repa_pt
    family = model.config.family
    assert record["family"] == "repa" and "projectors" in record["ignored_tensors"]
    assert (family.guidance_high, family.default_cfg_scale, family.guidance_channels) == (0.7, 1.8, None)
    net, label, seed, y = network(source), 6, 13, torch.tensor([6])
    noise, step_noises = image_noise(seed, 30)
    got, usage = generate(model, [label], num_steps=30, seeds=[seed], as_float=True)  # the family's sde_euler, 1.8
    want = repa_euler_maruyama(net, noise, y, 10, 1.8, 30, step_noises, high=0.7)
    assert rel(got, want) <= TOLERANCE, rel(got, want)
    got, _ = generate(model, [label], num_steps=20, seeds=[seed], sampler="euler", as_float=True)
    assert rel(got, repa_euler(net, noise, y, 10, 1.8, 20, high=0.7)) <= TOLERANCE
    unguided = repa_euler_maruyama(net, noise, y, 10, 1.8, 30, step_noises, high=1.0)
    assert rel(unguided, want) > 1e-3  # the interval matters
    assert usage[0].nominal_pairs == 0  # dense: no experts, yet the accounting ran per step


# -------------------------------------------------------------- the importer --
def test_unknown_layouts_and_pickles_are_refused_naming_what_was_tried(tmp_path, dit_pt):
    torch.save({"moe.gate.weight": torch.zeros(8, 32), "blocks.0.mlp.fc1.weight": torch.zeros(4, 4)}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match=r"tried dit, sit and repa.*missing.*not fitting \['moe\.gate\.weight'\]"):
        import_checkpoint(source=tmp_path / "x.pt", out=tmp_path / "o")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")
    with pytest.raises(CheckpointError, match="never unpickles"):
        import_checkpoint(source=tmp_path / "module.pt", out=tmp_path / "o")
    (tmp_path / "folder").mkdir()
    with pytest.raises(CheckpointError, match="DiTPipeline.*DiTTransformer2DModel"):
        import_checkpoint(source=tmp_path / "folder", out=tmp_path / "o")
    source, _, _ = dit_pt
    torch.save(dit_state_dict(source), tmp_path / "dit.pt")
    with pytest.raises(CheckpointError, match="not diffusers"):
        import_checkpoint(source=tmp_path / "dit.pt", out=tmp_path / "o", family="diffusers")
    fields = ImportOptions.model_fields
    assert all(f.description for f in fields.values()) and list(fields)[:2] == ["source", "out"]
