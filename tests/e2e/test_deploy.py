"""Deployment files, validated without a Docker engine."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "racedit.json"


def compose_config(*files: str) -> dict:
    if shutil.which("docker-compose") is None:
        pytest.fail("docker-compose is not installed (Debian package docker-compose; .ci/run installs it)")
    args = ["docker-compose"] + [a for f in files for a in ("-f", str(ROOT / f))] + ["config"]
    result = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def test_compose_gpu_stack():
    config = compose_config("docker-compose.yml")
    services = config["services"]
    assert {"racedit", "prometheus", "grafana"} <= set(services)
    racedit = services["racedit"]
    device = racedit["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert racedit["healthcheck"]["test"][-1].count("/readyz") == 1
    assert racedit["restart"] == "unless-stopped"
    assert any("/checkpoints" in str(v) for v in racedit["volumes"])
    assert all(k.startswith("RACEDIT_") for k in racedit["environment"])


def test_compose_cpu_override_runs_without_a_gpu():
    config = compose_config("docker-compose.yml", "docker-compose.cpu.yml")
    services = config["services"]
    assert services["racedit"]["profiles"] == ["gpu"]  # the GPU service is not started
    cpu = services["racedit-cpu"]
    assert "deploy" not in cpu and cpu["environment"]["RACEDIT_DEVICE"] == "cpu"
    assert "racedit" in cpu["networks"]["default"]["aliases"]  # Prometheus scrapes the same name


def test_prometheus_config():
    path = ROOT / "deploy" / "prometheus" / "prometheus.yml"
    config = yaml.safe_load(path.read_text())
    job = config["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics" and job["static_configs"][0]["targets"] == ["racedit:8000"]
    if shutil.which("promtool"):
        result = subprocess.run(["promtool", "check", "config", str(path)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_shape():
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM .*", text, re.M)
    assert len(stages) >= 2, "multi-stage build"
    final = text[text.rindex("\nFROM ") :]
    assert "build-essential" not in final and "COPY --from=build" in final
    assert re.search(r"^USER racedit$", final, re.M)
    assert "HEALTHCHECK" in final and "/readyz" in final
    assert 'ENTRYPOINT ["racedit", "serve"]' in final
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored and "runs" in ignored


def test_grafana_provisioning():
    datasource = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/racedit.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


def test_dashboard_queries_name_metrics_the_service_exposes(server_factory):
    server = server_factory()
    assert httpx.post(server.url + "/generate", json={"class_label": 1, "num_steps": 2}).status_code == 200
    scraped = set(re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)", httpx.get(server.url + "/metrics").text, re.M))
    dashboard = json.loads(DASHBOARD.read_text())
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for needed in ("requests/s", "p95", "queue depth", "rows per", "images/s", "experts per token", "per-layer"):
        assert needed in titles, needed
    for panel in dashboard["panels"]:
        names = {n for t in panel["targets"] for n in re.findall(r"\b((?:racedit|http)_[a-zA-Z0-9_]+)", t["expr"])}
        assert names, panel["title"]
        missing = names - scraped
        assert not missing, (panel["title"], missing)


def test_compose_grace_period_covers_the_default_drain_timeout():
    """Docker kills the container stop_grace_period after SIGTERM; the server needs the drain timeout, at
    most one engine step and its answers' grace (ANSWER_GRACE_S) before it exits."""
    from racedit.server.cli import ANSWER_GRACE_S
    from racedit.server.settings import ServeSettings

    needed = ServeSettings.model_fields["drain_timeout_s"].default + ANSWER_GRACE_S + 5
    for name in ("docker-compose.yml", "docker-compose.cpu.yml"):
        for service in yaml.safe_load((ROOT / name).read_text())["services"].values():
            if "stop_grace_period" in service:
                minutes, seconds = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", service["stop_grace_period"]).groups()
                assert int(minutes or 0) * 60 + int(seconds or 0) >= needed, (name, service["stop_grace_period"])
