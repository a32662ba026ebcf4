"""The device path (model/kernels.py and the code around it) on a CPU: RACEDIT_TRITON_ON_CPU=1 runs the
very Triton programs a GPU runs, in Triton's interpreter, on CPU tensors. So CPU CI checks each kernel
against the torch path, the routing and dispatch metadata, what a forward asks of the device (launches
and host reads, counted), that no op's shape follows the routing, and that the forward traces under
fake tensors -- the properties a CUDA graph needs. The interpreter has no bf16: fp32 and fp16 here.
That a row's bytes never depend on its batch-mates on a GPU is tested there
(tests/server/test_exactness.py -k cuda)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="on a GPU the CUDA tests of test_exactness.py run these kernels compiled"
)

PRELUDE = """
import json, sys, torch
sys.path.insert(0, "tests")
from racedit.model import exact          # first: the switch sets TRITON_INTERPRET before Triton loads
from racedit.model import kernels

def torch_path(on: bool) -> None:
    '''The CPU's torch path (on) or the device path (off), in this process.'''
    exact.TRITON_ON_CPU = not on
"""


def on_device_path(code: str) -> dict:
    """Run `code` in a fresh interpreter under the documented switch alone; its last line is JSON."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["RACEDIT_TRITON_ON_CPU"] = "1"
    done = subprocess.run(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_switch_sends_cpu_tensors_down_the_device_path():
    from racedit.model import Execution

    assert Execution().resolve(torch.device("cpu")).dispatch == "sorted"  # without it: the torch path
    result = on_device_path("""
        import os
        from conftest import batch, tiny_model
        from racedit.model import Execution
        x = torch.zeros(2, 3)
        out = {"dispatch": Execution().resolve(torch.device("cpu")).dispatch,
               "interpret": os.environ.get("TRITON_INTERPRET"), "device_path": exact.device_path(x),
               "with_grad": exact.device_path(x.requires_grad_())}
        grads = []  # a training step: the kernels have no backward, so autograd takes the torch path
        for on in (False, True):
            torch_path(on)
            model = tiny_model().train()
            model(*batch(model, 4)).prediction.square().mean().backward()
            grads.append([p.grad for p in model.parameters() if p.grad is not None])
        out["same_grads"] = len(grads[0]) == len(grads[1]) > 20 and all(map(torch.equal, *grads))
        print(json.dumps(out))
    """)
    assert result == {
        "dispatch": "device",
        "interpret": "1",
        "device_path": True,
        "with_grad": False,
        "same_grads": True,
    }


def test_linear_rounds_through_the_weights_dtype_and_applies_each_epilogue():
    result = on_device_path("""
        import torch.nn.functional as F
        g = torch.Generator().manual_seed(0)
        acts = {"none": lambda z: z, "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"), "gelu": F.gelu,
                "silu": F.silu, "swiglu": lambda z: F.silu(z[:, :50]) * z[:, 50:]}
        out = {}
        for dtype in (torch.float32, torch.float16):
            x = torch.randn(70, 72, generator=g)                   # 70 rows: a partial tile
            w = torch.randn(100, 72, generator=g).to(dtype)         # nn.Linear layout [N, K]
            b = torch.randn(100, generator=g).to(dtype)
            z = x.to(dtype).double() @ w.double().t() + b.double()
            for name, act in acts.items():
                y = kernels.linear(x, w, b, torch.float32, name, None, None, 1)
                ref = act(z).to(dtype).float()
                out[f"{dtype}-{name}"] = {"err": ((y - ref).abs().max() / ref.abs().max()).item(),
                                           "shape": list(y.shape), "rounded": bool(torch.equal(y, y.to(dtype).float()))}
            residual, gate = torch.randn(70, 100, generator=g), torch.randn(7, 100, generator=g)  # 10 rows a sample
            y = kernels.linear(x, w, b, torch.float32, "none", residual, gate, 10)
            ref = residual + gate.repeat_interleave(10, 0) * z.to(dtype).float()
            out[f"{dtype}-residual"] = {"err": ((y - ref).abs().max() / ref.abs().max()).item(), "shape": list(y.shape),
                                        "rounded": True}
            half = kernels.linear(x, w, b, dtype, "none", None, None, 1)
            out[f"{dtype}-out_dtype"] = {"err": 0.0 if half.dtype == dtype else 1.0, "shape": list(half.shape),
                                         "rounded": True}
        print(json.dumps(out))
    """)
    for name, r in result.items():
        assert r["shape"] == ([70, 50] if "swiglu" in name else [70, 100]) and r["rounded"], (name, r)
        assert r["err"] < (1e-5 if "float32" in name else 2e-3), (name, r)


def test_grouped_linear_computes_the_tiles_the_device_counted_and_gathers_their_rows():
    """Tiles are walked by a persistent grid up to num_tiles (a device tensor); tile t's first tile_rows[t]
    rows are real, gathered from the tokens by index; bias and GELU or SwiGLU in the epilogue."""
    result = on_device_path("""
        import torch.nn.functional as F
        g = torch.Generator().manual_seed(1)
        tile, experts, d, h = 16, 3, 40, 24
        x = torch.randn(10, d, generator=g)                          # the tokens
        source = torch.randint(0, 10, (5 * tile,), generator=g, dtype=torch.int32)
        tile_expert = torch.tensor([2, 0, 0, 1, 1], dtype=torch.int32)
        tile_rows = torch.tensor([3, 16, 4, 1, 16], dtype=torch.int32)
        num_tiles = torch.tensor([4], dtype=torch.int32)             # the last tile is beyond the count
        real = torch.cat([torch.arange(tile) < n for n in tile_rows[:4]])
        e = tile_expert.repeat_interleave(tile)[: 4 * tile]
        rows = x[source[: 4 * tile].long()]
        out = {}
        for dtype in (torch.float32, torch.float16):
            for act in ("gelu_tanh", "swiglu"):
                width = 2 * h if act == "swiglu" else h
                w = torch.randn(experts, d, width, generator=g).to(dtype)
                for bias in (None, torch.randn(experts, width, generator=g).to(dtype)):
                    y = kernels.grouped_linear(x, source, w, bias, tile_expert, tile_rows, num_tiles, tile, act)
                    z = torch.einsum("rk,rkn->rn", rows.to(dtype).double(), w.double()[e])
                    if bias is not None:
                        z = z + bias.double()[e]
                    ref = (F.silu(z[:, :h]) * z[:, h:] if act == "swiglu" else F.gelu(z, approximate="tanh")).to(dtype)
                    err = (y[: 4 * tile][real].double() - ref[real]).abs().max() / ref[real].abs().max()
                    out[f"{dtype}-{act}-{bias is not None}"] = {"err": err.item(), "shape": list(y.shape),
                                                                "dtype": str(y.dtype) == str(dtype)}
        try:
            kernels.grouped_linear(x, source, w, None, tile_expert, tile_rows, num_tiles, 24, "none")
            out["odd tile"] = {"refused": False}
        except ValueError:
            out["odd tile"] = {"refused": True}
        print(json.dumps(out))
    """)
    assert result.pop("odd tile") == {"refused": True}
    for name, r in result.items():
        assert r["shape"] == [80, 24] and r["dtype"], (name, r)
        assert r["err"] < (1e-6 if "float32" in name else 2e-3), (name, r)


def test_routing_and_layout_on_the_device_match_torch():
    """route (the gate-head GEMM with gating and selection in its epilogue: per-sample thresholds or top-k),
    count_pairs, dispatch_layout and scatter_pairs against the same decisions made in torch."""
    result = on_device_path("""
        from racedit.model.moe import gating, token_choice, worst_case_tiles
        g = torch.Generator().manual_seed(2)
        tokens, experts, dim, per_sample, tile = 150, 8, 32, 30, 16   # 5 samples; blocks of 64 tokens (fp32)
        x = torch.randn(tokens, dim, generator=g)
        w, b = torch.randn(experts, dim, generator=g) / 4, torch.randn(experts, generator=g) / 4
        out = {}
        cases = (("sigmoid", torch.linspace(0.4, 0.8, 5), 0), ("identity", torch.tensor([0.2]).expand(5), 0),
                 ("softmax", None, 2))
        for kind, tau, top_k in cases:
            logits, scores, mask, counts = kernels.route(x, w, b, tau, per_sample, kind, top_k)
            ref_logits = x @ w.t() + b
            ref_scores = gating(ref_logits, kind)
            if top_k:
                ref_mask = token_choice(ref_scores[None], top_k)[0]
            else:
                ref_mask = ref_scores > tau.repeat_interleave(per_sample)[:, None]
            block = kernels.route_block(w)
            given = kernels.count_pairs(mask, block)
            max_tiles = worst_case_tiles(tokens, experts, tile, top_k)
            offsets, tile_expert, tile_rows, num_tiles, per_expert = kernels.dispatch_layout(counts, tile, max_tiles)
            slot, source = kernels.scatter_pairs(mask, offsets, block, max_tiles, tile)
            # Every selected pair has a slot in its expert's group, the groups in expert order, whole tiles each.
            n = int(num_tiles)
            ok = bool(torch.equal(per_expert, mask.sum(0, dtype=torch.int32)))
            ok &= n == int(((per_expert + tile - 1) // tile).sum()) and n <= max_tiles
            starts = torch.cat([torch.zeros(1, dtype=torch.long), ((per_expert + tile - 1) // tile).cumsum(0)]) * tile
            for e in range(experts):
                chosen = mask[:, e].nonzero().squeeze(1)
                ok &= bool(torch.equal(slot[chosen, e].long(), starts[e] + torch.arange(len(chosen))))  # token order
                ok &= bool(torch.equal(source[slot[chosen, e].long()].long(), chosen))
                ok &= bool((slot[~mask[:, e], e] == -1).all())
                mine = tile_expert[:n] == e
                ok &= int(tile_rows[:n][mine].sum()) == len(chosen)
            out[kind] = {"logits": (logits - ref_logits).abs().max().item(),
                         "scores": (scores - ref_scores).abs().max().item(),
                         "mask": bool(torch.equal(mask, ref_mask)), "pairs": int(mask.sum()), "layout": ok,
                         "counts": bool(torch.equal(given, counts)), "none": int((mask.sum(1) == 0).sum())}
        print(json.dumps(out))
    """)
    for kind, r in result.items():
        assert r["logits"] < 1e-5 and r["scores"] < 1e-5, (kind, r)
        assert r["mask"] and r["layout"] and r["counts"], (kind, r)
    assert result["softmax"]["pairs"] == 2 * 150 and result["softmax"]["none"] == 0
    assert result["sigmoid"]["none"] > 0 and result["sigmoid"]["pairs"] != result["identity"]["pairs"]


def test_combine_sums_each_tokens_experts_in_expert_order_then_gates_and_adds_the_residual():
    result = on_device_path("""
        g = torch.Generator().manual_seed(3)
        tokens, experts, dim = 6, 4, 300
        y = torch.randn(12, dim, generator=g) * torch.logspace(-4, 4, 12)[:, None]   # magnitudes where order shows
        slot = torch.tensor([[3, -1, 11, 7], [-1, -1, -1, -1], [2, 9, -1, 5], [1, -1, -1, -1],
                             [-1, 0, 4, -1], [6, 8, 10, -1]], dtype=torch.int32)
        scores = torch.rand(tokens, experts, generator=g)
        extra, residual, gate = (torch.randn(tokens, dim, generator=g), torch.randn(tokens, dim, generator=g),
                                 torch.randn(3, dim, generator=g))
        ref = torch.zeros(tokens, dim)
        for t in range(tokens):
            for e in range(experts):
                if slot[t, e] >= 0:
                    ref[t] = ref[t] + y[slot[t, e]] * scores[t, e]
        plain = kernels.combine(y, slot, scores, None, None, None, 1)
        full = kernels.combine(y, slot, scores, extra, residual, gate, 2)
        ref_full = residual + gate.repeat_interleave(2, 0) * (ref + extra)
        print(json.dumps({"equal": bool(torch.equal(plain, ref)), "empty_row_zero": bool((plain[1] == 0).all()),
                          "full": (full - ref_full).abs().max().item()}))
    """)
    assert result["equal"] and result["empty_row_zero"] and result["full"] < 1e-5


def test_norm_modulate_is_adalns_layer_norm_and_modulation_emitted_in_the_gemms_dtype():
    result = on_device_path("""
        import torch.nn.functional as F
        from racedit.model.dit import modulate
        g = torch.Generator().manual_seed(5)
        x = torch.randn(3, 10, 72, generator=g) * 3 + 1                    # D = 72: a partial block of columns
        modulation = torch.randn(3, 6 * 72, generator=g)                   # a block's adaLN output: strided chunks
        shift, scale = modulation.chunk(6, dim=1)[:2]
        ref = modulate(F.layer_norm(x, (72,), eps=1e-6), shift, scale)
        out = {}
        for dtype in (torch.float32, torch.float16):
            y = kernels.norm_modulate(x, shift, scale, 1e-6, dtype)
            out[str(dtype)] = {"dtype": str(y.dtype), "err": (y.float() - ref).abs().max().item()}
        print(json.dumps(out))
    """)
    assert result["torch.float32"]["dtype"] == "torch.float32" and result["torch.float32"]["err"] < 1e-5
    assert result["torch.float16"]["dtype"] == "torch.float16" and result["torch.float16"]["err"] < 1e-2


def test_the_models_device_path_matches_its_torch_path():
    """A Race-DiT (MLP router, GELU experts with biases) and a DiT-MoE-shaped network (SwiGLU experts and a
    shared expert without biases, softmax top-2, qk-LayerNorm, t unscaled) with every GEMM, routing,
    dispatch, combine and adaLN norm on the kernels, against the torch path: fp32 alike within rounding,
    fp16 against the CPU's emulation of fp16 GEMMs, which rounds the same way; the same experts chosen."""
    result = on_device_path("""
        from conftest import batch, tiny_model
        from racedit.model import build
        torch.manual_seed(0)
        moe = dict(spec="2in4", hidden_split=1, routing="token_choice", gating="softmax", router="linear",
                   router_bias=False, expert_kind="swiglu", expert_bias=False, shared_expert=True,
                   shared_expert_hidden=96)
        dit_moe = build("tiny", moe=moe, qk_norm=True, conventions={"time_scale": 1.0}).eval()
        with torch.no_grad():
            for p in dit_moe.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        out = {}
        for name, model in (("race-dit", tiny_model()), ("dit-moe", dit_moe)):
            for dtype in (torch.float32, torch.float16):
                model.set_precision(dtype)
                x, t, y = batch(model, 5, seed=1)
                with torch.no_grad():
                    torch_path(True)
                    ref = model(x, t, y, return_stats=True)
                    torch_path(False)
                    model.fuse_modulations()
                    dev = model(x, t, y, return_stats=True)
                out[f"{name}-{dtype}"] = {
                    "err": (dev.prediction - ref.prediction).abs().max().item(),
                    "scale": ref.prediction.abs().max().item(),
                    "experts": bool(torch.equal(dev.stats.experts_per_token, ref.stats.experts_per_token)),
                    "load": bool(torch.equal(dev.stats.expert_load, ref.stats.expert_load))}
        print(json.dumps(out))
    """)
    for name, r in result.items():
        assert r["scale"] > 0.1 and r["experts"] and r["load"], (name, r)
        assert r["err"] < (1e-5 if "float32" in name else 1e-3 * max(1.0, r["scale"])), (name, r)


def test_a_rows_routing_does_not_follow_its_batch_mates():
    """A row's routing decisions and stats, alone and among six others that route differently (other
    thresholds: the compute dial), on the device path; its gate values and output within rounding. (Bytes
    are compared on a GPU: NumPy's matmul in the interpreter may round a row by where it sits in a tile.)"""
    result = on_device_path("""
        from conftest import batch, tiny_model
        model = tiny_model().fuse_modulations()
        x, t, y = batch(model, 7, seed=4)
        learned = torch.tensor(model.learned_thresholds())
        thresholds = learned[:, None] + torch.linspace(-0.3, 0.3, 7)
        with torch.no_grad():
            alone = model(x[3:4], t[3:4], y[3:4], thresholds=thresholds[:, 3:4], return_stats=True)
            among = model(x, t, y, thresholds=thresholds, return_stats=True)
        pairs = list(zip(alone.stats.routing, among.stats.routing))
        print(json.dumps({
            "mask": all(torch.equal(a.mask, b.mask[3:4]) for a, b in pairs),
            "stats": torch.equal(alone.stats.expert_load, among.stats.expert_load[:, 3:4])
            and torch.equal(alone.stats.experts_per_token, among.stats.experts_per_token[:, 3:4]),
            "scores": max((a.scores - b.scores[3:4]).abs().max().item() for a, b in pairs),
            "prediction": (alone.prediction - among.prediction[3:4]).abs().max().item(),
            "mates_differ": len({int(among.stats.experts_per_token[:, i].sum()) for i in range(7)}) > 1}))
    """)
    assert result["mask"] and result["stats"] and result["mates_differ"], result
    assert result["scores"] < 1e-5 and result["prediction"] < 1e-5, result


def test_what_a_forward_asks_of_the_device_is_counted_and_bounded():
    """Launches (Triton's, hooked, and every aten op that runs a kernel) and host reads of one MoE layer
    and of a whole forward of B/2's structure (12 blocks, MLP routers, 4 of 32 experts; narrow widths:
    the counts do not depend on widths), and of a DiT-MoE layer (linear router, shared expert); and the
    bytes a layer's kernels allocate against `device_buffer_bytes`, which the model card reports."""
    result = on_device_path("""
        from launches import device_work
        from racedit.model import build, SERVING
        torch.manual_seed(0)
        model = build("B/2", hidden_size=64, num_heads=2, image_size=8, num_classes=10).eval().fuse_modulations()
        x, t, y = torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([1, 2, 10])
        exe = SERVING.resolve(torch.device("cpu"))
        h, residual, gate, tau = torch.randn(3, 16, 64), torch.randn(3, 16, 64), torch.randn(3, 64), torch.rand(3)
        out = {}
        with torch.no_grad():
            with device_work() as work:
                model(x, t, y, return_stats=True)
            out["forward"] = work.summary()
            with device_work() as work:
                model.blocks[0].mlp(h, exe, thresholds=tau, residual=residual, gate=gate)
            out["layer"] = {**work.summary(), "bytes": work.custom_op_bytes,
                            "counted": model.blocks[0].mlp.device_buffer_bytes(48)}
            shared = build("B/2", hidden_size=64, num_heads=2, image_size=8, num_classes=10, depth=1,
                           moe=dict(spec="2in8", routing="token_choice", gating="softmax", router="linear",
                                    expert_kind="swiglu", shared_expert=True)).eval()
            with device_work() as work:
                shared.blocks[0].mlp(h, exe, residual=residual, gate=gate)
            out["dit-moe layer"] = {**work.summary(), "bytes": work.custom_op_bytes,
                                    "counted": shared.blocks[0].mlp.device_buffer_bytes(48)}
        print(json.dumps(out))
    """)
    forward, layer, dit_moe = result["forward"], result["layer"], result["dit-moe layer"]
    assert forward["host_reads"] == [] and layer["host_reads"] == [] and dit_moe["host_reads"] == []
    assert layer["launches"] == layer["triton"] == 7, layer  # hidden GEMM, route, layout, scatter, 2 GEMMs, combine
    assert dit_moe["launches"] == dit_moe["triton"] == 8, dit_moe  # route, layout, scatter, 2 GEMMs, shared x2, combine
    assert forward["launches"] <= 170, forward  # 676 launches and 12 host reads before the device path
    for r in (layer, dit_moe):  # the worst-case buffers the model card reports are what the kernels allocate
        assert 0.99 < r["counted"] / r["bytes"] <= 1.0, r
    # Per block: 2 adaLN norms, qkv, proj (gate and residual fused), the MoE layer's 7; then the patch
    # embedding, the timestep MLP's 2, every adaLN as 1 GEMM, the final norm and linear.
    assert forward["triton"] == 12 * (4 + 7) + 6, forward


def test_no_op_shape_follows_the_routing():
    """The same ops with the same shapes for two calls of an MoE layer that select very different numbers of
    pairs (a low and a high threshold), so one captured CUDA graph serves both."""
    result = on_device_path("""
        from launches import device_work
        from conftest import tiny_model
        from racedit.model import SERVING
        model = tiny_model()
        layer, exe = model.blocks[0].mlp, SERVING.resolve(torch.device("cpu"))
        h = torch.randn(4, 16, 64)
        runs = []
        with torch.no_grad():
            for tau in (-1.0, 1.0):
                with device_work() as work:
                    _, routing = layer(h, exe, thresholds=torch.full((4,), tau))
                runs.append((work.ops, int(routing.mask.sum())))
        print(json.dumps({"same_ops": runs[0][0] == runs[1][0], "ops": len(runs[0][0]), "pairs": [r[1] for r in runs]}))
    """)
    assert result["same_ops"] and result["ops"] > 0, result
    assert result["pairs"][0] > 2 * result["pairs"][1], result


def test_the_forward_traces_under_fake_tensors_where_the_torch_path_cannot():
    """Under FakeTensorMode nothing has a value: a forward that read one on the host, or made a shape of
    one, would raise. The device path traces (its kernels are torch.library ops with fake
    implementations); the torch path's dispatch reads the tokens per expert and does not. TorchDynamo
    captures the device path's forward as one graph (no graph break), the torch path's in pieces."""
    result = on_device_path("""
        from torch._subclasses.fake_tensor import FakeTensorMode
        from conftest import batch, tiny_model
        from racedit.model import Execution
        model = tiny_model().fuse_modulations()
        x, t, y = batch(model, 3)
        out = {}
        for dispatch in ("device", "sorted"):
            model.with_execution(Execution(dispatch=dispatch))
            try:
                with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True):
                    traced = model(x, t, y, return_stats=True)
                out[dispatch] = {"shape": list(traced.prediction.shape), "load": list(traced.stats.expert_load.shape)}
            except Exception as exc:
                out[dispatch] = {"error": type(exc).__name__}
            with torch.no_grad():
                explained = torch._dynamo.explain(model)(x, t, y, return_stats=True)
            out[dispatch + " breaks"] = explained.graph_break_count
        print(json.dumps(out))
    """)
    assert result["device"] == {"shape": [3, 3, 16, 16], "load": [2, 3, 4]}, result
    assert "error" in result["sorted"], result
    assert result["device breaks"] == 0 < result["sorted breaks"], result
