"""Two processes with gloo: the same update as one process, and a short run that trains."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dapo_rl.training.distributed import DistContext, shutdown_distributed


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


CASES = {  # name -> trainer overrides; small micro-batches give ranks unequal micro-batch counts
    "on-policy": ["ppo_epochs=1"],
    "two-epochs": ["ppo_epochs=2", "loss.agg_mode=seq-mean-token-mean"],
    "kl-micro2": ["ppo_epochs=1", "micro_batch_size=2", "loss.kl_coef=0.1", "optim.grad_clip=0.5"],
    # The default forward (distinct prompts run once; FSDP2 turns it off): rows are grouped
    # differently on 2 ranks, and HF's RMSNorm computes in float32 whatever the model dtype, so
    # gradients agree to ~1e-8 only; Adam's normalisation magnifies that for near-zero gradients
    # (a few elements move by ~1e-6, against updates of ~lr = 1e-2).
    "shared-prompts": ["ppo_epochs=1", "+share_prompts"],
    # LoRA adapters (B ≠ 0): replicated under DDP; sharded with the frozen base under FSDP2.
    "lora": ["ppo_epochs=2", "micro_batch_size=2", "+lora"],
}
TOLERANCE = {"shared-prompts": dict(rtol=1e-5, atol=5e-6)}


def _build(overrides: list[str], dist_ctx: DistContext):
    from tests.conftest import make_trainer
    from dapo_rl.data.synthetic import VOCAB
    from dapo_rl.models.tiny import build_char_tokenizer, build_tiny_llama

    tok = build_char_tokenizer(VOCAB)
    model = build_tiny_llama(tok, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seed=3).double()
    share = "+share_prompts" in overrides
    if "+lora" in overrides:
        from tests.conftest import with_adapters

        model = with_adapters(model)
    return make_trainer(model, tok, [o for o in overrides if not o.startswith("+")], dist=dist_ctx, share_prompts=share), tok


def _run_case(overrides: list[str], dist_ctx: DistContext, workdir: Path, tag: str, resume_from: str) -> dict:
    """Update 1 and a checkpoint into ``workdir/tag``; then a fresh trainer resumes the checkpoint
    in ``workdir/resume_from`` and makes update 2 on other groups."""
    from tests.conftest import make_scored_groups
    from dapo_rl.training.checkpoint import load_checkpoint, save_checkpoint

    trainer, tok = _build(overrides, dist_ctx)
    metrics = trainer.update(make_scored_groups(tok, 4, 4, seed=5))
    trainer.state.step = 1
    save_checkpoint(trainer, workdir / tag, keep_last=0)
    out = {"params1": _flat(dist_ctx.full_model_state(trainer.model)), "metrics": metrics,
           "local_numel": sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in trainer.model.parameters()),
           "total_numel": sum(p.numel() for p in trainer.model.parameters())}
    dist_ctx.barrier()  # the checkpoint to resume is complete
    resumed, _ = _build(overrides, dist_ctx)
    load_checkpoint(resumed, workdir / resume_from / "checkpoints" / "step_000001")
    resumed.update(make_scored_groups(tok, 4, 4, seed=6))
    out["params2"] = _flat(dist_ctx.full_model_state(resumed.model))
    return out


def _flat(state: dict) -> torch.Tensor | None:
    return torch.cat([v.flatten() for _, v in sorted(state.items())]) if state else None


def _worker(rank: int, world_size: int, port: int, workdir: str, strategy: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    ctx = DistContext(rank=rank, world_size=world_size, strategy=strategy)
    results = {name: _run_case(overrides, ctx, Path(workdir), f"{strategy}-{name}", f"single-{name}") for name, overrides in CASES.items()}
    if rank == 0:
        torch.save(results, Path(workdir) / f"{strategy}.pt")
    shutdown_distributed()


@pytest.fixture(scope="module")
def single_results(tmp_path_factory) -> tuple[Path, dict]:
    workdir = tmp_path_factory.mktemp("dist")
    return workdir, {name: _run_case(overrides, DistContext(), workdir, f"single-{name}", f"single-{name}")
                     for name, overrides in CASES.items()}


_spawned: dict[str, dict] = {}


def _two_process_results(workdir: Path, strategy: str) -> dict:
    """Every case under ``strategy`` with 2 gloo processes (one spawn per strategy)."""
    if strategy not in _spawned:
        mp.start_processes(_worker, args=(2, _free_port(), str(workdir), strategy), nprocs=2, start_method="spawn")
        _spawned[strategy] = torch.load(workdir / f"{strategy}.pt")
    return _spawned[strategy]


def _load_into_single(folder: Path, overrides: list[str]):
    from dapo_rl.training.checkpoint import load_checkpoint

    trainer, _ = _build(overrides, DistContext())
    load_checkpoint(trainer, folder / "checkpoints" / "step_000001")
    params = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    moments = torch.cat([torch.cat([s["exp_avg"].flatten(), s["exp_avg_sq"].flatten()]) for s in trainer.optimizer.state.values()])
    return params, moments


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
@pytest.mark.parametrize("case", list(CASES))
def test_two_process_update_equals_single_process(single_results, strategy, case):
    workdir, single = single_results
    double = _two_process_results(workdir, strategy)[case]
    ref = single[case]
    tol = TOLERANCE.get(case, dict(rtol=1e-9, atol=1e-10))
    torch.testing.assert_close(double["params1"], ref["params1"], **tol)
    for key in ("train/entropy", "train/clip_frac_low", "train/clip_frac_high", "train/loss", "train/grad_norm"):
        assert double["metrics"][key] == pytest.approx(ref["metrics"][key], rel=max(1e-6, tol["rtol"]), abs=1e-9), key
    # Resuming a single-process checkpoint on 2 processes continues exactly (Adam state included) ...
    torch.testing.assert_close(double["params2"], ref["params2"], **tol)
    # ... and a 2-process checkpoint resumes in one process with the same weights and Adam moments.
    p2, m2 = _load_into_single(workdir / f"{strategy}-{case}", CASES[case])
    p1, m1 = _load_into_single(workdir / f"single-{case}", CASES[case])
    torch.testing.assert_close(p2, p1, **tol)
    torch.testing.assert_close(m2, m1, rtol=tol["rtol"], atol=1e-12 if case not in TOLERANCE else 1e-9)
    if strategy == "fsdp2":  # each rank holds half of every parameter (dim 0 split, rounded up)
        assert double["local_numel"] < 0.6 * double["total_numel"]
    else:
        assert double["local_numel"] == double["total_numel"]


def test_ownership_partitions_the_batch():
    owners = DistContext(rank=1, world_size=3).owners(10)
    assert owners.tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]  # every sample exactly one rank, round robin


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_torchrun_training_run_completes_and_resumes_on_one_process(tmp_path, quickstart_cache, strategy):
    """A real `torchrun --nproc_per_node 2 -m dapo_rl.cli train` run on CPU with gloo, then the
    run continued from its checkpoint by a single process (another world size)."""
    import json

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    args = [f"output_dir={tmp_path / 'run'}", f"quickstart.cache_dir={quickstart_cache}", "prompts_per_step=8",
            "mini_batch_size=4", "micro_batch_size=16", "eval.interval=2", "data.builtin_eval_size=32",
            "logging.progress=false", "checkpoint.interval=2"]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port())]
    proc = subprocess.run([*launch, "-m", "dapo_rl.cli", "train", "steps=4", f"distributed.strategy={strategy}", *args],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count('"run_dir"') == 1  # one report, from the main rank
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["step"] > 0]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]  # written once, by rank 0
    assert all(r["train/batch_groups"] == 8 for r in steps)
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()

    proc = subprocess.run([sys.executable, "-m", "dapo_rl.cli", "train", "steps=6", "resume=true", *args],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["step"] > 0] == [1, 2, 3, 4, 5, 6]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["accuracy_after"] is not None
