#!/usr/bin/env bash
# Usage: scripts/setup.sh [--dev] [EXTRA ...]
# Create .venv (or add to it) and install racedit, with the optional extras named (latents, export,
# ray), and the client SDK. --dev adds the test tools (the `dev` extra) and, as root, Debian's
# docker-compose, prometheus and chromium for the deployment and playground tests.
# On a machine without an NVIDIA GPU, torch's CPU build is installed first, so that the
# unpinned `torch` requirement does not pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
dev=""
names=()
for arg in "$@"; do
  case "$arg" in
    --dev) dev=1; names+=(dev) ;;
    latents|export|ray|dev) names+=("$arg") ;;
    *) echo "usage: scripts/setup.sh [--dev] [EXTRA ...]; extras: latents, export, ray (got '$arg')" >&2; exit 2 ;;
  esac
done
extras=""
[ ${#names[@]} -gt 0 ] && extras="[$(IFS=,; echo "${names[*]}")]"
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
if [ -n "$dev" ] && { ! command -v docker-compose >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1 \
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
if [ -n "$dev" ] && $py -c "import sys, torch; sys.exit(torch.cuda.is_available())"; then
  # Without a GPU the tests run the GPU kernels (model/kernels.py) in Triton's interpreter, which
  # needs Triton 3.9 or later; a CUDA build of torch brings its own Triton, and there they run compiled.
  $py -m pip install -q "triton>=3.9"
fi
echo "racedit installed in .venv"
