"""The built-in policies: a tiny Llama taught a built-in task (:mod:`dapo_rl.data.builtin_tasks`)
by a short supervised warm-up; ``builtin:chain-tiny`` is the quickstart's.

The warm-up data is deliberately faulty (see :mod:`dapo_rl.data.synthetic` and
:mod:`dapo_rl.data.calculator`): the model learns the procedure and also the faults, so its
starting accuracy leaves room for RL. The result is a
plain Hugging Face folder, cached under a key made of every setting that shapes it, so a second
run (or a test) reuses it; the same settings give the same weights.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import tempfile
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from dapo_rl.cache_dir import default_cache_dir
from dapo_rl.config import QuickstartConfig
from dapo_rl.data.builtin_tasks import BUILTIN_TASKS, builtin_task
from dapo_rl.data.synthetic import CHAIN
from dapo_rl.models.tiny import build_char_tokenizer, build_tiny_llama

_FORMAT_VERSION = 1  # bump when the warm-up procedure changes, to invalidate old caches
_MAX_EXTRA_CYCLES = 4  # a task with a floor: extra warm-up cycles before giving up
_CHECK_SEED = 7  # the problems greedy_accuracy checks


def builtin_model_task(path: str) -> Any:
    """The task whose warm-up the built-in model ``builtin:<task>-tiny`` is.

    Raises:
        ValueError: not a built-in model name (the message lists the known ones).
    """
    try:
        if path.endswith("-tiny"):
            return builtin_task(path.removesuffix("-tiny"))
    except KeyError:
        pass
    known = ", ".join(f"builtin:{name}-tiny" for name in BUILTIN_TASKS)
    raise ValueError(f"unknown built-in model {path!r}; use one of {known}, or a local model folder")


def resolved_warmup(config: QuickstartConfig, task: Any = CHAIN) -> QuickstartConfig:
    """``config`` with ``warmup_steps=None`` replaced by the task's own (so one model has one key)."""
    return config if config.warmup_steps is not None else replace(config, warmup_steps=task.warmup_steps)


def quickstart_key(config: QuickstartConfig, seed: int, task: Any = CHAIN) -> str:
    config = resolved_warmup(config, task)
    settings = {k: v for k, v in asdict(config).items() if k != "cache_dir"}
    identity = {"settings": settings, "seed": seed, "version": _FORMAT_VERSION}
    if task != CHAIN:  # the quickstart task's key predates the other tasks: existing caches stay valid
        identity["task"] = asdict(task)
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]


def _warmup_batch(tokenizer, rng: random.Random, config: QuickstartConfig, task: Any) -> tuple[torch.Tensor, ...]:
    """Right-padded ``[batch, len]`` ids, attention mask and trained-token mask of ``config.warmup_batch``
    examples of ``task``: the first segment is encoded with the tokenizer's start token, and each
    trained segment (a model turn) is followed by the end-of-sequence token, which is trained too."""
    rows, masks = [], []
    for _ in range(config.warmup_batch):
        ids: list[int] = []
        mask: list[int] = []
        for i, (text, trained) in enumerate(task.warmup_segments(rng, config)):
            piece = tokenizer(text, add_special_tokens=i == 0)["input_ids"] + ([tokenizer.eos_token_id] if trained else [])
            ids += piece
            mask += [int(trained)] * len(piece)
        rows.append(ids)
        masks.append(mask)
    width = max(map(len, rows))
    ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    loss_mask = torch.tensor([m + [0] * (width - len(m)) for m in masks], dtype=torch.float32)
    return ids, attention, loss_mask


def build_quickstart_model(config: QuickstartConfig, seed: int, folder: Path, progress: bool = True, task: Any = CHAIN) -> None:
    """Build the tokenizer and model, run the supervised warm-up on ``task``, save both to ``folder``."""
    config = resolved_warmup(config, task)
    tokenizer = build_char_tokenizer(task.vocab, task.words)
    model = build_tiny_llama(tokenizer, hidden_size=config.hidden_size, num_layers=config.num_layers,
                             num_heads=4, intermediate_size=4 * config.hidden_size, max_positions=task.max_positions, seed=seed)
    rng = random.Random(seed)
    _supervised(model, tokenizer, rng, config, task, seed, config.warmup_steps, progress)
    checked: dict[str, Any] = {}
    # The task's own recipe is checked; a chosen quickstart.warmup_steps (tests, experiments) is taken as given.
    floor = task.min_greedy_accuracy if config.warmup_steps == task.warmup_steps else None
    if floor is not None:
        # Whether the steps found the procedure depends on float rounding, so on the machine:
        # check, and train on (a fresh cycle of half the steps, the same data stream) until it holds.
        accuracy, extra = greedy_accuracy(model, tokenizer, task), 0
        while accuracy < floor and extra < _MAX_EXTRA_CYCLES:
            extra += 1
            _supervised(model, tokenizer, rng, config, task, seed + extra, max(20, config.warmup_steps // 2), progress)
            accuracy = greedy_accuracy(model, tokenizer, task)
        if accuracy < floor:
            raise RuntimeError(f"the built-in model of {task.name} reached greedy accuracy {accuracy:.2f} after "
                               f"{extra} extra warm-up cycles, below its floor {floor}; set quickstart.warmup_steps "
                               f"higher or another seed")
        checked = {"greedy_accuracy": accuracy, "extra_cycles": extra}
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "quickstart.json").write_text(json.dumps({"seed": seed, "task": asdict(task), **asdict(config), **checked}, indent=2))


def _supervised(model, tokenizer, rng: random.Random, config: QuickstartConfig, task: Any, seed: int, steps: int,
                progress: bool) -> None:
    """``steps`` supervised steps on the task's warm-up data (model turns trained), with a fresh
    AdamW and learning-rate cycle; leaves the model in eval mode."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.warmup_lr, weight_decay=0.0)
    if steps >= 20:
        # One-cycle: 10% ramp up, cosine down. Its ramp needs at least two steps, hence the bound.
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.warmup_lr, total_steps=steps, pct_start=0.1)
    else:  # a token warm-up (tests): constant rate
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model.train()
    bar = tqdm(range(steps), desc="quickstart warm-up (cached after the first run)", disable=not progress, dynamic_ncols=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in bar:
            ids, attention, loss_mask = _warmup_batch(tokenizer, rng, config, task)
            logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
            logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            weights = loss_mask[:, 1:]
            loss = -(logp * weights).sum() / weights.sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()


@torch.no_grad()
def greedy_accuracy(model, tokenizer, task: Any, problems: int = 256, max_new_tokens: int = 16) -> float:
    """The fraction of ``problems`` problems of ``task`` (drawn apart from its train and held-out
    splits) that ``model`` answers correctly by greedy decoding, judged by the task's reward."""
    from dapo_rl.rewards.registry import resolve_reward_fn

    reward = resolve_reward_fn(task.reward)
    _, examples = task.splits(1, problems, seed=_CHECK_SEED)
    ids = torch.tensor([tokenizer(e.prompt)["input_ids"] for e in examples])  # a fixed prompt width: no padding
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
    return sum(reward(t, e.answer, e.metadata) is True for t, e in zip(texts, examples)) / len(examples)


def prepare_quickstart_model(config: QuickstartConfig, seed: int = 0, progress: bool = True, task: Any = CHAIN) -> Path:
    """The cached warm-up folder of ``task`` for these settings, built first if absent (atomically)."""
    config = resolved_warmup(config, task)
    cache = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
    folder = cache / f"{task.name}-tiny-{quickstart_key(config, seed, task)}"
    if (folder / "quickstart.json").is_file():
        return folder
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=cache))
    try:
        build_quickstart_model(config, seed, staging, progress=progress, task=task)
        try:
            staging.rename(folder)
        except OSError:
            if not (folder / "quickstart.json").is_file():  # not a concurrent builder winning the race
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder
