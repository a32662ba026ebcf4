"""The GPU kernels (model/kernels.py) on a CPU, in Triton's interpreter: the same programs, run by
NumPy, so CPU CI checks their indexing, masking, row gathers, epilogues and the order of their
sums, and the GPU branch of the MoE dispatch around them. The interpreter has no bf16: fp32 and
fp16 here. That a row's bytes never depend on its batch-mates is a property of the compiled kernels
and is tested on a GPU (tests/server/test_exactness.py -k cuda); NumPy's matmul inside the interpreter
makes no such promise, so nothing here compares bytes across batches."""

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


def interpreted(code: str) -> dict:
    """Run `code` in a fresh interpreter with TRITON_INTERPRET=1 (read when a kernel is decorated);
    its last line of output is a JSON object."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_matmul_computes_a_linear_rounding_through_the_weights_dtype():
    result = interpreted("""
        import json, torch
        from racedit.model import kernels
        g = torch.Generator().manual_seed(0)
        out = {}
        for dtype in (torch.float32, torch.float16):
            x = torch.randn(70, 72, generator=g)                    # fp32 activations, 70 rows: a partial tile
            w = torch.randn(100, 72, generator=g).to(dtype)          # nn.Linear layout [N, K], read transposed
            b = torch.randn(100, generator=g).to(dtype)
            y = kernels.matmul(x, w.t(), b, out_dtype=torch.float32)
            ref = (x.to(dtype).float() @ w.float().t() + b.float()).to(dtype).float()
            out[str(dtype)] = {"dtype": str(y.dtype), "err": (y - ref).abs().max().item(),
                               "rounded": bool(torch.equal(y, y.to(dtype).float())), "shape": list(y.shape)}
        print(json.dumps(out))
    """)
    assert result["torch.float32"] == {**result["torch.float32"], "dtype": "torch.float32", "shape": [70, 100]}
    assert result["torch.float32"]["err"] < 1e-4
    assert result["torch.float16"]["err"] < 0.05 and result["torch.float16"]["rounded"]  # fp16 values held in fp32


def test_grouped_matmul_gathers_rows_and_adds_each_tiles_experts_bias_and_gelu():
    result = interpreted("""
        import json, torch
        import torch.nn.functional as F
        from racedit.model import kernels
        g = torch.Generator().manual_seed(1)
        tile, experts, d, h = 16, 3, 40, 24
        x = torch.randn(10, d, generator=g)                          # the tokens
        w = torch.randn(experts, d, h, generator=g)
        b = torch.randn(experts, h, generator=g)
        source = torch.full((4 * tile,), -1)                        # tiles: expert 2, 0, 0, 1; -1 rows are padding
        source[[0, 1, 2]] = torch.tensor([4, 7, 9]); source[16:16 + 20] = torch.arange(20) % 10; source[48] = 3
        tile_expert = torch.tensor([2, 0, 0, 1], dtype=torch.int32)
        y = kernels.grouped_matmul(x, w, tile_expert, tile, bias=b, gelu=True, a_index=source)
        rows = torch.where(source[:, None] >= 0, x[source.clamp(min=0)], 0.0)
        e = tile_expert.repeat_interleave(tile)
        ref = F.gelu(torch.einsum("rk,rkn->rn", rows, w[e]) + b[e], approximate="tanh")
        bad = False
        try:
            kernels.grouped_matmul(x, w, tile_expert, 24, a_index=source)
        except ValueError:
            bad = True
        print(json.dumps({"err": (y - ref).abs().max().item(), "shape": list(y.shape), "refuses_odd_tiles": bad}))
    """)
    assert result["shape"] == [64, 24] and result["err"] < 1e-4 and result["refuses_odd_tiles"]


def test_combine_sums_each_tokens_pairs_in_their_order():
    result = interpreted("""
        import json, torch
        from racedit.model import kernels
        g = torch.Generator().manual_seed(2)
        y = torch.randn(12, 300, generator=g) * torch.logspace(-4, 4, 12)[:, None]  # magnitudes where order shows
        row = torch.tensor([3, 0, 11, 7, 2, 9, 5, 1])
        gate = torch.rand(8, generator=g)
        first = torch.tensor([0, 2, 2, 5, 8])                      # token 1 has no expert
        out = kernels.combine(y, row, gate, first)
        ref = torch.zeros(4, 300)
        for t in range(4):
            for p in range(int(first[t]), int(first[t + 1])):
                ref[t] = ref[t] + y[row[p]] * gate[p]
        print(json.dumps({"equal": bool(torch.equal(out, ref)), "empty_row_zero": bool((out[1] == 0).all())}))
    """)
    assert result == {"equal": True, "empty_row_zero": True}


def test_the_models_gpu_path_matches_its_cpu_path():
    """The network with every GEMM, the grouped experts and the combine on the Triton kernels (the
    GPU branch, taken here for CPU tensors) against the CPU path: fp32 alike within rounding; fp16
    against the CPU's emulation of fp16 GEMMs, which rounds the same way."""
    result = interpreted("""
        import json, sys, torch
        sys.path.insert(0, "tests")
        from conftest import batch, tiny_model
        from racedit.model import Execution, exact, moe
        from racedit.model.moe import Experts, grouped_dispatch, sorted_dispatch

        def gpu_branch(on: bool) -> None:
            exact.triton_device = moe.triton_device = (lambda t: True) if on else (lambda t: t.is_cuda)

        out = {}
        for dtype in (torch.float32, torch.float16):
            model = tiny_model().set_precision(dtype).with_execution(Execution(dispatch="grouped"))
            x, t, y = batch(model, 5, seed=1)
            with torch.no_grad():
                cpu = model(x, t, y).prediction
                gpu_branch(True)
                gpu = model(x, t, y).prediction
                gpu_branch(False)
            out[str(dtype)] = {"err": (gpu - cpu).abs().max().item(), "scale": cpu.abs().max().item()}
        experts = Experts(8, 48, 64)
        tokens, weights = torch.randn(300, 48), torch.rand(300, 8)
        mask = weights > 0.8                                        # some tokens take no expert, some several
        with torch.no_grad():
            reference = sorted_dispatch(tokens, weights, mask, experts, None)
            gpu_branch(True)
            layer = grouped_dispatch(tokens, weights, mask, experts, 32)
        out["layer"] = {"err": (layer - reference).abs().max().item(), "no_expert": int((mask.sum(1) == 0).sum())}
        print(json.dumps(out))
    """)
    assert result["torch.float32"]["scale"] > 0.1 and result["torch.float32"]["err"] < 1e-5
    assert result["torch.float16"]["err"] < 1e-3 * max(1.0, result["torch.float16"]["scale"])
    assert result["layer"]["no_expert"] > 0 and result["layer"]["err"] < 1e-5


def test_grouped_matmul_applies_swiglu_to_the_gate_and_up_halves_of_one_gemm():
    """DiT-MoE's experts: [gate | up] of width 2H as one GEMM whose epilogue stores silu(gate) * up, with
    and without biases, fp32 and fp16 (fp16 against the same rounding: fp32 sums, one rounding)."""
    result = interpreted("""
        import json, torch
        import torch.nn.functional as F
        from racedit.model import kernels
        g = torch.Generator().manual_seed(3)
        tile, experts, d, h = 16, 3, 40, 24
        x = torch.randn(10, d, generator=g)
        source = torch.full((3 * tile,), -1)
        source[:5] = torch.tensor([4, 7, 9, 0, 2]); source[16:30] = torch.arange(14) % 10; source[32] = 3
        tile_expert = torch.tensor([1, 0, 2], dtype=torch.int32)
        rows = torch.where(source[:, None] >= 0, x[source.clamp(min=0)], 0.0)
        e = tile_expert.repeat_interleave(tile)
        out = {}
        for dtype in (torch.float32, torch.float16):
            w = torch.randn(experts, d, 2 * h, generator=g).to(dtype)
            for bias in (None, torch.randn(experts, 2 * h, generator=g).to(dtype)):
                y = kernels.grouped_matmul(x, w, tile_expert, tile, bias=bias, swiglu=True, a_index=source,
                                           out_dtype=torch.float32)
                z = torch.einsum("rk,rkn->rn", rows.to(dtype).double(), w.double()[e])
                if bias is not None:
                    z = z + bias.double()[e]
                ref = (F.silu(z[:, :h]) * z[:, h:]).to(dtype).float()
                err = (y - ref).abs().max().item() / ref.abs().max().item()
                out[f"{dtype}-{bias is not None}"] = {"shape": list(y.shape), "err": err}
        print(json.dumps(out))
    """)
    for name, r in result.items():
        assert r["shape"] == [48, 24], name
        assert r["err"] < (1e-5 if "float32" in name else 2e-3), (name, r)


def test_a_dit_moe_models_gpu_path_matches_its_cpu_path():
    """A DiT-MoE-shaped network (SwiGLU experts and shared expert without biases, softmax token choice,
    qk-LayerNorm attention, t unscaled) on the Triton kernels against its CPU sorted dispatch."""
    result = interpreted("""
        import json, sys, torch
        sys.path.insert(0, "tests")
        from conftest import batch
        from racedit.model import Execution, build, exact, moe

        def gpu_branch(on: bool) -> None:
            exact.triton_device = moe.triton_device = (lambda t: True) if on else (lambda t: t.is_cuda)

        torch.manual_seed(0)
        spec = dict(spec="2in4", hidden_split=1, routing="token_choice", gating="softmax", router="linear",
                    router_bias=False, expert_kind="swiglu", expert_bias=False, shared_expert=True,
                    shared_expert_hidden=96)
        model = build("tiny", moe=spec, qk_norm=True, conventions={"time_scale": 1.0}).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        out = {}
        for dtype in (torch.float32, torch.float16):
            model.set_precision(dtype)
            x, t, y = batch(model, 5, seed=1)
            with torch.no_grad():
                cpu = model.with_execution(Execution(dispatch="sorted"))(x, t, y).prediction
                gpu_branch(True)
                gpu = model.with_execution(Execution(dispatch="grouped"))(x, t, y).prediction
                gpu_branch(False)
            out[str(dtype)] = {"err": (gpu - cpu).abs().max().item(), "scale": cpu.abs().max().item()}
        print(json.dumps(out))
    """)
    assert result["torch.float32"]["scale"] > 0.1 and result["torch.float32"]["err"] < 1e-5
    assert result["torch.float16"]["err"] < 1e-3 * max(1.0, result["torch.float16"]["scale"])
