"""Command-line flags made from a pydantic model: one typed mechanism for every command's options.

Each field of the model is a flag (`num_samples` -> `--num-samples`, or a positional argument where the
field says so) whose help is the field's description and its default; `Literal` fields offer their
choices, booleans take `--flag/--no-flag`, lists take several values. Flags left out stay out of the
parsed values, so the model's defaults (and, for `pydantic_settings` models, `RACEDIT_*` variables)
apply; pydantic types and checks what was given, and `errors` names each bad flag. Torch-free, so
every `--help` answers at once.
"""

from __future__ import annotations

import argparse
import types
import typing
from typing import Any, Literal, Optional

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

POSITIONAL = {"positional": True}  # Field(json_schema_extra=POSITIONAL): an argument without dashes


def add_flags(parser: argparse.ArgumentParser, model: type[BaseModel], env_prefix: Optional[str] = None) -> None:
    """One argument per field of `model`; `env_prefix` names the variable each field also reads."""
    for name, field in model.model_fields.items():
        env = f"env {env_prefix}{name.upper()}" if env_prefix else ""
        default = describe_default(field)
        note = ", ".join(part for part in (env, default) if part)
        help_text = (field.description or name) + (f" ({note})" if note else "")
        annotation = _unwrap(field.annotation)
        kwargs: dict[str, Any] = {"help": help_text, "default": None}
        if typing.get_origin(annotation) is Literal:
            kwargs["choices"] = typing.get_args(annotation)
        elif annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(annotation) is list:
            kwargs["nargs"] = "*"
        if (field.json_schema_extra or {}).get("positional"):
            kwargs.pop("default")
            parser.add_argument(name, **kwargs)
        else:
            kwargs["required"] = field.is_required()
            kwargs.setdefault("metavar", None if "choices" in kwargs or "action" in kwargs else name.upper())
            if kwargs["metavar"] is None:
                kwargs.pop("metavar")
            parser.add_argument("--" + name.replace("_", "-"), dest=name, **kwargs)


def parse(model: type[BaseModel], args: argparse.Namespace) -> BaseModel:
    """The typed options of what was given on the command line (raises pydantic's ValidationError)."""
    given = {name: value for name, value in vars(args).items() if name in model.model_fields and value is not None}
    return model(**given)


def errors(exc: ValidationError) -> list[str]:
    """One line per bad flag: `--num-steps: Input should be greater than or equal to 1 (got '0')`."""
    lines = []
    for error in exc.errors():
        loc = [str(p) for p in error["loc"]]
        flag = "--" + loc[0].replace("_", "-") if loc else "options"
        got = f" (got {error['input']!r})" if "input" in error and not isinstance(error["input"], dict) else ""
        lines.append(f"{flag}: {error['msg']}{got}")
    return lines


def describe_default(field: FieldInfo) -> str:
    """ "default X" for the help line; nothing where the description already says it in words."""
    if field.is_required():
        return "required"
    if field.default_factory is not None or "default:" in (field.description or ""):
        return ""
    value = field.default
    words = {None: "none", True: "on", False: "off"}
    shown = words.get(value, value) if isinstance(value, (bool, type(None))) else value
    if isinstance(shown, (list, tuple)):
        shown = " ".join(map(str, shown)) or "none"
    return f"default {shown}"


def _unwrap(annotation: Any) -> Any:
    """Optional[X] -> X."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation
