"""Small-number arithmetic word problems, for RL on small pretrained models (e.g. SmolLM2-135M).

GSM8K is beyond a 135M-parameter model; these problems are one or two operations on small
numbers, phrased as short word problems, so a small instruction-tuned model solves a fraction of
them and RL has something to improve. Difficulty is set by ``level`` (see :data:`LEVELS`).

Generation is deterministic given the seed. Rows are the plain ``{prompt, answer}`` schema, so
they load with ``data.preset=plain``; pair them with ``data.template=dapo`` (the ``Answer:``
instruction) and the ``math`` or ``dapo`` reward.

    python -m dapo_rl.data.arithmetic OUT.jsonl --num 1000 --seed 0 --level 2
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path

#: Appended to each problem by ``--instruction short``: DAPO's ``Answer:`` line, without its
#: "step by step" request, which makes a 135M model ramble past a CPU-sized response budget.
SHORT_INSTRUCTION = ("The last line of your response should be of the form Answer: $Answer (without quotes) "
                     "where $Answer is the answer to the problem. Be brief.")

#: ``--instruction example``: the short instruction plus a worked last line, because the model
#: often answers in prose without the ``Answer:`` line the verifier needs (see docs/smollm2-recipe.md).
EXAMPLE_INSTRUCTION = SHORT_INSTRUCTION + " For example, if the answer is 12, end with the line: Answer: 12"

_NAMES = ("Tom", "Anna", "Sam", "Lily", "Ben", "Mia", "Leo", "Emma", "Max", "Zoe")
_ITEMS = ("apples", "pencils", "marbles", "stickers", "books", "cookies", "coins", "cards")


@dataclass(frozen=True)
class Level:
    """Operand range and which problem shapes may appear."""

    low: int  # smallest operand
    high: int  # largest operand (inclusive)
    shapes: tuple[str, ...]  # of "add", "sub", "mul", "add_add", "mul_add"


#: Difficulty levels: 1 = one-digit add/subtract ... 4 = two operations on numbers up to 20.
LEVELS: dict[int, Level] = {
    1: Level(1, 9, ("add", "sub")),
    2: Level(2, 20, ("add", "sub", "mul")),
    3: Level(2, 30, ("add", "sub", "mul", "add_add")),
    4: Level(2, 20, ("add_add", "mul_add")),
}


def make_problem(rng: random.Random, level: Level) -> tuple[str, int]:
    """One word problem and its integer answer (never negative)."""
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b, c = (rng.randint(level.low, level.high) for _ in range(3))
    shape = rng.choice(level.shapes)
    if shape == "add":
        return f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?", a + b
    if shape == "sub":
        a, b = max(a, b), min(a, b)  # keep the answer non-negative
        return f"{name} has {a} {item} and gives away {b}. How many {item} does {name} have left?", a - b
    if shape == "mul":
        a, b = a % 10 + 1, b % 10 + 1  # multiplication table range keeps products small
        return f"{name} has {a} boxes with {b} {item} in each box. How many {item} are there in total?", a * b
    if shape == "add_add":
        return (f"{name} has {a} {item}, finds {b} more, and then gets {c} more. "
                f"How many {item} does {name} have now?"), a + b + c
    if shape == "mul_add":
        a, b = a % 10 + 1, b % 10 + 1
        return (f"{name} has {a} bags with {b} {item} in each bag, and {c} more {item} on the table. "
                f"How many {item} are there in total?"), a * b + c
    raise ValueError(f"unknown problem shape {shape!r}")


def generate(num: int, seed: int, level: int, instruction: str = "none") -> list[dict[str, str]]:
    """``num`` distinct ``{"prompt", "answer"}`` rows; the same arguments give the same rows.

    ``instruction``: ``none`` (the bare problem; use ``data.template=dapo`` to add DAPO's
    instruction), ``short`` (the problem followed by :data:`SHORT_INSTRUCTION`) or ``example``
    (followed by :data:`EXAMPLE_INSTRUCTION`).
    """
    if instruction not in ("none", "short", "example"):
        raise ValueError(f"instruction: {instruction!r} is not defined; use none, short or example")
    if level not in LEVELS:
        raise ValueError(f"level: {level} is not defined; use one of {sorted(LEVELS)}")
    rng = random.Random(f"arithmetic-{seed}-{level}")  # str seeds are hashed deterministically (not by PYTHONHASHSEED)
    rows, seen = [], set()
    attempts = 0
    while len(rows) < num:
        attempts += 1
        if attempts > 50 * num + 1000:
            raise ValueError(f"num: level {level} cannot give {num} distinct problems; ask for fewer")
        prompt, answer = make_problem(rng, LEVELS[level])
        if prompt in seen:
            continue
        seen.add(prompt)
        if instruction != "none":
            prompt = f"{prompt}\n{SHORT_INSTRUCTION if instruction == 'short' else EXAMPLE_INSTRUCTION}"
        rows.append({"prompt": prompt, "answer": str(answer)})
    return rows


def write_jsonl(rows: list[dict[str, str]], path: str | Path) -> None:
    """Write rows atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dapo_rl.data.arithmetic", description=__doc__.splitlines()[0])
    parser.add_argument("out", help="output JSONL path")
    parser.add_argument("--num", type=int, default=1000, help="number of problems")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--level", type=int, default=2, help=f"difficulty, one of {sorted(LEVELS)}")
    parser.add_argument("--instruction", default="none", choices=("none", "short", "example"),
                        help="short: append DAPO's 'Answer: $Answer' line instruction to each problem")
    parser.add_argument("--exclude", help="JSONL whose prompts must not appear (e.g. the eval set when writing train)")
    args = parser.parse_args(argv)
    if args.num < 1:
        print("error: --num must be >= 1", file=sys.stderr)
        return 2
    try:
        exclude = set()
        if args.exclude:
            exclude = {json.loads(line)["prompt"] for line in Path(args.exclude).read_text().splitlines() if line.strip()}
        rows = [r for r in generate(args.num + len(exclude), args.seed, args.level, args.instruction) if r["prompt"] not in exclude][: args.num]
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_jsonl(rows, args.out)
    print(f"wrote {len(rows)} problems (level {args.level}, seed {args.seed}) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
