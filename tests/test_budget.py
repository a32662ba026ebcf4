"""The compute dial: per-row thresholds from a budget table, batch-independent, 1.0 = the learned routing."""
import pytest
import torch

from conftest import tiny_model
from racedit.model import generate
from racedit.model.calibrate import Calibration, budget_range, budget_table, budget_thresholds

CALIBRATION = Calibration(num_images=8, num_steps=6)


@pytest.fixture(scope="module")
def dialled():
    model = tiny_model()
    record = budget_table(model, CALIBRATION, budgets=(0.5, 1.0, 1.5))
    return model, record


def test_the_table_orders_thresholds_and_compute(dialled):
    model, record = dialled
    assert record["budgets"] == [0.5, 1.0, 1.5] and budget_range(model) == (0.5, 1.5)
    low, one, high = torch.tensor(record["thresholds"])  # [n_layers] each
    assert torch.equal(one, torch.tensor([float(layer.threshold) for layer in model.moe_layers]))
    assert (low > one).all() and (one > high).all()  # fewer experts need a higher bar
    realised = record["mean_experts_per_token"]
    assert realised[0] < realised[1] < realised[2]
    assert realised[0] == pytest.approx(0.5 * 2, rel=0.35) and realised[2] == pytest.approx(1.5 * 2, rel=0.35)


def test_budget_one_is_the_learned_routing_to_the_bit(dialled):
    model, _ = dialled
    plain, _ = generate(model, [3, 7], num_steps=5, seeds=[0, 1], as_float=True)
    dialled_one, _ = generate(model, [3, 7], num_steps=5, seeds=[0, 1], as_float=True, expert_budget=1.0)
    assert plain.numpy().tobytes() == dialled_one.numpy().tobytes()


def test_mixed_budgets_in_one_batch_give_each_image_what_it_gets_alone(dialled):
    model, _ = dialled
    budgets = [0.5, 1.0, 1.5, 0.75]
    together, usage = generate(model, [1, 2, 3, 4], num_steps=5, seeds=[5, 6, 7, 8], as_float=True,
                               expert_budget=budgets)
    for i, budget in enumerate(budgets):
        alone, alone_usage = generate(model, [i + 1], num_steps=5, seeds=[5 + i], as_float=True,
                                      expert_budget=budget)
        assert together[i].numpy().tobytes() == alone[0].numpy().tobytes()
        assert usage[i] == alone_usage[0]
    assert usage[0]["mean_experts_per_token"] < usage[1]["mean_experts_per_token"] < usage[2]["mean_experts_per_token"]


def test_budgets_outside_the_table_are_refused(dialled):
    model, _ = dialled
    with pytest.raises(ValueError, match="outside the calibrated range 0.5..1.5"):
        budget_thresholds(model, [2.0])
    with pytest.raises(ValueError, match="no budget table"):
        budget_thresholds(tiny_model(), [0.5])
    assert budget_thresholds(tiny_model(), [1.0]).shape == (2, 1)  # 1.0 needs no table
