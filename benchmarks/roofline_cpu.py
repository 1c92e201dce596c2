"""Machine limits for the PPO roofline note: memory bandwidth and fp32 matmul rate on this CPU.

    .venv/bin/python benchmarks/roofline_cpu.py [--threads 2]   # writes benchmarks/results/roofline_cpu.json

Bandwidth: a STREAM-like copy of a 512 MiB float64 array with numpy (bytes moved = read + write),
best of 5. Peak FLOP rate: a 2048×2048 fp32 ``torch.mm`` (2·n³ FLOPs), best of 10, on ``--threads``.
Best-of-N, because other processes may share the cores; the load average is recorded.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch


def copy_bandwidth_gbs(mib: int = 512, repeats: int = 5) -> float:
    src = np.ones(mib * 2**20 // 8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best / 1e9


def matmul_gflops(n: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "roofline_cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "threads": args.threads,
              "load_average_before": os.getloadavg(), "copy_bandwidth_gb_s": copy_bandwidth_gbs(),
              "fp32_matmul_gflop_s": matmul_gflops(), "load_average_after": os.getloadavg()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
