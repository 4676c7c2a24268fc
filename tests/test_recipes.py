"""The scripts in recipes/ run as a user runs them (a smoke test each, seconds on a tiny model)."""

from __future__ import annotations

import re
import string
import subprocess
import sys
from pathlib import Path

import torch
import transformers as tf

from dapo_rl.models.tiny import build_char_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def test_the_tool_call_warm_up_trains_the_call_and_the_answer_only(tmp_path):
    """recipes/smollm2_tool_warmup.py on a tiny llama with a character tokenizer: its conversations
    are built as the rollout builds them (the trained tokens are exactly the call, the answer and
    their end-of-turn tokens), it runs, and the saved tokenizer carries the tools template."""
    sys.path.insert(0, str(ROOT / "recipes"))
    try:
        import smollm2_tool_warmup as warmup
    finally:
        sys.path.remove(str(ROOT / "recipes"))
    tokenizer = build_char_tokenizer(string.printable)
    tokenizer.chat_template = (ROOT / "recipes" / "smollm2-tools.jinja").read_text()
    question, expression = warmup.problem(__import__("random").Random(0))
    assert str(eval(expression)) == warmup.calculator(expression)  # noqa: S307 - our own generated arithmetic
    ids, trained = warmup.conversation(tokenizer, [{"type": "function", "function": {"name": "calculator"}}], question, expression)
    text = tokenizer.decode([i for i, t in zip(ids, trained) if t])
    value = warmup.calculator(expression)
    assert text == ('<tool_call>{"name": "calculator", "arguments": {"expression": "' + expression + '"}}</tool_call></s>'
                    + f"{expression} = {value}</s>")
    context = tokenizer.decode([i for i, t in zip(ids, trained) if not t])
    assert question in context and f"<tool_response>\n{value}\n</tool_response>" in context

    model_dir, out = tmp_path / "model", tmp_path / "out"
    config = tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                            pad_token_id=tokenizer.pad_token_id, bos_token_id=1, eos_token_id=2)
    tf.LlamaForCausalLM(config).save_pretrained(model_dir)
    build_char_tokenizer(string.printable).save_pretrained(model_dir)
    proc = subprocess.run([sys.executable, "recipes/smollm2_tool_warmup.py", str(model_dir), str(out), "--chat-template",
                           "recipes/smollm2-tools.jinja", "--steps", "3", "--batch", "2", "--lr", "1e-3"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"loss (\d+\.\d+)", proc.stdout)]
    assert len(losses) == 3 and losses[-1] < losses[0]  # lr 1e-3 on a random model: the loss falls
    assert "<tool_call>" in tf.AutoTokenizer.from_pretrained(out).chat_template
    assert torch.isfinite(tf.AutoModelForCausalLM.from_pretrained(out).model.embed_tokens.weight).all()
