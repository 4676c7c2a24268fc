"""The built-in quickstart policy: a tiny Llama taught the chain task by a short supervised warm-up.

The warm-up data is deliberately faulty (see :mod:`dapo_rl.data.synthetic`): the model learns
the procedure and also the faults, so its starting accuracy leaves room for RL. The result is a
plain Hugging Face folder, cached under a key made of every setting that shapes it, so a second
run (or a test) reuses it; the same settings give the same weights.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dapo_rl.cache import default_cache_dir
from dapo_rl.config import QuickstartConfig
from dapo_rl.data.synthetic import VOCAB, sample_problem, warmup_response
from dapo_rl.models.tiny import build_char_tokenizer, build_tiny_llama

_FORMAT_VERSION = 1  # bump when the warm-up procedure changes, to invalidate old caches


def quickstart_key(config: QuickstartConfig, seed: int) -> str:
    settings = {k: v for k, v in asdict(config).items() if k != "cache_dir"}
    blob = json.dumps({"settings": settings, "seed": seed, "version": _FORMAT_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _warmup_batch(tokenizer, rng: random.Random, config: QuickstartConfig) -> tuple[torch.Tensor, ...]:
    """Right-padded ``[batch, len]`` ids, attention mask and response-token mask."""
    rows, masks = [], []
    for _ in range(config.warmup_batch):
        problem = sample_problem(rng)
        response = warmup_response(problem, rng, step_error=config.step_error, recheck=config.recheck)
        prompt_ids = tokenizer(problem.prompt)["input_ids"]
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(prompt_ids + response_ids)
        masks.append([0] * len(prompt_ids) + [1] * len(response_ids))
    width = max(map(len, rows))
    ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    loss_mask = torch.tensor([m + [0] * (width - len(m)) for m in masks], dtype=torch.float32)
    return ids, attention, loss_mask


def build_quickstart_model(config: QuickstartConfig, seed: int, folder: Path, progress: bool = True) -> None:
    """Build the tokenizer and model, run the supervised warm-up, save both to ``folder``."""
    tokenizer = build_char_tokenizer(VOCAB)
    model = build_tiny_llama(tokenizer, hidden_size=config.hidden_size, num_layers=config.num_layers,
                             num_heads=4, intermediate_size=4 * config.hidden_size, seed=seed)
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.warmup_lr, weight_decay=0.0)
    if config.warmup_steps >= 20:
        # One-cycle: 10% ramp up, cosine down. Its ramp needs at least two steps, hence the bound.
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.warmup_lr, total_steps=config.warmup_steps, pct_start=0.1)
    else:  # a token warm-up (tests): constant rate
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model.train()
    bar = tqdm(range(config.warmup_steps), desc="quickstart warm-up (cached after the first run)", disable=not progress, dynamic_ncols=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in bar:
            ids, attention, loss_mask = _warmup_batch(tokenizer, rng, config)
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
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "quickstart.json").write_text(json.dumps({"seed": seed, **asdict(config)}, indent=2))


def prepare_quickstart_model(config: QuickstartConfig, seed: int = 0, progress: bool = True) -> Path:
    """The cached warm-up folder for these settings, built first if absent (atomically)."""
    cache = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
    folder = cache / f"chain-tiny-{quickstart_key(config, seed)}"
    if (folder / "quickstart.json").is_file():
        return folder
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=cache))
    try:
        build_quickstart_model(config, seed, staging, progress=progress)
        try:
            staging.rename(folder)
        except OSError:
            if not (folder / "quickstart.json").is_file():  # not a concurrent builder winning the race
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder
