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
