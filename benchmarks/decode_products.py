"""Decode-step matrix products of a model size: oneDNN with packed weights vs MKL, by row count.

A decode step multiplies a few rows (the samples still generating) by every weight of the
model once. This script times exactly that: for each row count it runs all the decode
products of one step (fused Q/K/V, output, fused gate/up, down, per layer), cycling through
every layer's own weights as a real step does (so the weights come from cache or memory, not
from a hot L1/L2), and prints the median time of a whole step's products with

- ``onednn``: weights reordered once by ``torch.ops.mkldnn._reorder_linear_weight`` and
  multiplied by ``torch.ops.mkldnn._linear_pointwise`` (what ``DecoderEngine`` uses on a
  CPU with ``pack_weights=True``);
- ``mkl``: ``F.linear`` on the plain ``[out, in]`` weights (MKL ``sgemm``, which packs the
  weight again on every call);
- ``mkl_packed``: MKL's own packed GEMM (``torch.ops.mkl._mkl_linear``), packed per row count.

It also prints, for the fastest variant, the weights streamed per second (GB/s: what bounds
few-row steps) and the arithmetic rate (GFLOP/s, 2 FLOP per weight per row: what bounds
many-row steps).

    python benchmarks/decode_products.py --size 512x8 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench_vs_trl import SIZES

F = torch.nn.functional


def step_weights(hidden: int, layers: int, intermediate: int, seed: int = 0) -> list[torch.Tensor]:
    """Random fp32 ``[out, in]`` weights of one decode step: fused QKV, output, fused gate/up, down per layer."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(3 * hidden, hidden), (hidden, hidden), (2 * intermediate, hidden), (hidden, intermediate)]
    return [torch.randn(shape, generator=g) * 0.02 for _ in range(layers) for shape in shapes]


def median_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="512x8", choices=sorted(SIZES))
    p.add_argument("--rows", default="1,2,4,8,16,32,64", help="comma-separated row counts")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=30, help="timed steps per variant and row count")
    a = p.parse_args()

    torch.set_num_threads(a.threads)
    hidden, layers, _, intermediate = SIZES[a.size]
    weights = step_weights(hidden, layers, intermediate)
    step_bytes = sum(w.numel() for w in weights) * 4
    print(f"# {a.size}: {len(weights)} products per step, {step_bytes / 2**20:.1f} MiB of weights; "
          f"torch {torch.__version__}, threads={a.threads}, loadavg {open('/proc/loadavg').read().split()[0]}")
    print(f"{'rows':>5} {'onednn ms':>10} {'mkl ms':>8} {'mkl_packed ms':>14}   fastest: GB/s  GFLOP/s")
    with torch.inference_mode():
        onednn = [torch.ops.mkldnn._reorder_linear_weight(w) for w in weights]
        for rows in (int(r) for r in a.rows.split(",")):
            inputs = {w.shape[1]: torch.randn(rows, w.shape[1]) for w in weights}
            mkl_packed = [torch.ops.mkl._mkl_reorder_linear_weight(w, rows) for w in weights]
            variants = {
                "onednn": lambda: [torch.ops.mkldnn._linear_pointwise(inputs[w.shape[1]], pw, None, "none", [], "")
                                   for w, pw in zip(weights, onednn)],
                "mkl": lambda: [F.linear(inputs[w.shape[1]], w) for w in weights],
                "mkl_packed": lambda: [torch.ops.mkl._mkl_linear(inputs[w.shape[1]], pw, w, None, rows)
                                       for w, pw in zip(weights, mkl_packed)],
            }
            reference = variants["mkl"]()
            for name, fn in variants.items():  # same products, up to summation order
                for got, want in zip(fn(), reference):
                    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=f"{name} differs at {rows} rows")
            ms = {name: min(median_ms(fn, a.repeats) for _ in range(2)) for name, fn in variants.items()}
            best = min(ms.values())
            flops = 2 * rows * step_bytes / 4
            print(f"{rows:>5} {ms['onednn']:>10.2f} {ms['mkl']:>8.2f} {ms['mkl_packed']:>14.2f}   "
                  f"{min(ms, key=ms.get):>10} {step_bytes / best / 1e6:>5.1f} {flops / best / 1e6:>8.1f}")


if __name__ == "__main__":
    main()
