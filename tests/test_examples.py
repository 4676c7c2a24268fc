"""The scripts in examples/ run (a smoke test each, seconds on the built-in model), as a user
runs them: ``python -m examples.<name>`` from the repository root."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from dapo_rl.algorithm.registry import import_path

ROOT = Path(__file__).resolve().parents[1]


def _run(module: str, cache: str, *argv: str) -> str:
    env = {**os.environ, "DAPO_RL_CACHE": cache, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, "-m", module, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _gsm8k_style(path: Path, n: int = 24) -> Path:
    """Built-in chain rows in GSM8K's columns: a question, and a worked answer ending in '#### <n>'."""
    from dapo_rl.data.synthetic import builtin_splits

    path.write_text("".join(json.dumps({"question": e.prompt, "answer": f"worked steps\n#### {e.answer}"}) + "\n"
                            for e in builtin_splits(n, 4)[0]))
    return path


def test_gsm8k_math_verify_example(tmp_path, quickstart_cache):
    run = tmp_path / "gsm8k"
    out = _run("examples.gsm8k_math_verify", quickstart_cache, "--model", "builtin:chain-tiny", "--data",
               str(_gsm8k_style(tmp_path / "rows.jsonl")), "--instruction", "", "--max-completion-length", "8",
               "--max-steps", "2", "--output-dir", str(run))
    assert "trained 2 steps" in out and (run / "final" / "model.safetensors").is_file()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # math_verify scored the built-in model's '#<digit>' answers: some right, some not.
    assert len(rows) == 2 and all(0 < row["reward/accuracy"] < 1 for row in rows)
    functions = yaml.safe_load((run / "config.yaml").read_text())["reward"]["functions"]
    assert functions == ["examples.gsm8k_math_verify:accuracy", "examples.gsm8k_math_verify:format_ok"]
    assert all(callable(import_path(f, "reward function")) for f in functions)  # dapo train can run the file


def test_multi_reward_example(tmp_path, quickstart_cache):
    run = tmp_path / "multi"
    # A low target: the callback stops after the first update, which leaves a checkpoint.
    out = _run("examples.multi_reward", quickstart_cache, "--max-steps", "4", "--stop-at-accuracy", "0.01", "--output-dir", str(run))
    assert "update 1: accuracy=" in out and "correct=" in out and "concise=" in out and "level_one_only=" in out
    assert "ran 1 of 4 steps" in out and (run / "checkpoints" / "step_000001").is_dir() and not (run / "final").exists()
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert {"reward/correct", "reward/concise", "reward/level_one_only"} <= row.keys()
    assert (run / "adapter" / "adapter_model.safetensors").is_file()  # LoRA: the adapter, not the full model
