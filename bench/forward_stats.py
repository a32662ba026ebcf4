"""Cost of collecting routing statistics: forward with and without `return_stats=True`.

python bench/forward_stats.py [--preset shapes10] [--batch 64]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save, time_call  # noqa: E402

from racedit.model import build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="shapes10")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build(args.preset).eval()
    cfg = model.config
    x = torch.randn(args.batch, cfg.in_channels, cfg.image_size, cfg.image_size)
    t = torch.rand(args.batch)
    y = torch.randint(0, cfg.num_classes, (args.batch,))
    with torch.no_grad():
        plain = time_call(lambda: model(x, t, y), args.repeats)
        stats = time_call(lambda: model(x, t, y, return_stats=True), args.repeats)
    overhead = stats / plain - 1
    print(f"forward {plain * 1000:.2f} ms, with stats {stats * 1000:.2f} ms: overhead {overhead * 100:.2f} %")
    save(
        f"forward_stats-{args.preset.replace('/', '_')}",
        {"preset": args.preset, "batch": args.batch, "overhead": overhead},
        [{"variant": "forward", "ms": plain * 1000}, {"variant": "forward + stats", "ms": stats * 1000}],
    )


if __name__ == "__main__":
    main()
