"""Two processes with gloo: the same update as one process, and a short run that trains."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dapo_rl.training.distributed import DistContext


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _one_update(rank: int, world_size: int, port: int, out_path: str, overrides: list[str]) -> None:
    # Imported here: the worker is a fresh spawned interpreter.
    from tests.test_training import _groups, _trainer
    from dapo_rl.data.synthetic import VOCAB
    from dapo_rl.models.tiny import build_char_tokenizer, build_tiny_llama

    torch.set_num_threads(1)
    if world_size > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    tok = build_char_tokenizer(VOCAB)
    model = build_tiny_llama(tok, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, seed=3).double()
    trainer = _trainer(model, tok, overrides)
    trainer.dist = DistContext(rank=rank, world_size=world_size)
    metrics = trainer._update(_groups(tok, 4, 4, seed=5))
    if rank == 0:
        params = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
        torch.save({"params": params, "metrics": metrics}, out_path)
    if world_size > 1:
        dist.destroy_process_group()


def _run(world_size: int, tmp_path, overrides: list[str]) -> dict:
    out = str(tmp_path / f"w{world_size}.pt")
    if world_size == 1:
        _one_update(0, 1, 0, out, overrides)
    else:
        mp.start_processes(_one_update, args=(world_size, _free_port(), out, overrides), nprocs=world_size, start_method="spawn")
    return torch.load(out)


@pytest.mark.parametrize("overrides", [["ppo_epochs=1"], ["ppo_epochs=2", "loss.agg_mode=seq-mean-token-mean"]])
def test_two_process_update_equals_single_process(tmp_path, overrides):
    single = _run(1, tmp_path, overrides)
    double = _run(2, tmp_path, overrides)
    torch.testing.assert_close(double["params"], single["params"], rtol=1e-9, atol=1e-10)
    for key in ("train/entropy", "train/clip_frac_low", "train/clip_frac_high", "train/loss"):
        assert double["metrics"][key] == pytest.approx(single["metrics"][key], rel=1e-6, abs=1e-9), key


def test_ownership_partitions_the_batch():
    owners = [[DistContext(rank=r, world_size=3).owns(i) for r in range(3)] for i in range(10)]
    assert all(sum(row) == 1 for row in owners)


@pytest.mark.slow
def test_torchrun_training_run_completes(tmp_path, quickstart_cache):
    """A real `torchrun --nproc_per_node 2 -m dapo_rl.cli train` run on CPU with gloo."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "dapo_rl.cli", "train", f"output_dir={tmp_path / 'run'}", f"quickstart.cache_dir={quickstart_cache}",
           "steps=4", "prompts_per_step=8", "mini_batch_size=4", "micro_batch_size=16", "eval.interval=2",
           "data.builtin_eval_size=32", "logging.progress=false"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["step"] > 0]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]  # written once, by rank 0
    assert all(r["train/batch_groups"] == 8 for r in steps)
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
