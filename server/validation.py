"""Wire values to engine requests. The request model carries this server's limits, so the OpenAPI
schema shows them and pydantic names every bad field at once; KServe rows go through the same model."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Literal, Optional, Union

from pydantic import Field, StrictInt, ValidationError, create_model, field_validator, model_validator

from racedit_client.models import GenerateRequest, StrictFloat

from .requests import GenerationRequest
from .settings import ServeSettings

MAX_SEED = 2**63 - 1


@dataclass
class Limits:
    class_names: list[str]
    max_steps: int
    max_images: int
    max_cfg_scale: float
    max_batch_rows: int
    timeout_s: float
    budget_range: tuple[float, float] = (1.0, 1.0)  # the checkpoint's budget table, or 1.0 alone
    samplers: tuple[str, ...] = ("euler",)  # what a request may name
    default_sampler: str = "euler"
    default_steps: int = 25  # the checkpoint family's (DiT: 250), at most max_steps
    default_cfg_scale: float = 4.0
    family: str = "racedit"

    @classmethod
    def from_settings(cls, settings: ServeSettings, model: ServedModel) -> Limits:
        return cls(
            model.class_names,
            settings.max_steps,
            settings.max_images,
            settings.max_cfg_scale,
            settings.max_batch_rows,
            settings.request_timeout_s,
            model.budget_range,
            model.samplers,
            model.default_sampler,
            min(model.default_steps, settings.max_steps),
            min(model.default_cfg_scale, settings.max_cfg_scale),
            model.family,
        )


@dataclass
class ServedModel:
    """What the request schema needs of the model, known before it loads."""

    class_names: list[str]
    budget_range: tuple[float, float]
    samplers: tuple[str, ...]
    default_sampler: str
    default_steps: int = 25
    default_cfg_scale: float = 4.0
    family: str = "racedit"


def resolve_class(value: Union[int, str], class_names: list[str]) -> int:
    """A class index (a JSON integer) or name (any case) -> the index; ValueError names the range or the names.
    A string is always a name: "5" is class 5 only where a class is called "5"."""
    n = len(class_names)
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value < n:
            raise ValueError(f"class index {value} is out of range 0..{n - 1}")
        return value
    key = str(value).strip().lower()
    lowered = [c.lower() for c in class_names]
    if key not in lowered:
        raise ValueError(f"unknown class {value!r}; known: {', '.join(class_names)}")
    return lowered.index(key)


def request_model(limits: Limits, base: type[GenerateRequest] = GenerateRequest) -> type[GenerateRequest]:
    """`base` (GenerateRequest or a subclass) with this server's ranges (served in /openapi.json) and
    its class names."""
    field = GenerateRequest.model_fields

    def known_class(value: Union[int, str]) -> Union[int, str]:
        resolve_class(value, limits.class_names)
        return value

    low, high = limits.budget_range

    def calibrated_budget(value: float) -> float:
        if not low <= value <= high:
            raise ValueError(
                f"expert_budget {value:g} is outside this model's calibrated range {low:g}..{high:g}"
                + ("" if high > low else " (its checkpoint has no budget table: racedit calibrate)")
            )
        return value

    def fits(request: GenerateRequest) -> GenerateRequest:
        rows_per_image = 1 if request.cfg_scale == 1.0 else 2
        most = min(limits.max_images, limits.max_batch_rows // rows_per_image)
        if request.num_images > most:
            raise ValueError(
                f"num_images {request.num_images} needs {request.num_images * rows_per_image} rows; "
                f"this server's batch holds {limits.max_batch_rows}, so at most {most} "
                f"{'unguided' if rows_per_image == 1 else 'guided'} images"
            )
        if request.seed is not None and request.seed > MAX_SEED - request.num_images:
            raise ValueError(f"seed + num_images must stay below 2**63 (seed at most {MAX_SEED - request.num_images})")
        return request

    return create_model(
        base.__name__,
        __base__=base,
        __module__=__name__,
        __doc__=base.__doc__,
        cfg_scale=(
            StrictFloat,
            Field(
                limits.default_cfg_scale,
                ge=0,
                le=limits.max_cfg_scale,
                allow_inf_nan=False,
                description=field["cfg_scale"].description,
            ),
        ),
        num_steps=(
            StrictInt,
            Field(limits.default_steps, ge=1, le=limits.max_steps, description=field["num_steps"].description),
        ),
        num_images=(StrictInt, Field(1, ge=1, le=limits.max_images, description=field["num_images"].description)),
        expert_budget=(
            StrictFloat,
            Field(
                1.0,
                allow_inf_nan=False,
                description=field["expert_budget"].description,
                json_schema_extra={"minimum": low, "maximum": high},
            ),
        ),
        sampler=(Optional[Literal[limits.samplers]], Field(None, description=field["sampler"].description)),
        __validators__={
            "known_class": field_validator("class_label")(known_class),
            "calibrated_budget": field_validator("expert_budget")(calibrated_budget),
            "fits": model_validator(mode="after")(fits),
        },
    )


def build_request(limits: Limits, body: GenerateRequest) -> GenerationRequest:
    """An engine request from a validated body; a seed left out is drawn at random."""
    seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
    return GenerationRequest(
        class_label=resolve_class(body.class_label, limits.class_names),
        cfg_scale=float(body.cfg_scale),
        num_steps=body.num_steps,
        seed=seed,
        num_images=body.num_images,
        timeout_s=limits.timeout_s,
        expert_budget=float(body.expert_budget),
        sampler=body.sampler or limits.default_sampler,
    )


def describe(exc: ValidationError) -> str:
    """One line naming every bad field, for answers that are not 422 lists (KServe's 400)."""
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'request'}: {e['msg']}" for e in exc.errors())
