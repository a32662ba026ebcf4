"""Row buckets and CUDA graphs (model/graphs.py): rows padded to a bucket are the unpadded forward's
bytes, prediction and routing counts alike, with and without per-row thresholds; on CUDA a replay is the
eager forward's bytes and hands the caller tensors the next replay cannot overwrite."""

import pytest
import torch
from conftest import batch, tiny_model

from racedit.model import generate
from racedit.model.budget import thresholds_for
from racedit.model.exact import SERVING
from racedit.model.graphs import GraphedDenoiser, row_buckets

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this host")


def dialled_tiny():
    """The tiny model with a budget table around its learned thresholds (a higher bar: fewer experts)."""
    model = tiny_model()
    learned = model.learned_thresholds()
    model.metadata["budget_table"] = {
        "budgets": [0.5, 1.0, 1.5],
        "thresholds": [[v + 0.05 for v in learned], learned, [v - 0.05 for v in learned]],
    }
    return model


def forward_bytes(out) -> list[bytes]:
    stats = out.stats
    return [t.detach().cpu().numpy().tobytes() for t in (out.prediction, stats.experts_per_token, stats.expert_load)]


def test_row_buckets():
    assert row_buckets(64) == [8, 16, 32, 64]
    assert row_buckets(48) == [8, 16, 32, 48]
    assert row_buckets(8) == [8] and row_buckets(6) == [6] and row_buckets(1) == [1]
    with pytest.raises(ValueError):
        row_buckets(0)


def test_learned_thresholds_as_a_tensor_route_as_none():
    """What lets one graph serve dialled and undialled steps: per-row thresholds equal to the learned
    ones select exactly what the learned scalar does."""
    model = tiny_model()
    x, t, y = batch(model, 5, seed=3)
    learned = thresholds_for(None, model.learned_thresholds(), [1.0] * 5)  # [n_layers, 5]
    plain = model(x, t, y, return_stats=True)
    as_tensor = model(x, t, y, thresholds=learned, return_stats=True)
    assert forward_bytes(as_tensor) == forward_bytes(plain)


@pytest.mark.parametrize("dial", [False, True], ids=["learned", "per-row-thresholds"])
def test_rows_padded_to_a_bucket_are_the_unpadded_bytes(dial):
    model = dialled_tiny()
    graphed = GraphedDenoiser(model, [4, 8], graphs=False)
    seen = []
    hook = model.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    budgets = [0.5, 1.0, 1.5, 1.2, 0.7, 1.0, 0.9, 1.4, 0.6, 1.1, 1.3]
    for rows in (1, 3, 4, 7, 11):  # 11: more than the largest bucket, run as 8 + 3 padded to 4
        x, t, y = batch(model, rows, seed=rows)
        y[0] = model.null_class  # an unconditional row among them
        thresholds = thresholds_for(model.budget_table, model.learned_thresholds(), budgets[:rows]) if dial else None
        seen.clear()
        with torch.no_grad():
            unpadded = model(x, t, y, thresholds=thresholds, return_stats=True)
        padded = graphed(x, t, y, thresholds=thresholds, return_stats=True)
        assert seen[1:] == {1: [4], 3: [4], 4: [4], 7: [8], 11: [8, 4]}[rows]  # what the model ran
        assert forward_bytes(padded) == forward_bytes(unpadded), rows
        assert padded.stats.experts_per_token.shape[1] == rows and padded.stats.routing == []
        assert graphed(x, t, y, thresholds=thresholds).stats is None
    hook.remove()
    if dial:  # the dial changed the routing, so the comparison above was not of the learned routing again
        x, t, y = batch(model, 3, seed=3)
        low = thresholds_for(model.budget_table, model.learned_thresholds(), [0.5] * 3)
        assert (
            graphed(x, t, y, low, True).stats.expert_load.sum() < graphed(x, t, y, None, True).stats.expert_load.sum()
        )


def test_a_model_without_a_budget_table_takes_no_thresholds():
    model = tiny_model()
    graphed = GraphedDenoiser(model, [8], graphs=False)
    x, t, y = batch(model, 2)
    with pytest.raises(ValueError, match="budget table"):
        graphed(x, t, y, thresholds=thresholds_for(None, model.learned_thresholds(), [1.0, 1.0]))


def test_generate_through_the_buckets_gives_the_library_s_bytes():
    """The wrapper stands in for the denoiser everywhere (device, eval, config, thresholds), and a
    guided step's rows (5 here) are chunked and padded without changing an image."""
    model = dialled_tiny()
    graphed = GraphedDenoiser(model, [4], graphs=True)
    assert graphed.report().reason.startswith("no CUDA device")  # a CPU: the same padded forward, eagerly
    kwargs = dict(labels=[1, 2, 3], cfg_scale=[4.0, 1.0, 2.0], num_steps=3, seeds=[5, 6, 7], as_float=True)
    for budgets in (1.0, [0.5, 1.0, 1.5]):
        want, want_usage = generate(model, expert_budget=budgets, **kwargs)
        got, usage = generate(graphed, expert_budget=budgets, **kwargs)
        assert got.numpy().tobytes() == want.numpy().tobytes() and usage == want_usage


@CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_replays_are_the_eager_bytes_and_outlive_the_next_replay(dtype):
    device = torch.device("cuda")
    model = dialled_tiny().prepare(device, dtype, SERVING)
    graphed = GraphedDenoiser(model, [8, 16], graphs=True)
    graphed.capture_all()
    report = graphed.report()
    assert report.enabled, f"the forward could not be captured: {report.reason}"
    assert report.captured == [8, 16] and report.memory_bytes > 0
    eager = GraphedDenoiser(model, [8, 16], graphs=False)
    for rows in (1, 5, 8, 13, 16):
        x, t, y = (v.to(device) for v in batch(model, rows, seed=rows))
        budgets = [0.5 + 0.1 * (i % 10) for i in range(rows)]
        thresholds = thresholds_for(model.budget_table, model.learned_thresholds(), budgets).to(device)
        for th in (None, thresholds):
            replayed = graphed(x, t, y, th, return_stats=True)
            assert forward_bytes(replayed) == forward_bytes(eager(x, t, y, th, return_stats=True)), rows
            with torch.no_grad():
                assert forward_bytes(replayed) == forward_bytes(model(x, t, y, th, return_stats=True)), rows
    # A result the caller holds is its own: the next replay of the same graph leaves it alone.
    first_inputs, second_inputs = (tuple(v.to(device) for v in batch(model, 6, seed=s)) for s in (1, 2))
    first = graphed(*first_inputs, return_stats=True)
    kept = forward_bytes(first)
    second = graphed(*second_inputs, return_stats=True)
    assert forward_bytes(first) == kept and forward_bytes(second) != kept
