"""The Race-DiT network: routing counts, gradients, threshold, batch independence, presets."""

from pathlib import Path

import pytest
import torch
from conftest import batch, tiny_model
from torch.overrides import TorchFunctionMode

from racedit.model import Execution, build, count_parameters, exact, preset_config
from racedit.model.config import ConfigError
from racedit.model.moe import (
    Experts,
    expert_choice,
    expert_race,
    grouped_dispatch,
    loop_dispatch,
    sorted_dispatch,
    threshold,
    token_choice,
)
from racedit.model.training.losses import (
    balance,
    combination_usage,
    max_violation,
    per_layer_regularisation,
    router_similarity,
)


def tiny(routing="expert_race", gating="identity", **moe):
    return build("tiny", moe={"routing": routing, "gating": gating, **moe})


def test_forward_shapes_and_stats_types():
    model = tiny().eval()
    x, t, y = batch(model, 3)
    v = model(x, t, y).prediction
    assert v.shape == x.shape
    out = model(x, t, y, return_stats=True)
    v2, stats = out.prediction, out.stats
    assert torch.equal(v, v2)
    n_layers, seq = len(model.moe_layers), model.config.num_tokens
    assert stats.experts_per_token.shape == (n_layers, 3, seq)
    assert stats.experts_per_token.dtype in (torch.int32, torch.int64)
    assert torch.equal(stats.expert_load.sum(-1), stats.experts_per_token.sum(-1))


@pytest.mark.parametrize("routing", ["token_choice", "expert_choice", "expert_race"])
def test_exact_selection_counts_in_training(routing):
    model = tiny(routing).train()
    b = 5
    x, t, y = batch(model, b)
    stats = model(x, t, y, return_stats=True).stats
    k, e, seq = 2, 4, model.config.num_tokens
    for layer_routing in stats.routing:
        mask = layer_routing.mask
        assert mask.shape == (b, seq, e)
        if routing == "token_choice":
            assert (mask.sum(-1) == k).all()
        elif routing == "expert_choice":
            assert (mask.sum(1) == k * seq // e).all()
        else:
            assert int(mask.sum()) == b * seq * k
    if routing == "expert_race":
        # Race allocation is free: experts per token must vary across tokens.
        assert stats.experts_per_token.unique().numel() > 1


def test_routing_functions_directly():
    scores = torch.randn(2, 8, 4)
    assert (token_choice(scores, 3).sum(-1) == 3).all()
    assert (expert_choice(scores, 2).sum(1) == 4).all()
    mask, kth = expert_race(scores, 2)
    assert int(mask.sum()) == 32
    assert torch.equal(mask, scores >= kth)
    assert torch.equal(threshold(scores, torch.tensor(0.3)), scores > 0.3)


@pytest.mark.parametrize(
    "dispatch, row_tile",
    [
        (grouped_dispatch, 32),
        (grouped_dispatch, None),
        (sorted_dispatch, 32),
        (loop_dispatch, None),
        (loop_dispatch, 8),
    ],
)
def test_sparse_dispatch_matches_a_dense_reference(dispatch, row_tile):
    torch.manual_seed(1)
    experts = Experts(4, 8, 16)
    x = torch.randn(50, 8)
    weights = torch.randn(50, 4)
    mask = torch.rand(50, 4) > 0.5
    mask[3] = False  # a token with no expert gets zero
    mask[:, 2] = False  # an expert with no token
    out = dispatch(x, weights, mask, experts, row_tile)
    dense = torch.stack([experts.run(e, x) for e in range(4)], dim=1)  # [N, E, D]
    ref = (dense * (weights * mask).unsqueeze(-1)).sum(1)
    assert torch.allclose(out, ref, atol=1e-5)
    assert torch.equal(out[3], torch.zeros(8))


class HostReads(TorchFunctionMode):
    """Records the calls that make the host wait for a device result."""

    NAMES = {"tolist", "item", "nonzero", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu"}

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.NAMES:
            self.calls.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_grouped_dispatch_is_one_grouped_gemm_per_matrix_and_one_host_sync():
    """Both expert matrices run as one _grouped_mm each; the tokens per expert are the one host read
    (the per-expert loop of the export path waits once per expert)."""
    experts = Experts(8, 16, 32)
    x, weights = torch.randn(64, 16), torch.randn(64, 8)
    mask = weights > 0.5
    with HostReads() as reads:
        grouped = grouped_dispatch(x, weights, mask, experts)
    assert reads.calls == ["tolist"]
    with HostReads() as reads:
        assert torch.equal(sorted_dispatch(x, weights, mask, experts), grouped)  # same groups, same bytes
    assert reads.calls == ["tolist"]
    with HostReads() as reads:
        loop_dispatch(x, weights, mask, experts)
    assert reads.calls == ["nonzero"] * 8


class IndexAdds(TorchFunctionMode):
    """Records the index of every index_add_."""

    def __init__(self):
        super().__init__()
        self.indices: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") == "index_add_":
            self.indices.append(args[2].clone())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dispatch", [grouped_dispatch, sorted_dispatch])
def test_each_index_add_adds_a_token_once(dispatch):
    """On CUDA index_add_ adds with atomics: were a token added twice in one call, the sum of its three
    or more experts would follow thread timing. One call per expert adds each token at most once."""
    torch.manual_seed(4)
    experts = Experts(6, 16, 32)
    x, weights = torch.randn(40, 16), torch.randn(40, 6)
    mask = weights > -0.5  # most tokens take four or more experts
    mask[:, 1] = False
    with torch.no_grad(), IndexAdds() as adds:
        dispatch(x, weights, mask, experts)
    assert len(adds.indices) == 5 and int(mask.sum(1).max()) >= 4
    assert all(index.unique().numel() == index.numel() for index in adds.indices)


@pytest.mark.parametrize("dtype, native", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)])
def test_served_sorted_dispatch_reuses_one_workspace_and_gives_the_training_paths_bytes(dtype, native, monkeypatch):
    """Without autograd every expert writes into one set of buffers; the bytes are those of the
    autograd path, which allocates per expert (out= cannot record a graph) and keeps gradients.
    bf16 both as this AVX2 host emulates it and as an AVX512-BF16 host runs it (buffers in bf16)."""
    monkeypatch.setattr(exact, "_CPU_NATIVE_REDUCED", native)
    torch.manual_seed(3)
    experts = Experts(4, 32, 64).to(dtype)
    x, weights = torch.randn(100, 32), torch.randn(100, 4)
    mask = weights > 0.3
    made = []
    monkeypatch.setattr(experts, "workspace", lambda *a: made.append(Experts.workspace(experts, *a)) or made[-1])
    trained = sorted_dispatch(x, weights, mask, experts)
    assert trained.requires_grad and not made
    with torch.no_grad():
        served = sorted_dispatch(x, weights, mask, experts)
    assert len(made) == 1 and made[0].rows.shape[0] == -(-int(mask.sum(0).max()) // 32) * 32
    assert made[0].hidden.dtype == (dtype if native else torch.float32)
    assert torch.equal(served, trained.detach())


@pytest.mark.parametrize("dispatch", [grouped_dispatch, sorted_dispatch])
def test_a_row_of_a_grouped_expert_is_the_same_bytes_in_any_group(dispatch):
    """The row tile makes a token's expert output independent of how many tokens share its expert."""
    torch.manual_seed(2)
    experts = Experts(4, 32, 64)
    x, weights = torch.randn(300, 32), torch.randn(300, 4)
    alone = dispatch(x[:1], weights[:1], weights[:1] > 0, experts)
    for n in (2, 7, 40, 300):
        crowd = dispatch(x[:n], weights[:n], weights[:n] > 0, experts)
        assert torch.equal(crowd[0], alone[0]), n


@pytest.mark.parametrize("gating", ["identity", "sigmoid", "softmax"])
@pytest.mark.parametrize("routing", ["token_choice", "expert_choice", "expert_race"])
def test_gradient_reaches_router(routing, gating):
    model = tiny(routing, gating).train()
    # adaLN-Zero makes the MoE output gate zero at init; open it so gradients flow to the router.
    for block in model.blocks:
        torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.02)
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.02)
    x, t, y = batch(model, 4)
    model(x, t, y).prediction.pow(2).mean().backward()
    for layer in model.moe_layers:
        grad = layer.router.gate_head.weight.grad
        assert grad is not None and grad.abs().sum() > 0


def test_threshold_moves_in_training_and_is_frozen_in_eval():
    model = tiny().train()
    x, t, y = batch(model, 4)
    model(x, t, y)
    first = [float(layer.threshold) for layer in model.moe_layers]
    x2, t2, y2 = batch(model, 4, seed=1)
    model(x2 * 3, t2, y2)
    second = [float(layer.threshold) for layer in model.moe_layers]
    assert first != second
    assert all(int(layer.threshold_updates) == 2 for layer in model.moe_layers)
    model.eval()
    model(x, t, y)
    assert [float(layer.threshold) for layer in model.moe_layers] == second


def test_thresholds_are_named_buffers_in_state_dict():
    keys = build("tiny").state_dict().keys()
    assert sum("threshold" in k for k in keys) >= 2


@pytest.mark.parametrize("routing", ["expert_race", "token_choice", "expert_choice"])
def test_eval_routing_and_output_independent_of_batch_mates(routing):
    model = tiny_model(moe={"routing": routing, "gating": "identity"})  # trained threshold, non-zero head
    x, t, y = batch(model, 1, seed=10)
    out = model(x, t, y, return_stats=True)
    alone_v, alone = out.prediction, out.stats
    mates_x, mates_t, mates_y = batch(model, 7, seed=11)
    xs, ts, ys = (
        torch.cat([mates_x[:3], x, mates_x[3:]]),
        torch.cat([mates_t[:3], t, mates_t[3:]]),
        torch.cat([mates_y[:3], y, mates_y[3:]]),
    )
    out = model(xs, ts, ys, return_stats=True)
    mixed_v, mixed = out.prediction, out.stats
    assert torch.equal(mixed.experts_per_token[:, 3], alone.experts_per_token[:, 0])
    assert alone_v.abs().max() > 0.1 and torch.equal(mixed_v[3], alone_v[0])  # the same bytes, not merely close


@pytest.mark.parametrize("dispatch", ["grouped", "sorted"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_row_is_the_same_bytes_in_any_batch_and_any_position(dtype, dispatch):
    model = tiny_model().set_precision(dtype).with_execution(Execution(dispatch=dispatch))
    x, t, y = batch(model, 70, seed=3)
    alone = model(x[:1], t[:1], y[:1]).prediction
    assert alone.abs().max() > 0.1
    for n, position in [(2, 1), (5, 2), (8, 7), (33, 16), (70, 69)]:
        order = torch.cat([torch.arange(1, position + 1), torch.tensor([0]), torch.arange(position + 1, n)])
        assert torch.equal(model(x[order], t[order], y[order]).prediction[position], alone[0]), (n, position)


def test_reduced_precision_keeps_thresholds_and_activations_in_fp32():
    model = tiny().train()
    model(*batch(model, 8))
    thresholds = [layer.threshold.clone() for layer in model.moe_layers]
    model.eval().set_precision(torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(
        layer.threshold.dtype == torch.float32 and torch.equal(layer.threshold, before)
        for layer, before in zip(model.moe_layers, thresholds)
    )
    v = model(*batch(model, 2)).prediction
    assert v.dtype == torch.float32


def test_topk_inference_mode_is_batch_dependent_ablation():
    model = tiny(inference="topk").eval()
    x, t, y = batch(model, 4)
    stats = model(x, t, y, return_stats=True).stats
    assert int(stats.experts_per_token.sum(dim=(1, 2))[0]) == 4 * model.config.num_tokens * 2


def test_dense_baseline_has_no_moe():
    model = build("tiny", moe=None)
    assert model.moe_layers == []
    x, t, y = batch(model, 2)
    out = model(x, t, y, return_stats=True)
    v, stats = out.prediction, out.stats
    assert v.shape == x.shape and stats.experts_per_token.shape[0] == 0


def test_shared_expert_and_linear_router():
    model = tiny(shared_expert=True, router="linear")
    assert model.moe_layers[0].shared_expert is not None
    assert model.moe_layers[0].router.target_head is None
    assert model(*batch(model, 2)).prediction.shape == (2, 3, 16, 16)


def test_losses_and_metrics():
    model = tiny().train()
    x, t, y = batch(model, 4)
    stats = model(x, t, y, return_stats=True).stats
    target = model.patchify(torch.randn_like(x))
    assert per_layer_regularisation(stats.routing, target) > 0
    sim = router_similarity(stats.routing)
    assert sim >= 0 and sim.requires_grad
    assert balance(stats.routing) > 0
    assert max_violation(torch.tensor([1.0, 1.0, 1.0, 1.0])) == 0.0
    assert max_violation(torch.tensor([4.0, 0.0, 0.0, 0.0])) == pytest.approx(3.0)
    # Two fixed pairs (Fig. 4 top) use 2 of 6 combinations; diverse pairs use more.
    collapsed = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1]] * 4, dtype=torch.bool)
    diverse = torch.tensor(
        [[1, 1, 0, 0], [0, 0, 1, 1], [1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 0, 1], [0, 1, 1, 0]], dtype=torch.bool
    )
    assert combination_usage(collapsed) == pytest.approx(2 / 6)
    assert combination_usage(diverse) == pytest.approx(1.0)


def test_router_similarity_is_low_for_independent_experts():
    from racedit.model.moe import Routing

    g = torch.randn(4096, 8)
    independent = Routing(scores=g, mask=g > 0, target=None, logits=g)
    copied = Routing(scores=g[:, [0, 0, 1, 1, 2, 2, 3, 3]], mask=g > 0, target=None, logits=g)
    assert router_similarity([independent]) < 0.01 < router_similarity([copied])


def test_paper_preset_parameter_counts_on_meta_device():
    with torch.device("meta"):
        xl = build("XL/2", moe="4in32")
        dense = build("XL/2", moe=None)
    total, activated = count_parameters(xl)
    assert abs(total / 2.788e9 - 1) < 0.02, total
    assert abs(activated / 0.707e9 - 1) < 0.02, activated
    assert abs(count_parameters(dense)[0] / 0.669e9 - 1) < 0.02
    for name, depth, width in [("B/2", 12, 768), ("M/2", 16, 960), ("L/2", 24, 1024)]:
        cfg = preset_config(name)
        assert (cfg.depth, cfg.hidden_size) == (depth, width)


def test_config_validation_names_the_key():
    with pytest.raises(ConfigError, match="patch_size"):
        build("tiny", image_size=18)
    with pytest.raises(ConfigError, match="moe.routing"):
        build("tiny", moe={"routing": "random"})
    with pytest.raises(ConfigError, match="moe.spec"):
        build("tiny", moe="9in4")
    with pytest.raises(ConfigError, match="unknown key model.widht"):
        build("tiny", widht=3)
    with pytest.raises(ConfigError, match="model.depth"):
        build("tiny", depth="2")


def test_config_object_and_attributes():
    cfg = preset_config("tiny")
    model = build(cfg)
    assert (model.config.image_size, model.config.in_channels, model.config.patch_size, model.config.num_classes) == (
        16,
        3,
        4,
        10,
    )
    assert model.config.moe.spec == "2in4"


def test_the_model_package_depends_on_no_other_racedit_package():
    """racedit.model is the network: serving, exports and the CLI build on it, never the reverse."""
    import ast

    package = Path(__file__).resolve().parents[2] / "model"
    for path in package.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and node.level == 0
                else []
            )
            for name in names:
                assert not name.startswith(("racedit.server", "racedit.export", "racedit.cli")), (
                    f"model/{path.name} imports {name}"
                )
