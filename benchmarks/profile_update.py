"""Time and profile the trainer's policy update alone on the benchmark's work (8 prompts × 8 samples).

    python benchmarks/profile_update.py --size 256x4 --repeats 15          # timing, trained tokens/s, GFLOP/s
    python benchmarks/profile_update.py --size 512x8 --arch gemma2          # another model family
    python benchmarks/profile_update.py --size 256x4 --profile torch        # + torch.profiler op table
    python benchmarks/profile_update.py --size 64x2 --repeats 2             # smoke run

The trainer is bench_vs_trl.py's (same model, prompts, DAPO settings and seed). It runs
``--steps`` whole steps first (so the batch is a trained policy's), collects one more step's groups,
then times ``Trainer.update`` on those same groups again and again: fixed work, so a change to
the forward, backward or optimiser step shows in the time alone (the weights move each update,
the batch does not). Each update is treated as on-policy (the groups' policy version is reset),
as in a real step. To compare two versions of the library, run the script with
``PYTHONPATH=<other checkout>/src``.

Options: ``--size`` (a key of ``bench_vs_trl.SIZES``), ``--arch`` (a family of
``bench_vs_trl.ARCHS``), ``--steps`` (steps before the timed updates), ``--repeats`` (timed
updates; the median is printed), ``--threads``, ``--seed``, ``--profile`` (none | torch | cprofile:
profile one more update).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from bench_vs_trl import ARCHS, SIZES, build_trainer, load_average, prepare, print_profile, timed_runs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="256x4", choices=sorted(SIZES))
    p.add_argument("--arch", default="llama", choices=ARCHS, help="model family (see bench_vs_trl.build_model)")
    p.add_argument("--steps", type=int, default=2, help="whole steps before the timed updates")
    p.add_argument("--repeats", type=int, default=15, help="timed updates (median printed)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", choices=["none", "torch", "cprofile"], default="none", help="profile one more update")
    a = p.parse_args()

    from dapo_rl.reproducibility import reproducible_torch

    folder = prepare(Path(tempfile.mkdtemp(prefix="profile-update-")), a.size, a.steps + 1, a.seed, a.arch)
    trainer = build_trainer(folder, a.steps + 1, a.seed, a.threads)
    params_count = sum(q.numel() for q in trainer.model.parameters())
    with reproducible_torch(True, torch.device("cpu")):  # as `dapo train` runs it (default true)
        for _ in range(a.steps):
            trainer.train_step()
        groups, _ = trainer.rollouts.collect(a.steps, policy_version=trainer.policy_version)

        def once() -> tuple[float, dict[str, float]]:
            for group in groups:  # on-policy, as in a step: no π_old pass, no correction
                group.policy_version = trainer.policy_version
            t0 = time.perf_counter()
            metrics = trainer.update(groups)
            return time.perf_counter() - t0, metrics

        runs, secs = timed_runs(once, a.repeats)
        tokens = runs[0][1]["perf/train_tokens_per_s"] * runs[0][1]["time/update_s"]  # tokens run forward and backward
        print(f"{a.arch} {a.size} ({params_count / 1e6:.2f} M): update of {round(tokens)} response tokens in "
              f"{secs * 1000:.1f} ms (median of {a.repeats}, min {min(r[0] for r in runs) * 1000:.1f}) = "
              f"{tokens / secs:.0f} tok/s = {6 * params_count * tokens / secs / 1e9:.1f} GFLOP/s; load {load_average()}")

        print_profile(once, a.profile, shapes=True)


if __name__ == "__main__":
    main()
