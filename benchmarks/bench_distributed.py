"""DDP vs FSDP2 under torchrun: seconds per step and what each rank holds in memory.

For each strategy the script launches ``torchrun --nproc_per_node N`` on itself; every rank
builds the same randomly initialised Llama (``--size`` hidden×layers), trains the built-in chain
task for ``--steps`` steps with the DAPO defaults, and reports:

- s/step (median over the measured steps, after ``--warmup``), as rank 0 sees it;
- the bytes of parameters + gradients + AdamW moments held by the rank (exact, from the local
  tensors: sharded ones count their local shard only);
- the rank's peak resident memory (``VmHWM``), which also counts the interpreter, libraries,
  activations and the parameters gathered for generation.

    python benchmarks/bench_distributed.py --size 512x8 --nproc 2 --steps 3
    python benchmarks/bench_distributed.py --device cuda --nproc 8 --size 2048x16   # on a GPU node
    python benchmarks/bench_distributed.py --size 64x2 --steps 1 --warmup 0 --prompts 2   # smoke run

Options: ``--size`` (hidden x layers, any; heads = hidden / 64, at least 1), ``--nproc`` (ranks),
``--strategies`` (comma list of ddp, fsdp2), ``--steps`` / ``--warmup`` (measured / unmeasured
steps), ``--prompts`` (prompts per step, 8 samples each), ``--threads`` (torch threads per rank),
``--device``.

On a CUDA machine ``--device cuda`` uses NCCL and reports ``torch.cuda.max_memory_allocated``
per rank instead of the resident set.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from bench_vs_trl import proc_status_kib


def _peak_rss_mib() -> float:
    return proc_status_kib("VmHWM").get("VmHWM", float("nan")) / 1024


def worker(a) -> None:
    import torch

    from dapo_rl.config import load_config
    from dapo_rl.data.encoding import encode_prompts
    from dapo_rl.data.synthetic import VOCAB, builtin_splits
    from dapo_rl.models.tiny import build_char_tokenizer, build_tiny_llama
    from dapo_rl.rewards import resolve_reward_fn
    from dapo_rl.training.distributed import init_distributed, shutdown_distributed
    from dapo_rl.training.compose import rollout_engine, training_autocast, training_device
    from dapo_rl.training.trainer import Trainer

    torch.set_num_threads(a.threads)
    hidden, layers = (int(x) for x in a.size.split("x"))
    config = load_config(overrides=[
        f"steps={a.steps + a.warmup}", f"prompts_per_step={a.prompts}", "group_size=8", f"mini_batch_size={a.prompts}",
        f"micro_batch_size={a.prompts * 8}", "rollout.max_response_length=32", "overlong.cache_length=8",
        "dynamic_sampling.enabled=false", f"model.device={a.device}", f"distributed.strategy={a.strategy}", "data.eval=null",
    ])
    ctx = init_distributed(config.model.device, config.distributed.strategy)
    torch.manual_seed(ctx.rank)
    device = training_device(config, ctx.local_rank)
    tokenizer = build_char_tokenizer(VOCAB)
    model = build_tiny_llama(tokenizer, hidden_size=hidden, num_layers=layers, num_heads=max(1, hidden // 64),
                             intermediate_size=hidden * 8 // 3, max_positions=128, seed=0).to(device)
    autocast = training_autocast(config, model, device, ctx).autocast_dtype
    train, _ = builtin_splits(a.prompts * (a.steps + a.warmup), 8)
    prompts, _ = encode_prompts(train, tokenizer)
    # A random model is never right on the chain task: reward the share of digits instead, so that
    # groups have spread and every step trains.
    reward = resolve_reward_fn(lambda response, truth, meta: sum(c.isdigit() for c in response) / max(1, len(response)))
    trainer = Trainer(config, model, tokenizer, prompts, None, reward, rollout_engine(config, model, tokenizer),
                      device=device, autocast_dtype=autocast, dist=ctx)
    times = []
    for step in range(a.steps + a.warmup):
        t0 = time.perf_counter()
        trainer.train_step()
        if step >= a.warmup:
            times.append(time.perf_counter() - t0)

    def local_bytes(t) -> int:
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    params = list(model.parameters())
    held = sum(local_bytes(p) for p in params)
    held += sum(local_bytes(p) for p in params)  # gradients (freed between steps; same size as parameters)
    held += sum(local_bytes(v) for s in trainer.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else _peak_rss_mib()
    rows = ctx.all_gather_objects({"rank": ctx.rank, "state_mib": held / 2**20, "peak_mib": peak, "s_step": statistics.median(times)})
    if ctx.is_main:
        print(json.dumps({"params": sum(p.numel() for p in params), "ranks": rows}))
    shutdown_distributed()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="512x8", help="hidden x layers of the random Llama")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--strategies", default="ddp,fsdp2")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step (8 samples each)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU per rank)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.worker:
        worker(a)
        return
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}  size {a.size}  nproc {a.nproc}  device {a.device}  "
          f"threads/rank {a.threads}  loadavg {os.getloadavg()[0]:.2f}")
    for strategy in a.strategies.split(","):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(a.nproc), "--master_port", str(29500 + os.getpid() % 1000),
               __file__, "--worker", "--strategy", strategy, "--size", a.size, "--steps", str(a.steps), "--warmup", str(a.warmup),
               "--prompts", str(a.prompts), "--threads", str(a.threads), "--device", a.device]
        env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tempfile.gettempdir())
        if proc.returncode != 0:
            raise SystemExit(f"{strategy}: torchrun failed:\n{proc.stderr[-3000:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        ranks = result["ranks"]
        print(f"{strategy:6s} {result['params'] / 1e6:6.1f} M params  {ranks[0]['s_step']:6.2f} s/step  "
              f"params+grads+Adam per rank {max(r['state_mib'] for r in ranks):7.2f} MiB  "
              f"peak per rank {max(r['peak_mib'] for r in ranks):7.0f} MiB  loadavg {os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
    main()
