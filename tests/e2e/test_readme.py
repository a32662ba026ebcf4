"""Every fenced bash and python block of README.md runs as written, as a newcomer runs it.

A fresh `git clone` of this repository (its committed state) is set up by the README's own first
block. The blocks then run in the README's order, each in a fresh shell with no activated venv and
none of this run's RACEDIT_* variables: bash blocks in the clone's folder under `bash -e`, python
blocks with the clone's `.venv/bin/python` from another folder. They reach the servers the README
starts, on the ports it names. An HTML comment right before a block says how to take it:

    <!-- readme-test: server URL -->    the block runs a server in the foreground: it is started in
                                        the background and the next block waits until URL answers 200
    <!-- readme-test: skip: WHY -->     not run here (a GPU, Docker, Kubernetes, a Ray cluster, ...)

At the end every process a block started (its whole process group) is stopped.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import httpx
import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
BLOCK = re.compile(
    r"(?:<!-- readme-test: (?P<marker>.*?) -->\n)?^```(?P<lang>bash|python)\n(?P<body>.*?)^```$", re.S | re.M
)
SETUP_S = 900  # the first block: a venv, torch's CPU build, racedit (about a minute when pip's cache is warm)
BLOCK_S = 600  # any other block
READY_S = 120  # a server block from start to ready (the first: after setup)
STOP_S = 30  # SIGTERM to SIGKILL
# The only warnings tolerated: this machine's pip configuration names index folders that are absent,
# and pip says so on every install (the machine's, not the project's); and a server without an API
# key says so at start, on purpose (README: Authentication and limits).
TOLERATED = re.compile(
    r"^WARNING: Location '[^']*' is ignored: it is neither a file nor a directory\.$"
    r"|WARNING racedit\.server: serving WITHOUT authentication"
)


@dataclass
class Block:
    line: int
    lang: str
    body: str
    server: Optional[str] = None  # the URL that answers once the block's server is ready
    skip: Optional[str] = None  # why it is not run here

    def __str__(self) -> str:
        return f"README.md:{self.line} ({self.lang})"


def readme_blocks(text: str) -> list[Block]:
    blocks = []
    for match in BLOCK.finditer(text):
        block = Block(text.count("\n", 0, match.start("lang")) + 1, match["lang"], match["body"])
        marker = match["marker"]
        if marker is not None:
            kind, _, rest = marker.partition(" ")
            if kind == "server" and rest.startswith("http://127.0.0.1:"):
                block.server = rest
            elif kind == "skip:" and rest.strip():
                block.skip = rest.strip()
            else:
                raise AssertionError(
                    f"{block}: unknown marker {marker!r} (server http://127.0.0.1:PORT/... | skip: WHY)"
                )
        blocks.append(block)
    return blocks


def test_the_markers_parse_and_skip_only_what_cannot_run_here():
    blocks = readme_blocks((ROOT / "README.md").read_text())
    assert blocks[0].server and blocks[0].body.startswith("scripts/setup.sh"), "the first block sets up and serves"
    assert len({b.server.split("/")[2] for b in blocks if b.server}) == sum(1 for b in blocks if b.server), (
        "every server of the README needs a port of its own"
    )
    run = [b for b in blocks if not b.skip]
    assert len(run) >= 10 and any(b.lang == "python" for b in run)
    for block in blocks:
        if block.skip:
            assert re.search(r"GPU|Docker|Kubernetes|Ray|hub|hours|\.ci/run", block.skip), f"{block}: {block.skip}"


def newcomer_env() -> dict[str, str]:
    """This environment less any virtual environment and racedit's own settings."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME") and not k.startswith("RACEDIT_")
    }
    path = [
        p for p in env.get("PATH", "").split(os.pathsep) if p and not (Path(p).parent / "pyvenv.cfg").exists()
    ]  # no venv's bin (this test's included)
    env["PATH"] = os.pathsep.join(path or ["/usr/bin", "/bin"])
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Runner:
    """Runs the README's blocks in a clone; remembers every process group it started."""

    def __init__(self, clone: Path, elsewhere: Path, logs: Path):
        self.clone, self.elsewhere, self.logs = clone, elsewhere, logs
        self.env = newcomer_env()
        self.groups: list[subprocess.Popen] = []
        self.seconds: dict[str, float] = {}

    def start(self, block: Block) -> tuple[subprocess.Popen, Path]:
        log = self.logs / f"readme-{block.line}.log"
        if block.lang == "bash":
            argv, cwd = ["bash", "-e", "-c", block.body], self.clone
        else:
            script = self.logs / f"readme-{block.line}.py"
            script.write_text(block.body)
            argv, cwd = [str(self.clone / ".venv" / "bin" / "python"), str(script)], self.elsewhere
        # A session of its own: the block and whatever it leaves in the background share one process
        # group, stopped as a whole at the end. Output goes to a file, which no background job holds open.
        with open(log, "w") as out:
            proc = subprocess.Popen(
                argv,
                cwd=cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.groups.append(proc)
        return proc, log

    def run(self, block: Block, first: bool) -> None:
        started = time.monotonic()
        proc, log = self.start(block)
        if block.server:
            self.wait_ready(block, proc, log, (SETUP_S if first else 0) + READY_S)
        else:
            try:
                code = proc.wait(SETUP_S if first else BLOCK_S)
            except subprocess.TimeoutExpired:
                code = f"still running after {SETUP_S if first else BLOCK_S} s"
            assert code == 0, f"{block} failed ({code}):\n{block.body}\n--- output ---\n{log.read_text()[-4000:]}"
        self.seconds[str(block)] = round(time.monotonic() - started, 1)

    def wait_ready(self, block: Block, proc: subprocess.Popen, log: Path, limit: float) -> None:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(
                    f"{block} exited ({proc.returncode}) before {block.server} answered:\n{log.read_text()[-4000:]}"
                )
            try:
                if httpx.get(block.server, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise AssertionError(f"{block}: {block.server} did not answer within {limit} s:\n{log.read_text()[-4000:]}")

    def stop_all(self) -> None:
        """SIGTERM to every group (servers drain), then SIGKILL to what is left after STOP_S."""
        for proc in self.groups:
            signal_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_S
        for proc in self.groups:
            while group_alive(proc.pid) and time.monotonic() < deadline:
                proc.poll()  # reap the leader, so that a finished one does not count as alive
                time.sleep(0.2)
            signal_group(proc.pid, signal.SIGKILL)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass


def signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


@pytest.mark.slow
def test_every_block_of_the_readme_runs_as_written(tmp_path):
    blocks = readme_blocks((ROOT / "README.md").read_text())
    ports = {b.server.split("/")[2] for b in blocks if b.server and not b.skip} | {"127.0.0.1:8001"}
    for port in sorted(ports):  # the README names fixed ports: say so plainly when one is taken
        try:
            httpx.get(f"http://{port}/", timeout=1)
            pytest.fail(f"{port} is taken, and the README's servers need it: stop what listens there")
        except httpx.HTTPError:
            pass
    clone, elsewhere, logs = tmp_path / "racedit", tmp_path / "elsewhere", tmp_path / "logs"
    elsewhere.mkdir()
    logs.mkdir()
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True, timeout=300)
    runner = Runner(clone, elsewhere, logs)
    started = time.monotonic()
    try:
        for index, block in enumerate(b for b in blocks if not b.skip):
            runner.run(block, first=index == 0)
        card = httpx.get("http://127.0.0.1:8002/v1/models", timeout=10).json()["data"][0]
        assert card["backend"] == "onnxruntime", card  # the ONNX server is the one on its port
    finally:
        runner.stop_all()
        print(json.dumps({"seconds": runner.seconds, "total": round(time.monotonic() - started, 1)}, indent=1))
    outputs = {log.name: log.read_text() for log in sorted(logs.glob("*.log"))}  # the servers' to their end
    everything = "\n".join(outputs.values())
    assert "Traceback" not in everything, everything[-4000:]
    noise = [
        f"{name}: {line}"
        for name, output in outputs.items()
        for line in output.splitlines()
        if re.search(r"warn|deprecat|accelerate", line, re.I) and not TOLERATED.search(line)
    ]
    assert noise == [], "setup, the servers and the commands should print no warnings:\n" + "\n".join(noise[:40])

    # What the blocks say they make, they made.
    assert sorted(p.name for p in (clone / "out").glob("star-*.png")) == [f"star-{i}.png" for i in range(1, 5)]
    for picture in [clone / "heart.png", clone / "star.png", elsewhere / "star.png", *elsewhere.glob("star-*.png")]:
        with Image.open(picture) as image:
            assert image.format == "PNG" and image.size == (32, 32), picture
    assert len(list(elsewhere.glob("preview-*.png"))) >= 4
    assert {p.stem for p in elsewhere.glob("*.png")} >= {"circle", "square", "heart"}
    # The latent walk-through was answered by its own model on its own port, not by the quick start's.
    assert "latents 4x8x8" in everything
    latents = sorted((clone / "out" / "latent-latents").glob("*.npy"))
    assert len(latents) == 2 and all(np.load(f).shape == (4, 8, 8) for f in latents)
    pictures = sorted((clone / "out" / "latent-pictures").glob("*.png"))
    assert len(pictures) == 2
    with Image.open(pictures[0]) as image:
        assert image.size == (32, 32) and image.mode == "RGB"
    for exported in ("onnx/model.onnx", "aot/model.pt2", "triton/racedit_denoiser/config.pbtxt"):
        assert (clone / "exports" / exported).is_file(), exported
    shutil.rmtree(clone / ".venv")  # a GB or two that pytest would otherwise keep for its last three runs
