"""Log-probabilities and entropy of tokens from logits, a bounded block of the vocabulary softmax at a time.

A full ``[tokens, vocab]`` log-softmax is the largest tensor of a training step for a real
vocabulary (49k–150k entries × thousands of tokens), and autograd's version of
``log_softmax(logits / T).gather(tokens)`` keeps several such tensors alive (the scaled logits for
the backward, then its exp, the scattered one-hot and their sum). These functions flatten the
tokens and process them in chunks of at most :data:`CHUNK_ELEMENTS` logits (``chunk_size``
tokens when given), and :func:`token_logprobs` is one autograd node that keeps only the logits
it was given and one log-normaliser per token: its backward writes the gradient
``(onehot − softmax(logits / T)) · g / T`` chunk by chunk into one ``[tokens, vocab]`` tensor.

Both take the sampling ``temperature``: the trainer must score tokens under the distribution they
were drawn from, ``softmax(logits / T)``, or the importance ratio is not 1 on-policy.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

CHUNK_ELEMENTS = 1 << 22  # logits per chunk (16 MiB in float32) when no chunk_size is given


def _at_least_fp32(logits: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 logits are upcast for the softmax; float64 ones stay float64."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _chunk_rows(flat: torch.Tensor, chunk_size: int | None) -> int:
    """Tokens per chunk: ``chunk_size``, or as many as fit :data:`CHUNK_ELEMENTS` logits."""
    return chunk_size if chunk_size is not None else max(1, CHUNK_ELEMENTS // max(1, flat.shape[-1]))


class _TokenLogprob(torch.autograd.Function):
    """``log softmax(logits / T)[token]`` for ``logits [N, V]``, ``tokens [N]`` → ``[N]``, chunked."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, tokens: torch.Tensor, temperature: float, rows: int) -> torch.Tensor:
        n = logits.shape[0]
        dtype = torch.promote_types(logits.dtype, torch.float32)
        out = torch.empty(n, dtype=dtype, device=logits.device)
        lse = torch.empty(n, dtype=dtype, device=logits.device)
        for i in range(0, n, rows):
            scaled = _at_least_fp32(logits[i : i + rows]) / temperature
            lse[i : i + rows] = torch.logsumexp(scaled, dim=-1)
            out[i : i + rows] = scaled.gather(-1, tokens[i : i + rows, None]).squeeze(-1) - lse[i : i + rows]
        ctx.save_for_backward(logits, tokens, lse)
        ctx.temperature, ctx.rows = temperature, rows
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        logits, tokens, lse = ctx.saved_tensors
        temperature, rows = ctx.temperature, ctx.rows
        grad_logits = torch.empty_like(logits)
        for i in range(0, logits.shape[0], rows):
            g = grad[i : i + rows, None]
            # d/dlogits of (scaled[token] − logsumexp(scaled)), scaled = logits / T
            block = torch.exp(_at_least_fp32(logits[i : i + rows]) / temperature - lse[i : i + rows, None]).mul_(-g)
            block.scatter_add_(-1, tokens[i : i + rows, None], g)
            grad_logits[i : i + rows] = block.div_(temperature)
        return grad_logits, None, None, None


def token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, *, temperature: float = 1.0, chunk_size: int | None = None
) -> torch.Tensor:
    """Log-probability of each chosen token under ``softmax(logits / temperature)``.

    Args:
        logits: ``[..., vocab]`` raw logits.
        tokens: ``[...]`` token ids, same leading shape.
        temperature: sampling temperature the tokens were drawn at.
        chunk_size: tokens per chunk (None: as many as fit :data:`CHUNK_ELEMENTS` logits).
    Returns:
        ``[...]`` natural-log probabilities in float32 (float64 for float64 logits), differentiable
        w.r.t. ``logits`` (once: the backward is not itself differentiable).
    """
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_tokens = tokens.reshape(-1)
    if flat_logits.shape[0] == 0:
        return flat_logits.new_zeros(tokens.shape, dtype=torch.promote_types(logits.dtype, torch.float32))
    out = _TokenLogprob.apply(flat_logits, flat_tokens, float(temperature), _chunk_rows(flat_logits, chunk_size))
    return out.reshape(tokens.shape)


def _chunk_entropy(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    logp = torch.log_softmax(_at_least_fp32(logits) / temperature, dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def token_entropy(logits: torch.Tensor, *, temperature: float = 1.0, chunk_size: int | None = None) -> torch.Tensor:
    """Entropy (nats) of the next-token distribution at each position.

    Under autograd each chunk is recomputed in backward (activation checkpointing) instead of
    keeping its log-softmax alive, so an entropy bonus costs no more memory than the metric.

    Args:
        logits: ``[..., vocab]`` raw logits.
        temperature: sampling temperature.
        chunk_size: positions per chunk (None: as many as fit :data:`CHUNK_ELEMENTS` logits).
    Returns:
        ``[...]`` entropies in float32 (float64 for float64 logits).
    """
    flat = logits.reshape(-1, logits.shape[-1])
    needs_grad = torch.is_grad_enabled() and flat.requires_grad
    parts = []
    rows = _chunk_rows(flat, chunk_size)
    for i in range(0, flat.shape[0], rows):
        chunk = flat[i : i + rows]
        if needs_grad:
            parts.append(checkpoint(_chunk_entropy, chunk, temperature, use_reentrant=False))
        else:
            parts.append(_chunk_entropy(chunk, temperature))
    return torch.cat(parts).reshape(logits.shape[:-1]) if parts else flat.new_zeros(logits.shape[:-1])
