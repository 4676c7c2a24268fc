"""Log-probabilities and entropy of tokens from logits, one chunk of the vocabulary softmax at a time.

A full ``[batch, len, vocab]`` log-softmax is the largest tensor of a training step for a real
vocabulary (150k entries × thousands of tokens). These functions flatten the tokens and process
``chunk_size`` of them at a time, so at most one ``[chunk_size, vocab]`` log-softmax exists.

Both take the sampling ``temperature``: the trainer must score tokens under the distribution they
were drawn from, ``softmax(logits / T)``, or the importance ratio is not 1 on-policy.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def _at_least_fp32(logits: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 logits are upcast for the softmax; float64 ones stay float64."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _chunk_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    scaled = _at_least_fp32(logits) / temperature
    return scaled.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(scaled, dim=-1)


def _chunk_entropy(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    logp = torch.log_softmax(_at_least_fp32(logits) / temperature, dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, *, temperature: float = 1.0, chunk_size: int = 4096
) -> torch.Tensor:
    """Log-probability of each chosen token.

    Args:
        logits: ``[..., vocab]`` raw logits.
        tokens: ``[...]`` token ids, same leading shape.
        temperature: sampling temperature the tokens were drawn at.
        chunk_size: tokens per chunk.
    Returns:
        ``[...]`` natural-log probabilities in float32 (float64 for float64 logits), differentiable w.r.t. ``logits``.
    """
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_tokens = tokens.reshape(-1)
    parts = [
        _chunk_logprobs(flat_logits[i : i + chunk_size], flat_tokens[i : i + chunk_size], temperature)
        for i in range(0, flat_logits.shape[0], chunk_size)
    ]
    return torch.cat(parts).reshape(tokens.shape) if parts else flat_logits.new_zeros(tokens.shape)


def token_entropy(logits: torch.Tensor, *, temperature: float = 1.0, chunk_size: int = 4096) -> torch.Tensor:
    """Entropy (nats) of the next-token distribution at each position.

    Under autograd each chunk is recomputed in backward (activation checkpointing) instead of
    keeping its log-softmax alive, so an entropy bonus costs no more memory than the metric.

    Args:
        logits: ``[..., vocab]`` raw logits.
        temperature: sampling temperature.
        chunk_size: positions per chunk.
    Returns:
        ``[...]`` entropies in float32 (float64 for float64 logits).
    """
    flat = logits.reshape(-1, logits.shape[-1])
    needs_grad = torch.is_grad_enabled() and flat.requires_grad
    parts = []
    for i in range(0, flat.shape[0], chunk_size):
        chunk = flat[i : i + chunk_size]
        if needs_grad:
            parts.append(checkpoint(_chunk_entropy, chunk, temperature, use_reentrant=False))
        else:
            parts.append(_chunk_entropy(chunk, temperature))
    return torch.cat(parts).reshape(logits.shape[:-1]) if parts else flat.new_zeros(logits.shape[:-1])
