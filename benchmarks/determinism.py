"""Which CPU operations of a training run give the same bits every time, at this thread count.

    python benchmarks/determinism.py                      # every case, 200 repeats, default threads
    python benchmarks/determinism.py --repeats 20 --scale 0.25 --threads 1   # smoke run (seconds)

Each case builds its inputs once, runs the operation ``--repeats`` times on those same inputs
(forward and, where it has one, backward), hashes the result bytes and prints how many distinct
results it saw: 1 means deterministic at this thread count. The cases are the reductions a
training step runs: the trainer's gathers (advanced indexing ``x[idx]`` and ``index_select``, whose
backwards differ), embedding backward, ``scatter_add``/``index_add``, MKL/oneDNN products, the
attention products and SDPA, log-softmax + gather, AdamW, and the fast engine's decode (oneDNN
packed products and the fused C kernels) through sampled generation of a tiny model (reseeded before each run).

``x[idx]`` with repeated indices past 32768 elements is the one case expected to show more than one
result at ≥ 2 threads: its backward is ``index_put_(accumulate=True)``, which PyTorch runs with
atomic adds from several threads. It is the control that shows the check can see a race; the
trainer gathers with ``index_select`` (``tests/test_reproducibility.py`` holds it to that).

Options: ``--repeats`` (runs per case), ``--threads`` (torch threads; default: torch's default for
this machine), ``--scale`` (multiplies the sizes; < 1 for a quick run), ``--only`` (comma list of
case names).
"""

from __future__ import annotations

import argparse
import hashlib
import time
from collections.abc import Callable

import torch

F = torch.nn.functional


def _digest(*tensors: torch.Tensor | None) -> str:
    h = hashlib.sha256()
    for t in tensors:
        if t is not None:
            h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def _grad_case(build: Callable[[], tuple[list[torch.Tensor], Callable[..., torch.Tensor]]]) -> Callable[[], str]:
    """``build()`` → (leaf inputs, fn); each call: forward, backward of a fixed weighted sum, digest."""
    leaves, fn = build()
    weights: list[torch.Tensor] = []

    def once() -> str:
        for leaf in leaves:
            leaf.grad = None
        out = fn(*leaves)
        if not weights:
            weights.append(torch.randn(out.shape, generator=torch.Generator().manual_seed(7)))
        (out * weights[0]).sum().backward()
        return _digest(out, *[leaf.grad for leaf in leaves])

    return once


def cases(scale: float) -> dict[str, Callable[[], str]]:
    g = torch.Generator().manual_seed(0)

    def n(x: int) -> int:
        return max(2, int(x * scale))

    def randn(*shape, grad=True):
        return torch.randn(*shape, generator=g).requires_grad_(grad)

    prompts, group, kv_heads, plen, d = n(16), 8, 4, n(16), 16
    # Each prompt gathered once per response, its copies spread over the batch (rows are ordered
    # by response length in the trainer), so the threads' halves of the index share destinations.
    idx = torch.arange(prompts).repeat(group)
    tokens, hidden, vocab = n(2000), 256, n(4096)
    token_ids = torch.randint(0, vocab, (tokens,), generator=g)
    out: dict[str, Callable[[], str]] = {
        # The control: repeated indices, ≥ 32768 elements → threaded atomic adds in the backward.
        # Each prompt's keys/values flattened to a row [kv_heads · P · d], as the trainer gathers them.
        "gather x[idx] (repeats)": _grad_case(lambda: ([randn(prompts, kv_heads * plen * d)], lambda x: x[idx])),
        "gather index_select (repeats)": _grad_case(lambda: ([randn(prompts, kv_heads * plen * d)],
                                                            lambda x: x.index_select(0, idx))),
        "embedding": _grad_case(lambda: ([randn(vocab, hidden)], lambda w: F.embedding(token_ids, w))),
        "scatter_add": _grad_case(lambda: ([randn(tokens, hidden)], lambda x: torch.zeros(vocab, hidden).scatter_add(
            0, token_ids[:, None].expand(-1, hidden), x))),
        "index_add": _grad_case(lambda: ([randn(tokens, hidden)],
                                         lambda x: torch.zeros(vocab, hidden).index_add(0, token_ids, x))),
        "linear (MKL)": _grad_case(lambda: ([randn(tokens, hidden), randn(4 * hidden, hidden)], F.linear)),
        "attention products": _grad_case(lambda: ([randn(n(64), 4, 32, d), randn(n(64), 4, 48, d), randn(n(64), 4, 48, d)],
                                                  lambda q, k, v: (q @ k.transpose(-1, -2)).softmax(-1) @ v)),
        "sdpa causal": _grad_case(lambda: ([randn(n(64), 4, 48, d), randn(n(64), 4, 48, d), randn(n(64), 4, 48, d)],
                                           lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True))),
        "log_softmax + gather": _grad_case(lambda: ([randn(tokens, vocab)],
                                                    lambda x: x.log_softmax(-1).gather(-1, token_ids[:, None]))),
    }

    params = [torch.randn(n(4 * hidden), hidden, generator=g) for _ in range(4)]
    grads = [torch.randn(p.shape, generator=g) for p in params]

    def adamw() -> str:
        ps = [p.clone().requires_grad_() for p in params]
        opt = torch.optim.AdamW(ps, lr=1e-3)
        for _ in range(3):
            for p, gr in zip(ps, grads):
                p.grad = gr.clone()
            opt.step()
        return _digest(*ps)

    out["AdamW (3 steps)"] = adamw
    out["fast engine decode (oneDNN + C kernels)"] = _decode_case(scale)
    return out


def _decode_case(scale: float) -> Callable[[], str]:
    from dapo_rl.data.synthetic import VOCAB
    from dapo_rl.models.tiny import build_char_tokenizer, build_tiny_llama
    from dapo_rl.rollout import SamplingParams
    from dapo_rl.rollout.decoder_engine import DecoderEngine

    tok = build_char_tokenizer(VOCAB)
    model = build_tiny_llama(tok, hidden_size=256, num_layers=4, num_heads=8, intermediate_size=688, seed=0)
    engine = DecoderEngine(model, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    prompts = [tok(text)["input_ids"] for text in ("12+7=", "3456+1=", "9=", "81+18=")] * max(1, int(2 * scale))
    params = SamplingParams(max_new_tokens=32, temperature=1.0)

    def once() -> str:
        torch.manual_seed(0)  # the same random stream each time: sampling is part of the check
        groups = engine.generate(prompts, 8, params)  # 8 samples per prompt, as a rollout group
        return _digest(torch.tensor([lp for group in groups for s in group for lp in s.logprobs]))

    return once


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=200, help="runs per case on the same inputs")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--scale", type=float, default=1.0, help="size multiplier (< 1 for a quick run)")
    parser.add_argument("--only", default=None, help="comma list of case names")
    a = parser.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    chosen = cases(a.scale)
    if a.only:
        chosen = {k: v for k, v in chosen.items() if k in a.only.split(",")}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {a.repeats} repeats, scale {a.scale}")
    print(f"{'case':<42} {'distinct results':>16} {'ms/run':>8}")
    for name, once in chosen.items():
        once()  # warm-up (first-call allocations, kernel compilation)
        t0 = time.perf_counter()
        distinct = len({once() for _ in range(a.repeats)})
        ms = (time.perf_counter() - t0) / a.repeats * 1e3
        print(f"{name:<42} {distinct:>16} {ms:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
