"""The rooms and who may enter them: imports read from the source (lazy imports inside functions too)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE_DIRS = {"model": "racedit.model", "server": "racedit.server", "export": "racedit.export", "cli": "racedit.cli"}


def imports(folder: str) -> dict[str, set[str]]:
    """Every module a folder's files import, absolute names (relative imports resolved), by file."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        package = ".".join([PACKAGE_DIRS[folder], *path.relative_to(ROOT / folder).parent.parts])
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = package.rsplit(".", node.level - 1)[0] if node.level else ""
                module = ".".join(p for p in (base, node.module) if p)
                names.add(module)
                names.update(f"{module}.{alias.name}" for alias in node.names)
        found[str(path.relative_to(ROOT))] = names
    return found


def offenders(folder: str, forbidden: str) -> list[str]:
    return [
        f"{path} imports {name}"
        for path, names in imports(folder).items()
        for name in sorted(names)
        if name == forbidden or name.startswith(forbidden + ".")
    ]


@pytest.mark.parametrize("folder", ["server", "export"])
def test_serving_never_imports_training(folder):
    assert offenders(folder, "racedit.model.training") == []


@pytest.mark.parametrize("forbidden", ["racedit.server", "racedit.export", "racedit.cli"])
def test_the_model_package_imports_nothing_from_serving_or_exports(forbidden):
    assert offenders("model", forbidden) == []


def test_the_scheduler_and_the_http_wire_need_no_tensors():
    names = imports("server")
    for module in ("server/scheduler.py", "server/requests.py"):
        assert not {n for n in names[module] if n.split(".")[0] == "torch"}, module


def test_the_check_sees_relative_imports():
    """The scan resolves `from ..training import x` in model/ to racedit.model.training (the rule can fail)."""
    names = imports("model")
    assert "racedit.model.training.losses" in names["model/training/objective.py"]
