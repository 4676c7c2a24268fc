"""Time and profile the fast rollout engine alone on the benchmark's work (8 prompts × 8 samples, ≤ 64 tokens).

    python benchmarks/profile_rollout.py --size 512x8 --repeats 5            # timing, tokens/s, GFLOP/s
    python benchmarks/profile_rollout.py --size 256x4 --profile torch        # + torch.profiler op table
    python benchmarks/profile_rollout.py --size 256x4 --profile cprofile     # + cProfile (Python side)
    python benchmarks/profile_rollout.py --size 256x4 --arch gemma2          # another model family
    python benchmarks/profile_rollout.py --size 64x2 --repeats 1             # smoke run

The model is the benchmark's randomly initialised model (same seed, sizes and families as
bench_vs_trl.py; Llama by default), untrained; each repeat reseeds the RNG, so every repeat draws
the same samples.

Options: ``--size`` (a key of ``bench_vs_trl.SIZES``), ``--arch`` (a family of
``bench_vs_trl.ARCHS``), ``--repeats`` (timed generations; the median is printed), ``--threads``,
``--seed``, ``--profile`` (none | torch | cprofile: profile one more generation),
``--engine-kwargs`` (JSON keyword arguments of ``DecoderEngine``), ``--engine-file`` (load the
engine class from another file).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from bench_vs_trl import ARCHS, GROUP_SIZE, MAX_NEW_TOKENS, PROMPTS_PER_STEP, SIZES, build_model, load_average, print_profile, timed_runs


def build(size: str, seed: int, arch: str = "llama"):
    from dapo_rl.data.datasets import Example
    from dapo_rl.data.encoding import encode_prompts
    from dapo_rl.data.synthetic import VOCAB, builtin_splits
    from dapo_rl.models.tiny import build_char_tokenizer

    tokenizer = build_char_tokenizer(VOCAB)
    model = build_model(arch, tokenizer, size, seed)
    train, _ = builtin_splits(PROMPTS_PER_STEP, 8, seed=seed)
    prompts, _ = encode_prompts([Example(prompt=e.prompt, answer="0", metadata={}) for e in train], tokenizer)
    return model, tokenizer, [list(p.ids) for p in prompts]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="256x4", choices=sorted(SIZES))
    p.add_argument("--arch", default="llama", choices=ARCHS, help="model family (see bench_vs_trl.build_model)")
    p.add_argument("--repeats", type=int, default=5, help="timed generations (median printed)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", choices=["none", "torch", "cprofile"], default="none", help="profile one more generation")
    p.add_argument("--engine-kwargs", default="{}", help="JSON kwargs for DecoderEngine")
    p.add_argument("--engine-file", help="load DecoderEngine from this file instead (e.g. an older version, "
                   "`git show REV:src/dapo_rl/rollout/decoder_engine.py > old.py`), for paired comparisons")
    a = p.parse_args()

    from dapo_rl.rollout.base import SamplingParams
    if a.engine_file:
        import importlib.util

        spec = importlib.util.spec_from_file_location("fast_under_test", a.engine_file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        DecoderEngine = module.DecoderEngine
    else:
        from dapo_rl.rollout.decoder_engine import DecoderEngine

    torch.set_num_threads(a.threads)
    model, tok, prompts = build(a.size, a.seed, a.arch)
    params_count = sum(q.numel() for q in model.parameters())
    engine = DecoderEngine(model, tok.pad_token_id, tok.eos_token_id, **json.loads(a.engine_kwargs))
    params = SamplingParams(temperature=1.0, max_new_tokens=MAX_NEW_TOKENS)

    def once():
        torch.manual_seed(a.seed)
        t0 = time.perf_counter()
        groups = engine.generate(prompts, GROUP_SIZE, params)
        return time.perf_counter() - t0, sum(len(s.response_ids) for g in groups for s in g)

    runs, secs = timed_runs(once, a.repeats)
    tokens = runs[0][1]
    print(f"{a.arch} {a.size} ({params_count / 1e6:.2f} M): {tokens} tokens in {secs * 1000:.1f} ms (median of {a.repeats}) = "
          f"{tokens / secs:.0f} tok/s = {2 * params_count * tokens / secs / 1e9:.1f} GFLOP/s; "
          f"load {load_average()}")

    print_profile(once, a.profile, shapes=False)


if __name__ == "__main__":
    main()
