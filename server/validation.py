"""Turn wire values into engine requests, naming the field and the allowed range on every error."""
from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Optional, Union

from .engine import GenerationRequest
from .settings import ServeSettings

MAX_SEED = 2**63 - 1


class FieldError(ValueError):
    """Invalid fields: a 422 (HTTP) or a 400 (KServe) naming each field and its allowed range."""

    def __init__(self, field: str, message: str, more: Optional[list[tuple[str, str]]] = None):
        self.problems = [(field, message)] + list(more or [])
        super().__init__("; ".join(f"{f}: {m}" for f, m in self.problems))


@dataclass
class Limits:
    class_names: list[str]
    max_steps: int
    max_images: int
    max_cfg_scale: float
    max_batch_rows: int
    timeout_s: float

    @classmethod
    def from_settings(cls, settings: ServeSettings, class_names: list[str]) -> "Limits":
        return cls(class_names, settings.max_steps, settings.max_images, settings.max_cfg_scale,
                   settings.max_batch_rows, settings.request_timeout_s)


def resolve_class(value: Union[int, str], class_names: list[str]) -> int:
    n = len(class_names)
    if isinstance(value, bool):
        raise FieldError("class_label", f"must be a class index 0..{n - 1} or a class name")
    if isinstance(value, int):
        if not 0 <= value < n:
            raise FieldError("class_label", f"index {value} is out of range 0..{n - 1}")
        return value
    key = str(value).strip().lower()
    if key.isdigit():
        return resolve_class(int(key), class_names)
    lowered = [c.lower() for c in class_names]
    if key not in lowered:
        raise FieldError("class_label", f"unknown class {value!r}; known: {', '.join(class_names)}")
    return lowered.index(key)


def build_request(limits: Limits, class_label: Union[int, str], cfg_scale: float, num_steps: int,
                  seed: Optional[int], num_images: int) -> GenerationRequest:
    """Check every field, raising one FieldError that lists all that are wrong."""
    problems: list[tuple[str, str]] = []
    label = 0
    try:
        label = resolve_class(class_label, limits.class_names)
    except FieldError as exc:
        problems += exc.problems
    if not isinstance(cfg_scale, (int, float)) or not math.isfinite(cfg_scale):
        problems.append(("cfg_scale", f"must be a finite number in 0..{limits.max_cfg_scale:g}"))
    elif not 0.0 <= cfg_scale <= limits.max_cfg_scale:
        problems.append(("cfg_scale", f"{cfg_scale:g} is outside 0..{limits.max_cfg_scale:g}"))
    if not 1 <= num_steps <= limits.max_steps:
        problems.append(("num_steps", f"{num_steps} is outside 1..{limits.max_steps}"))
    rows_per_image = 1 if cfg_scale == 1.0 else 2
    max_images = min(limits.max_images, limits.max_batch_rows // rows_per_image)
    if not 1 <= num_images <= max_images:
        problems.append(("num_images", f"{num_images} is outside 1..{max_images}"))
    if seed is None:
        seed = secrets.randbelow(2**31)
    if not 0 <= seed <= MAX_SEED - num_images:
        problems.append(("seed", f"must be in 0..{MAX_SEED - num_images}"))
    if problems:
        raise FieldError(*problems[0], more=problems[1:])
    return GenerationRequest(class_label=label, cfg_scale=float(cfg_scale), num_steps=int(num_steps),
                             seed=int(seed), num_images=int(num_images), timeout_s=limits.timeout_s)
