import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def batch(model, n, seed=0):
    """Random (x, t, y) for a model's shape, drawn from a seeded generator."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
    t = torch.rand(n, generator=g)
    y = torch.randint(0, cfg.num_classes, (n,), generator=g)
    return x, t, y
