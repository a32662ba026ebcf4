#!/usr/bin/env bash
# Create .venv and install racedit and the client SDK (with --dev: the test tools, and Debian's
# docker-compose and prometheus for the deployment checks when run as root).
# On a machine without an NVIDIA GPU, torch's CPU build is installed first, so that the
# unpinned `torch` requirement does not pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"
python3 -m venv .venv
py=.venv/bin/python
$py -m pip install -q --upgrade pip
if ! $py -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    $py -m pip install -q torch
  else
    $py -m pip install -q "torch==${RACEDIT_CPU_TORCH:-2.13.0}" \
      || $py -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
  fi
fi
if [ -n "$extras" ] && { ! command -v docker-compose >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1 \
                          || [ ! -x /usr/bin/chromium ]; }; then
  # The deployment tests validate the compose files and the Prometheus config with Debian's tools;
  # the playground tests drive Debian's chromium through Playwright (no browser download).
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose prometheus chromium >/dev/null
  else
    echo "note: the tests need docker-compose, promtool and chromium (Debian: apt-get install docker-compose prometheus chromium)" >&2
  fi
fi
# The SDK first: the service imports its wire models from it (racedit_client.models).
$py -m pip install -q -e clients/python
# setuptools notes every editable install through an import hook ("Editable installation."): a
# note about editable installs in general, not about this project, so it is not shown.
PYTHONWARNINGS="ignore:Editable installation" $py -m pip install -q -e ".${extras}"
if [ -n "$extras" ] && $py -c "import sys, torch; sys.exit(torch.cuda.is_available())"; then
  # Without a GPU the tests run the GPU kernels (model/kernels.py) in Triton's interpreter, which
  # needs Triton 3.9 or later; a CUDA build of torch brings its own Triton, and there they run compiled.
  $py -m pip install -q "triton>=3.9"
fi
echo "racedit installed in .venv"
