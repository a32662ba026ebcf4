"""shapes10 and ImageFolder datasets."""

import numpy as np
import pytest
import torch
from PIL import Image

from racedit.model.training.data import ImageFolder, Shapes10, ShapesStyle, vae_encoder


def test_shapes10_items_and_classes():
    ds = Shapes10("train", length=20)
    assert len(ds) == 20 and len(Shapes10("val")) == 5000 and len(Shapes10("train")) == 50_000
    assert ds.class_names == [
        "circle",
        "square",
        "triangle",
        "diamond",
        "pentagon",
        "hexagon",
        "star",
        "cross",
        "ring",
        "heart",
    ]
    x, y = ds[7]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert y == 7
    with pytest.raises(IndexError):
        ds[20]


def test_shapes10_is_deterministic_and_splits_are_disjoint():
    a, b = Shapes10("train", length=50), Shapes10("train", length=50)
    assert all(torch.equal(a[i][0], b[i][0]) for i in range(0, 50, 7))
    val = Shapes10("val", length=50)
    assert not any(torch.equal(a[i][0], val[i][0]) for i in range(50))
    other_seed = Shapes10("train", length=5, seed=1)
    assert not torch.equal(a[0][0], other_seed[0][0])


def test_shapes10_is_anti_aliased_and_varied():
    ds = Shapes10("train", length=40)
    image = ds.draw(0)
    # Edges have intermediate values, not just background and foreground.
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 20
    means = [ds[i][0].mean().item() for i in range(0, 40, 10)]  # same class, different draws
    assert np.std(means) > 0.01


def test_shapes10_style_controls_position():
    centred = Shapes10("train", length=30, style=ShapesStyle(jitter=0.0, min_size=0.3, max_size=0.3, rotation=0.0))
    # A circle with no jitter has its mass at the centre of the frame.
    for i in range(0, 30, 10):
        lum = centred.draw(i).astype(float) @ np.array([0.299, 0.587, 0.114])
        border = np.median(np.concatenate([lum[0], lum[-1], lum[:, 0], lum[:, -1]]))
        ys, xs = np.nonzero(np.abs(lum - border) > 60)  # the foreground differs by >= 0.35 luminance
        assert abs(ys.mean() - 15.5) < 1.5 and abs(xs.mean() - 15.5) < 1.5


def test_materialize_caches(tmp_path):
    ds = Shapes10("val", length=12)
    images, labels = ds.materialize(tmp_path)
    assert images.shape == (12, 3, 32, 32) and images.dtype == torch.uint8
    assert list(tmp_path.glob("shapes10-*.npz"))
    again, _ = ds.materialize(tmp_path)
    assert torch.equal(images, again)
    assert torch.equal(images[3], ((ds[3][0] + 1) * 127.5).round().to(torch.uint8))


def test_image_folder(tmp_path):
    for name, colour in (("cats", (255, 0, 0)), ("dogs", (0, 0, 255))):
        (tmp_path / name).mkdir()
        for i in range(3):
            Image.new("RGB", (40 + i, 30), colour).save(tmp_path / name / f"{i}.png")
    ds = ImageFolder(tmp_path, image_size=16)
    assert ds.class_names == ["cats", "dogs"] and len(ds) == 6
    x, y = ds[4]
    assert x.shape == (3, 16, 16) and y == 1 and x[2].mean() > 0.9
    with pytest.raises(FileNotFoundError, match="not a folder"):
        ImageFolder(tmp_path / "missing")


def test_image_folder_with_an_encoder(tmp_path):
    (tmp_path / "a").mkdir()
    Image.new("RGB", (16, 16), (10, 20, 30)).save(tmp_path / "a" / "x.png")
    encoder = torch.nn.Conv2d(3, 4, 8, stride=8)
    ds = ImageFolder(tmp_path, image_size=16, encoder=encoder)
    assert ds[0][0].shape == (4, 2, 2)


def test_image_folder_with_a_local_diffusers_vae(tmp_path):
    """A tiny randomly initialised AutoencoderKL, saved and loaded by path: nothing from a hub."""
    import diffusers  # a dev dependency: this test must run, not skip

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=16,
        scaling_factor=0.5,
    )
    vae.save_pretrained(tmp_path / "vae")
    for name, colour in (("red", (200, 10, 10)), ("blue", (10, 10, 200))):
        (tmp_path / "images" / name).mkdir(parents=True)
        Image.new("RGB", (20, 20), colour).save(tmp_path / "images" / name / "0.png")
    ds = ImageFolder(tmp_path / "images", image_size=16, encoder=vae_encoder(tmp_path / "vae"))
    assert ds.class_names == ["blue", "red"]
    (z_blue, y_blue), (z_red, y_red) = ds[0], ds[1]
    assert z_blue.shape == (4, 8, 8) and (y_blue, y_red) == (0, 1)
    pixels = ImageFolder(tmp_path / "images", image_size=16)[1][0]
    with torch.no_grad():
        expected = vae.eval().encode(pixels[None]).latent_dist.mean[0] * 0.5  # the VAE's own scaling_factor
    torch.testing.assert_close(z_red, expected)
    assert not torch.allclose(z_red, z_blue)
    with pytest.raises(FileNotFoundError, match="AutoencoderKL folder"):
        vae_encoder(tmp_path / "images")
