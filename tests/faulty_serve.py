"""`racedit serve` with faults injected into the denoiser, for the resilience tests only.

RACEDIT_TEST_FAULT_LABEL=n: a forward whose batch holds class n raises RuntimeError.
RACEDIT_TEST_FATAL_LABEL=n: a forward whose batch holds class n past t = 0.5 (half-way) raises
SystemExit in the engine's worker thread, which no handler of an iteration catches: the worker dies.
Only forwards on the engine's worker thread are affected (the start-up check runs as usual).
RACEDIT_TEST_ENCODE_FAULT=fmt: encoding an answer's images as fmt (png, jpeg, webp) raises RuntimeError, an
unexpected error in a route (a bug, answered 500).
"""

import os
import sys
import threading

import torch

import racedit.server.encoding as encoding_module
from racedit.model.dit import RaceDiT
from racedit.server.cli import main

fault = int(os.environ.get("RACEDIT_TEST_FAULT_LABEL", "-1"))
fatal = int(os.environ.get("RACEDIT_TEST_FATAL_LABEL", "-1"))
forward = RaceDiT.forward


def faulty_forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, *args, **kwargs):
    if threading.current_thread().name != "racedit-engine":  # start-up checks run as usual
        return forward(self, x, t, y, *args, **kwargs)
    if bool((y == fault).any()):
        raise RuntimeError(f"injected fault for class label {fault}")
    if bool(((y == fatal) & (t < 0.5)).any()):
        raise SystemExit(f"injected worker death for class label {fatal}")
    return forward(self, x, t, y, *args, **kwargs)


RaceDiT.forward = faulty_forward
encode_fault, encode_image = os.environ.get("RACEDIT_TEST_ENCODE_FAULT"), encoding_module.encode_image


def faulty_encode(pixels, fmt: str) -> bytes:
    if fmt == encode_fault:
        raise RuntimeError(f"injected encoding fault for {fmt}")
    return encode_image(pixels, fmt)


encoding_module.encode_image = faulty_encode

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
