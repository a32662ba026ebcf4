#!/usr/bin/env bash
# Create .venv and install racedit (and with --dev, the test tools and the client SDK).
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
$py -m pip install -q -e ".${extras}"
$py -m pip install -q -e clients/python
echo "racedit installed in .venv"
