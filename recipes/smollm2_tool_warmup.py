"""Teach SmolLM2-135M-Instruct the calculator's call format before RL with the calculator tool.

The base model never calls a tool (0 calls in 200 samples, and no valid call with a worked
example in the prompt: docs/tools.md), and RL cannot reinforce what it never samples. This
script does the short supervised warm-up that every tool-RL recipe starts from (verl's and
TRL's multi-turn examples start from an SFT'd model), and nothing more:

- **Format, not the task.** Half the conversations are bare sums, differences and products
  ("What is 23 + 17 + 8?"), half short word problems in wordings of their own (:data:`WORDED`:
  shelves, trains, cats and dogs), never the wordings of the arithmetic generator RL trains on
  (``dapo_rl.data.arithmetic``). With bare sums alone, the model learned to copy the whole
  question into the call ("Tom has 28 apples and gives away 20"): 187 of 191 calls failed on
  the level-3 problems. Turning "Sam has 4 pencils and gets 9 more ..." into ``4 + 9`` is left
  to RL.
- **Token-exact with the rollout.** A conversation is built the way the multi-turn sampler
  builds a trajectory: the prompt rendered by the tools template, the call's tokens, the
  end-of-turn token, the tool's reply as the template continues the conversation
  (:func:`dapo_rl.data.templates.observation_glue`), then the answer and its end-of-turn token.
- **Loss on the model's tokens only** (the call, the answer, their end-of-turn tokens), the mean
  over them, as an RL run trains only the model's tokens.
- AdamW (lr 3e-5, no weight decay), 8 conversations per step, fp32 weights; the products run in
  bf16 autocast where the CPU has native bf16 (``--bf16``), fp32 otherwise. Seeded: the same
  arguments give the same weights on one machine.

    python recipes/smollm2_tool_warmup.py runs/models/smollm2-135m-instruct runs/models/smollm2-135m-calc \
        --chat-template recipes/smollm2-tools.jinja --steps 40
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dapo_rl.data.templates import observation_glue, use_chat_template_file
from dapo_rl.tools import load_tools
from dapo_rl.tools.calculator import calculator

TOOL = "dapo_rl.tools.calculator:calculator"
_ASK = ("What is {e}?", "Compute {e}.", "Calculate {e}.", "{e} = ?", "Work out {e}.")


#: Word problems in wordings the arithmetic generator never uses: (question, expression) templates.
WORDED = (
    ("A box holds {a} red balls and {b} blue balls. How many balls are in the box?", "{a} + {b}"),
    ("A train had {a} passengers and {b} got off. How many passengers are still on the train?", "{a} - {b}"),
    ("Each of {a} shelves holds {b} jars. How many jars are on the shelves?", "{a} * {b}"),
    ("There are {a} cats, {b} dogs and {c} birds in a shop. How many animals are in the shop?", "{a} + {b} + {c}"),
    ("A baker made {a} rolls in the morning and {b} in the afternoon. How many rolls did the baker make?", "{a} + {b}"),
    ("A pond had {a} ducks. Then {b} flew away. How many ducks are on the pond?", "{a} - {b}"),
)


def problem(rng: random.Random) -> tuple[str, str]:
    """A question and its expression: a bare one (two or three terms, numbers 2–60) or a
    :data:`WORDED` one, each half the time."""
    if rng.random() < 0.5:
        question, expression = rng.choice(WORDED)
        a, b, c = (rng.randint(2, 40) for _ in range(3))
        if "-" in expression:
            a, b = max(a, b), min(a, b)
        if "*" in expression:
            a, b = a % 10 + 2, b % 10 + 2
        return question.format(a=a, b=b, c=c), expression.format(a=a, b=b, c=c)
    terms = rng.choice((2, 2, 3))
    numbers = [rng.randint(2, 60) for _ in range(terms)]
    ops = [rng.choice("+-*") if terms == 2 else rng.choice("+-") for _ in range(terms - 1)]
    expression = str(numbers[0]) + "".join(f" {op} {n}" for op, n in zip(ops, numbers[1:]))
    return rng.choice(_ASK).format(e=expression), expression


def conversation(tokenizer, schemas: list[dict], question: str, expression: str) -> tuple[list[int], list[int]]:
    """``(ids, trained)``: one call-then-answer conversation as the rollout would build it, and a 0/1
    mask of the model's tokens."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                           add_generation_prompt=True, tools=schemas)
    call = '<tool_call>{"name": "calculator", "arguments": {"expression": ' + json.dumps(expression) + "}}</tool_call>"
    value = calculator(expression)
    before, after = observation_glue(tokenizer)
    eos = [tokenizer.eos_token_id]

    def encode(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    parts = [(encode(prompt), 0), (encode(call) + eos, 1), (encode(before + value + after), 0),
             (encode(f"{expression} = {value}") + eos, 1)]
    ids = [i for part, _ in parts for i in part]
    trained = [flag for part, flag in parts for _ in part]
    return ids, trained


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="the model folder to start from")
    parser.add_argument("out", help="where the warmed-up model (and its tokenizer, with the tools template) goes")
    parser.add_argument("--chat-template", required=True, help="a Jinja chat template that renders tools=")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for the products (weights stay fp32)")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    rng = random.Random(f"tool-warmup-{args.seed}")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    use_chat_template_file(tokenizer, args.chat_template)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.train()
    schemas = [tool.schema for tool in load_tools([TOOL])]
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        rows = [conversation(tokenizer, schemas, *problem(rng)) for _ in range(args.batch)]
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for r, (ids, trained) in enumerate(rows):
            input_ids[r, : len(ids)] = torch.tensor(ids)
            attention[r, : len(ids)] = 1
            labels[r, : len(ids)] = torch.tensor([i if t else -100 for i, t in zip(ids, trained)])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            logits = model(input_ids=input_ids, attention_mask=attention).logits
        # next-token loss on the model's tokens, in fp32, mean over them
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        target = labels[:, 1:]
        keep = target != -100
        loss = -logp[keep].gather(-1, target[keep].unsqueeze(-1)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        print(f"step {step}/{args.steps}  loss {loss.item():.4f}  {time.perf_counter() - start:.0f}s", flush=True)
    out = Path(args.out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"saved the warmed-up model to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
