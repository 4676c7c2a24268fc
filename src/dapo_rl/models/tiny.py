"""Tiny policies built in code: a character tokenizer and a small Llama, no downloads.

Both are ordinary Hugging Face objects: ``save_pretrained`` writes a folder that
``AutoTokenizer`` / ``AutoModelForCausalLM.from_pretrained`` load back.
"""

from __future__ import annotations

import re
from typing import Sequence

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

PAD, BOS, EOS = "<pad>", "<s>", "</s>"


def build_char_tokenizer(characters: Sequence[str], words: Sequence[str] = ()) -> PreTrainedTokenizerFast:
    """One token per character, plus ``<pad>`` (id 0), ``<s>`` (1, prepended on encoding) and ``</s>`` (2).

    Text is split into single characters before lookup, and decoding concatenates them back
    without separators, so ``decode(encode(s)) == s`` for any string over ``characters``.
    ``words``: longer pieces that are one token each wherever they occur (the longest first), as a
    real tokenizer has tokens for ``<tool_call>`` and frequent text; their ids follow the characters'.
    """
    vocab = {PAD: 0, BOS: 1, EOS: 2}
    for char in characters:
        if len(char) != 1:
            raise ValueError(f"characters must be single characters, got {char!r}")
        vocab.setdefault(char, len(vocab))
    for word in words:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD))
    pieces = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(f"{pieces}|." if pieces else "."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    # Every encoded text starts with <s>, as for most pretrained tokenizers.
    backend.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, bos_token=BOS, eos_token=EOS, padding_side="left"
    )


def build_tiny_llama(
    tokenizer: PreTrainedTokenizerFast,
    *,
    hidden_size: int = 128,
    num_layers: int = 3,
    num_heads: int = 4,
    intermediate_size: int = 256,
    max_positions: int = 128,
    seed: int = 0,
) -> LlamaForCausalLM:
    """A randomly initialised Llama sized for the tokenizer, in float32, deterministic by ``seed``."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.float()
