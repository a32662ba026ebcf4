"""Row buckets and CUDA graphs: a denoiser whose forward runs on a fixed set of row counts.

Why: at serving batch sizes a GPU step is mostly kernel launches and host work; a captured CUDA
graph replays the whole forward as one launch. A graph has fixed shapes, so each forward's rows are
padded to the smallest bucket that holds them, and one graph is captured per bucket, all sharing one
memory pool (buckets never run concurrently). Padding changes no real row: routing is per token (by
thresholds, or token choice) or per sample (expert choice), attention and the adaLN conditioning per
sample, every GEMM batch-invariant (model/exact.py), so a row never sees how many rows share its
forward. Padding rows are zero samples at t = 0 of the null class, routed by the learned thresholds.
(A race over the whole batch at inference, `inference: topk` with expert race, depends on its
batch-mates anyway, and there padding rows join the race.)

Capture asks of the wrapped forward what graphs ask of any code: no host sync and no shape that
follows the data (model/moe.py's CUDA dispatch on worst-case buffers). Where a capture fails anyway,
the wrapper logs why, says so in its report and runs the same padded forward eagerly.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch

from .budget import BudgetTable
from .config import ModelConfig
from .denoiser import Denoiser, DenoiserOutput, ForwardStats, device_of
from .exact import Execution

log = logging.getLogger("racedit.graphs")

SMALLEST_BUCKET = 8  # below this a GPU forward costs the same whatever its rows
WARMUP_RUNS = 3  # eager forwards on a side stream before a capture (Triton compiles, cuBLAS handles, allocator)


def row_buckets(max_rows: int, smallest: int = SMALLEST_BUCKET) -> list[int]:
    """Powers of two from `smallest` below `max_rows`, then `max_rows` itself: a forward of R rows runs
    at most 2R rows (or `smallest`), and a full step runs unpadded."""
    if max_rows < 1:
        raise ValueError(f"max_rows must be at least 1 (got {max_rows})")
    buckets, size = [], smallest
    while size < max_rows:
        buckets.append(size)
        size *= 2
    return [*buckets, max_rows]


def graphs_unavailable(device: torch.device, wanted: bool) -> str:
    """Why forwards on `device` would not replay CUDA graphs ("" when they would)."""
    if not wanted:
        return "turned off"
    if device.type != "cuda":
        return f"no CUDA device (serving on {device.type})"
    return ""


@dataclass(frozen=True)
class GraphReport:
    """What the serving model card says about graphs: plain values, read without touching the device."""

    enabled: bool  # forwards replay captured graphs
    reason: str  # why not, when not ("" when enabled)
    buckets: list[int]  # the row counts a forward is padded to ([]: forwards run unpadded)
    captured: list[int]  # the buckets captured so far
    memory_bytes: int  # device memory the captures hold: static inputs, outputs and the shared pool
    moe_buffer_bytes: int = 0  # the device path's worst-case MoE buffers at the largest forward (one layer's)


@dataclass
class CapturedForward:
    """One bucket's graph with the static tensors it reads and writes: inputs are copied in before a
    replay, outputs copied out after it (the next replay overwrites them)."""

    graph: torch.cuda.CUDAGraph
    x: torch.Tensor  # [bucket, C, H, W] fp32
    t: torch.Tensor  # [bucket] fp32
    y: torch.Tensor  # [bucket] int64
    thresholds: Optional[torch.Tensor]  # [n_moe_layers, bucket] fp32 (None: the model has no dial)
    prediction: torch.Tensor
    experts_per_token: torch.Tensor
    expert_load: torch.Tensor


class GraphedDenoiser:
    """A prepared denoiser whose forward runs on a fixed set of row counts (`buckets`): a forward of R
    rows is padded to the smallest bucket >= R (more rows than the largest bucket run in chunks of it,
    each padded), and on CUDA with `graphs` each bucket's forward is captured once (on first use, or
    by `capture_all` at start-up) and replayed. Elsewhere it runs the padded forward eagerly, the
    same rows a graph would run.

    A model with a budget table is always given per-row thresholds (the learned ones for rows without
    their own, which select exactly what the learned scalar does), so one graph serves steps with and
    without the compute dial; a model without one refuses thresholds, as its `Denoiser` contract says.
    Stats keep the routing counts; `routing` (the training losses' tensors) is left empty.
    """

    def __init__(self, denoiser: Denoiser, buckets: Sequence[int], graphs: bool = True):
        if not buckets or min(buckets) < 1:
            raise ValueError(f"buckets must be positive row counts (got {list(buckets)})")
        self.denoiser = denoiser
        self.buckets = sorted({int(b) for b in buckets})
        self.device = device_of(denoiser)
        self.wants_graphs = graphs
        self.reason = graphs_unavailable(self.device, graphs)
        self.graphs = not self.reason
        self.dial = denoiser.budget_table is not None
        # Read once here (one host read per layer), so a forward never reads them from the device.
        self.layer_thresholds = denoiser.learned_thresholds()
        self.learned = torch.tensor(self.layer_thresholds, dtype=torch.float32).to(self.device)  # [n_moe_layers]
        self.captured: dict[int, CapturedForward] = {}
        self.memory_bytes = 0
        self._pool: Optional[tuple[int, int]] = None  # the graphs' shared memory pool, once one is captured

    # ------------------------------------------------------- the contract ----
    @property
    def config(self) -> ModelConfig:
        return self.denoiser.config

    @property
    def null_class(self) -> int:
        return self.denoiser.null_class

    @property
    def budget_table(self) -> Optional[BudgetTable]:
        return self.denoiser.budget_table

    def learned_thresholds(self) -> list[float]:
        return list(self.layer_thresholds)

    def prepare(self, device: torch.device, dtype: torch.dtype, execution: Execution) -> GraphedDenoiser:
        return GraphedDenoiser(self.denoiser.prepare(device, dtype, execution), self.buckets, self.wants_graphs)

    def __getattr__(self, name: str) -> Any:
        """Everything else is the wrapped denoiser's (its parameters, `eval`, metadata)."""
        if name == "denoiser":  # not set yet: no recursion
            raise AttributeError(name)
        return getattr(self.denoiser, name)

    @torch.no_grad()
    def __call__(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        thresholds: Optional[torch.Tensor] = None,
        return_stats: bool = False,
    ) -> DenoiserOutput:
        rows = x.shape[0]
        if thresholds is not None and not self.dial:
            raise ValueError("this model has no budget table: it routes by its learned thresholds only")
        if self.dial and thresholds is None:
            thresholds = self.learned.unsqueeze(1).expand(-1, rows)
        top = self.buckets[-1]
        parts = [
            self._bucket_forward(
                x[i : i + top],
                t[i : i + top],
                y[i : i + top],
                None if thresholds is None else thresholds[:, i : i + top],
            )
            for i in range(0, max(rows, 1), top)
        ]
        prediction, experts_per_token, expert_load = (
            parts[0] if len(parts) == 1 else [torch.cat(tensors, dim=d) for tensors, d in zip(zip(*parts), (0, 1, 1))]
        )
        stats = ForwardStats(experts_per_token, expert_load, []) if return_stats else None
        return DenoiserOutput(prediction, stats)

    def bucket(self, rows: int) -> int:
        """The row count a forward of `rows` (at most the largest bucket) runs on."""
        return next(b for b in self.buckets if b >= rows)

    def _bucket_forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, thresholds: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prediction, experts per token and expert load of rows that fit one bucket, padding cut off."""
        rows, bucket = x.shape[0], self.bucket(x.shape[0])
        captured = self.captured.get(bucket) or (self.capture(bucket) if self.graphs else None)
        if captured is not None:
            return self._replay(captured, x, t, y, thresholds)
        pad = bucket - rows
        if pad:
            x = torch.cat([x, x.new_zeros(pad, *x.shape[1:])])
            t = torch.cat([t, t.new_zeros(pad)])
            y = torch.cat([y, y.new_full((pad,), self.null_class)])
            if thresholds is not None:
                thresholds = torch.cat([thresholds, self.learned.unsqueeze(1).expand(-1, pad)], dim=1)
        out = self.denoiser(x, t, y, thresholds=thresholds, return_stats=True)
        stats = out.stats
        return out.prediction[:rows], stats.experts_per_token[:, :rows], stats.expert_load[:, :rows]

    def _replay(
        self,
        captured: CapturedForward,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        thresholds: Optional[torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The rows copied into the bucket's static inputs (the padding reset), one replay, the results
        copied out: all queued on the current stream, nothing waits on the host."""
        rows = x.shape[0]
        captured.x[:rows].copy_(x)
        captured.x[rows:].zero_()
        captured.t[:rows].copy_(t)
        captured.t[rows:].zero_()
        captured.y[:rows].copy_(y)
        captured.y[rows:].fill_(self.null_class)
        if captured.thresholds is not None:
            captured.thresholds[:, :rows].copy_(thresholds)
            captured.thresholds[:, rows:].copy_(
                self.learned.unsqueeze(1).expand(-1, captured.thresholds.shape[1] - rows)
            )
        with torch.cuda.device(self.device):
            captured.graph.replay()
        return (
            captured.prediction[:rows].clone(),
            captured.experts_per_token[:, :rows].clone(),
            captured.expert_load[:, :rows].clone(),
        )

    # ------------------------------------------------------------ capture ----
    def capture_all(self) -> None:
        """Capture every bucket not yet captured, the largest first (the smaller ones then fit in the
        pool's blocks it freed): at start-up, so no request waits for a capture."""
        for bucket in reversed(self.buckets):
            if self.graphs and bucket not in self.captured:
                self.capture(bucket)

    @torch.no_grad()
    def capture(self, bucket: int) -> Optional[CapturedForward]:
        """Warm the bucket's forward up on a side stream, then capture it into the shared pool (as
        torch.cuda.graphs documents). A failed capture turns graphs off: forwards then run eagerly."""
        cfg, device = self.config, self.device
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        reserved = torch.cuda.memory_reserved(device)
        x = torch.zeros(bucket, cfg.in_channels, cfg.image_size, cfg.image_size, device=device)
        t = torch.zeros(bucket, device=device)
        y = torch.full((bucket,), self.null_class, dtype=torch.long, device=device)
        thresholds = self.learned.unsqueeze(1).repeat(1, bucket) if self.dial else None

        def forward() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            out = self.denoiser(x, t, y, thresholds=thresholds, return_stats=True)
            return out.prediction, out.stats.experts_per_token, out.stats.expert_load

        graph = torch.cuda.CUDAGraph()
        try:
            # The capture stream is the current device's: make it the model's (cuda:1 serves on cuda:1).
            with torch.cuda.device(device):
                side = torch.cuda.Stream(device)
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):
                    for _ in range(WARMUP_RUNS):
                        forward()
                torch.cuda.current_stream(device).wait_stream(side)
                with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                    outputs = forward()
        except Exception as exc:  # a host sync or a data-dependent shape in the forward; a kernel that fails
            # to compile (Triton's errors are not RuntimeErrors) fails eagerly too, and says so there
            self.graphs, self.reason = False, f"capture of {bucket} rows failed: {str(exc).splitlines()[0]}"
            self.captured.clear()
            self.memory_bytes = 0
            log.warning("CUDA graphs off, forwards run eagerly on padded rows: %s", self.reason)
            return None
        self._pool = graph.pool()
        captured = CapturedForward(graph, x, t, y, thresholds, *outputs)
        self.captured[bucket] = captured
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()  # the warm-up's blocks; the pool's stay with its graphs
        self.memory_bytes += max(0, torch.cuda.memory_reserved(device) - reserved)
        log.info("captured the forward of %d rows (graph memory now %.1f MiB)", bucket, self.memory_bytes / 2**20)
        return captured

    def report(self) -> GraphReport:
        return GraphReport(self.graphs, self.reason, list(self.buckets), sorted(self.captured), self.memory_bytes)
