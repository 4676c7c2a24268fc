"""Several training methods, several seeds each, on one recipe: a table against a reference method and a figure.

    python benchmarks/method_study.py --target-step 30 --figure docs/smollm2-methods-l2.png \
        --method DAPO      --runs runs/series/l2-dapo-rerun/dapo/seed0 --evals runs/series/l2-dapo-seed0.json \
        --method "naive GRPO" --runs runs/series/l2-grpo/grpo/seed{0,1,2} --evals runs/series/l2-grpo-seed{0,1,2}.json

The first ``--method`` is the reference. Each method's ``--runs`` are its seeds' run folders
(``metrics.jsonl``, ``summary.json``) and ``--evals`` the ``dapo eval`` JSON of each seed's final
policy on the same held-out problems, in the same seed order. Seed *i* of one method is paired
with seed *i* of the reference.

Printed, per method:

- greedy accuracy and avg@k of the final policies, mean ± std over seeds;
- its avg@k minus the reference's, **paired by seed**: the mean difference, its standard error
  (std of the per-seed differences / √seeds) and how many standard errors it is from zero; and
  for each seed, the same difference **paired by problem** with its own standard error;
- steps to reach the reference's mean held-out accuracy at ``--target-step`` (the first logged
  evaluation at or above it; ``-`` if never), per seed;
- the policy's entropy, response length and truncated fraction over the last ``--tail`` steps
  (mean ± std over seeds) and the entropy's ratio to the reference's;
- wall time (``summary.json``), mean over seeds;
- what a step costs: the median over every step of every seed of the step's seconds, the
  rollout's generated tokens/s, the update's and the π_old pass's seconds, and each as a ratio to
  the reference's (medians, so that a step slowed by other work on the machine moves them little);
- the sampler/trainer mismatch, where logged (``rollout/*``, see docs/metrics.md): mean
  |Δlog p|, k3 KL, the effective sample size fraction and the fraction of tokens the correction
  masked, each the mean over every step of every seed, and the same over the first and the last
  ``--tail`` steps (does the gap grow as training moves?).

The figure: held-out accuracy, entropy, mean response length and truncated fraction against
the step; a thick line per method (the mean over its seeds; for the training statistics, a trailing
mean over 5 steps as well) over thin per-seed lines. When any method logged the mismatch, a
second row plots it the same way.
"""

from __future__ import annotations

import argparse
import math
import statistics
from dataclasses import dataclass, field

import numpy as np

from dapo_rl.telemetry.plots import load_series
from seed_series import load_eval, paired_gain, wall_seconds  # a sibling script (python puts benchmarks/ on the path)

CURVES = (("eval/accuracy", "held-out accuracy (avg@1)"), ("train/entropy", "policy entropy (nats/token)"),
          ("train/response_length_mean", "mean response length (tokens)"),
          ("train/truncated_frac", "truncated fraction"))
MISMATCH = (("rollout/logp_abs_diff", "|Δlog p|", "mean |Δlog p|, sampler vs trainer"),
            ("rollout/kl", "k3 KL", "k3 KL(π_rollout ‖ π_old) per token"),
            ("rollout/ess_frac", "ESS", "ESS fraction of the IS weights"),
            ("rollout/masked_frac", "masked", "fraction of tokens the correction masked"))
COST = (("time/step_s", "s/step"), ("perf/generation_tokens_per_s", "rollout tok/s"), ("time/update_s", "update s"),
        ("time/old_logprob_s", "π_old s"))
SMOOTH = 5  # steps in the trailing mean of the thick training-statistic lines


@dataclass
class Method:
    label: str
    runs: list[str]
    evals: list[dict] = field(default_factory=list)
    series: list[dict] = field(default_factory=list)


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def tail_mean(series: dict, key: str, tail: int) -> float:
    if key not in series:
        return float("nan")
    return float(series[key][1][-tail:].mean())


def pooled(m: Method, key: str) -> np.ndarray:
    """``key``'s values at every step of every seed of ``m`` (empty where none logged it)."""
    parts = [s[key][1] for s in m.series if key in s]
    return np.concatenate(parts) if parts else np.array([])


def cost_line(m: Method, ref: Method) -> str:
    """Per-step medians over every seed's steps, each with its ratio to the reference's."""
    parts = []
    for key, label in COST:
        mine, theirs = pooled(m, key), pooled(ref, key)
        if not len(mine):
            continue
        text = f"{label} {np.median(mine):.3g}"
        if m is not ref and len(theirs) and np.median(theirs) > 0:
            text += f" (× {np.median(mine) / np.median(theirs):.2f})"
        parts.append(text)
    return "   ".join(parts)


def mismatch_line(m: Method, tail: int) -> str | None:
    """Each mismatch metric's mean over the run, and over the first / last ``tail`` steps (seeds pooled)."""
    parts = []
    for key, short, _ in MISMATCH:
        runs = [s[key][1] for s in m.series if key in s]
        if not runs:
            continue
        first = np.concatenate([r[:tail] for r in runs]).mean()
        last = np.concatenate([r[-tail:] for r in runs]).mean()
        parts.append(f"{short} {np.concatenate(runs).mean():.3g} ({first:.3g} → {last:.3g})")
    return "   ".join(parts) if parts else None


def steps_to(series: dict, target: float) -> int | None:
    """The first logged held-out evaluation's step at which accuracy reaches ``target``."""
    if "eval/accuracy" not in series:
        return None
    for step, value in zip(*series["eval/accuracy"]):
        if value >= target - 1e-9:
            return int(step)
    return None


def accuracy_at(series: dict, step: int) -> float:
    steps, values = series["eval/accuracy"]
    hits = np.nonzero(steps == step)[0]
    if not len(hits):
        raise SystemExit(f"--target-step {step}: a reference run has no held-out evaluation at that step "
                         f"(it has {steps.tolist()})")
    return float(values[hits[0]])


def report(methods: list[Method], target_step: int, tail: int) -> None:
    ref = methods[0]
    target = statistics.fmean(accuracy_at(s, target_step) for s in ref.series)
    ref_entropy = statistics.fmean(tail_mean(s, "train/entropy", tail) for s in ref.series)
    k = ref.evals[0]["k"]
    print(f"reference: {ref.label}; its mean held-out accuracy at step {target_step}: {target:.3f}; "
          f"last {tail} steps for entropy, length, truncation")
    for m in methods:
        greedy = mean_std([e["greedy_accuracy"] for e in m.evals])
        avg = mean_std([e["avg_at_k"] for e in m.evals])
        entropy = mean_std([tail_mean(s, "train/entropy", tail) for s in m.series])
        length = mean_std([tail_mean(s, "train/response_length_mean", tail) for s in m.series])
        trunc = mean_std([tail_mean(s, "train/truncated_frac", tail) for s in m.series])
        walls = [w for w in map(wall_seconds, m.runs) if w is not None]
        reach = [steps_to(s, target) for s in m.series]
        print(f"\n{m.label} ({len(m.runs)} seeds)")
        print(f"  greedy {greedy[0]:.3f} ± {greedy[1]:.3f}   avg@{k} {avg[0]:.3f} ± {avg[1]:.3f}   "
              f"per seed avg@{k}: {' / '.join(format(e['avg_at_k'], '.3f') for e in m.evals)}")
        print(f"  steps to {target:.3f} held-out: {' / '.join('-' if r is None else str(r) for r in reach)}")
        print(f"  entropy {entropy[0]:.3f} ± {entropy[1]:.3f} (× {entropy[0] / ref_entropy:.2f} the reference's)   "
              f"length {length[0]:.1f} ± {length[1]:.1f}   truncated {trunc[0]:.3f} ± {trunc[1]:.3f}")
        if walls:
            print(f"  wall time {statistics.fmean(walls) / 60:.1f} min (mean of {len(walls)}: "
                  f"{' / '.join(f'{w / 60:.1f}' for w in walls)})")
        costs = cost_line(m, ref)
        if costs:
            print(f"  per step, median: {costs}")
        mismatch = mismatch_line(m, tail)
        if mismatch:
            print(f"  mismatch, mean over the run (first {tail} → last {tail} steps): {mismatch}")
        if m is ref:
            continue
        pairs = list(zip(m.evals, ref.evals))
        diffs = [100 * (a["avg_at_k"] - b["avg_at_k"]) for a, b in pairs]
        if len(diffs) > 1:
            d, sd = mean_std(diffs)
            se = sd / math.sqrt(len(diffs))
            print(f"  − {ref.label}, paired by seed ({len(diffs)}): {d:+.1f} points, SE {se:.1f}, "
                  f"{d / se if se else float('inf'):+.1f} SE")
        for i, (a, b) in enumerate(pairs):
            d, se = paired_gain(a, b)
            print(f"  seed {i}, paired by problem: {100 * d:+.1f} ± {100 * se:.1f} points ({d / se if se else 0:+.1f} SE)")


def plot(methods: list[Method], path: str) -> None:
    from matplotlib.figure import Figure

    panels = list(CURVES)
    if any(key in s for m in methods for s in m.series for key, _, _ in MISMATCH):
        panels += [(key, title) for key, _, title in MISMATCH]
    rows = len(panels) // len(CURVES)
    fig = Figure(figsize=(18, 4.5 * rows), layout="constrained")
    axes = fig.subplots(rows, len(CURVES)).reshape(-1)
    for i, m in enumerate(methods):
        for ax, (key, title) in zip(axes, panels):
            curves = [s[key] for s in m.series if key in s]
            for steps, values in curves:
                ax.plot(steps, values, color=f"C{i}", alpha=0.25, linewidth=0.8)
            # The mean over seeds where every seed logged the step (evaluations share their steps).
            common = sorted(set.intersection(*(set(steps.tolist()) for steps, _ in curves))) if curves else []
            if common:
                mean = np.array([statistics.fmean(float(v[np.nonzero(s == t)[0][0]]) for s, v in curves) for t in common])
                if not key.startswith("eval/") and len(mean) >= SMOOTH:
                    # Per-step training statistics of 32 samples are noisy: the thick line is a trailing mean.
                    mean = np.convolve(mean, np.ones(SMOOTH) / SMOOTH, mode="valid")
                    common = common[SMOOTH - 1:]
                marker = "o" if key == "eval/accuracy" else None
                ax.plot(common, mean, color=f"C{i}", linewidth=2, marker=marker, label=f"{m.label} ({len(curves)} seeds)")
            ax.set(title=title, xlabel="step")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", action="append", required=True, help="a method's label (the first is the reference)")
    parser.add_argument("--runs", action="append", nargs="+", required=True, help="its seeds' run folders")
    parser.add_argument("--evals", action="append", nargs="+", required=True, help="dapo eval JSON per seed, same order")
    parser.add_argument("--target-step", type=int, default=30, help="steps-to-target uses the reference's accuracy here")
    parser.add_argument("--tail", type=int, default=5, help="steps averaged for the final entropy, length, truncation")
    parser.add_argument("--figure", help="PNG to write")
    a = parser.parse_args()
    if not len(a.method) == len(a.runs) == len(a.evals):
        raise SystemExit("give --runs and --evals once after each --method")
    methods = []
    for label, runs, evals in zip(a.method, a.runs, a.evals):
        if len(runs) != len(evals):
            raise SystemExit(f"{label}: {len(runs)} run folders but {len(evals)} eval files; give one of each per seed")
        methods.append(Method(label, runs, [load_eval(e) for e in evals], [load_series(r) for r in runs]))
    report(methods, a.target_step, a.tail)
    if a.figure:
        plot(methods, a.figure)
        print(f"\n{a.figure}")


if __name__ == "__main__":
    main()
