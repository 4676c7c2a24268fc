"""The CUDA code paths that can run without a GPU: device and dtype choice, backend choice, and
the bf16 autocast update (autocast works on CPU too)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from dapo_rl.config import ConfigError, load_config
from dapo_rl.training import distributed
from dapo_rl.models.precision import training_precision
from dapo_rl.training.compose import training_device


def test_auto_device_is_cuda_when_a_gpu_is_present_and_the_product_dtype_follows_the_model(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert training_device(load_config(overrides=[])) == torch.device("cuda")
    assert training_device(load_config(overrides=[]), local_rank=3) == torch.device("cuda:3")  # one GPU per torchrun process
    cuda = torch.device("cuda")
    wide, narrow = SimpleNamespace(hidden_size=576, intermediate_size=1536), SimpleNamespace(hidden_size=64)
    assert training_precision("auto", wide, cuda).autocast_dtype == torch.bfloat16
    assert training_precision("auto", narrow, cuda).autocast_dtype is None  # too narrow for bf16 to pay anywhere
    assert training_precision("float32", wide, cuda).autocast_dtype is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert training_precision("auto", wide, cuda).autocast_dtype is None


def test_auto_device_is_cpu_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert training_device(load_config(overrides=[])) == torch.device("cpu")
    wide = SimpleNamespace(hidden_size=576, intermediate_size=1536)
    assert training_precision("bf16-autocast", wide, torch.device("cpu")).autocast_dtype == torch.bfloat16
    with pytest.raises(ValueError, match="use float32, bf16-autocast, auto"):
        training_precision("bf16", wide, torch.device("cpu"))
    with pytest.raises(ConfigError, match="model.device"):
        training_device(load_config(overrides=["model.device=cuda"]))


@pytest.mark.parametrize("has_gpu, backend", [(True, "nccl"), (False, "gloo")])
def test_torchrun_environment_picks_the_backend_and_the_local_gpu(monkeypatch, has_gpu, backend):
    calls = {}
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: has_gpu)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.setdefault("device", index))
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend: calls.setdefault("backend", backend))
    ctx = distributed.init_distributed("auto", strategy="fsdp2")
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.strategy) == (3, 4, 1, "fsdp2")
    assert calls["backend"] == backend
    assert calls.get("device") == (1 if has_gpu else None)
    assert ctx.sharded and not ctx.is_main


def test_alone_no_process_group_and_no_sharding(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = distributed.init_distributed("auto", strategy="fsdp2")
    assert not ctx.enabled and not ctx.sharded
    model = torch.nn.Linear(2, 2)
    assert ctx.wrap_policy(model) is model
    assert ctx.micro_batch_count([3]) == 3


def test_micro_batch_counts_keep_ranks_in_step():
    ddp = distributed.DistContext(rank=1, world_size=2, strategy="ddp")
    fsdp = distributed.DistContext(rank=1, world_size=2, strategy="fsdp2")
    assert ddp.micro_batch_count([3, 0]) == 1  # the synchronising backward happens on every rank
    assert ddp.micro_batch_count([3, 2]) == 2
    assert fsdp.micro_batch_count([3, 1]) == 3  # every FSDP2 forward/backward is collective
    assert ddp.micro_batch_count([0, 0]) == fsdp.micro_batch_count([0, 0]) == 0


def test_bf16_autocast_update_runs_and_tracks_the_fp32_update(trainer_factory, scored_groups):
    """The GPU default (bf16 autocast) on CPU: the update is finite and close to fp32's."""
    from dapo_rl.data.synthetic import VOCAB
    from dapo_rl.models.tiny import build_char_tokenizer, build_tiny_llama

    tok = build_char_tokenizer(VOCAB)
    model = build_tiny_llama(tok, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seed=3)
    start = torch.cat([p.detach().flatten() for p in model.parameters()])
    deltas = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        trainer = trainer_factory(model, tok, ["optim.lr=1e-3"], autocast_dtype=dtype)
        metrics = trainer.update(scored_groups(tok, 4, 4, seed=5))
        assert torch.isfinite(torch.tensor(metrics["train/loss"]))
        deltas[name] = torch.cat([p.detach().flatten() for p in trainer.model.parameters()]) - start
        assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # master weights stay fp32
    assert deltas["bf16"].abs().max() > 0
    cosine = torch.nn.functional.cosine_similarity(deltas["bf16"], deltas["fp32"], dim=0)
    assert cosine > 0.9, cosine


def test_balanced_micro_batches_yield_own_samples_and_placeholders():
    """Rank 1 of 2 owns samples 1, 3, 5, 7; of those only 1 and 3 have work, rank 0 has three."""
    work = torch.tensor([True] * 5 + [False] * 3)
    for strategy, training, expected_placeholders in (("fsdp2", True, 1), ("ddp", True, 0), ("fsdp2", False, 1), ("ddp", False, 0)):
        ctx = distributed.DistContext(rank=1, world_size=2, strategy=strategy)
        placeholders = []
        model = torch.nn.Linear(1, 1) if training else None
        batches = list(ctx.balanced_micro_batches(work, 1, lambda: placeholders.append(1), train_model=model))
        assert batches == [[1], [3]], (strategy, training)
        assert len(placeholders) == expected_placeholders, (strategy, training)
    alone = distributed.DistContext()
    assert list(alone.balanced_micro_batches(work, 2, lambda: None)) == [[0, 1], [2, 3], [4]]
