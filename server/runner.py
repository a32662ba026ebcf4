"""The engine's tensor work: a request's state from noise to images, and one guided model evaluation
for every request a plan runs, as one batch.

A request's state is its sampler (model/samplers.py: the current sample, time grid and step),
its routing thresholds (the compute dial) and its expert usage. Threshold routing makes rows
independent and each image's noise comes from its own seed, so a request's samples never depend
on its batch-mates; with a batch-invariant `Execution` they are the same bytes alone or in any
batch, which `check_batch_invariance` verifies on this host.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch

from racedit.model.budget import BudgetTable, budget_range, thresholds_for
from racedit.model.denoiser import Denoiser, to_device
from racedit.model.exact import SERVING, Execution, kernel_device
from racedit.model.graphs import GraphedDenoiser, GraphReport, graphs_unavailable, row_buckets
from racedit.model.samplers import Sampler, make_sampler, start_noise
from racedit.model.sampling import guided_prediction, require_servable, to_uint8
from racedit.model.usage import UsageAccumulator, usage_by_image

from .requests import GenerationRequest, GenerationResult, StepProgress

log = logging.getLogger("racedit.runner")

Decoder = Callable[[torch.Tensor], torch.Tensor]  # latents [N, C, h, w] -> images in [-1, 1]


@dataclass(eq=False)
class RequestState:
    """One admitted request's tensors and accounting."""

    request: GenerationRequest
    sampler: Sampler
    usage: UsageAccumulator
    thresholds: Optional[torch.Tensor]  # [n_moe_layers] of its budget; None: the learned ones
    started: float  # monotonic seconds


@dataclass
class StepReport:
    """What one batched evaluation did, for the engine's metrics and listeners."""

    rows: int
    mean_experts_per_token: float
    progress: list[tuple[RequestState, StepProgress]]  # requests that completed a step and listen


class Runner:
    """Owns the denoiser on its device; stateless between calls apart from what it read at start.

    With `cuda_graphs` on a CUDA device, each step's rows are padded to a row bucket (powers of two up
    to `max_rows`, model/graphs.py) and the step replays that bucket's captured forward. `padding`
    pads to the buckets without graphs too (None: where graphs run; on a CPU padding only adds work).
    """

    def __init__(
        self,
        denoiser: Denoiser,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        execution: Execution = SERVING,
        decoder: Optional[Decoder] = None,
        max_rows: int = 64,
        cuda_graphs: bool = True,
        padding: Optional[bool] = None,
    ):
        require_servable(denoiser.config)
        prepared = denoiser.prepare(device, dtype, execution)
        self.graphs_off = graphs_unavailable(device, cuda_graphs)  # why not ("" when graphs run)
        pad = not self.graphs_off if padding is None else padding
        if pad:
            prepared = GraphedDenoiser(prepared, row_buckets(max_rows), graphs=cuda_graphs)
        self.denoiser = prepared
        # The device path sizes its MoE buffers for the worst case (every token taking every expert).
        worst_case = getattr(prepared, "device_buffer_bytes", None)
        self.moe_buffer_bytes = worst_case(max_rows) if worst_case is not None and kernel_device(device) else 0
        self.device, self.dtype, self.decoder = device, dtype, decoder
        cfg = denoiser.config
        self.config = cfg
        self.family = cfg.family  # the checkpoint's conventions: samplers, guidance channels and interval
        # Read once here, so answering about the model never waits on the device the engine is using.
        self.layer_thresholds = self.denoiser.learned_thresholds()
        self.budget_table: Optional[BudgetTable] = self.denoiser.budget_table
        self.budget_range = budget_range(self.budget_table)
        self.learned = thresholds_for(None, self.layer_thresholds, [1.0])[:, 0].to(device)
        self.image_shape = (cfg.in_channels, cfg.image_size, cfg.image_size)  # what is denoised (maybe latents)
        side = decoder.image_size(cfg.image_size) if decoder is not None else cfg.image_size
        self.output_shape = (3 if decoder is not None else cfg.in_channels, side, side)  # what is answered

    def warm_up(self) -> None:
        """Capture every row bucket's forward now (largest first), so that no request waits for one."""
        if isinstance(self.denoiser, GraphedDenoiser):
            self.denoiser.capture_all()

    def graph_report(self) -> GraphReport:
        """Row buckets and CUDA graphs as plain values (the model card's `cuda_graphs`)."""
        if isinstance(self.denoiser, GraphedDenoiser):
            return dataclasses.replace(self.denoiser.report(), moe_buffer_bytes=self.moe_buffer_bytes)
        return GraphReport(False, self.graphs_off, [], [], 0, self.moe_buffer_bytes)

    @torch.no_grad()
    def check_batch_invariance(self, max_rows: int) -> bool:
        """One row alone and the same row among up to 15 others must give the same bytes (also warms up)."""
        g = torch.Generator().manual_seed(0)
        n = max(2, min(16, max_rows))
        x = torch.randn(n, *self.image_shape, generator=g).to(self.device)
        t = torch.rand(n, generator=g).to(self.device)
        y = torch.randint(0, self.config.num_classes + 1, (n,), generator=g).to(self.device)
        alone = self.denoiser(x[:1], t[:1], y[:1]).prediction
        mixed = self.denoiser(x.roll(n // 2, 0), t.roll(n // 2, 0), y.roll(n // 2, 0)).prediction[n // 2 : n // 2 + 1]
        return torch.equal(alone, mixed)

    def check(self, request: GenerationRequest) -> None:
        """What the engine refuses at submission (ValueError naming the field)."""
        low, high = self.budget_range
        if not low <= request.expert_budget <= high:
            raise ValueError(f"expert_budget {request.expert_budget:g} is outside this model's range {low:g}..{high:g}")
        if request.sampler not in self.family.samplers:
            raise ValueError(
                f"sampler {request.sampler!r} is not one of this model's samplers ({', '.join(self.family.samplers)})"
            )
        schedule = self.family.schedule
        if schedule is not None and request.num_steps > schedule.num_train_timesteps:
            raise ValueError(
                f"num_steps {request.num_steps} is more than this model's {schedule.num_train_timesteps} timesteps"
            )

    def start(self, request: GenerationRequest) -> RequestState:
        noise, generators = start_noise(request.seeds, self.image_shape)  # each image's own CPU generator
        thresholds = None
        if request.expert_budget != 1.0:
            thresholds = thresholds_for(self.budget_table, self.layer_thresholds, [request.expert_budget])[:, 0]
            thresholds = to_device(thresholds, self.device)
        return RequestState(
            request,
            make_sampler(request.sampler, to_device(noise, self.device), request.num_steps, self.family, generators),
            UsageAccumulator.for_model(self.config),
            thresholds,
            time.monotonic(),
        )

    @torch.no_grad()
    def step(self, states: list[RequestState]) -> StepReport:
        """One guided evaluation for every image of `states`, as one batch. The host waits on the device
        once: for the results. The inputs go over from pinned memory without blocking, and which rows are
        guided is known here (the scales stay on the host)."""
        counts = [state.request.num_images for state in states]
        images = torch.tensor(counts)

        def per_image(values: list) -> torch.Tensor:  # one value per request -> one per image, on the device
            return to_device(torch.tensor(values).repeat_interleave(images), self.device)

        queries = [state.sampler.query() for state in states]
        asked = [state.sampler.query_index() for state in states]  # the grid point each prediction belongs to
        # Guidance where the family's interval holds at the step's start (REPA's; everywhere for the others).
        cfg = [s.request.cfg_scale if self.family.guides_at(s.sampler.position) else 1.0 for s in states]
        t = per_image([t for _, t in queries])
        labels = per_image([state.request.class_label for state in states])
        scales = torch.tensor(cfg).repeat_interleave(images)  # on the host
        x_t = torch.cat([x for x, _ in queries])
        dialled = any(state.thresholds is not None for state in states)  # else the learned thresholds, as ever
        thresholds = (
            torch.cat(
                [
                    (self.learned if s.thresholds is None else s.thresholds).unsqueeze(1).expand(-1, n)
                    for s, n in zip(states, counts)
                ],
                dim=1,
            )
            if dialled
            else None
        )
        v, ept, load, owner = guided_prediction(self.denoiser, x_t, t, labels, scales, thresholds)
        usage = usage_by_image(ept, load, owner, x_t.shape[0]).cpu()  # [n_layers, N, L + E + E + 1]
        progress, offset = [], 0
        for state, n, x_q, index, scale in zip(states, counts, [x for x, _ in queries], asked, cfg):
            state.usage.add(usage[:, offset : offset + n].sum(1), n * (1 if scale == 1.0 else 2))
            if state.sampler.update(v[offset : offset + n]) and state.request.on_step is not None:
                progress.append((state, self._progress(state, x_q, index, v[offset : offset + n])))
            offset += n
        slots = int(ept.shape[0] * ept.shape[1] * ept.shape[2])
        tokens = int(usage[:, :, : ept.shape[2]].sum())
        return StepReport(
            rows=int(owner.numel()), mean_experts_per_token=tokens / slots if slots else 0.0, progress=progress
        )

    def _progress(self, state: RequestState, x_t: torch.Tensor, index: int, v: torch.Tensor) -> StepProgress:
        """A completed step of a streaming request (its own rows only); the preview is the predicted clean
        sample at the evaluated point (x0 = x_t - t * v for a velocity model)."""
        r, sampler = state.request, state.sampler
        preview = None
        if r.preview_every and (sampler.step % r.preview_every == 0 or sampler.done):
            preview = sampler.clean(x_t, v, index)
            preview = (self.decoder(preview) if self.decoder is not None else preview).cpu().numpy()
        return StepProgress(
            request_id=r.request_id,
            step=sampler.step,
            num_steps=sampler.num_steps,
            t=sampler.grid[sampler.step - 1],
            mean_experts_per_token=state.usage.mean_so_far(),
            elapsed_ms=(time.monotonic() - state.started) * 1000,
            preview=preview,
        )

    def decode(self, states: list[RequestState]) -> tuple[dict[int, torch.Tensor], float]:
        """Images in [-1, 1] of finished requests, by id(state): a latent model's VAE decodes them all as
        one batch; a request whose batch fails is decoded alone, so only one that fails alone fails."""
        if self.decoder is None or not states:
            return {id(s): s.sampler.x.float() for s in states}, 0.0
        start = time.perf_counter()
        try:
            decoded = self.decoder(torch.cat([s.sampler.x.float() for s in states]))
            out = dict(zip(map(id, states), decoded.split([s.request.num_images for s in states])))
        except Exception:
            log.exception("batched VAE decode failed; decoding each request alone")
            out = {}
            for s in states:
                try:
                    out[id(s)] = self.decoder(s.sampler.x.float())
                except Exception:
                    log.exception("VAE decode of request %s failed", s.request.request_id)
        return out, (time.perf_counter() - start) * 1000

    def result(
        self, state: RequestState, image: Optional[torch.Tensor], submitted: float, decode_ms: float
    ) -> GenerationResult:
        """The answer of a finished request; `image` its decoded pictures (None: the decode failed)."""
        if image is None:
            raise RuntimeError("the VAE could not decode its latents")
        now = time.monotonic()
        return GenerationResult(
            request_id=state.request.request_id,
            images=to_uint8(image.cpu()).permute(0, 2, 3, 1).numpy(),
            samples=state.sampler.x.float().cpu().numpy(),
            seeds=state.request.seeds,
            expert_usage=state.usage.summary(),
            queue_ms=(state.started - submitted) * 1000,
            inference_ms=(now - state.started) * 1000,
            total_ms=(now - submitted) * 1000,
            decode_ms=decode_ms,
        )
