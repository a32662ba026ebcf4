"""A published family's checkpoint served (issue 25): a tiny DiT `.pt` imported with a VAE by `racedit import`
and served by `racedit serve` -- its own samplers and defaults in /v1/models and the request schema, a
422 naming them for any other, the library's bytes, and ddpm's learned-range variance and 3-channel
guidance batch-invariant among other requests."""

import base64
import io

import httpx
import numpy as np
import pytest
import torch
from conftest import tiny_vae
from test_exactness import run_among_others, samples
from tiny_dits import dit_state_dict, tiny_transformer

from racedit.model import generate, load
from racedit.model.training.import_families import import_checkpoint
from racedit_client import Client


@pytest.fixture(scope="module")
def dit_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dit-served")
    torch.save(dit_state_dict(tiny_transformer()), folder / "DiT-tiny.pt")
    tiny_vae().save_pretrained(folder / "vae")
    out, _ = import_checkpoint(source=folder / "DiT-tiny.pt", out=folder / "dit-tiny", vae=folder / "vae", num_heads=2)
    return out


def post(server, body):
    return httpx.post(server.url + "/generate", json=body, timeout=120)


def test_a_dit_checkpoint_serves_its_own_samplers_and_defaults(server_factory, dit_checkpoint):
    server = server_factory("--max-batch-rows", "16", checkpoint=dit_checkpoint)
    card = httpx.get(server.url + "/v1/models").json()["data"][0]
    assert card["family"] == "dit" and card["samplers"] == ["ddpm", "ddim", "dpmpp_2m"]
    assert (card["default_sampler"], card["default_num_steps"], card["default_cfg_scale"]) == ("ddpm", 250, 4.0)
    assert card["image_shape"] == [3, 16, 16] and card["latent_shape"] == [4, 8, 8]
    r = post(server, {"class_label": 1, "sampler": "euler"})  # no continuous time in a DDPM chain
    assert r.status_code == 422 and "'ddpm', 'ddim' or 'dpmpp_2m'" in r.text
    answer = post(server, {"class_label": 3, "seed": 5, "output_format": "npy"})  # DiT's defaults: ddpm, 250 steps
    assert answer.status_code == 200, answer.text
    request = answer.json()["request"]
    assert (request["sampler"], request["num_steps"], request["cfg_scale"]) == ("ddpm", 250, 4.0)
    want, _ = generate(load(dit_checkpoint), [3], seeds=[5], as_float=True)
    got = np.load(io.BytesIO(base64.b64decode(answer.json()["images"][0]["data"])), allow_pickle=False)
    assert got.tobytes() == want[0].numpy().tobytes()
    with Client(server.url) as client:  # the SDK reads a dense network's usage: no experts, every step
        result = client.generate(3, seed=5, num_steps=10, sampler="dpmpp_2m")
    assert result.images[0].size == (16, 16)  # decoded by the checkpoint's VAE
    assert result.expert_usage.mean_experts_per_token == 0.0 and result.expert_usage.per_step == [0.0] * 10
    # ddpm with a learned variance and 3-channel guidance: the same bytes alone and among other samplers
    target = {"class_label": 7, "cfg_scale": 3.0, "num_steps": 12, "seed": 77, "num_images": 2, "output_format": "npy"}
    others = [
        {"class_label": 1, "cfg_scale": 1.0, "num_steps": 120, "seed": 5, "sampler": "ddim"},
        {"class_label": 2, "cfg_scale": 5.0, "num_steps": 100, "seed": 6, "num_images": 2, "sampler": "dpmpp_2m"},
        {"class_label": 4, "cfg_scale": 2.0, "num_steps": 150, "seed": 8},
    ]
    alone = samples(post(server, target))
    together, still_running = run_among_others(server, target, others, static=False)
    assert still_running and samples(together) == alone
