"""Objective, samplers and generate()."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from racedit.model import build, generate
from racedit.model.denoiser import DenoiserOutput, ForwardStats
from racedit.model.samplers import Euler, Heun, time_grid
from racedit.model.sampling import guided_prediction
from racedit.model.training.config import LossConfig
from racedit.model.training.objective import logit_normal, training_loss


def trained_tiny():
    model = build("tiny").train()
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        model(
            torch.randn(8, 3, 16, 16, generator=g), torch.rand(8, generator=g), torch.randint(0, 10, (8,), generator=g)
        )
    # Nudge the zero-initialised output so samples are not trivially equal.
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.05)
    for block in model.blocks:
        torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.05)
    return model.eval()


def test_training_loss_terms():
    model = build("tiny").train()
    x0 = torch.rand(4, 3, 16, 16) * 2 - 1
    y = torch.randint(0, 10, (4,))
    loss, terms, stats, t = training_loss(model, x0, y, LossConfig(plr=1.0, similarity=0.1))
    assert loss.requires_grad and t.shape == (4,) and 0 < float(t.min()) and float(t.max()) < 1
    assert terms["loss"] == pytest.approx(terms["mse"] + terms["plr"] + 0.1 * terms["similarity"], rel=1e-5)
    assert terms["plr"] > 0 and len(stats.routing) == 2


def test_timesteps_follow_the_configured_logit_normal():
    """loss.t_mean shifts training towards the noisy steps: logit(t) ~ N(t_mean, t_std)."""
    g = torch.Generator().manual_seed(0)
    logit = torch.logit(logit_normal(20_000, g, mean=0.7, std=0.5).double())
    assert float(logit.mean()) == pytest.approx(0.7, abs=0.02) and float(logit.std()) == pytest.approx(0.5, abs=0.02)
    model = build("tiny").train()
    x0, y = torch.rand(256, 3, 16, 16) * 2 - 1, torch.randint(0, 10, (256,))
    _, _, _, t = training_loss(model, x0, y, LossConfig(t_mean=2.0), torch.Generator().manual_seed(0))
    assert float((t > 0.8).float().mean()) > 0.5  # 8 % of draws at the default t_mean 0


def test_time_grid():
    assert time_grid(4) == [1.0, 0.75, 0.5, 0.25, 0.0]


def test_generate_shapes_types_and_usage():
    model = trained_tiny()
    images, usage = generate(model, labels=[3, 7], cfg_scale=4.0, num_steps=5, seeds=[0, 1])
    assert images.shape == (2, 3, 16, 16) and images.dtype == torch.uint8
    u = usage[0]
    assert u.num_moe_layers == 2 and u.num_experts == 4 and u.nominal_k == 2
    assert len(u.per_step) == 5 and len(u.per_layer) == 2
    assert len(u.token_map) == 4 and len(u.token_map[0]) == 4
    # Under guidance an image has two rows per step.
    assert u.nominal_pairs == 5 * 2 * 16 * 2 * 2
    assert u.activated_pairs == sum(sum(layer.expert_load) for layer in u.per_layer)
    # Histogram over 0..E experts: shares of the (layer, row, token, step) slots, whose mean is the mean.
    histogram = u.experts_per_token_histogram
    assert len(histogram) == 5 and sum(histogram) == pytest.approx(1.0)
    assert sum(j * share for j, share in enumerate(histogram)) == pytest.approx(u.mean_experts_per_token)
    assert histogram != usage[1].experts_per_token_histogram  # each image its own


def test_cfg_one_skips_the_unconditional_pass():
    model = trained_tiny()
    x = torch.randn(3, 3, 16, 16)
    t = torch.full((3,), 0.5)
    y = torch.tensor([1, 2, 3])
    _, ept, _, owner = guided_prediction(model, x, t, y, torch.tensor([1.0, 4.0, 1.0]))
    assert ept.shape[1] == 4 and owner.tolist() == [0, 1, 2, 1]
    _, usage = generate(model, labels=[1], cfg_scale=1.0, num_steps=3, seeds=[0])
    assert usage[0].nominal_pairs == 3 * 1 * 16 * 2 * 2


class ArithmeticDenoiser:
    """A denoiser of fixed arithmetic with the tiny model's config: no routing and no host reads of its own,
    so what a dispatch counter sees around it is `guided_prediction`'s."""

    def __init__(self):
        self.config = build("tiny").config
        self.null_class = self.config.num_classes

    def __call__(self, x, t, y, thresholds=None, return_stats=False):
        rows = x.shape[0]
        prediction = x * 2 + t.view(-1, 1, 1, 1) + y.view(-1, 1, 1, 1).to(x.dtype)
        counts = torch.zeros(2, rows, self.config.num_tokens, dtype=torch.int32, device=x.device)
        load = torch.zeros(2, rows, 4, dtype=torch.int32, device=x.device)
        return DenoiserOutput(prediction, ForwardStats(counts, load, []))


class HostWaits(TorchDispatchMode):
    """Counts the ops that make the host wait on a device: data-dependent shapes and scalar reads, and
    copies from the host that block."""

    def __init__(self):
        super().__init__()
        self.waits: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.ops.aten.nonzero.default, torch.ops.aten._local_scalar_dense.default):
            self.waits.append(str(func))
        if func is torch.ops.aten._to_copy.default and args[0].device.type == "cpu":
            if kwargs.get("device", args[0].device).type != "cpu" and not kwargs.get("non_blocking", False):
                self.waits.append(f"blocking copy to {kwargs['device']}")
        return func(*args, **kwargs)


@pytest.mark.parametrize("device", ["cpu", "meta"])  # meta: a host read has no data to read
@pytest.mark.parametrize("scales", [[1.0, 4.0, 1.0, 2.5], torch.tensor([1.0, 4.0, 1.0, 2.5])], ids=["list", "tensor"])
def test_guided_prediction_decides_the_guided_rows_on_the_host(device, scales):
    model = ArithmeticDenoiser()
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(4, 3, 16, 16, generator=g).to(device), torch.rand(4, generator=g).to(device)
    y = torch.tensor([1, 2, 3, 4]).to(device)
    thresholds = torch.rand(2, 4, generator=g).to(device)
    with HostWaits() as counter:
        v, ept, load, owner = guided_prediction(model, x, t, y, scales, thresholds)
    assert counter.waits == []
    assert v.shape == x.shape and ept.shape == (2, 6, 16) and load.shape == (2, 6, 4) and owner.shape == (6,)
    if device == "cpu":
        assert owner.tolist() == [0, 1, 2, 3, 1, 3]
        cond, uncond = x * 2 + t.view(-1, 1, 1, 1) + y.view(-1, 1, 1, 1), x * 2 + t.view(-1, 1, 1, 1) + 10
        want = cond.clone()
        for i, s in ((1, 4.0), (3, 2.5)):
            want[i] = uncond[i] + s * (cond[i] - uncond[i])
        assert torch.equal(v, want)


def test_seed_determinism_and_batch_independence():
    model = trained_tiny()
    a, _ = generate(model, labels=[5], cfg_scale=3.0, num_steps=6, seeds=[42])
    b, _ = generate(model, labels=[5], cfg_scale=3.0, num_steps=6, seeds=[42])
    assert torch.equal(a, b)
    mixed, usage = generate(
        model, labels=[1, 5, 9, 0], cfg_scale=[1.0, 3.0, 7.0, 2.0], num_steps=6, seeds=[7, 42, 3, 4]
    )
    assert torch.equal(mixed[1], a[0])
    c, _ = generate(model, labels=[5], cfg_scale=3.0, num_steps=6, seeds=[43])
    assert not torch.equal(a, c)


def test_heun_sampler_and_bad_arguments():
    model = trained_tiny()
    heun, _ = generate(model, labels=[2], num_steps=4, seeds=[0], sampler="heun")
    euler, _ = generate(model, labels=[2], num_steps=4, seeds=[0])
    assert heun.shape == euler.shape and not torch.equal(heun, euler)
    with pytest.raises(ValueError, match="sampler"):
        generate(model, labels=[2], sampler="lms")
    with pytest.raises(ValueError, match="same length"):
        generate(model, labels=[2, 3], seeds=[1])


def test_samplers_keep_their_own_state_and_ask_for_one_evaluation_at_a_time():
    """The objects generate() and the engine drive: Euler asks once per step, Heun twice (once on the
    last step, which ends at t = 0), and each completes exactly num_steps steps."""
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    slope = torch.full_like(x, 0.5)  # a constant velocity: both methods land on x - 0.5 exactly
    for cls, evaluations in ((Euler, 4), (Heun, 7)):
        sampler, asked, completed = cls(x, time_grid(4)), [], 0
        while not sampler.done:
            x_q, t_q = sampler.query()
            asked.append(t_q)
            completed += sampler.update(slope)
        assert len(asked) == evaluations and completed == sampler.step == 4
        assert torch.allclose(sampler.x, x - 0.5, atol=1e-6)
    heun = Heun(x, time_grid(2))
    heun.update(torch.ones_like(x))  # the predictor's slope at t = 1 ...
    x_pred, t_pred = heun.query()
    assert t_pred == 0.5 and torch.allclose(x_pred, x - 0.5)  # ... is evaluated again at its end point
    assert heun.update(-torch.ones_like(x)) and torch.allclose(heun.x, x)  # the mean slope is 0
