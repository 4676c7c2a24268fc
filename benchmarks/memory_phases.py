"""Where a `dapo train` run's memory goes, phase by phase: peak RSS (anonymous and file-backed
pages) and the C heap's live and held bytes during each update and between updates.

A thread samples ``/proc/self/status`` (VmRSS, RssAnon, RssFile) and, on glibc, ``mallinfo2``
(live = bytes in use in the main heap plus mmapped blocks; heap = the main heap's size, live or
freed but kept) every ``--interval-ms``. Phases are cut at the start and end of each
``Trainer.update``: "update" is the policy update, "rest" everything between two updates (sampling,
scoring, the weight push and its check, checkpoints). RSS above the live bytes is freed memory
the allocator keeps (fragmentation, or ``keep_freed_host_memory``) or file-backed pages (the
weights of a model loaded from safetensors stay mapped until written).

    python benchmarks/memory_phases.py recipes/smollm2-135m-arithmetic.yaml --set model.path=/tmp/smol/model \
        data.train=/tmp/smol/train.jsonl data.eval=null steps=2 dynamic_sampling.enabled=false \
        [model.lora.r=16 model.lora.alpha=32 model.gradient_checkpointing=true]

Prints one line per phase, then the process's peak RSS (``ru_maxrss``). Samples every few
milliseconds, so a peak shorter than the interval can be missed (``ru_maxrss`` is not).
"""

from __future__ import annotations

import argparse
import ctypes
import resource
import sys
import tempfile
import threading
import time

from bench_vs_trl import proc_status_kib


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def heap_reader():
    """A function giving ``(live, heap)`` bytes of glibc's allocator, or None off glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallinfo2 = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _MallInfo2

    def read() -> tuple[int, int]:
        info = mallinfo2()
        return info.uordblks + info.hblkhd, info.arena

    return read


def rss() -> tuple[int, int, int]:
    """``(VmRSS, RssAnon, RssFile)`` of this process, bytes."""
    fields = proc_status_kib("VmRSS", "RssAnon", "RssFile")
    return tuple(fields.get(key, 0) * 1024 for key in ("VmRSS", "RssAnon", "RssFile"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", nargs="?", help="run config (YAML); default: the built-in quickstart")
    parser.add_argument("--set", nargs="*", default=[], help="key=value overrides")
    parser.add_argument("--interval-ms", type=float, default=5.0)
    args = parser.parse_args(argv)

    from dapo_rl.config import load_config
    from dapo_rl.training import trainer as trainer_module
    from dapo_rl.training.run import run_training

    heap = heap_reader()
    samples: list[tuple[float, tuple[int, int, int], tuple[int, int]]] = []
    cuts: list[tuple[str, float]] = [("rest", time.perf_counter())]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append((time.perf_counter(), rss(), heap() if heap else (0, 0)))
            stop.wait(args.interval_ms / 1000)

    update = trainer_module.Trainer.update

    def timed_update(self, groups):
        cuts.append(("update", time.perf_counter()))
        try:
            return update(self, groups)
        finally:
            cuts.append(("rest", time.perf_counter()))

    trainer_module.Trainer.update = timed_update
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    with tempfile.TemporaryDirectory() as out:
        config = load_config(args.config, [*args.set, f"output_dir={out}", "overwrite=true", "logging.progress=false"])
        run_training(config)
    stop.set()
    sampler.join()
    cuts.append(("end", time.perf_counter()))

    mib = 1 << 20
    print(f"{'phase':8}{'seconds':>9}{'peak RSS MiB':>14}{'anon':>8}{'file':>8}{'max live':>10}{'max heap':>10}")
    for (name, start), (_, end) in zip(cuts, cuts[1:]):
        window = [(r, h) for t, r, h in samples if start <= t <= end]
        if not window:
            continue
        top = max(window, key=lambda item: item[0][0])[0]
        live = max(h[0] for _, h in window) if heap else 0
        held = max(h[1] for _, h in window) if heap else 0
        print(f"{name:8}{end - start:>9.2f}{top[0] / mib:>14.0f}{top[1] / mib:>8.0f}{top[2] / mib:>8.0f}"
              f"{live / mib:>10.0f}{held / mib:>10.0f}")
    print(f"ru_maxrss {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MiB"
          + ("" if heap else " (no glibc: heap columns are 0)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
