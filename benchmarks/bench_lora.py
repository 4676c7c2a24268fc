"""LoRA against full fine-tuning on the same run: peak RSS, s/step, optimiser-state bytes and
held-out accuracy after the same number of steps.

Each run is ``dapo train`` in a process of its own (its peak RSS is that process's ``ru_maxrss``),
full and LoRA alternating, ``--rounds`` times; the optimiser-state bytes are read back from the
run's final checkpoint (the tensors AdamW keeps); held-out accuracy is ``dapo eval`` of the final
policy (the LoRA adapter folder is evaluated as it is, base + adapter).

    python benchmarks/bench_lora.py recipes/smollm2-135m-arithmetic.yaml --steps 4 --rounds 2 \
        --set model.path=/tmp/smol/model data.train=/tmp/smol/train.jsonl \
        --lora model.lora.r=16 model.lora.alpha=32 optim.lr=2e-4 \
        --eval-data /tmp/smol/eval60.jsonl --eval-args k=2 temperature=0.7 max_response_length=48 \
        use_chat_template=true reward=last_number

Prints one JSON line per run, then a table of medians and the LoRA/full ratios.

On a machine whose load changes over minutes, separate runs time the load as much as the
method: ``--interleaved`` builds both trainers in one process and alternates their steps (which
goes first alternates too; each pair from the same seed), printing per-step seconds of the
step, its generation and its update, and their medians.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path


def child(out_dir: str, config: str | None, overrides: list[str]) -> None:
    """One training run in this process; prints its measurements as JSON."""
    import torch

    from dapo_rl.config import load_config
    from dapo_rl.telemetry import read_metrics
    from dapo_rl.training.checkpoint import latest_checkpoint
    from dapo_rl.training.run import run_training

    result = run_training(load_config(config, [*overrides, f"output_dir={out_dir}", "overwrite=true", "logging.progress=false"]))
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    blob = torch.load(latest_checkpoint(Path(out_dir)) / "trainer.pt", weights_only=False)
    state_bytes = sum(t.numel() * t.element_size() for s in blob["optimizer"]["state"].values() for t in s.values()
                      if torch.is_tensor(t) and t.ndim > 0)
    steps = [row["time/step_s"] for row in read_metrics(Path(out_dir) / "metrics.jsonl") if "time/step_s" in row]
    print(json.dumps({"peak_rss_bytes": peak_rss, "optimizer_state_bytes": state_bytes, "step_s": steps,
                      "steps": result.steps, "seconds": result.seconds}))


def interleaved(config: str | None, overrides: list[str], lora: list[str], steps: int) -> None:
    """Both trainers in this process, their steps alternating (which goes first alternates too),
    each pair from the same seed: a machine whose load changes over minutes slows both alike.
    Prints per-step seconds of the whole step, its generation and its update, then medians."""
    import torch

    from dapo_rl.config import load_config
    from dapo_rl.models.loading import resolve_device
    from dapo_rl.training.compose import encoded_prompts, policy_and_tokenizer, reward_function, rollout_engine
    from dapo_rl.training.trainer import Trainer

    trainers = {}
    for kind in ("full", "lora"):
        cfg = load_config(config, [*overrides, *(lora if kind == "lora" else []), f"steps={steps}", "logging.progress=false"])
        device, autocast = resolve_device(cfg.model.device, cfg.model.dtype)
        model, tok = policy_and_tokenizer(cfg)  # as `dapo train` loads it (adapters, gradient checkpointing)
        model.to(device)
        trainers[kind] = Trainer(cfg, model, tok, encoded_prompts(cfg, "train", tok), None, reward_function(cfg), rollout_engine(cfg, model, tok),
                                 device=device, autocast_dtype=autocast)
    rows = {"full": [], "lora": []}
    for step in range(steps):
        for kind in (("full", "lora") if step % 2 == 0 else ("lora", "full")):
            torch.manual_seed(1000 + step)
            m = trainers[kind].train_step()
            row = {"kind": kind, "step": step + 1, "step_s": m["time/step_s"], "generation_s": m["time/generation_s"],
                   "update_s": m["time/update_s"], "response_length_mean": m["train/response_length_mean"],
                   "samples": m["train/samples_generated"]}
            rows[kind].append(row)
            print(json.dumps(row), flush=True)
    for key in ("step_s", "generation_s", "update_s"):
        full, lora_ = (statistics.median(r[key] for r in rows[k]) for k in ("full", "lora"))
        print(f"median {key}: full {full:.2f} s, lora {lora_:.2f} s, lora/full {lora_ / full:.3f}")


def run(kind: str, index: int, args: argparse.Namespace) -> dict:
    out = Path(args.out) / f"{kind}-{index}"
    overrides = [*args.set, *(args.lora if kind == "lora" else [])]
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(out), *([args.config] if args.config else []),
               "--set", *overrides, f"steps={args.steps}"]
    proc = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    if proc.returncode != 0:
        sys.exit(f"{kind} run {index} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    row.update(kind=kind, round=index)
    if args.eval_data:
        result = out / "eval.json"
        ev = subprocess.run([sys.executable, "-m", "dapo_rl.cli", "eval", str(out / "final"), args.eval_data, *args.eval_args,
                             f"output={result}", "overwrite=true", "progress=false"], capture_output=True, text=True)
        if ev.returncode != 0:
            sys.exit(f"eval of {out / 'final'} failed:\n{ev.stderr[-3000:]}")
        row["eval_avg_at_k"] = json.loads(result.read_text())["avg_at_k"]
    # Step 1 also pays one-time work (kernel builds, first allocations): reported, not in the mean.
    row["step_s_mean_after_first"] = statistics.mean(row["step_s"][1:]) if len(row["step_s"]) > 1 else row["step_s"][0]
    print(json.dumps(row), flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", nargs="?", help="run config (YAML); default: the built-in quickstart")
    parser.add_argument("--set", nargs="*", default=[], help="key=value overrides of both runs")
    parser.add_argument("--lora", nargs="*", default=["model.lora.r=16", "model.lora.alpha=32"], help="overrides of the LoRA run")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=1, help="full, LoRA alternations")
    parser.add_argument("--eval-data", help="held-out dataset for `dapo eval` of each final policy (none: skip)")
    parser.add_argument("--eval-args", nargs="*", default=[], help="key=value options of that `dapo eval`")
    parser.add_argument("--out", default="runs/bench-lora")
    parser.add_argument("--interleaved", action="store_true",
                        help="time only: both trainers in one process, steps alternating (no RSS, no evaluation)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.config, args.set)
        return 0
    if args.interleaved:
        interleaved(args.config, args.set, args.lora, args.steps)
        return 0
    rows = [run(kind, i, args) for i in range(args.rounds) for kind in ("full", "lora")]
    keys = ["peak_rss_bytes", "optimizer_state_bytes", "step_s_mean_after_first"] + (["eval_avg_at_k"] if args.eval_data else [])
    medians = {kind: {k: statistics.median(r[k] for r in rows if r["kind"] == kind) for k in keys} for kind in ("full", "lora")}
    print(f"\n{'':6}" + "".join(f"{k:>26}" for k in keys))
    for kind in ("full", "lora"):
        print(f"{kind:6}" + "".join(f"{medians[kind][k]:>26.4g}" for k in keys))
    ratios = {k: medians["lora"][k] / medians["full"][k] if medians["full"][k] else float("nan") for k in keys}
    print("lora/full " + " ".join(f"{k}={v:.3f}" for k, v in ratios.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
