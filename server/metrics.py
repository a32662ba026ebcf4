"""Prometheus series of the engine (`racedit_*`), in a registry the HTTP layer also exposes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

if TYPE_CHECKING:
    from racedit.model.usage import UsageSummary


class EngineMetrics:
    """The engine's own series; one instance per engine so tests can run several in a process."""

    def __init__(self, registry: Optional[CollectorRegistry] = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("racedit_queue_depth", "Requests waiting for admission", registry=r)
        self.active_rows = Gauge("racedit_active_rows", "Forward rows of the requests being denoised", registry=r)
        self.rows_per_step = Histogram(
            "racedit_rows_per_step",
            "Rows in each engine step",
            registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
        )
        self.step_seconds = Histogram(
            "racedit_step_seconds",
            "Latency of one batched denoising step",
            registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.queue_seconds = Histogram(
            "racedit_queue_seconds",
            "Time from submission to admission",
            registry=r,
            buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.decode_seconds = Histogram(
            "racedit_decode_seconds",
            "VAE decode of the requests finishing in one iteration (latent models)",
            registry=r,
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.images = Counter("racedit_images_generated", "Images generated", registry=r)
        self.experts_per_token = Histogram(
            "racedit_experts_per_token",
            "Mean experts per token of each step",
            registry=r,
            buckets=(0.25, 0.5, 1, 1.5, 2, 2.5, 3, 4, 6, 8, 16),
        )
        self.expert_tokens = Counter(
            "racedit_expert_tokens", "Tokens processed by each expert", ["layer", "expert"], registry=r
        )
        self.rejected = Counter("racedit_rejected_requests", "Requests refused at admission", ["reason"], registry=r)
        self.cancelled = Counter("racedit_cancelled_requests", "Requests dropped because the client left", registry=r)
        self.request_errors = Counter(
            "racedit_request_errors", "Requests that ended in an engine error", ["kind"], registry=r
        )
        # Known label values start at zero, so dashboards and alerts see the series before the first event.
        for reason in ("queue_full", "draining"):
            self.rejected.labels(reason=reason)
        for kind in ("DeadlineExceeded", "StepFailed", "Cancelled", "ShuttingDown"):
            self.request_errors.labels(kind=kind)

    def record_usage(self, usage: UsageSummary) -> None:
        for layer_index, layer in enumerate(usage.per_layer):
            for expert, tokens in enumerate(layer.expert_load):
                if tokens:
                    self.expert_tokens.labels(layer=str(layer_index), expert=str(expert)).inc(tokens)
