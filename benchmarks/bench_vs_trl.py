"""Our DAPO trainer vs TRL's GRPOTrainer (configured as DAPO) on identical work, side by side.

Both frameworks get the same randomly initialised model (weights saved once, loaded by both), the
same character tokenizer, the same prompts, the same reward (a cheap content score plus the soft
overlong punishment), the same batch shape (8 prompts × 8 samples, ≤ 64 new tokens, one
optimiser update per rollout), the same optimiser settings and seed. Each run is a fresh
subprocess (so its peak RSS is its own); each round runs every selected framework once, rotating
which goes first, so all see the same background load. Printed per model family and size: median
completion tokens/s, seconds per step, peak RSS, ratios.

    python benchmarks/bench_vs_trl.py                       # Llama, both sizes, 3 rounds each
    python benchmarks/bench_vs_trl.py --sizes 256x4 --rounds 5 --steps 4
    python benchmarks/bench_vs_trl.py --arch llama,qwen2,gemma2 --sizes 256x4
    python benchmarks/bench_vs_trl.py --frameworks ours,ours-bf16,trl,trl-bf16 --sizes 256x4   # fp32 and bf16
    python benchmarks/bench_vs_trl.py --sizes 64x2 --rounds 1 --steps 1 --warmup 0   # smoke run (seconds)

Options: ``--sizes`` (comma list of hidden×layers from ``SIZES``: 64x2 (smoke tests only), 256x4,
512x8), ``--arch`` (comma list of model families from ``ARCHS``, default llama; see
:func:`build_model` for what each family's model is), ``--rounds`` (rounds per family and size,
each one run of every framework), ``--steps`` / ``--warmup`` (measured / unmeasured steps per
run), ``--seed``, ``--same-seed``, ``--threads``, ``--engine`` (our rollout engine; ``ours-bf16``
needs one that samples in bf16, e.g. the default ``fast``), ``--reproducible`` (our
``reproducible=`` setting, default true as in ``dapo train``), ``--frameworks`` (comma list of
``ours``, ``ours-bf16``, ``trl``, ``trl-bf16``, default ``ours,trl``; round r starts at the r-th
modulo their number), ``--trl-keep-freed-memory``, ``--json`` (write every run's results, keyed
by family then size).

Precision. ``ours`` and ``trl`` run in float32 throughout (``ours`` pins ``rollout.dtype=float32``
and ``model.dtype=float32``, so ``rollout.dtype=auto`` cannot switch its sampler to bf16 at the
larger sizes). The bf16 variants keep float32 master weights, gradients and AdamW state on both
sides:

- ``ours-bf16``: ``rollout.dtype=bfloat16`` (the fast engine samples from a bf16 copy of the
  weights with a bf16 key/value cache; the prompt's prefill, logits, log-softmax, sampling and
  the reported log-probs stay float32) and ``model.dtype=bf16-autocast`` (the trainer's forwards
  under ``torch.autocast("cpu", bfloat16)``, hence their backward in bf16 too; the autocast dtype
  is passed to the ``Trainer`` as ``dapo train`` does, and the trainer enters the autocast itself).
  Sampler and trainer then no longer agree to rounding, so ``rollout_correction.mode=auto``
  resolves to ``token_truncate``: each step pays one no-grad π_old pass (``time/old_logprob_s``,
  "old" on the per-run line) that the fp32 run skips.
- Both of our runs report how far the sampler is from the trainer (the ``rollout/*`` step
  metrics: ``rollout/logp_abs_diff`` = mean |Δlog p| per token, ``rollout/kl``,
  ``rollout/is_weight_mean`` / ``_max``, ``rollout/ess_frac``, ``rollout/masked_frac``, and the
  weight-sync probe's ``rollout/sync_logp_abs_diff``), averaged over the measured steps in each
  run's summary (``--json``); ~1e-7 in fp32. ``ours-bf16``'s line prints the mean |Δlog p|.
- ``trl-bf16``: TRL's ``GRPOConfig(bf16=True)``, everything else identical. Accelerate wraps the
  model's forward in ``torch.autocast("cpu", bfloat16)``, so generation (``generate`` on the
  fp32 model), the log-prob and training forwards all run their products in bf16. As a check,
  TRL's runs record the dtype of their first linear layer's outputs with gradients (training)
  and without (sampling): ``rollout_dtype`` / ``train_dtype`` in the ``--json`` results, next to
  ours (the engine's resolved sampling dtype, the trainer's autocast, its rollout correction).

After the medians table: ``ours/TRL`` (fp32), ``ours-bf16/TRL-bf16``, and ``ours bf16/fp32`` /
``trl bf16/fp32`` ratio lines, each when both of its frameworks ran.

Needs ``pip install trl==1.16.0`` (benchmark-only; the library never imports TRL).

Definitions (identical for both):
- completion tokens of a step: response tokens generated that step (EOS included when emitted);
- s/step: wall time of one training step (rollout + reward + update), after ``--warmup`` steps;
- tokens/s of a run: Σ completion tokens / Σ step time over its measured steps;
- peak RSS: the subprocess's ``VmHWM`` at exit (imports + model + training).

Our worker calls ``keep_freed_host_memory()`` first, as ``dapo train`` does (glibc keeps freed
blocks for reuse instead of unmapping them); TRL's runs with glibc's defaults unless
``--trl-keep-freed-memory`` gives it the same setting.

What is identical and what is not (checked 2026-11-25, see RESULTS.md): both feed the model the
same prompt ids at the same step (``<s>`` + characters; TRL tokenizes with the tokenizer's
special tokens, as ``encode_prompts`` does), stop only at ``</s>`` (id 2), sample at temperature 1
with top-k/top-p off, and count completion tokens the same way (up to and including the first
EOS). Given the same samples, both compute the same gradient (cosine 1.000), with one exception
inside TRL: it treats a completion that hits the length limit and whose last sampled token
happens to be ``<pad>`` as finished, so ``mask_truncated_completions`` keeps it in the loss (this
random model samples ``<pad>`` like any other token). The two frameworks consume the RNG
differently, so they draw different samples; lengths then drift apart over a few updates in
either direction (with AdamW's first steps moving every weight by ~lr, the sample noise decides
the direction). Hence one seed per round (shared by every framework of the round) and medians over
rounds.
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
from pathlib import Path

PROMPTS_PER_STEP = 8
GROUP_SIZE = 8
MAX_NEW_TOKENS = 64
OVERLONG_CACHE = 16  # L_cache of the soft overlong punishment (both frameworks)
LR = 1e-5
SIZES = {  # hidden × layers → (hidden, layers, heads, intermediate); intermediate ≈ 8/3·hidden (Llama)
    "64x2": (64, 2, 4, 176),  # for smoke tests (tests/test_benchmarks.py): seconds, not a measurement
    "256x4": (256, 4, 4, 688),
    "512x8": (512, 8, 8, 1376),
}
ARCHS = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "phi3")
GQA_ARCHS = ("qwen2", "qwen3", "mistral", "gemma2")  # families whose released models share key/value heads
SLIDING_WINDOW = 32  # Mistral's and Gemma 2's window: shorter than prompt + 64 new tokens, so it is exercised
MAX_POSITIONS = 256
FRAMEWORKS = ("ours", "ours-bf16", "trl", "trl-bf16")
# Ratio lines after the medians table: (label, numerator, denominator), printed when both ran.
RATIOS = (("ours/TRL", "ours", "trl"), ("ours-bf16/TRL-bf16", "ours-bf16", "trl-bf16"),
          ("ours bf16/fp32", "ours-bf16", "ours"), ("trl bf16/fp32", "trl-bf16", "trl"))


# ----------------------------------------------------------------------------- shared definitions

def content_reward(text: str) -> float:
    """Fraction of digit characters minus one half: cheap, deterministic, varied across samples."""
    return sum(c.isdigit() for c in text) / max(1, len(text)) - 0.5


def proc_status_kib(*keys: str) -> dict[str, int]:
    """This process's ``/proc/self/status`` fields ``keys`` (``VmRSS``, ``VmHWM``, ``RssAnon``, …) in KiB."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in keys:
                fields[key] = int(value.split()[0])
    return fields


def timed_runs(run, repeats: int) -> tuple[list, float]:
    """One warm-up call of ``run()`` (which returns ``(seconds, result)``), then ``repeats`` timed
    ones: their ``(seconds, result)`` pairs and the median seconds. Shared by the profile_* scripts."""
    run()
    runs = [run() for _ in range(repeats)]
    return runs, statistics.median(r[0] for r in runs)


def print_profile(run, kind: str, shapes: bool = False) -> None:
    """Profile one call of ``run()`` and print the table: ``kind`` "torch" (torch.profiler, ops by
    self CPU time; by input shape with ``shapes``), "cprofile" (Python functions by own time) or
    "none" (nothing). Shared by the profile_* scripts."""
    if kind == "torch":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], record_shapes=shapes) as prof:
            run()
        print(prof.key_averages(group_by_input_shape=shapes).table(sort_by="self_cpu_time_total", row_limit=30))
    elif kind == "cprofile":
        import cProfile
        import pstats

        pr = cProfile.Profile()
        pr.enable()
        run()
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(25)


def rss_kib() -> tuple[int, int]:
    """(current, peak) resident set size of this process in KiB."""
    fields = proc_status_kib("VmRSS", "VmHWM")
    return fields["VmRSS"], fields["VmHWM"]


def build_model(arch: str, tokenizer, size: str, seed: int):
    """A randomly initialised float32 causal LM of family ``arch`` with the hidden size, layers,
    query heads and MLP width of ``SIZES[size]``, deterministic by ``seed``.

    Common to all families: the character tokenizer's vocabulary and special ids (``<pad>`` 0,
    ``<s>`` 1, ``</s>`` 2), tied input/output embeddings, 256 positions, head dim = hidden / heads.
    Per family (otherwise its config class's defaults):

    - llama: multi-head attention (key/value heads = query heads): the model of every earlier run
      (the same weights as ``dapo_rl.models.tiny.build_tiny_llama`` with this seed);
    - qwen2: grouped-query attention (heads / 2 key/value heads), biases on the q/k/v projections
      (always on in Qwen2), no sliding window (its default);
    - qwen3: grouped-query attention, RMSNorm on queries and keys, no attention biases;
    - mistral: grouped-query attention, sliding window ``SLIDING_WINDOW`` (32) on every layer;
    - gemma2: grouped-query attention, layers alternating sliding window ``SLIDING_WINDOW`` (32) /
      global, GeLU-tanh MLP, final logit soft-capping (30), query scaling by the head dim,
      embeddings scaled by √hidden, extra norms after attention and MLP. Its attention-score
      soft-capping (50) applies only under eager attention; both frameworks load the model with
      transformers' default (SDPA), which leaves it out;
    - phi3: multi-head attention with fused q/k/v and gate/up projections.
    """
    import torch
    from transformers import Gemma2Config, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config, Qwen3Config
    from transformers import AutoModelForCausalLM

    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose from {', '.join(ARCHS)}")
    hidden, layers, heads, inter = SIZES[size]
    common = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=heads // 2 if arch in GQA_ARCHS else heads,
                  max_position_embeddings=MAX_POSITIONS, pad_token_id=tokenizer.pad_token_id,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    head_dim = hidden // heads
    if arch == "llama":
        config = LlamaConfig(**common)
    elif arch == "qwen2":
        config = Qwen2Config(**common, use_sliding_window=False)
    elif arch == "qwen3":
        config = Qwen3Config(**common, head_dim=head_dim, attention_bias=False, use_sliding_window=False)
    elif arch == "mistral":
        config = MistralConfig(**common, head_dim=head_dim, sliding_window=SLIDING_WINDOW)
    elif arch == "gemma2":
        config = Gemma2Config(**common, head_dim=head_dim, query_pre_attn_scalar=head_dim, sliding_window=SLIDING_WINDOW)
    else:
        config = Phi3Config(**common)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    return model.float()


def prepare(workdir: Path, size: str, steps: int, seed: int, arch: str = "llama") -> Path:
    """Save the ``arch`` model of ``size`` + tokenizer and the prompt list to ``workdir/arch/size``."""
    import torch

    from dapo_rl.data.synthetic import VOCAB, builtin_splits
    from dapo_rl.models.tiny import build_char_tokenizer

    out = workdir / arch / size
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_char_tokenizer(VOCAB)
    model = build_model(arch, tokenizer, size, seed)
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    train, _ = builtin_splits(PROMPTS_PER_STEP * steps, 8, seed=seed)
    (out / "prompts.json").write_text(json.dumps([e.prompt for e in train]))
    params = sum(p.numel() for p in model.parameters())
    (out / "meta.json").write_text(json.dumps({"params": params, "arch": arch, "size": size,
                                               "model_type": model.config.model_type}))
    del model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return out


# ----------------------------------------------------------------------------- workers (subprocesses)

def build_trainer(folder: Path, steps: int, seed: int, threads: int, engine: str = "fast", bf16: bool = False):
    """Our trainer on a :func:`prepare`d folder, configured as the benchmark runs it (DAPO, one
    update per step, dynamic sampling off so both frameworks do the same work). float32
    throughout, or with ``bf16`` bf16 sampling (``rollout.dtype=bfloat16``) and training
    (``model.dtype=bf16-autocast``, its autocast dtype resolved and passed to the ``Trainer`` as
    ``dapo train`` does)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dapo_rl.config import load_config
    from dapo_rl.data.datasets import Example
    from dapo_rl.data.encoding import encode_prompts
    from dapo_rl.rewards import resolve_reward_fn
    from dapo_rl.training.host_memory import keep_freed_host_memory
    from dapo_rl.training.compose import rollout_engine, training_autocast, training_device
    from dapo_rl.training.trainer import Trainer

    keep_freed_host_memory()  # as `dapo train` does
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(folder / "model")
    model = AutoModelForCausalLM.from_pretrained(folder / "model", dtype=torch.float32)
    config = load_config(None, [
        f"seed={seed}", f"steps={steps}", f"prompts_per_step={PROMPTS_PER_STEP}", f"group_size={GROUP_SIZE}",
        f"mini_batch_size={PROMPTS_PER_STEP}", f"micro_batch_size={PROMPTS_PER_STEP * GROUP_SIZE}", "ppo_epochs=1",
        f"rollout.engine={engine}", f"rollout.max_response_length={MAX_NEW_TOKENS}", "rollout.temperature=1.0",
        "dynamic_sampling.enabled=false", "overlong.filter=true", "overlong.soft_punishment=true",
        f"overlong.cache_length={OVERLONG_CACHE}", "loss.agg_mode=token-mean", "loss.kl_coef=0.0",
        "clip.eps_low=0.2", "clip.eps_high=0.28", f"optim.lr={LR}", "optim.warmup_updates=0", "optim.beta2=0.99",
        "optim.grad_clip=1.0", "model.device=cpu", "data.eval=null",
        f"rollout.dtype={'bfloat16' if bf16 else 'float32'}", f"model.dtype={'bf16-autocast' if bf16 else 'float32'}",
    ])
    device = training_device(config)
    autocast_dtype = training_autocast(config, model, device).autocast_dtype  # bfloat16 under bf16-autocast, else None
    texts = json.loads((folder / "prompts.json").read_text())
    prompts, _ = encode_prompts([Example(prompt=t, answer="0", metadata={}) for t in texts], tokenizer)
    reward = resolve_reward_fn(lambda response, truth, meta: content_reward(response))
    return Trainer(config, model, tokenizer, prompts, None, reward, rollout_engine(config, model, tokenizer), device=device,
                   autocast_dtype=autocast_dtype)


def run_ours(folder: Path, steps: int, warmup: int, seed: int, threads: int, engine: str, reproducible: bool = True,
             bf16: bool = False) -> dict:
    from dapo_rl.reproducibility import reproducible_torch

    trainer = build_trainer(folder, steps + warmup, seed, threads, engine, bf16)
    setup_rss = rss_kib()[0]
    rows = []
    # As `dapo train` runs it: reproducible_torch around the steps (default true); the trainer
    # enters its own autocast (Trainer(autocast_dtype=...)) around its forwards, so the steps
    # need no outer autocast.
    with reproducible_torch(reproducible, trainer.device):
        for step in range(steps + warmup):
            t0 = time.perf_counter()
            metrics = trainer.train_step()
            dt = time.perf_counter() - t0
            tokens = metrics["train/response_length_mean"] * PROMPTS_PER_STEP * GROUP_SIZE
            if step >= warmup:
                rows.append({"s": dt, "tokens": tokens, "gen_s": metrics["time/generation_s"],
                             "score_s": metrics["time/scoring_s"], "update_s": metrics["time/update_s"],
                             "truncated": metrics["train/truncated_frac"],
                             "gen_tok_s": metrics["perf/generation_tokens_per_s"],
                             "train_tok_s": metrics["perf/train_tokens_per_s"],
                             "old_s": metrics.get("time/old_logprob_s", 0.0),
                             # sampler vs trainer (present when π_old is computed: bf16, corrections)
                             **{k: v for k, v in metrics.items() if k.startswith("rollout/")}})
    autocast = trainer.forward.autocast_dtype
    return {"rows": rows, "setup_rss_kib": setup_rss, "peak_rss_kib": rss_kib()[1],
            # what actually ran: the engine's resolved sampling dtype (None: the fp32 model's own),
            # the trainer's autocast dtype, the rollout correction it resolved
            "rollout_dtype": trainer.engine.precision or "float32",
            "train_dtype": "float32" if autocast is None else f"{str(autocast).removeprefix('torch.')}-autocast",
            "correction": trainer.correction_mode}


def run_trl(folder: Path, steps: int, warmup: int, seed: int, threads: int, keep_freed_memory: bool,
            bf16: bool = False) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    from trl.rewards import get_soft_overlong_punishment

    if keep_freed_memory:  # our allocator setting given to TRL too, to see what it does there
        from dapo_rl.training.host_memory import keep_freed_host_memory

        keep_freed_host_memory()
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(folder / "model")
    model = AutoModelForCausalLM.from_pretrained(folder / "model", dtype=torch.float32)
    texts = json.loads((folder / "prompts.json").read_text())
    # Serve prompts in the order our trainer's PromptStream does (TRL reads them in order), so
    # step k of both frameworks sees the same 8 prompts.
    from dapo_rl.training.rollouts import PromptStream

    texts = PromptStream(texts, seed).take(len(texts))
    dataset = Dataset.from_dict({"prompt": texts})

    def content(completions, **kwargs):
        return [content_reward(c) for c in completions]

    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-bench-"), seed=seed, use_cpu=True, bf16=bf16, fp16=False,
        per_device_train_batch_size=PROMPTS_PER_STEP * GROUP_SIZE, gradient_accumulation_steps=1,
        num_generations=GROUP_SIZE, steps_per_generation=1, num_iterations=1, max_steps=steps + warmup,
        max_completion_length=MAX_NEW_TOKENS, temperature=1.0, top_p=1.0, top_k=0,
        loss_type="dapo", epsilon=0.2, epsilon_high=0.28, beta=0.0, scale_rewards="group",
        mask_truncated_completions=True, use_vllm=False, gradient_checkpointing=False,
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, adam_beta2=0.99, weight_decay=0.0,
        max_grad_norm=1.0, shuffle_dataset=False, logging_steps=1, save_strategy="no", report_to="none",
        disable_tqdm=True, dataloader_num_workers=0, log_completions=False,
    )
    times: list[float] = []
    lengths: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"])

    # Which dtype the products ran in: the first linear layer's output dtypes, seen with gradients
    # (training forwards) and without (generation, no-grad log-prob passes).
    seen: dict[str, set] = {"train": set(), "rollout": set()}
    first_linear = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    first_linear.register_forward_hook(
        lambda module, args, out: seen["train" if torch.is_grad_enabled() else "rollout"].add(str(out.dtype).removeprefix("torch.")))
    trainer = GRPOTrainer(model=model, reward_funcs=[content, get_soft_overlong_punishment(MAX_NEW_TOKENS, OVERLONG_CACHE)],
                          args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[Timer()])
    setup_rss = rss_kib()[0]
    trainer.train()
    rows = [{"s": t, "tokens": n * PROMPTS_PER_STEP * GROUP_SIZE} for t, n in zip(times, lengths)][warmup:]
    return {"rows": rows, "setup_rss_kib": setup_rss, "peak_rss_kib": rss_kib()[1],
            "rollout_dtype": ",".join(sorted(seen["rollout"])), "train_dtype": ",".join(sorted(seen["train"]))}


# ----------------------------------------------------------------------------- driver

def load_average() -> str:
    try:
        return open("/proc/loadavg").read().split()[0]
    except OSError:
        return "?"


def round_order(frameworks: list[str], rnd: int) -> list[str]:
    """The order of round ``rnd``'s runs: ``frameworks`` rotated to start at the ``rnd``-th, modulo
    their number (with two, they alternate), so no framework always runs first or after another."""
    start = rnd % len(frameworks)
    return frameworks[start:] + frameworks[:start]


def _spawn(framework: str, folder: Path, a, seed: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", framework, "--folder", str(folder), "--steps", str(a.steps),
           "--warmup", str(a.warmup), "--seed", str(seed), "--threads", str(a.threads), "--engine", a.engine,
           "--reproducible", a.reproducible]
    if a.trl_keep_freed_memory:
        cmd.append("--trl-keep-freed-memory")
    load_before = load_average()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{framework} worker failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["load"] = f"{load_before}->{load_average()}"
    return result


def _summary(result: dict) -> dict:
    rows = result["rows"]
    seconds = sum(r["s"] for r in rows)
    tokens = sum(r["tokens"] for r in rows)
    out = {"tok_s": tokens / seconds, "s_step": seconds / len(rows), "peak_mib": result["peak_rss_kib"] / 1024,
           "setup_mib": result["setup_rss_kib"] / 1024, "tokens_step": tokens / len(rows), "load": result["load"]}
    for key in ("gen_s", "score_s", "update_s", "old_s", "truncated", "gen_tok_s", "train_tok_s"):
        if key in rows[0]:
            out[key] = sum(r[key] for r in rows) / len(rows)
    # The sampler/trainer mismatch (rollout/logp_abs_diff, rollout/kl, ...): the mean over the
    # measured steps that report it.
    for key in sorted({k for r in rows for k in r if k.startswith("rollout/")}):
        values = [r[key] for r in rows if key in r]
        out[key] = sum(values) / len(values)
    for key in ("rollout_dtype", "train_dtype", "correction"):
        if key in result:
            out[key] = result[key]
    return out


def _run_line(summary: dict) -> str:
    """The per-run line's tail after tokens, seconds and memory: our phases, and for a bf16 run
    what ran in bf16 and (ours) the sampler's distance from the trainer."""
    extra = ""
    if "gen_s" in summary:
        extra += f" gen {summary['gen_s']:.2f}s score {summary['score_s']:.3f}s update {summary['update_s']:.2f}s"
        if summary.get("correction", "none") != "none":  # the no-grad π_old pass a correction needs
            extra += f" (old {summary['old_s']:.2f}s)"
    if summary.get("rollout_dtype", "float32") != "float32" or summary.get("train_dtype", "float32") != "float32":
        extra += f"  rollout {summary['rollout_dtype']} train {summary['train_dtype']}"
        if "correction" in summary:
            diff = summary.get("rollout/logp_abs_diff")
            extra += f" |Δlog p| {'n/a' if diff is None else f'{diff:.4f}'} ({summary['correction']})"
    return extra


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="256x4,512x8", help=f"comma list of hidden x layers from {', '.join(SIZES)}")
    parser.add_argument("--arch", default="llama", help=f"comma list of model families from {', '.join(ARCHS)}")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per family and size (one run of each framework)")
    parser.add_argument("--steps", type=int, default=4, help="measured steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured steps per run")
    parser.add_argument("--seed", type=int, default=0, help="model weights, prompt list; run seed of round 0")
    parser.add_argument("--same-seed", dest="vary_seed", action="store_false",
                        help="every round uses --seed (repeats the same draw); default: round r uses seed + r")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in both frameworks")
    parser.add_argument("--engine", default="fast", help="our rollout.engine (fast | hf)")
    parser.add_argument("--reproducible", default="true", choices=["true", "false"],
                        help="our reproducible= setting (deterministic torch kernels; `dapo train` default true)")
    parser.add_argument("--frameworks", default="ours,trl", help=f"comma list from {', '.join(FRAMEWORKS)} (e.g. "
                        "'ours' to time another checkout of the library against an earlier TRL run)")
    parser.add_argument("--trl-keep-freed-memory", action="store_true",
                        help="give TRL's process the glibc malloc setting our trainer uses (keep_freed_host_memory)")
    parser.add_argument("--json", help="also write all per-run results here, as {family: {size: results}}")
    parser.add_argument("--worker", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    a = parser.parse_args()

    if a.worker:
        folder = Path(a.folder)
        bf16 = a.worker.endswith("-bf16")
        if a.worker.startswith("ours"):
            result = run_ours(folder, a.steps, a.warmup, a.seed, a.threads, a.engine, a.reproducible == "true", bf16)
        else:
            result = run_trl(folder, a.steps, a.warmup, a.seed, a.threads, a.trl_keep_freed_memory, bf16)
        print(json.dumps(result))
        return

    sizes, archs = a.sizes.split(","), a.arch.split(",")
    frameworks = list(dict.fromkeys(a.frameworks.split(",")))  # in the order given, once each
    for name, values, known in (("--sizes", sizes, SIZES), ("--arch", archs, ARCHS), ("--frameworks", frameworks, FRAMEWORKS)):
        unknown = [v for v in values if v not in known]
        if unknown:
            parser.error(f"{name}: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
    if "ours-bf16" in frameworks:  # a setting our config refuses (e.g. --engine hf) fails here, not in a worker
        from dapo_rl.config import ConfigError, load_config

        try:
            load_config(None, [f"rollout.engine={a.engine}", "rollout.dtype=bfloat16", "model.dtype=bf16-autocast"])
        except ConfigError as exc:
            parser.error(f"--frameworks ours-bf16 with --engine {a.engine}: {exc}")

    import torch

    workdir = Path(tempfile.mkdtemp(prefix="bench-vs-trl-"))
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}  torch {torch.__version__}  threads={a.threads}  "
          f"frameworks={','.join(frameworks)}  engine={a.engine}  reproducible={a.reproducible}  trl_keep_freed_memory={a.trl_keep_freed_memory}  cpus={os.cpu_count()}  loadavg at start {load_average()}")
    everything: dict[str, dict] = {}
    for arch in archs:
        for size in sizes:
            folder = prepare(workdir, size, a.steps + a.warmup, a.seed, arch)
            params = json.loads((folder / "meta.json").read_text())["params"]
            runs: dict[str, list[dict]] = {fw: [] for fw in frameworks}
            for rnd in range(a.rounds):
                order = round_order(frameworks, rnd)
                # One run seed per round, shared by its runs: every framework sees the same prompts in
                # the same order; across rounds the samples (hence lengths) vary, so medians average
                # over sampling noise instead of repeating one draw per framework.
                seed = a.seed + rnd if a.vary_seed else a.seed
                for framework in order:
                    summary = _summary(_spawn(framework, folder, a, seed))
                    runs[framework].append(summary)
                    print(f"{arch} {size} round {rnd} seed {seed} {framework:9s}: {summary['tok_s']:7.0f} tok/s  "
                          f"{summary['s_step']:6.2f} s/step  {summary['tokens_step']:5.0f} tok/step  peak "
                          f"{summary['peak_mib']:6.0f} MiB (after setup {summary['setup_mib']:.0f}){_run_line(summary)}  "
                          f"load {summary['load']}", flush=True)
            runs = {fw: rs for fw, rs in runs.items() if rs}
            med = {fw: {k: statistics.median(r[k] for r in rs) for k in ("tok_s", "s_step", "peak_mib", "tokens_step")}
                   for fw, rs in runs.items()}
            for fw, rs in runs.items():  # pooled over all runs: Σ tokens / Σ seconds
                med[fw]["pooled_tok_s"] = sum(r["tokens_step"] for r in rs) / sum(r["s_step"] for r in rs)
            print(f"\n{arch} {size} ({params / 1e6:.2f} M params), medians of {a.rounds} runs × {a.steps} steps:")
            print(f"  {'':9s} {'tok/s':>8s} {'pooled':>8s} {'s/step':>8s} {'tok/step':>9s} {'peak MiB':>9s}")
            for fw in med:
                print(f"  {fw:9s} {med[fw]['tok_s']:8.0f} {med[fw]['pooled_tok_s']:8.0f} {med[fw]['s_step']:8.2f} "
                      f"{med[fw]['tokens_step']:9.0f} {med[fw]['peak_mib']:9.0f}")
            for label, num, den in RATIOS:
                if num in med and den in med:
                    n, d = med[num], med[den]
                    print(f"  {arch} {size} {label}: tokens/s ×{n['tok_s'] / d['tok_s']:.2f} (pooled ×"
                          f"{n['pooled_tok_s'] / d['pooled_tok_s']:.2f}), s/step ×{n['s_step'] / d['s_step']:.2f}, "
                          f"peak RSS ×{n['peak_mib'] / d['peak_mib']:.2f}", flush=True)
            print(flush=True)
            everything.setdefault(arch, {})[size] = {"arch": arch, "size": size, "params": params, "runs": runs,
                                                     "medians": med}
    if a.json:
        Path(a.json).write_text(json.dumps(everything, indent=2))


if __name__ == "__main__":
    main()
