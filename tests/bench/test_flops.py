"""bench/flops.py, the benches' activated-FLOP count: by hand on the tiny preset, and against the
matmul FLOPs torch's FlopCounterMode sees a real forward do."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from racedit.model import Execution, build

spec = importlib.util.spec_from_file_location("bench_flops", Path(__file__).resolve().parents[2] / "bench" / "flops.py")
flops = importlib.util.module_from_spec(spec)
sys.modules["bench_flops"] = flops  # dataclasses look their module up there
spec.loader.exec_module(flops)


def test_tiny_by_hand_adaln_and_the_timestep_mlp_once_per_sample():
    """tiny: 16x16x3, p 4 (L 16), D 64, 2 blocks, 2in4 GELU experts of width 128, MLP router."""
    d, tokens = 64, 16
    per_token = (
        2 * 3 * 16 * d  # patch embed
        + 2
        * (
            2 * d * 3 * d  # qkv
            + 4 * tokens * d  # QK^T and AV
            + 2 * d * d  # proj
            + 2 * d * d
            + 2 * d * 4  # MLP router: hidden, gate head
            + 2 * (2 * d * 128 + 2 * 128 * d)  # 2 experts a token
        )
        + 2 * d * 16 * 3  # final linear
    )
    per_sample = 2 * 256 * d + 2 * d * d + 2 * (2 * d * 6 * d) + 2 * d * 2 * d  # timestep MLP, adaLN x 2, final adaLN
    count = flops.forward_flops(build("tiny").config)
    assert (count.per_token, count.per_sample) == (per_token, per_sample) == (234496, 155648)
    assert count.forward(3) == 3 * (tokens * per_token + per_sample)


@pytest.mark.parametrize(
    "moe",
    [
        "keep",  # the tiny preset: GELU experts, MLP router
        {"spec": "2in4", "expert_kind": "swiglu", "shared_expert": True, "router": "linear", "expert_bias": False},
        None,  # a dense DiT
    ],
)
def test_the_count_is_what_a_forward_multiplies(moe):
    """Every addmm and (math-backend) attention bmm of a forward without row tiles (no padding rows),
    at the experts per token the forward reports."""
    torch.manual_seed(0)
    model = build("tiny", **({} if moe == "keep" else {"moe": moe})).eval().with_execution(Execution(row_tile=None))
    rows = 3
    x, t, y = torch.randn(rows, 3, 16, 16), torch.rand(rows), torch.randint(0, 10, (rows,))
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        stats = model(x, t, y, return_stats=True).stats
        m = float(stats.experts_per_token.double().mean()) if stats.experts_per_token.numel() else None
        with FlopCounterMode(display=False) as counter:
            model(x, t, y)
    if moe is not None:
        assert 0 < m  # experts ran: the experts' term is tested, not only the rest
    assert flops.forward_flops(model.config, m).forward(rows) == pytest.approx(counter.get_total_flops(), rel=1e-12)
