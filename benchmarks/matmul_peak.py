"""This CPU's matrix-multiply rate in fp32 and bf16: the limit the trainer's FLOP/s are compared with.

    python benchmarks/matmul_peak.py                 # 2048² (and the model-shaped products), 1 and 2 threads, fp32
    python benchmarks/matmul_peak.py --dtype bf16    # the same products on bf16 operands
    python benchmarks/matmul_peak.py --dtype fp32,bf16 --threads 2   # both, side by side, in one run
    python benchmarks/matmul_peak.py --square 128 --sizes 64x2 --threads 1 --repeats 1 --block-s 0.01 --dtype fp32,bf16   # smoke run

Prints GFLOP/s as the median over ``--repeats`` timed blocks, each block as many products as fit
in ~``--block-s`` seconds; the best block is printed too (it is the least disturbed by other
processes sharing the machine). Also times products shaped like the benchmark models' layers
(rows = tokens in flight, e.g. 64 decode rows or ~2,000 training tokens) so the gap between
"peak" and "what a small model can get" is visible.

Precision (``--dtype``): ``fp32`` times ``torch.mm`` on float32 operands and output; ``bf16`` on
bfloat16 ones (``a``, ``b`` and ``out`` all bf16, as the fast rollout engine's bf16 weights and
the products under ``model.dtype=bf16-autocast`` run; on a CPU with AMX or AVX512-BF16 oneDNN
computes them natively, elsewhere they are emulated and slower). GFLOP/s counts the same
2·m·k·n FLOP per ``[m, k] @ [k, n]`` product (2·n³ for the n×n square) in either dtype, so the
two rates compare directly. Each line names its dtype; with several dtypes each product's lines
follow one another (dtypes inside thread counts).

Options: ``--square`` (n of the square product, default 2048), ``--sizes`` (model sizes of
bench_vs_trl.py whose hidden → MLP-width products are timed, default 256x4,512x8), ``--threads``
(comma list of torch thread counts), ``--dtype`` (comma list of fp32, bf16; default fp32),
``--repeats`` (timed blocks per product), ``--block-s`` (seconds per block).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench_vs_trl import GROUP_SIZE, PROMPTS_PER_STEP, SIZES

TRAIN_ROWS = 2048  # tokens of a training micro-batch: 64 sequences × ~32 (prompt + response) tokens
DECODE_ROWS = PROMPTS_PER_STEP * GROUP_SIZE  # rows of a decode step while every sample is still generating
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # --dtype names → the operands' dtype


def rate(m: int, k: int, n: int, threads: int, repeats: int, block_s: float,
         dtype: torch.dtype = torch.float32) -> tuple[float, float]:
    """(median, best) GFLOP/s of ``[m, k] @ [k, n]`` products on ``dtype`` operands and output
    (2·m·k·n FLOP each, whatever the dtype)."""
    torch.set_num_threads(threads)
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    out = torch.empty(m, n, dtype=dtype)
    flop = 2.0 * m * k * n
    torch.mm(a, b, out=out)  # warm-up: page in, pick kernels
    t0, count = time.perf_counter(), 0
    while time.perf_counter() - t0 < block_s / 4:
        torch.mm(a, b, out=out)
        count += 1
    per_block = max(1, int(count * 4))
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(per_block):
            torch.mm(a, b, out=out)
        rates.append(flop * per_block / (time.perf_counter() - t0) / 1e9)
    return statistics.median(rates), max(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed blocks per product")
    parser.add_argument("--block-s", type=float, default=1.0, help="seconds per timed block")
    parser.add_argument("--threads", default="1,2", help="comma list of torch thread counts")
    parser.add_argument("--square", type=int, default=2048, help="n of the n×n square product")
    parser.add_argument("--sizes", default="256x4,512x8", help=f"comma list of model sizes from {', '.join(SIZES)}")
    parser.add_argument("--dtype", default="fp32", help=f"comma list of operand dtypes from {', '.join(DTYPES)}")
    a = parser.parse_args()
    dtypes = a.dtype.split(",")
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        parser.error(f"--dtype: unknown {', '.join(unknown)}; choose from {', '.join(DTYPES)}")
    shapes = [(f"{a.square}² square", a.square, a.square, a.square)]
    for size in a.sizes.split(","):
        if size not in SIZES:
            parser.error(f"--sizes: unknown {size}; choose from {', '.join(SIZES)}")
        hidden, _, _, inter = SIZES[size]
        shapes += [(f"{size} train: {TRAIN_ROWS} tok × {hidden} → {inter}", TRAIN_ROWS, hidden, inter),
                   (f"{size} decode: {DECODE_ROWS} rows × {hidden} → {inter}", DECODE_ROWS, hidden, inter)]
    load = open("/proc/loadavg").read().split()[0]
    native = ""
    if "bf16" in dtypes:  # the CPU flags that make oneDNN's bf16 products native rather than emulated
        flags = next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")), [])
        native = f" (native bf16: {','.join(f for f in ('amx_bf16', 'avx512_bf16') if f in flags) or 'none'})"
    print(f"# torch {torch.__version__}, {','.join(dtypes)}{native}, loadavg at start {load}")
    for name, m, k, n in shapes:
        for threads in (int(t) for t in a.threads.split(",")):
            for dtype in dtypes:
                med, best = rate(m, k, n, threads, a.repeats, a.block_s, DTYPES[dtype])
                print(f"{name:40s} {dtype} threads={threads}: median {med:6.1f} GFLOP/s  best {best:6.1f}", flush=True)
    print(f"# loadavg at end {open('/proc/loadavg').read().split()[0]}")


if __name__ == "__main__":
    main()
