"""The compute dial: per-row thresholds from a budget table, batch-independent, 1.0 = the learned routing."""

import pytest
import torch
from conftest import tiny_model

from racedit.model import generate
from racedit.model.budget import budget_range, thresholds_for
from racedit.model.training.calibrate import budget_table
from racedit.model.training.config import Calibration


def budget_thresholds(model, budgets):
    """The thresholds the engine and generate() route by for these budgets."""
    return thresholds_for(model.budget_table, model.learned_thresholds(), budgets)


CALIBRATION = Calibration(num_images=8, num_steps=6)


@pytest.fixture(scope="module")
def dialled():
    model = tiny_model()
    record = budget_table(model, CALIBRATION, budgets=(0.5, 1.0, 1.5))
    return model, record


def test_the_table_orders_thresholds_and_compute(dialled):
    model, record = dialled
    assert record["budgets"] == [0.5, 1.0, 1.5] and budget_range(model.budget_table) == (0.5, 1.5)
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
    together, usage = generate(
        model, [1, 2, 3, 4], num_steps=5, seeds=[5, 6, 7, 8], as_float=True, expert_budget=budgets
    )
    for i, budget in enumerate(budgets):
        alone, alone_usage = generate(model, [i + 1], num_steps=5, seeds=[5 + i], as_float=True, expert_budget=budget)
        assert together[i].numpy().tobytes() == alone[0].numpy().tobytes()
        assert usage[i] == alone_usage[0]
    assert usage[0].mean_experts_per_token < usage[1].mean_experts_per_token < usage[2].mean_experts_per_token


def test_budgets_outside_the_table_are_refused(dialled):
    model, _ = dialled
    with pytest.raises(ValueError, match="outside the calibrated range 0.5..1.5"):
        budget_thresholds(model, [2.0])
    with pytest.raises(ValueError, match="no budget table"):
        budget_thresholds(tiny_model(), [0.5])
    assert budget_thresholds(tiny_model(), [1.0]).shape == (2, 1)  # 1.0 needs no table


@pytest.fixture(scope="module")
def dial_server(server_factory, tmp_path_factory):
    from racedit.model import save

    model = tiny_model()
    budget_table(model, CALIBRATION, budgets=(0.25, 0.5, 1.0, 1.5))
    checkpoint = save(model, tmp_path_factory.mktemp("dial") / "racedit-dial", metadata=model.metadata)
    return server_factory("--max-batch-rows", "32", checkpoint=checkpoint)


def npy(answer: dict) -> list[bytes]:
    import base64

    return [base64.b64decode(image["data"]) for image in answer["images"]]


def test_expert_budget_over_http(dial_server, server_factory):
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    url = dial_server.url

    def post(budget, seed, label=3):
        body = {"class_label": label, "num_steps": 30, "seed": seed, "output_format": "npy", "expert_budget": budget}
        return httpx.post(url + "/generate", json=body, timeout=120).json()

    alone = {budget: post(budget, 40) for budget in (0.25, 1.0, 1.5)}
    default = httpx.post(
        url + "/generate", json={"class_label": 3, "num_steps": 30, "seed": 40, "output_format": "npy"}, timeout=120
    ).json()
    assert npy(default) == npy(alone[1.0])  # budget 1.0 is today's routing, to the bit
    realised = [alone[b]["expert_usage"]["mean_experts_per_token"] for b in (0.25, 1.0, 1.5)]
    assert realised[0] < realised[1] < realised[2]
    assert alone[0.25]["request"]["expert_budget"] == 0.25
    with ThreadPoolExecutor(6) as pool:  # mixed budgets sharing steps: each gets what it gets alone
        mixed = list(pool.map(lambda b: post(b, 40), [0.25, 1.5, 1.0, 0.25, 1.5, 1.0]))
    for budget, answer in zip([0.25, 1.5, 1.0, 0.25, 1.5, 1.0], mixed):
        assert npy(answer) == npy(alone[budget])
    refused = httpx.post(url + "/generate", json={"class_label": 3, "expert_budget": 3.0})
    assert refused.status_code == 422 and "outside this model's calibrated range 0.25..1.5" in refused.text
    schema = httpx.get(url + "/openapi.json").json()["components"]["schemas"]["GenerateRequest"]
    assert schema["properties"]["expert_budget"]["minimum"] == 0.25
    assert schema["properties"]["expert_budget"]["maximum"] == 1.5
    # Without a table only 1.0 is served, and the error says how to get one.
    plain = server_factory()
    refused = httpx.post(plain.url + "/generate", json={"class_label": 3, "expert_budget": 0.5})
    assert refused.status_code == 422 and "racedit calibrate" in refused.text


def test_expert_budget_through_the_sdk_and_kserve(dial_server):
    import numpy as np
    import tritonclient.http as triton

    from racedit_client import Client

    with Client(dial_server.url) as client:
        low = client.generate(2, num_steps=20, seed=9, expert_budget=0.5)
        high = client.generate(2, num_steps=20, seed=9, expert_budget=1.5)
        streamed = list(client.stream(2, num_steps=20, seed=9, expert_budget=0.5))[-1]
    assert low.expert_usage.mean_experts_per_token < high.expert_usage.mean_experts_per_token
    assert streamed.expert_usage == low.expert_usage and low.request.expert_budget == 0.5
    kserve = triton.InferenceServerClient(dial_server.url.removeprefix("http://"))
    inputs = []
    for name, dtype, values in [
        ("class_label", "INT64", np.array([2], np.int64)),
        ("num_steps", "INT32", np.array([20], np.int32)),
        ("seed", "INT64", np.array([9], np.int64)),
        ("expert_budget", "FP32", np.array([0.5], np.float32)),
    ]:
        item = triton.InferInput(name, [1], dtype)
        item.set_data_from_numpy(values)
        inputs.append(item)
    result = kserve.infer("racedit-dial", inputs)
    assert result.as_numpy("mean_experts_per_token")[0] == pytest.approx(low.expert_usage.mean_experts_per_token)
