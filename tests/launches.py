"""Counting what a forward asks of the device, on the CPU: every Triton launch (a hook on Triton's
launches, compiled or interpreted), every aten op that runs a kernel (a dispatch mode; views and
allocations launch nothing), every op that reads a tensor's value on the host (a sync on a GPU),
and the shapes of every op, so a test can tell whether any shape follows the routing."""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
NO_KERNEL = {  # allocations and metadata: no launch
    aten.empty.memory_format,
    aten.empty_strided.default,
    aten.empty_like.default,
    aten.new_empty.default,
    aten.new_empty_strided.default,
    aten.lift_fresh.default,
    aten.detach.default,
    aten._unsafe_view.default,
}
HOST_READS = {  # ops that wait for a tensor's value on the host (or make shapes of it)
    aten._local_scalar_dense.default,
    aten.nonzero.default,
    aten.is_nonzero.default,
    aten.equal.default,
    aten.masked_select.default,
    aten.unique_dim.default,
    aten._unique2.default,
    aten.repeat_interleave.Tensor,
}


def _shapes(tree) -> tuple:
    flat, _ = torch.utils._pytree.tree_flatten(tree)
    return tuple(tuple(t.shape) for t in flat if isinstance(t, torch.Tensor))


class DeviceWork(TorchDispatchMode):
    """What ran under it: `ops` (every op, with its input and output shapes), `kernels` (aten ops that
    launch, custom ops excluded: their launches are `triton`'s), `host_reads` and `triton` launches."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, tuple, tuple]] = []
        self.kernels: list[str] = []
        self.host_reads: list[str] = []
        self.triton = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func)
        self.ops.append((name, _shapes((args, kwargs)), _shapes(out)))
        if func in HOST_READS or (func is aten.repeat_interleave.self_Tensor and "output_size" not in (kwargs or {})):
            self.host_reads.append(name)
        if func.namespace != "racedit" and func not in NO_KERNEL and not func.is_view:
            self.kernels.append(name)
        return out

    @property
    def launches(self) -> int:
        return self.triton + len(self.kernels)

    def summary(self) -> dict:
        return {
            "launches": self.launches,
            "triton": self.triton,
            "aten": dict(Counter(self.kernels)),
            "host_reads": self.host_reads,
        }


@contextmanager
def device_work():
    """Count under the mode, with Triton's launches hooked: the interpreter's `run` (TRITON_INTERPRET=1)
    or the compiled launcher's enter hook."""
    import triton

    work = DeviceWork()
    from triton.runtime import interpreter

    original = interpreter.InterpretedFunction.run

    def run(self, *args, **kwargs):
        work.triton += 1
        return original(self, *args, **kwargs)

    interpreter.InterpretedFunction.run = run
    knobs = triton.knobs.runtime
    previous = knobs.launch_enter_hook
    knobs.launch_enter_hook = lambda *_: setattr(work, "triton", work.triton + 1)
    try:
        with work:
            yield work
    finally:
        interpreter.InterpretedFunction.run = original
        knobs.launch_enter_hook = previous
