"""The ``dapo`` command line.

    dapo train [CONFIG.yaml] [key=value ...]    train (no arguments: the built-in quickstart)
    dapo eval MODEL DATA [key=value ...]        avg@k / pass@k of a model folder on a dataset
    dapo plot RUN_DIR [RUN_DIR ...] [-o OUT]    PNG figures overlaying runs

Bad input ends with one line on stderr naming the key (or file and row) and the fix, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2


def _split_config_args(args: list[str]) -> tuple[str | None, list[str]]:
    config_path = None
    overrides = []
    for arg in args:
        if "=" not in arg and config_path is None and arg.endswith((".yaml", ".yml")):
            config_path = arg
        else:
            overrides.append(arg)
    return config_path, overrides


def cmd_train(args: argparse.Namespace) -> int:
    from dapo_rl.config import load_config
    from dapo_rl.training.run import run_training

    config_path, overrides = _split_config_args(args.args)
    config = load_config(config_path, overrides)
    result = run_training(config)
    print(json.dumps({"run_dir": str(result.run_dir), "accuracy_before": result.accuracy_before,
                      "accuracy_after": result.accuracy_after, "steps": result.steps,
                      "seconds": round(result.seconds, 1)}))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from dapo_rl.evaluation.cli import run_eval

    return run_eval(args.model, args.data, args.overrides)


def cmd_plot(args: argparse.Namespace) -> int:
    from dapo_rl.telemetry import plot_runs, summary_table

    runs = [Path(r) for r in args.run_dirs]
    for run in runs:
        if not (run / "metrics.jsonl").is_file():
            raise FileNotFoundError(f"{run}: no metrics.jsonl; pass a run folder written by `dapo train`")
    out = Path(args.out) if args.out else runs[0] / "plots"
    written = plot_runs(runs, out, smooth=args.smooth)
    print(summary_table(runs))
    for path in written:
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dapo", description="DAPO / GRPO-family RL from verifiable rewards.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a policy (no arguments: the built-in quickstart)")
    train.add_argument("args", nargs="*", help="optional CONFIG.yaml, then key=value overrides")
    train.set_defaults(func=cmd_train)
    ev = sub.add_parser("eval", help="evaluate a model folder on a dataset")
    ev.add_argument("model", help="local Hugging Face model folder (or builtin:chain-tiny)")
    ev.add_argument("data", help="dataset path (JSONL, Parquet, HF folder) or builtin:chain")
    ev.add_argument("overrides", nargs="*", help="key=value options (see `dapo eval --help`)")
    ev.set_defaults(func=cmd_eval)
    plot = sub.add_parser("plot", help="plot metrics of one or more runs")
    plot.add_argument("run_dirs", nargs="+")
    plot.add_argument("-o", "--out", help="output folder (default: RUN_DIR/plots)")
    plot.add_argument("--smooth", type=float, default=0.0, help="EMA smoothing in [0, 1)")
    plot.set_defaults(func=cmd_plot)
    return parser


def main(argv: list[str] | None = None) -> int:
    from dapo_rl.config import ConfigError
    from dapo_rl.data import DatasetError
    from dapo_rl.training.run import RunError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DatasetError, RunError, FileNotFoundError) as exc:
        print(f"dapo {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"dapo {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
