"""What sampling from base + LoRA adapters costs, per way of applying them.

For one model, with adapters (random B, so they are not a no-op) and without, times a
``generate`` call of ``--prompts`` prompts × ``--samples`` samples × ``--tokens`` tokens:

- ``fast``: the fast engine's direct decoder reading the frozen base in place, the adapters'
  low-rank terms computed on the fly (what the library does);
- ``fast-merged``: the same decoder on its own fused, packed per-call copies with the adapters
  merged in (``W + (alpha / r)·B·A``: no extra products per step, a weight-sized copy per call);
- ``fast-hf-decode``: the same engine decoding through the Hugging Face modules, where PEFT
  computes the adapters' term on the fly at every step;
- ``hf``: Hugging Face ``generate``, adapters on the fly (what the library does);
- ``hf-merge-in-place``: ``generate`` with the adapters merged into the model's weights before
  and unmerged after (PEFT's ``merge``/``unmerge``), and how far that leaves the base weights
  from where they were (fp32: W + BA − BA ≠ W).

The LoRA-specific cost of a way is its time with adapters minus its time without. Median of
``--repeats`` calls after one warm-up call each.

    python benchmarks/lora_sampling.py --model /tmp/smol/model --rank 16 --prompts 4 --samples 8 --tokens 48
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch


def timed(engine, prompts, samples: int, tokens: int, repeats: int, around=None) -> float:
    from dapo_rl.rollout import SamplingParams

    params = SamplingParams(temperature=1.0, max_new_tokens=tokens)
    times = []
    for i in range(repeats + 1):
        torch.manual_seed(i)
        start = time.perf_counter()
        if around is not None:
            around[0]()
        engine.generate(prompts, samples, params)
        if around is not None:
            around[1]()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="builtin:chain-tiny")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    from dapo_rl.models.loading import load_policy
    from dapo_rl.models.lora import adapter_layers, add_adapters
    from dapo_rl.rollout.decoder_engine import DecoderEngine
    from dapo_rl.rollout.hf import HFGenerateEngine

    base, tok = load_policy(args.model, progress=False)
    base.eval()
    adapted = copy.deepcopy(base)
    add_adapters(adapted, r=args.rank, alpha=2.0 * args.rank, dropout=0.0, target_modules=["all-linear"], base_path=args.model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 1e-3)
    adapted.eval()
    prompts = [tok(f"Sam has {i + 3} pencils and gets {i + 5} more. How many pencils does Sam have now?")["input_ids"]
               for i in range(args.prompts)]
    rows = {}
    for name, make in (("fast", lambda m: DecoderEngine(m, tok.pad_token_id, tok.eos_token_id)),
                       ("fast-merged", lambda m: DecoderEngine(m, tok.pad_token_id, tok.eos_token_id, read_in_place=False)),
                       ("fast-hf-decode", lambda m: DecoderEngine(m, tok.pad_token_id, tok.eos_token_id, direct_decode=False)),
                       ("hf", lambda m: HFGenerateEngine(m, tok.pad_token_id, tok.eos_token_id))):
        rows[name] = (timed(make(base), prompts, args.samples, args.tokens, args.repeats),
                      timed(make(adapted), prompts, args.samples, args.tokens, args.repeats))
    layers = [m for _, m in adapter_layers(adapted)]
    before = [m.base_layer.weight.detach().clone() for m in layers]
    merge = (lambda: [m.merge() for m in layers], lambda: [m.unmerge() for m in layers])
    rows["hf-merge-in-place"] = (rows["hf"][0], timed(HFGenerateEngine(adapted, tok.pad_token_id, tok.eos_token_id), prompts,
                                                      args.samples, args.tokens, args.repeats, around=merge))
    drift = max((m.base_layer.weight - w).abs().max().item() for m, w in zip(layers, before))
    changed = sum(int(not torch.equal(m.base_layer.weight, w)) for m, w in zip(layers, before))
    print(f"{args.model}: {sum(p.numel() for p in base.parameters()) / 1e6:.1f} M parameters, r={args.rank}, "
          f"{args.prompts} prompts x {args.samples} samples x {args.tokens} tokens, median of {args.repeats}")
    print(f"{'way':20}{'no adapters (s)':>18}{'adapters (s)':>15}{'LoRA cost (s)':>16}")
    for name, (plain, lora) in rows.items():
        print(f"{name:20}{plain:>18.3f}{lora:>15.3f}{lora - plain:>16.3f}")
    print(f"merge in place then unmerge, after {args.repeats + 1} calls: {changed} of {len(layers)} base weights changed, "
          f"max |dW| = {drift:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
