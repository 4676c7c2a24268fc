"""Check that bench_vs_trl.py gives both frameworks the same work: prompt ids, and the gradient of one batch.

    python benchmarks/trl_parity.py --size 512x8
    python benchmarks/trl_parity.py --size 64x2 --arch qwen2        # smoke run; any family of bench_vs_trl.ARCHS

Options: ``--size`` (a key of ``bench_vs_trl.SIZES``), ``--arch`` (model family, as in
bench_vs_trl.py, default llama), ``--sample-seed`` (seed of the fixed batch's sampling).

1. Prompt ids: TRL's ``generate`` is intercepted at step 0; the ids it feeds the model are
   compared with the ids our trainer's PromptStream serves at step 0.
2. Gradient: one fixed batch of 64 completions (sampled once by our engine from the step-0
   prompts) replaces generation in both trainers; the clipped gradient each computes before its
   optimiser step is captured and compared (cosine, norms). Done twice: with the batch as
   sampled, and with the last token of any length-limited completion that ends in ``<pad>``
   replaced by a digit (TRL counts such a completion as finished, see RESULTS.md).

Each trainer runs in its own subprocess (``--worker``). Needs ``pip install trl==1.16.0``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import bench_vs_trl as bench
import torch

PAD, EOS, DIGIT = 0, 2, 3


def _samples(folder: Path, seed: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dapo_rl.data.datasets import Example
    from dapo_rl.data.encoding import encode_prompts
    from dapo_rl.rollout.base import SamplingParams
    from dapo_rl.rollout.decoder_engine import DecoderEngine
    from dapo_rl.training.rollouts import PromptStream

    tok = AutoTokenizer.from_pretrained(folder / "model")
    model = AutoModelForCausalLM.from_pretrained(folder / "model", dtype=torch.float32)
    texts = json.loads((folder / "prompts.json").read_text())
    encoded, _ = encode_prompts([Example(prompt=t, answer="0", metadata={}) for t in texts], tok)
    prompts = [list(p.ids) for p in PromptStream(encoded, 0).take(bench.PROMPTS_PER_STEP)]
    torch.manual_seed(seed)
    groups = DecoderEngine(model, tok.pad_token_id, tok.eos_token_id).generate(
        prompts, bench.GROUP_SIZE, SamplingParams(temperature=1.0, max_new_tokens=bench.MAX_NEW_TOKENS))
    return {"prompts": prompts, "completions": [s.response_ids for g in groups for s in g]}


def _worker(framework: str, folder: Path, fixed_path: Path, out_path: Path) -> None:
    """Run one step of ``framework`` on the fixed batch; save its clipped gradient and step-0 prompt ids."""
    fixed = json.loads(fixed_path.read_text())
    grads: dict[str, torch.Tensor] = {}
    seen: dict[str, list] = {}

    def capture(model):
        grads.update({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})

    if framework == "ours":
        import dapo_rl.training.trainer as T
        from dapo_rl.rollout.base import FINISH_LENGTH, FINISH_STOP, Sample

        original = T.Trainer.__init__

        def init(self, *args, **kwargs):
            original(self, *args, **kwargs)

            def generate(prompts, n, params):
                if n == bench.GROUP_SIZE:  # a rollout; the trainer's weight-sync probe decodes 1 sample greedily
                    seen.setdefault("prompts", [list(p) for p in prompts])
                completions = fixed["completions"]
                return [[Sample(list(p), list(c), FINISH_STOP if c and c[-1] == EOS else FINISH_LENGTH)
                         for c in completions[i * n : (i + 1) * n]] for i, p in enumerate(prompts)]

            self.engine.generate = generate
            step = self.optimizer.step

            def optimizer_step(*a, **kw):
                capture(self.model)
                return step(*a, **kw)

            self.optimizer.step = optimizer_step

        T.Trainer.__init__ = init
        bench.run_ours(folder, 1, 0, 0, 1, "fast")
    else:
        import transformers
        import trl
        from transformers import TrainerCallback

        def generate(self, *args, input_ids=None, attention_mask=None, **kwargs):
            rows = [[t for t, m in zip(r, a) if m] for r, a in zip(input_ids.tolist(), attention_mask.tolist())]
            seen["prompts"] = rows[:: bench.GROUP_SIZE]
            seen["repeated"] = all(rows[i] == rows[i - i % bench.GROUP_SIZE] for i in range(len(rows)))
            padded = [c + [PAD] * (bench.MAX_NEW_TOKENS - len(c)) for c in fixed["completions"]]
            return torch.cat([input_ids, torch.tensor(padded)], dim=1)

        transformers.GenerationMixin.generate = generate
        original = trl.GRPOTrainer.__init__

        def init(self, *args, **kwargs):
            original(self, *args, **kwargs)
            trainer = self

            class Capture(TrainerCallback):
                def on_pre_optimizer_step(self, args, state, control, **kw):
                    capture(trainer.model)

            self.add_callback(Capture())

        trl.GRPOTrainer.__init__ = init
        bench.run_trl(folder, 1, 0, 0, 1, keep_freed_memory=False)
    torch.save({"grads": grads, "seen": seen}, out_path)


def _run_workers(work: Path, folder: Path, fixed: dict) -> dict:
    """One training step of each framework on the batch ``fixed``, each in its own subprocess."""
    fixed_path = work / "fixed.json"
    fixed_path.write_text(json.dumps(fixed))
    result = {}
    for framework in ("ours", "trl"):
        out = work / f"{framework}.pt"
        cmd = [sys.executable, __file__, "--worker", framework, "--folder", str(folder), "--fixed", str(fixed_path),
               "--out", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{framework} worker failed:\n{proc.stderr[-3000:]}")
        result[framework] = torch.load(out)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="512x8", choices=sorted(bench.SIZES))
    p.add_argument("--arch", default="llama", choices=bench.ARCHS, help="model family (see bench_vs_trl.build_model)")
    p.add_argument("--sample-seed", type=int, default=5, help="seed of the fixed batch's sampling")
    p.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    p.add_argument("--fixed", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        _worker(a.worker, Path(a.folder), Path(a.fixed), Path(a.out))
        return

    work = Path(tempfile.mkdtemp(prefix="trl-parity-"))
    folder = bench.prepare(work, a.size, 1, 0, a.arch)
    batch = _samples(folder, a.sample_seed)
    at_limit_pad = [i for i, c in enumerate(batch["completions"]) if len(c) == bench.MAX_NEW_TOKENS and c[-1] == PAD]
    variants = {"as sampled": batch,
                "pad-ended at limit fixed": {**batch, "completions": [c[:-1] + [DIGIT] if i in at_limit_pad else c
                                                                       for i, c in enumerate(batch["completions"])]}}
    print(f"{a.arch} {a.size}: batch of {len(batch['completions'])} completions, mean length "
          f"{sum(map(len, batch['completions'])) / len(batch['completions']):.1f}, <pad> tokens inside "
          f"{sum(c.count(PAD) for c in batch['completions'])}, length-limited ending in <pad>: {len(at_limit_pad)}")
    result: dict = {}
    for name, fixed in variants.items():
        reused = name != "as sampled" and fixed == batch  # nothing to fix: the gradients of the batch as sampled
        if not reused:
            result = _run_workers(work, folder, fixed)
        if name == "as sampled":
            ours_p, trl_p = result["ours"]["seen"]["prompts"], result["trl"]["seen"]["prompts"]
            print(f"step-0 prompt ids identical: {ours_p == trl_p} (TRL rows repeat each prompt "
                  f"{bench.GROUP_SIZE}x: {result['trl']['seen']['repeated']}); first: {ours_p[0]}")
        g_ours, g_trl = result["ours"]["grads"], result["trl"]["grads"]
        names = sorted(g_ours)
        va = torch.cat([g_ours[n].flatten() for n in names])
        vb = torch.cat([g_trl[n].flatten() for n in names])
        cos = torch.nn.functional.cosine_similarity(va.double(), vb.double(), dim=0).item()
        print(f"gradient, batch {name}: cosine {cos:.4f}, norms ours {va.norm():.5f} TRL {vb.norm():.5f}"
              + (" (no completion to fix: the batch as sampled)" if reused else ""))


if __name__ == "__main__":
    main()
