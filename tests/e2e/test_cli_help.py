"""`racedit --help` and every subcommand's `--help` answer without importing torch, and every flag says
what it does and what it defaults to."""

import argparse
import json
import subprocess
import sys

import pytest

from racedit.cli import parser as racedit_parser
from racedit.export.cli import parser as export_parser
from racedit.server.cli import parser as serve_parser


def subcommands() -> list[str]:
    sub = next(a for a in racedit_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return list(sub.choices)


def parsers() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in racedit_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {**sub.choices, "serve": serve_parser(), "export": export_parser(), "": racedit_parser()}


HELP_WITHOUT_TORCH = """
import contextlib, io, json, sys
from racedit.cli import main
with contextlib.redirect_stdout(io.StringIO()) as out:
    try:
        main(sys.argv[1:] + ["--help"])
    except SystemExit as exc:
        code = exc.code
print(json.dumps({"code": code, "usage": out.getvalue().startswith("usage: racedit"),
                  "heavy": sorted({m.split(".")[0] for m in sys.modules} & {"torch", "numpy", "safetensors"})}))
"""


@pytest.mark.parametrize("command", ["", *subcommands()])
def test_help_imports_no_torch(command):
    """What makes `racedit serve --help` take seconds is torch; no --help may import it."""
    done = subprocess.run(
        [sys.executable, "-c", HELP_WITHOUT_TORCH, *([command] if command else [])],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer == {"code": 0, "usage": True, "heavy": []}, answer


def test_every_subcommand_is_covered():
    assert set(subcommands()) == {
        "serve",
        "export",
        "train",
        "eval",
        "calibrate",
        "import",
        "import-dit",
        "pack",
        "train-classifier",
    }


@pytest.mark.parametrize("name, parser", parsers().items(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_flag_has_help_with_its_default(name, parser):
    formatter = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        flag = "/".join(action.option_strings) or action.dest
        assert action.help and action.help != argparse.SUPPRESS, f"racedit {name} {flag} has no help"
        if action.option_strings:
            text = formatter._expand_help(action)  # the help line as printed, "(default: ...)" included
            if action.required:
                assert "required" in text, f"racedit {name} {flag}: {text!r} should say it is required"
            else:
                assert "default" in text, f"racedit {name} {flag}: {text!r} should give its default"


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["eval", "--num-samples", "0"], "--num-samples: Input should be greater than or equal to 1"),
        (["eval", "--num-steps", "many"], "--num-steps: Input should be a valid integer"),
        (["calibrate", "ck", "--iterations", "-1"], "--iterations: Input should be greater than or equal to 0"),
        (["import-dit", "dit.pt", "--out", "o", "--hidden-split", "0"], "--hidden-split"),
        (["import", "dit.pt", "--out", "o", "--family", "dall-e"], "invalid choice: 'dall-e'"),
        (["train-classifier", "--steps", "2.5"], "--steps: Input should be a valid integer"),
        (["export", "onnx", "--out", "o", "--opset", "x"], "--opset: Input should be a valid integer"),
        (["serve", "--port", "99999"], "port: Input should be less than or equal to 65535"),
    ],
)
def test_a_bad_flag_is_refused_by_its_typed_options_naming_it(argv, flag):
    """Every command's flags are the fields of a typed options model: a bad value fails before any work,
    naming the flag and the rule (exit 2)."""
    done = subprocess.run([sys.executable, "-m", "racedit.cli", *argv], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and flag in done.stderr, done.stderr


def test_options_are_typed_with_their_models_defaults():
    from racedit.cli import COMMANDS
    from racedit.cli.flags import parse

    for name, (model, _) in COMMANDS.items():
        argv = {
            "train": ["--config", "c.yaml"],
            "calibrate": ["ck"],
            "import": ["s", "--out", "o"],
            "import-dit": ["s", "--out", "o"],
            "pack": ["--checkpoint", "c", "--out", "o"],
        }.get(name, [])
        options = parse(model, racedit_parser().parse_args([name, *argv]))
        assert type(options) is model
        for field, info in model.model_fields.items():
            if not info.is_required() and field not in ("out",):
                assert getattr(options, field) == info.default, (name, field)
    evaluation = parse(COMMANDS["eval"][0], racedit_parser().parse_args(["eval", "--num-samples", "7"]))
    assert evaluation.num_samples == 7 and isinstance(evaluation.num_samples, int)
