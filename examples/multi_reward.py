"""Several rewards, LoRA and a callback, in TRL GRPOTrainer's shape, on the built-in task (seconds on a CPU).

    python -m examples.multi_reward [--max-steps 6] [--stop-at-accuracy 0.9]

- an in-memory ``datasets.Dataset`` with an extra column (``level``) that reaches the rewards by name;
- three reward functions summed with ``reward_weights``: a sync one, an ``async`` one (awaited
  concurrently with any other async function: a remote judge would go here), and one that returns
  ``None`` ("not applicable") for the rows it does not score;
- a ``peft.LoraConfig`` (trains adapters only);
- a ``transformers.TrainerCallback`` that prints each function's reward from ``on_log`` and stops
  the run early (``control.should_training_stop``) once accuracy is high enough; the stop leaves a
  checkpoint, which ``train(resume_from_checkpoint=True)`` would continue.
"""

from __future__ import annotations

import argparse
import asyncio

from datasets import Dataset
from peft import LoraConfig
from transformers import TrainerCallback

from dapo_rl import DAPOConfig, DAPOTrainer
from dapo_rl.data.synthetic import builtin_splits


def correct(prompts, completions, completion_ids, answer, **columns):
    """+1 when the digit after the last '#' is the answer, else -1 (the built-in task's answer format)."""
    return [1.0 if text.rpartition("#")[2].strip()[:1] == gold else -1.0 for text, gold in zip(completions, answer)]


async def concise(prompts, completions, completion_ids, **columns):
    """A small bonus for short completions; async, as a call to a judge service would be."""
    await asyncio.sleep(0.01)
    return [0.2 if len(ids) <= 6 else 0.0 for ids in completion_ids]


def level_one_only(prompts, completions, completion_ids, level, **columns):
    """Scores level-1 rows only; None elsewhere: that function is skipped for them (as TRL)."""
    return [0.1 * text.count("=") if lv == 1 else None for text, lv in zip(completions, level)]


class PrintAndStop(TrainerCallback):
    """Prints each reward function's mean per logged step; stops once train accuracy ≥ ``target``."""

    def __init__(self, target: float):
        self.target = target

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "train/accuracy" in logs:
            rewards = " ".join(f"{k.split('/', 1)[1]}={v:.2f}" for k, v in sorted(logs.items()) if k.startswith("reward/"))
            # No reward/* on a step trained on groups left over from the previous step's generation.
            print(f"update {state.global_step}: accuracy={logs['train/accuracy']:.2f} {rewards or '(no new generation)'}")
            if logs["train/accuracy"] >= self.target:
                control.should_training_stop = True
                print(f"accuracy reached {self.target}: stopping (checkpointed)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default="runs/multi_reward")
    parser.add_argument("--max-steps", type=int, default=6, help="optimiser updates")
    parser.add_argument("--stop-at-accuracy", type=float, default=0.9)
    opts = parser.parse_args(argv)

    train, _ = builtin_splits(64, 8)
    dataset = Dataset.from_list([{"prompt": e.prompt, "answer": e.answer, "level": i % 2} for i, e in enumerate(train)])
    args = DAPOConfig(
        output_dir=opts.output_dir, max_steps=opts.max_steps, seed=0, overwrite=True,
        learning_rate=2e-3, num_generations=4, max_completion_length=8,
        per_device_train_batch_size=8, gradient_accumulation_steps=1,  # 2 prompts × 4 completions per step
        reward_weights=[1.0, 1.0, 0.5],
        # The extra rewards shape the score, so 'informative' groups are those whose rewards differ.
        dynamic_sampling={"criterion": "reward_std", "max_rounds": 4},
        logging={"progress": False},
    )
    trainer = DAPOTrainer(model="builtin:chain-tiny", reward_funcs=[correct, concise, level_one_only], args=args,
                          train_dataset=dataset, peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
                          callbacks=[PrintAndStop(opts.stop_at_accuracy)])
    result = trainer.train()
    print(f"ran {result.steps} of {trainer.config.steps} steps; run folder {result.run_dir}")
    trainer.save_model(f"{opts.output_dir}/adapter")


if __name__ == "__main__":
    main()
