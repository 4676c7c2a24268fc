"""What a built-in chain task gives RL to work on: its start policy's groups, lengths and truncation.

    python benchmarks/chain_task_properties.py                        # builtin:chain-long, the ablation's task
    python benchmarks/chain_task_properties.py --task chain --cap 12  # the quickstart task at the old ladder's cap
    python benchmarks/chain_task_properties.py --prompts 16 --group 4 --warmup-steps 20   # smoke run (seconds)

The built-in model of the task (``builtin:<task>-tiny``, warm-up seed 0, the policy every rung of
``dapo ablate`` starts from) samples ``--group`` responses to each of ``--prompts`` training
problems at temperature 1 with a ``--cap``-token limit, as a naive-GRPO step would. Printed:

- per number of digits: accuracy, truncated fraction (over the cap, scored wrong) and mean length;
- the groups: all correct, mixed (informative) or all wrong. A uniform group has zero advantage
  under GRPO: it trains nothing but still counts in the loss normaliser, which is what dynamic
  sampling removes;
- the spread of response lengths, which decides how much token-level and sequence-level loss
  aggregation differ.

Options: ``--task`` (chain | chain-long), ``--cap``, ``--prompts``, ``--group``, ``--seed`` (torch
sampling seed), ``--threads``, ``--warmup-steps`` (default: the task's own), ``--cache`` (model
cache folder; default ~/.cache/dapo-rl).
"""

from __future__ import annotations

import argparse
import statistics
from collections import Counter, defaultdict

import torch

from dapo_rl.data.synthetic import CHAIN_TASKS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="chain-long", choices=list(CHAIN_TASKS))
    parser.add_argument("--cap", type=int, default=16, help="max response tokens (the ablation's 16)")
    parser.add_argument("--prompts", type=int, default=512)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--warmup-steps", type=int, default=None)
    parser.add_argument("--cache", default=None)
    a = parser.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    from dapo_rl.config import Config, QuickstartConfig
    from dapo_rl.data.encoding import encode_prompts
    from dapo_rl.data.synthetic import builtin_splits
    from dapo_rl.models.loading import load_policy
    from dapo_rl.rewards.chain import chain_reward
    from dapo_rl.rollout.base import SamplingParams
    from dapo_rl.rollout.engines import build_engine

    task = CHAIN_TASKS[a.task]
    quickstart = QuickstartConfig(warmup_steps=a.warmup_steps, cache_dir=a.cache)
    model, tokenizer = load_policy(f"builtin:{task.name}-tiny", quickstart=quickstart, seed=0, progress=False)
    train, _ = builtin_splits(a.prompts, 8, task=task)
    prompts, _ = encode_prompts(train, tokenizer)
    engine = build_engine(Config(), model, tokenizer)  # the default engine, fast
    torch.manual_seed(a.seed)
    groups = engine.generate([list(p.ids) for p in prompts], a.group, SamplingParams(temperature=1.0, max_new_tokens=a.cap))

    per_terms: dict[int, list[tuple[bool, bool, int]]] = defaultdict(list)  # (correct, truncated, length)
    kinds: Counter[str] = Counter()
    for example, group in zip(train, groups):
        correct = 0
        for sample in group:
            truncated = sample.finish_reason != "stop"
            ok = not truncated and chain_reward(tokenizer.decode(sample.response_ids, skip_special_tokens=True), example.answer, {})
            correct += ok
            per_terms[len(example.metadata["digits"])].append((ok, truncated, len(sample.response_ids)))
        kinds["all correct" if correct == a.group else "all wrong" if correct == 0 else "mixed"] += 1

    print(f"builtin:{task.name}: {task.min_terms}-{task.max_terms} digits, start policy builtin:{task.name}-tiny, "
          f"{len(prompts)} prompts x {a.group} samples, T=1, cap {a.cap} tokens")
    print(f"{'digits':>6} {'samples':>8} {'accuracy':>9} {'truncated':>10} {'mean length':>12}")
    rows = [row for terms in sorted(per_terms) for row in per_terms[terms]]
    for terms in sorted(per_terms):
        r = per_terms[terms]
        print(f"{terms:>6} {len(r):>8} {statistics.fmean(x[0] for x in r):>9.3f} {statistics.fmean(x[1] for x in r):>10.3f} "
              f"{statistics.fmean(x[2] for x in r):>12.1f}")
    print(f"{'all':>6} {len(rows):>8} {statistics.fmean(x[0] for x in rows):>9.3f} {statistics.fmean(x[1] for x in rows):>10.3f} "
          f"{statistics.fmean(x[2] for x in rows):>12.1f}")
    lengths = sorted(x[2] for x in rows)
    print(f"groups: all correct {kinds['all correct'] / len(groups):.3f}, mixed {kinds['mixed'] / len(groups):.3f}, "
          f"all wrong {kinds['all wrong'] / len(groups):.3f}")
    print(f"response length: min {lengths[0]}, median {lengths[len(lengths) // 2]}, max {lengths[-1]} tokens")


if __name__ == "__main__":
    main()
