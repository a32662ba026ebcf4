"""`racedit serve`: flags generated from ServeSettings (each also a RACEDIT_* variable)."""

from __future__ import annotations

import argparse
import errno
import logging
import socket
import sys
import threading
from collections.abc import Sequence
from typing import Optional

import uvicorn
from pydantic import ValidationError

from racedit.cli.flags import add_flags, parse

from .settings import ServeSettings


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="racedit serve",
        description="Serve a Race-DiT checkpoint over HTTP. Every flag is also an environment variable "
        "RACEDIT_<FLAG> (e.g. RACEDIT_MAX_BATCH_ROWS=128); flags win over variables.",
    )
    add_flags(parser, ServeSettings, env_prefix="RACEDIT_")
    return parser


def settings_from_args(argv: Sequence[str]) -> ServeSettings:
    return parse(ServeSettings, parser().parse_args(list(argv)))


def port_in_use(host: str, port: int) -> Optional[str]:
    """Why `host:port` cannot be bound now (None when it can; port 0 always can)."""
    if port == 0:
        return None
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((host, port))
        except OSError as exc:
            return "the port is in use" if exc.errno == errno.EADDRINUSE else exc.strerror or str(exc)
    return None


ANSWER_GRACE_S = 5  # after the engine's final sweep, how long connections get to send their answers


class DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT: stop admission (new requests get 503), let in-flight and queued requests finish
    for up to `drain_timeout_s`, then answer those left 503 with Retry-After (streams: an `error` event),
    take their jobs out of the engine and stop it, and exit once the answers are out (ANSWER_GRACE_S).

    A second signal does the same at once; a third is uvicorn's forced exit.
    """

    def handle_exit(self, sig: int, frame) -> None:  # type: ignore[override]
        engine = getattr(self.config.app.state, "engine", None) if hasattr(self.config.app, "state") else None
        signals = getattr(self, "_signals", 0)
        self._signals = signals + 1
        if engine is None or signals >= 2:
            return super().handle_exit(sig, frame)
        log = logging.getLogger("racedit.server")
        if signals == 1:
            log.warning("signal %s again: answering every unfinished request 503 and exiting now", sig)
            threading.Thread(target=self._stop_now, args=(engine,), name="racedit-stop", daemon=True).start()
            return
        engine.begin_drain()
        timeout = self.config.app.state.settings.drain_timeout_s
        log.info("signal %s: draining (up to %.0f s)", sig, timeout)

        def finish() -> None:
            if not engine.wait_idle(timeout):
                log.warning("drain timeout (%.0f s) passed; answering every unfinished request 503", timeout)
            self._stop_now(engine)

        threading.Thread(target=finish, name="racedit-drain", daemon=True).start()

    def _stop_now(self, engine) -> None:
        """The engine's final sweep (every unanswered job fails with ShuttingDown: 503 + Retry-After), then exit."""
        engine.stop(drain=False)
        self.should_exit = True


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        settings = settings_from_args(sys.argv[1:] if argv is None else argv)
    except ValidationError as exc:
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"]) or "settings"
            print(f"racedit serve: error: {field}: {err['msg']} (got {err.get('input')!r})", file=sys.stderr)
        return 2
    from racedit.model import CheckpointError, ConfigError, ModelConfig, read_config
    from racedit.model.autoencoder import AutoencoderError, require_diffusers
    from racedit.model.checkpoint import read_autoencoder
    from racedit.model.sampling import ObjectiveError, require_servable

    try:  # what would fail after minutes of loading fails now, naming the file
        require_servable(ModelConfig.from_dict(read_config(settings.checkpoint)["model"]))
        if read_autoencoder(settings.checkpoint) is not None:
            require_diffusers()
    except (CheckpointError, ConfigError, AutoencoderError, ObjectiveError) as exc:
        print(f"racedit serve: error: {settings.checkpoint}: {exc}", file=sys.stderr)
        return 2
    if settings.backend == "onnxruntime" and settings.onnx is None:
        print("racedit serve: error: --backend onnxruntime needs --onnx PATH", file=sys.stderr)
        return 2
    if (busy := port_in_use(settings.host, settings.port)) is not None:  # before minutes of model loading
        print(
            f"racedit serve: error: cannot listen on {settings.host}:{settings.port}: {busy}; "
            f"choose another with --port (or RACEDIT_PORT), or stop what holds it",
            file=sys.stderr,
        )
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.ray:
        try:
            from .ray_serve import run
        except ImportError as exc:
            print(f"racedit serve: error: --ray needs Ray Serve (pip install 'racedit[ray]'): {exc}", file=sys.stderr)
            return 2
        return run(settings)
    from .app import create_app
    from .middleware import GuardedH11Protocol

    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        http=GuardedH11Protocol.with_read_timeout(settings.read_timeout_s),
        h11_max_incomplete_event_size=settings.max_header_bytes,
        timeout_graceful_shutdown=ANSWER_GRACE_S,
    )
    DrainingServer(config).run()
    return 0
