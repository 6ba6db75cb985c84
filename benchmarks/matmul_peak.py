"""Row 2's denominator: this machine's fp32 matrix-multiply peak, at the thread count the steps use.

The best (not median) of the repeats: the peak is what the hardware can do when it is least disturbed; on a
shared machine the median would understate it and flatter the achieved/peak ratio.
"""

from __future__ import annotations

import argparse
import time

from benchmarks.common import emit, median, set_threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=2048, help="n of the n x n @ n x n product")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    set_threads(args.threads)

    import torch

    a, b = torch.randn(args.size, args.size), torch.randn(args.size, args.size)
    out = torch.empty(args.size, args.size)
    torch.matmul(a, b, out=out)  # warm-up: first call allocates and picks the kernel
    flops = 2 * args.size ** 3
    rates = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        torch.matmul(a, b, out=out)
        rates.append(flops / (time.perf_counter() - start))
    emit({"size": args.size, "threads": args.threads, "peak_flops": max(rates), "median_flops": median(rates)})


if __name__ == "__main__":
    main()
