"""Counting what a forward asks of the device, on the CPU: every Triton launch (a hook on Triton's
launches, compiled or interpreted), every aten op that runs a kernel (a dispatch mode; views and
allocations launch nothing), every read of a tensor's value on the host (a sync on a GPU: ops such
as `item` and `nonzero` in the dispatch mode, `tolist` and `numpy`, which bypass it, hooked), and
the shapes of every op, so a test can tell whether any shape follows the routing."""

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
}
REPEATS = (aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor)  # a host read without output_size


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
        self.custom_op_bytes = 0  # what the kernels' ops allocated (their outputs)
        self.in_kernel = 0  # inside an interpreted Triton launch

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.in_kernel:  # the interpreter's own tensor work while it runs a kernel: part of that launch
            return out
        name = str(func)
        self.ops.append((name, _shapes((args, kwargs)), _shapes(out)))
        if func in HOST_READS or (func in REPEATS and (kwargs or {}).get("output_size") is None):
            self.host_reads.append(name)
        if func.namespace != "racedit" and func not in NO_KERNEL and not func.is_view:
            self.kernels.append(name)
        if func.namespace == "racedit":
            flat, _ = torch.utils._pytree.tree_flatten(out)
            self.custom_op_bytes += sum(t.nbytes for t in flat if isinstance(t, torch.Tensor))
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
        work.in_kernel += 1
        try:
            return original(self, *args, **kwargs)
        finally:
            work.in_kernel -= 1

    interpreter.InterpretedFunction.run = run
    readers = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}  # host reads past the dispatcher

    def reader(name):
        def read(tensor, *args, **kwargs):
            if not work.in_kernel:  # the interpreter reads its arguments: that is the kernel running
                work.host_reads.append(f"Tensor.{name}")
            return readers[name](tensor, *args, **kwargs)

        return read

    for name in readers:
        setattr(torch.Tensor, name, reader(name))
    knobs = triton.knobs.runtime
    previous = knobs.launch_enter_hook
    knobs.launch_enter_hook = lambda *_: setattr(work, "triton", work.triton + 1)
    try:
        with work:
            yield work
    finally:
        interpreter.InterpretedFunction.run = original
        knobs.launch_enter_hook = previous
        for name, method in readers.items():
            setattr(torch.Tensor, name, method)
