"""GSM8K with math_verify rewards, written as a TRL GRPOTrainer script would be.

    python -m examples.gsm8k_math_verify --model path/to/Qwen2.5-0.5B-Instruct     # openai/gsm8k from the Hub
    python -m examples.gsm8k_math_verify --model builtin:chain-tiny --data rows.jsonl --instruction "" \
        --max-completion-length 8 --max-steps 2                                   # seconds, on the built-in model

Rows are GSM8K's own (``question``, ``answer`` = worked solution ending in ``#### <number>``),
turned into a ``prompt`` column and the ground truth. Two plain TRL-signature reward functions:
``accuracy`` (math_verify on what follows the last ``#``; 1 or 0) and ``format_ok`` (a small bonus
for ending in ``#### <number>``). Run with ``-m`` from the repository root, the run folder's
config.yaml names them ``examples.gsm8k_math_verify:accuracy``, so ``dapo train runs/gsm8k/config.yaml``
repeats the run.
"""

from __future__ import annotations

import argparse
import json
import re

from math_verify import parse, verify

from dapo_rl import DAPOConfig, DAPOTrainer

INSTRUCTION = ' Think step by step, then give the final answer as "#### <number>".'
FINAL = re.compile(r"####\s*-?[\d,.]+\s*$")


def gsm8k_rows(rows, instruction: str = INSTRUCTION) -> list[dict]:
    """GSM8K rows → ``prompt`` (the question and the instruction) and ``answer`` (the number after ``####``)."""
    return [{"prompt": row["question"] + instruction, "answer": row["answer"].rpartition("####")[2].strip().replace(",", "")}
            for row in rows]


def accuracy(prompts, completions, completion_ids, answer, **columns) -> list[float]:
    """1 when math_verify finds the final answer (after the last '#') equal to the gold number, else 0.
    Timeouts are off: math_verify's are signal-based (main thread only); reward.timeout_s bounds the call."""
    return [float(verify(parse(gold, parsing_timeout=None), parse(text.rpartition("#")[2], parsing_timeout=None),
                         timeout_seconds=None)) for text, gold in zip(completions, answer)]


def format_ok(prompts, completions, completion_ids, **columns) -> list[float]:
    """0.1 for a completion that ends in GSM8K's '#### <number>'."""
    return [0.1 if FINAL.search(text) else 0.0 for text in completions]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a model folder, or builtin:chain-tiny")
    parser.add_argument("--data", help="a JSONL file of GSM8K rows (question, answer); default: openai/gsm8k's train split")
    parser.add_argument("--instruction", default=INSTRUCTION, help="appended to each question")
    parser.add_argument("--output-dir", default="runs/gsm8k")
    parser.add_argument("--max-steps", type=int, default=200, help="optimiser updates")
    parser.add_argument("--max-completion-length", type=int, default=512)
    opts = parser.parse_args(argv)

    if opts.data:
        with open(opts.data) as f:
            raw = [json.loads(line) for line in f if line.strip()]
    else:
        from datasets import load_dataset

        raw = load_dataset("openai/gsm8k", "main", split="train")
    args = DAPOConfig(
        output_dir=opts.output_dir, max_steps=opts.max_steps, seed=0,
        learning_rate=1e-6, num_generations=8, max_completion_length=opts.max_completion_length, temperature=1.0,
        per_device_train_batch_size=8, gradient_accumulation_steps=4, steps_per_generation=4,  # 4 prompts per step, 1 update
        epsilon=0.2, epsilon_high=0.28, loss_type="dapo", reward_weights=[1.0, 1.0],
        # format_ok shapes the reward, so 'informative' is read from the spread of rewards in a group.
        dynamic_sampling={"criterion": "reward_std", "max_rounds": 4},
        overwrite=True,
    )
    trainer = DAPOTrainer(model=opts.model, reward_funcs=[accuracy, format_ok], args=args, train_dataset=gsm8k_rows(raw, opts.instruction))
    result = trainer.train()
    print(f"trained {result.steps} steps; final policy in {result.run_dir / 'final'}")


if __name__ == "__main__":
    main()
