"""The device path's kernels compiled for an H100/H200 (sm_90) on a machine without a GPU: Triton's
compiler and the ptxas it ships need no device, so a driver that names the target and a launch that
only compiles turn a forward into the list of every kernel variant it would launch, each compiled
to a cubin. This catches what the interpreter tolerates and a compiler does not, and resources:
shared memory within the 227 KB an SM gives a block, registers without spills (ptxas's stack).
It leans on Triton's driver interface (triton.runtime.driver), which a Triton release may change."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels compile for the GPU itself")

COMPILE_FOR_HOPPER = r'''
import json, os, re, subprocess, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.driver import DriverBase
from triton.runtime import driver
from triton.runtime.jit import JITFunction


class Hopper(DriverBase):
    """An sm_90 GPU with warps of 32 that is not here: kernels compile for it, nothing launches."""

    @classmethod
    def is_active(cls):
        return True

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda

    def get_benchmarker(self):
        raise NotImplementedError

    def get_empty_cache_for_benchmark(self):
        raise NotImplementedError

    def clear_cache(self, cache):
        pass

    def map_python_to_cpp_type(self, t):
        raise NotImplementedError


import torch
driver.set_active(Hopper())
cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
compiled = {}
launch = JITFunction.run


def compile_only(self, *args, grid, warmup, **kwargs):
    kernel = launch(self, *args, grid=grid, warmup=True, **kwargs)  # compiles (or finds) it; launches nothing
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([cuobjdump, "-res-usage", cubin.name], capture_output=True, text=True).stdout
    registers, stack = (int(v) for v in re.search(r"REG:(\d+) STACK:(\d+)", usage).groups())
    variant = self.fn.__name__ + str(sorted((k, str(v)) for k, v in kwargs.items() if k.isupper()))
    compiled[variant] = {"registers": registers, "stack": stack, "shared": kernel.metadata.shared}
    return kernel


JITFunction.run = compile_only

from racedit.model import SERVING, build

dit_moe = dict(spec="2in8", routing="token_choice", gating="softmax", router="linear", router_bias=False,
               expert_kind="swiglu", expert_bias=False, shared_expert=True)
expert_choice = dict(spec="2in8", routing="expert_choice")
for dtype, extra in ((torch.bfloat16, {}), (torch.float32, {}), (torch.bfloat16, dict(moe=dit_moe, qk_norm=True)),
                     (torch.float16, dict(moe=None)), (torch.bfloat16, dict(moe=expert_choice))):
    model = build("B/2", depth=1, hidden_size=128, num_heads=2, image_size=8, num_classes=10, **extra)
    model = model.prepare(torch.device("cpu"), dtype, SERVING)
    with torch.no_grad():
        model(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 10]), return_stats=True)
print(json.dumps(compiled))
'''


def test_every_kernel_a_forward_launches_compiles_for_hopper_within_its_resources(tmp_path):
    env = {**os.environ, "RACEDIT_TRITON_ON_CPU": "1", "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(COMPILE_FOR_HOPPER)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    compiled = json.loads(done.stdout.strip().splitlines()[-1])
    kinds = {name.split("[")[0] for name in compiled}
    assert kinds == {"_tiled_mm", "_norm_modulate", "_router_mm", "_count_pairs", "_layout", "_scatter", "_combine"}
    assert len(compiled) >= 20, sorted(compiled)  # dtypes, epilogues, grouped and dense, GELU and SwiGLU experts
    for name, use in compiled.items():
        assert use["shared"] <= 227 * 1024, (name, use)  # what one block may take on sm_90
        assert use["stack"] <= 64, (name, use)  # a few bytes of frame; a spilling tile takes hundreds
