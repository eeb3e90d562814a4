"""Benchmark: the CPU int8 ``linear`` kernel alone, for Gemma 3 270M's shapes and 1 to 16 rows.

    .venv/bin/python benchmarks/kernels.py

Times ``cpu_kernels.ops().linear`` on random weights of the output head (262,144 x 640) and two layer shapes
(2,048 x 640, 640 x 1,024), for 1, 2, 6, 8 and 16 rows (a decode step of that many sessions). Prints ms per call
and the multiply-adds per second; asserts nothing.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    import torch

    from llm_backends import cpu_kernels

    ops = cpu_kernels.ops()
    if ops is None:
        sys.exit("the CPU kernels could not be built here")
    torch.manual_seed(0)
    print("| weight N x K | rows | ms per call | G multiply-adds/s |")
    print("|---|---|---|---|")
    for n, k in ((262144, 640), (2048, 640), (640, 1024)):
        packed, scale = ops.pack(torch.randn(n, k))
        for m in (1, 2, 6, 8, 16):
            x = torch.randn(m, k)
            ops.linear(x, packed, scale, None, k)
            calls = 20 if n > 100_000 else 500
            started = time.perf_counter()
            for _ in range(calls):
                ops.linear(x, packed, scale, None, k)
            ms = (time.perf_counter() - started) / calls * 1000
            print(f"| {n} x {k} | {m} | {ms:.3f} | {m * n * k / ms / 1e6:.0f} |")


if __name__ == "__main__":
    main()
