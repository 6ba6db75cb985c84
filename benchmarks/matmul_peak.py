"""Row 2's denominator: this machine's fp32 matrix-multiply peak, at the thread count the steps use
(`--device cuda --dtype bfloat16`: a GPU's bf16 peak, for gpu_check.py).

The best (not median) of the repeats: the peak is what the hardware can do when it is least disturbed; on a
shared machine the median would understate it and flatter the achieved/peak ratio.
"""

from __future__ import annotations

import argparse
import time

from benchmarks.common import add_device_args, emit, median, set_threads, synchronize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=2048, help="n of the n x n @ n x n product")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    add_device_args(parser)
    args = parser.parse_args()
    set_threads(args.threads)

    import torch

    like = dict(device=args.device, dtype=getattr(torch, args.dtype))
    a, b = torch.randn(args.size, args.size, **like), torch.randn(args.size, args.size, **like)
    out = torch.empty(args.size, args.size, **like)
    torch.matmul(a, b, out=out)  # warm-up: first call allocates and picks the kernel
    flops = 2 * args.size ** 3
    rates = []
    for _ in range(args.repeats):
        synchronize(args.device)
        start = time.perf_counter()
        torch.matmul(a, b, out=out)
        synchronize(args.device)
        rates.append(flops / (time.perf_counter() - start))
    emit({"size": args.size, "threads": args.threads, "device": args.device, "dtype": args.dtype,
          "peak_flops": max(rates), "median_flops": median(rates)})


if __name__ == "__main__":
    main()
