"""Multi-turn against single-turn rollout speed on the fast engine: model tokens per second.

    python benchmarks/multi_turn_rollout.py --size 256x4 --rounds 5        # alternated rounds, medians printed
    python benchmarks/multi_turn_rollout.py --size 64x2 --rounds 1         # smoke run

The work is the profile scripts' (8 prompts × 8 samples of bench_vs_trl's randomly initialised
model, seeded), at equal total tokens:

- **Single-turn:** one ``generate`` of ``--budget`` new tokens per sample. EOS is switched off
  (the engine's EOS id is one the model cannot sample), so every sample runs the whole budget.
- **Multi-turn:** the same prompts through :class:`~dapo_rl.rollout.multi_turn.MultiTurnSampler`,
  with an environment that answers every model turn with a one-token message. A trajectory has
  up to ``--turns`` model turns within the same ``--budget`` (model and environment tokens
  together), and a model turn ends at EOS.

The rate compared is model tokens per second of the whole call, environment handling included.
Rounds alternate the two modes; the medians and their ratio are printed. The issue's goal:
multi-turn ≥ 0.7× single-turn.

With ``--tool-ms`` every reply takes that long, as a tool would; ``--wait-steps N`` runs the
replies in threads while the other rows sample (``rollout.tool_wait_steps``)::

    python benchmarks/multi_turn_rollout.py --size 256x4 --rounds 3 --tool-ms 5                  # the loop waits
    python benchmarks/multi_turn_rollout.py --size 256x4 --rounds 3 --tool-ms 5 --wait-steps 8   # replies overlap

Options: ``--size`` (a key of ``bench_vs_trl.SIZES``), ``--arch``, ``--rounds``, ``--budget``,
``--turns``, ``--threads``, ``--seed``, ``--tool-ms``, ``--wait-steps``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench_vs_trl import ARCHS, GROUP_SIZE, MAX_NEW_TOKENS, SIZES, load_average
from profile_rollout import build


class OneTokenReply:
    """Answers every model turn with '=' after ``latency_s`` (a tool's time) and never ends the
    trajectory itself."""

    latency_s = 0.0

    def reset(self, row):
        return None

    def step(self, text):
        if self.latency_s:
            time.sleep(self.latency_s)
        return "=", False


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="256x4", choices=sorted(SIZES))
    p.add_argument("--arch", default="llama", choices=ARCHS)
    p.add_argument("--rounds", type=int, default=5, help="alternated rounds of both modes (medians printed)")
    p.add_argument("--budget", type=int, default=MAX_NEW_TOKENS, help="tokens after the prompt, per trajectory")
    p.add_argument("--turns", type=int, default=4, help="most model turns of a multi-turn trajectory")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tool-ms", type=float, default=0.0, help="each reply takes this long (a tool's latency)")
    p.add_argument("--wait-steps", type=int, default=0, help="rollout.tool_wait_steps: replies run while the loop samples")
    a = p.parse_args()
    OneTokenReply.latency_s = a.tool_ms / 1000

    from dapo_rl.rollout.base import SamplingParams
    from dapo_rl.rollout.decoder_engine import DecoderEngine
    from dapo_rl.rollout.multi_turn import MultiTurnSampler

    torch.set_num_threads(a.threads)
    model, tok, prompts = build(a.size, a.seed, a.arch)
    engine = DecoderEngine(model, tok.pad_token_id, tok.eos_token_id, keep_decoder=True)
    no_eos = DecoderEngine(model, tok.pad_token_id, len(tok), keep_decoder=True)  # an id no sample can be
    sampler = MultiTurnSampler(engine, tok, environment=OneTokenReply, max_turns=a.turns, wait_steps=a.wait_steps)
    params = SamplingParams(temperature=1.0, max_new_tokens=a.budget)

    def single() -> tuple[float, int, float]:
        torch.manual_seed(a.seed)
        t0 = time.perf_counter()
        groups = no_eos.generate(prompts, GROUP_SIZE, params)
        return time.perf_counter() - t0, sum(len(s.response_ids) for g in groups for s in g), 1.0

    def multi() -> tuple[float, int, float]:
        torch.manual_seed(a.seed)
        t0 = time.perf_counter()
        groups = sampler.generate(prompts, GROUP_SIZE, params)
        seconds = time.perf_counter() - t0
        samples = [s for g in groups for s in g]
        return seconds, sum(s.model_tokens for s in samples), sum(s.trajectory.turns for s in samples) / len(samples)

    single(), multi()  # warm-up (kernels, oneDNN shapes)
    rates: dict[str, list[float]] = {"single-turn": [], "multi-turn": []}
    shown: dict[str, tuple[int, float]] = {}
    for _ in range(a.rounds):
        for name, run in (("single-turn", single), ("multi-turn", multi)):
            seconds, tokens, turns = run()
            rates[name].append(tokens / seconds)
            shown[name] = (tokens, turns)
    for name, values in rates.items():
        tokens, turns = shown[name]
        print(f"{a.arch} {a.size} {name}: {tokens} model tokens, {turns:.2f} turns per trajectory, "
              f"{statistics.median(values):.0f} tok/s (median of {len(values)}; range {min(values):.0f}-{max(values):.0f})")
    ratio = statistics.median(rates["multi-turn"]) / statistics.median(rates["single-turn"])
    print(f"multi-turn / single-turn tokens/s: x{ratio:.2f} (goal >= 0.7); load {load_average()}")


if __name__ == "__main__":
    main()
