"""Latent-space checkpoints: they carry their VAE, and serving them answers pictures (real diffusers
AutoencoderKL, tiny and random; real `racedit serve` processes on loopback)."""

import base64
import io
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from conftest import metric
from PIL import Image

from racedit.model import CheckpointError, generate, load, read_config


def png(image: dict) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(image["data"]))) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def npy(image: dict) -> np.ndarray:
    assert image["mime_type"] == "application/x-npy"
    return np.load(io.BytesIO(base64.b64decode(image["data"])), allow_pickle=False)


def vae_decode(checkpoint, latents: np.ndarray) -> np.ndarray:
    """The VAE's own decode of the model's latents (undoing the checkpoint's scaling and shift), as uint8 HWC."""
    from diffusers import AutoencoderKL

    record = read_config(checkpoint)["autoencoder"]
    vae = AutoencoderKL.from_pretrained(checkpoint / record["path"], local_files_only=True).eval()
    z = torch.from_numpy(latents) / record["scaling_factor"] + record["shift_factor"]
    with torch.no_grad():
        x = vae.decode(z).sample
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def test_save_copies_the_vae_and_load_finds_it(latent_checkpoint, tmp_path):
    document = read_config(latent_checkpoint)
    assert document["autoencoder"] == {
        "kind": "diffusers.AutoencoderKL",
        "path": "vae",
        "scaling_factor": 0.5,
        "shift_factor": 0.1,
    }
    assert (latent_checkpoint / "vae" / "config.json").is_file()
    assert list((latent_checkpoint / "vae").glob("*.safetensors"))
    model = load(latent_checkpoint)
    assert model.autoencoder.path == latent_checkpoint / "vae" and model.autoencoder.scaling_factor == 0.5
    # a VAE folder given by path is copied the same way; pack carries it
    from racedit.model import save

    again = save(model, tmp_path / "again", autoencoder=latent_checkpoint / "vae")
    assert read_config(again)["autoencoder"]["scaling_factor"] == 0.5  # the VAE's own config
    packed = tmp_path / "packed"
    out = subprocess.run(
        [sys.executable, "-m", "racedit.cli", "pack", "--checkpoint", str(latent_checkpoint), "--out", str(packed)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert read_config(packed)["autoencoder"] == document["autoencoder"] and (packed / "vae" / "config.json").is_file()
    assert load(packed).autoencoder.path == packed / "vae"


def test_a_missing_vae_fails_at_load_and_at_serve_naming_the_folder(latent_checkpoint, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(latent_checkpoint, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(CheckpointError, match=str(broken / "vae")):
        load(broken)
    out = subprocess.run(
        [sys.executable, "-m", "racedit.cli", "serve", "--checkpoint", str(broken), "--port", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and str(broken / "vae") in out.stderr


def test_a_latent_checkpoint_without_diffusers_names_the_extra(latent_checkpoint):
    code = (
        "import sys; sys.modules['diffusers'] = None\n"
        "from racedit.cli import main\n"
        f"sys.exit(main(['serve', '--checkpoint', {str(latent_checkpoint)!r}, '--port', '1']))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "diffusers.AutoencoderKL" in out.stderr and "racedit[latents]" in out.stderr


def test_broken_vae_weights_fail_start_up_naming_the_folder(latent_checkpoint, tmp_path, server_factory):
    broken = tmp_path / "broken-weights"
    shutil.copytree(latent_checkpoint, broken)
    for weights in (broken / "vae").glob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")
    with pytest.raises(RuntimeError, match="cannot load the VAE"):
        server_factory(checkpoint=broken)


@pytest.fixture(scope="module")
def latent_server(server_factory, latent_checkpoint):
    return server_factory("--max-batch-rows", "16", checkpoint=latent_checkpoint)


def post(server, body):
    return httpx.post(server.url + "/generate", json=body, timeout=120)


def test_models_report_latent_and_image_shapes(latent_server):
    card = httpx.get(latent_server.url + "/v1/models").json()["data"][0]
    assert card["latent_shape"] == [4, 8, 8] and card["image_shape"] == [3, 16, 16]
    assert card["autoencoder"] == {"kind": "diffusers.AutoencoderKL", "scaling_factor": 0.5, "shift_factor": 0.1}


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_served_png_is_the_vaes_decode_of_the_served_latents(latent_server, latent_checkpoint, cfg_scale):
    body = {"class_label": 2, "cfg_scale": cfg_scale, "num_steps": 5, "seed": 7, "num_images": 2}
    pictures = post(latent_server, body)
    latents = post(latent_server, {**body, "output_format": "npy"})
    assert pictures.status_code == 200 and latents.status_code == 200, pictures.text
    images = np.stack([png(im) for im in pictures.json()["images"]])
    z = np.stack([npy(im) for im in latents.json()["images"]])
    assert images.shape == (2, 16, 16, 3) and z.shape == (2, 4, 8, 8) and z.dtype == np.float32
    expected = vae_decode(latent_checkpoint, z)
    assert np.abs(images.astype(int) - expected.astype(int)).max() <= 1
    # the latents are the library's own samples
    library, _ = generate(
        load(latent_checkpoint), [2, 2], cfg_scale=cfg_scale, num_steps=5, seeds=[7, 8], as_float=True
    )
    assert np.array_equal(z, library.numpy())
    assert pictures.json()["timing"]["decode_ms"] > 0


def test_a_mixed_batch_decodes_each_request_as_alone(latent_server, latent_checkpoint):
    bodies = [
        {"class_label": c, "cfg_scale": s, "num_steps": n, "seed": 40 + c, "num_images": m}
        for c, s, n, m in [(0, 1.0, 6, 1), (1, 4.0, 6, 2), (3, 2.0, 9, 1), (5, 1.0, 4, 3), (9, 6.0, 6, 1)]
    ]
    alone = [post(latent_server, {**b, "output_format": "npy"}).json() for b in bodies]
    before = metric(httpx.get(latent_server.url + "/metrics").text, "racedit_decode_seconds_count")
    with ThreadPoolExecutor(len(bodies) * 2) as pool:
        together = list(
            pool.map(lambda b: post(latent_server, b), bodies + [{**b, "output_format": "npy"} for b in bodies])
        )
    assert all(r.status_code == 200 for r in together)
    for body, single, picture, latent in zip(bodies, alone, together[: len(bodies)], together[len(bodies) :]):
        z = np.stack([npy(im) for im in latent.json()["images"]])
        assert np.array_equal(z, np.stack([npy(im) for im in single["images"]]))  # the bytes, whoever shares
        images = np.stack([png(im) for im in picture.json()["images"]])
        assert images.shape == (body["num_images"], 16, 16, 3)
        assert np.abs(images.astype(int) - vae_decode(latent_checkpoint, z).astype(int)).max() <= 1
    after = metric(httpx.get(latent_server.url + "/metrics").text, "racedit_decode_seconds_count")
    assert before < after < before + 2 * len(bodies)  # some requests finished together and shared a decode


def test_stream_previews_and_result_are_pictures(latent_server):
    from racedit_client import Client, GenerateResult, Preview

    events = list(Client(latent_server.url).stream(class_label=1, num_steps=4, seed=3, preview_every=2))
    previews = [e for e in events if isinstance(e, Preview)]
    assert previews and all(np.asarray(p.images[0]).shape == (16, 16, 3) for p in previews)
    result = events[-1]
    assert isinstance(result, GenerateResult) and np.asarray(result.images[0]).shape == (16, 16, 3)


def test_kserve_infer_returns_pictures(latent_server):
    body = {
        "inputs": [
            {"name": "class_label", "shape": [1], "datatype": "INT64", "data": [4]},
            {"name": "seed", "shape": [1], "datatype": "INT64", "data": [5]},
        ]
    }
    r = httpx.post(latent_server.url + "/v2/models/racedit-latent/infer", json=body, timeout=120)
    assert r.status_code == 200, r.text
    out = {o["name"]: o for o in r.json()["outputs"]}
    assert out["image"]["shape"] == [1, 16, 16, 3]
    meta = httpx.get(latent_server.url + "/v2/models/racedit-latent").json()
    assert {o["name"]: o["shape"] for o in meta["outputs"]}["image"] == [-1, 16, 16, 3]


def test_a_ddpm_checkpoint_is_refused_by_serve_and_generate(tmp_path):
    from conftest import tiny_model

    from racedit.model import save
    from racedit.model.sampling import ObjectiveError

    checkpoint = save(tiny_model(objective="ddpm_eps"), tmp_path / "ddpm")
    with pytest.raises(ObjectiveError, match="racedit train"):
        generate(load(checkpoint), [1], num_steps=2)
    out = subprocess.run(
        [sys.executable, "-m", "racedit.cli", "serve", "--checkpoint", str(checkpoint), "--port", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "ddpm_eps" in out.stderr and "--init" in out.stderr
