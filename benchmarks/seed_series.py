"""Several seeds of one training recipe against the base model: a table with error bars and a figure.

    python benchmarks/seed_series.py --name "level 2" --base base-l2.json \
        --evals l2-seed0.json l2-seed1.json l2-seed2.json \
        --runs runs/series/l2/dapo/seed0 runs/series/l2/dapo/seed1 runs/series/l2/dapo/seed2 \
        --figure docs/smollm2-series-l2.png

Inputs are what the library already writes: ``--base`` and ``--evals`` are ``dapo eval`` JSON
results on the same held-out problems (the base model's, and each trained seed's final policy),
``--runs`` the seeds' run folders (their ``metrics.jsonl`` holds the evaluations during training).

Printed:

- per seed and for the base model: greedy accuracy, avg@k, pass@1..k, mean response length,
  truncated fraction, and the training wall time (``summary.json``) with the sum of its step
  times (``time/step_s``);
- each seed's gain in avg@k over the base model, **paired by problem** (the same problems: per
  problem, the trained accuracy minus the base accuracy), with its standard error and how many
  standard errors it is from zero;
- mean ± std over seeds of greedy accuracy, avg@k and the gain.

The figure: held-out accuracy during training per seed (with the base model's avg@k and pass@k
as lines), response length and truncated fraction per seed, and pass@k before and after.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path


def load_eval(path: str) -> dict:
    data = json.loads(Path(path).read_text())
    data["per_problem"] = [c / data["k"] for c in data["correct_counts"]]
    return data


def paired_gain(trained: dict, base: dict) -> tuple[float, float]:
    """Mean over problems of (trained accuracy − base accuracy), and its standard error."""
    if trained["num_problems"] != base["num_problems"]:
        raise SystemExit(f"{trained['model']} and {base['model']} were evaluated on different problem counts")
    diffs = [t - b for t, b in zip(trained["per_problem"], base["per_problem"])]
    return statistics.fmean(diffs), statistics.stdev(diffs) / math.sqrt(len(diffs))


def wall_seconds(run: str) -> float | None:
    """The run's wall seconds, from its summary.json (None without one)."""
    summary = Path(run) / "summary.json"
    return json.loads(summary.read_text()).get("seconds") if summary.is_file() else None


def run_times(run: str | None) -> tuple[float | None, float | None]:
    """The run's wall seconds (summary.json) and the sum of its logged step times."""
    if run is None:
        return None, None
    from dapo_rl.telemetry.plots import load_series

    series = load_series(run)
    steps = float(series["time/step_s"][1].sum()) if "time/step_s" in series else None
    return wall_seconds(run), steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default="", help="a label for the table and figure (e.g. 'level 2')")
    parser.add_argument("--base", required=True, help="dapo eval JSON of the base model")
    parser.add_argument("--evals", nargs="+", required=True, help="dapo eval JSON of each seed's final policy")
    parser.add_argument("--runs", nargs="*", default=[], help="each seed's run folder, in the same order")
    parser.add_argument("--figure", help="PNG to write")
    a = parser.parse_args()
    if a.runs and len(a.runs) != len(a.evals):
        raise SystemExit("--runs: give one run folder per --evals file, in the same order")
    base = load_eval(a.base)
    seeds = [load_eval(p) for p in a.evals]
    runs = a.runs or [None] * len(seeds)

    ks = sorted(int(k) for k in base["pass_at_k"])
    print(f"{a.name}: {base['num_problems']} held-out problems; base k={base['k']}, trained k={seeds[0]['k']}")
    header = f"{'policy':<34} {'greedy':>7} {'avg@k':>7} " + " ".join(f"{'pass@' + str(k):>8}" for k in ks)
    print(header + f" {'length':>7} {'trunc':>6} {'gain (pts)':>11} {'± SE':>6} {'SEs':>6} {'wall s':>7} {'steps s':>8}")

    def row(label: str, e: dict, gain: tuple[float, float] | None, times: tuple[float | None, float | None]) -> None:
        passes = " ".join(f"{e['pass_at_k'].get(str(k), float('nan')):>8.3f}" for k in ks)
        greedy = e["greedy_accuracy"] if e["greedy_accuracy"] is not None else float("nan")
        g = f"{100 * gain[0]:>+11.1f} {100 * gain[1]:>6.1f} {gain[0] / gain[1]:>6.1f}" if gain else f"{'':>11} {'':>6} {'':>6}"
        t = " ".join(f"{v:>7.0f}" if v is not None else f"{'-':>7}" for v in times)
        print(f"{label:<34} {greedy:>7.3f} {e['avg_at_k']:>7.3f} {passes} {e['response_length_mean']:>7.1f} "
              f"{e['truncated_frac']:>6.3f} {g} {t}")

    row("base", base, None, (None, None))
    gains = []
    for e, run in zip(seeds, runs):
        gain = paired_gain(e, base)
        gains.append(gain)
        row(Path(run).name if run else Path(e["model"]).parent.name, e, gain, run_times(run))

    def pm(values: list[float]) -> str:
        return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.3f}"

    print(f"mean ± std over {len(seeds)} seeds: greedy {pm([e['greedy_accuracy'] for e in seeds])}, "
          f"avg@{seeds[0]['k']} {pm([e['avg_at_k'] for e in seeds])}, "
          f"gain over base avg@{base['k']} {pm([100 * g for g, _ in gains])} points; "
          f"every seed above base by > 2 SE: {'yes' if all(g / se > 2 for g, se in gains) else 'no'}")
    if a.figure:
        plot(a, base, seeds, runs)
        print(a.figure)


def plot(a: argparse.Namespace, base: dict, seeds: list[dict], runs: list[str | None]) -> None:
    from matplotlib.figure import Figure

    from dapo_rl.telemetry.plots import load_series

    fig = Figure(figsize=(16, 4.5), layout="constrained")
    acc, length, passes = fig.subplots(1, 3)
    for i, run in enumerate(runs):
        if run is None:
            continue
        series = load_series(run)
        label = Path(run).name
        if "eval/accuracy" in series:
            acc.plot(*series["eval/accuracy"], marker="o", color=f"C{i}", label=label)
        # Truncation as a fraction of the cap's 48 tokens shares the length axis: both read in tokens.
        for key, style, scale in (("train/response_length_mean", "-", 1), ("train/truncated_frac", ":", 48)):
            if key in series:
                length.plot(series[key][0], series[key][1] * scale, linestyle=style, color=f"C{i}", alpha=0.8,
                            label=f"{label} {'length' if scale == 1 else 'truncated × 48'}")
    acc.axhline(base["avg_at_k"], color="black", linestyle=":", label=f"base avg@{base['k']}")
    acc.axhline(base["pass_at_k"][str(base["k"])], color="grey", linestyle="--", label=f"base pass@{base['k']}")
    acc.set(title=f"{a.name}: held-out accuracy during training", xlabel="step", ylabel="accuracy", ylim=(0, 1))
    length.set(title="responses: mean length (solid), truncated fraction × 48 (dotted)", xlabel="step", ylabel="tokens")
    ks = sorted(int(k) for k in base["pass_at_k"])
    passes.plot(ks, [base["pass_at_k"][str(k)] for k in ks], color="black", marker="s", linestyle=":", label="base")
    for i, e in enumerate(seeds):
        mine = sorted(int(k) for k in e["pass_at_k"])
        passes.plot(mine, [e["pass_at_k"][str(k)] for k in mine], color=f"C{i}", marker="o",
                    label=Path(runs[i]).name if runs[i] else f"seed {i}")
    passes.set_xscale("log", base=2)
    passes.set(title="pass@k on the held-out problems", xlabel="k", ylabel="pass@k", ylim=(0, 1))
    for ax in (acc, length, passes):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.savefig(a.figure, dpi=100)


if __name__ == "__main__":
    main()
