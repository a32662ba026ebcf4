import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import httpx
import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def batch(model, n, seed=0):
    """Random (x, t, y) for a model's shape, drawn from a seeded generator."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
    t = torch.rand(n, generator=g)
    y = torch.randint(0, cfg.num_classes, (n,), generator=g)
    return x, t, y


# ------------------------------------------------------------ servers ----


def metric(text: str, name: str) -> float:
    """One sample of `name` from Prometheus text (the first, whatever its labels); nan if absent."""
    match = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M)
    return float(match.group(1)) if match else float("nan")


def tiny_model(**overrides):
    """A tiny model with trained thresholds and a non-zero output head, so outputs vary."""
    from racedit.model import build

    torch.manual_seed(0)
    model = build("tiny", **overrides).train()
    for seed in range(3):
        model(*batch(model, 8, seed=seed))
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.05)
    for block in model.blocks:
        torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.05)
    return model.eval()


def make_tiny_checkpoint(path: Path) -> Path:
    from racedit.model import save

    return save(tiny_model(), path)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ck") / "racedit-tiny")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`racedit serve` in a real process on loopback."""

    def __init__(
        self,
        checkpoint: Path,
        log_path: Path,
        *flags: str,
        env: dict | None = None,
        launcher: tuple[str, ...] = ("-m", "racedit.cli", "serve"),
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                *launcher,
                "--checkpoint",
                str(checkpoint),
                "--port",
                str(self.port),
                "--log-level",
                "warning",
                *flags,
            ],
            stdout=open(log_path, "w"),
            stderr=subprocess.STDOUT,
            env=environment,
        )
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {log_path.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not ready: {log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture(scope="module")
def server_factory(tmp_path_factory, tiny_checkpoint):
    started = []

    def start(
        *flags: str, env: dict | None = None, checkpoint: Path | None = None, faults: dict | None = None
    ) -> ServerProcess:
        """`faults` ({"FAULT_LABEL": 9, ...}) serves through tests/faulty_serve.py with those injections."""
        log = tmp_path_factory.mktemp("server") / "server.log"
        launcher = ("-m", "racedit.cli", "serve")
        if faults:
            launcher = (str(Path(__file__).with_name("faulty_serve.py")),)
            env = {**(env or {}), **{f"RACEDIT_TEST_{k}": str(v) for k, v in faults.items()}}
        server = ServerProcess(checkpoint or tiny_checkpoint, log, *flags, env=env, launcher=launcher)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


# ------------------------------------------------------------- latents ----
def tiny_vae(seed: int = 0, scaling_factor: float = 0.5, shift_factor: Optional[float] = 0.1):
    """A real diffusers AutoencoderKL, tiny and random: 3 -> 4 channels, each side halved (16 px <-> 8)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
    ).eval()


def make_latent_checkpoint(path: Path, vae=None) -> Path:
    """A tiny Race-DiT over the tiny VAE's 4x8x8 latents (patch 2: 16 tokens), saved with its VAE."""
    from racedit.model import save

    return save(tiny_model(in_channels=4, image_size=8, patch_size=2), path, autoencoder=vae or tiny_vae())


@pytest.fixture(scope="session")
def latent_checkpoint(tmp_path_factory) -> Path:
    return make_latent_checkpoint(tmp_path_factory.mktemp("latent") / "racedit-latent")
