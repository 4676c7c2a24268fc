"""Which dtype a model's products run in: bfloat16 where the hardware has it natively and it is
measured faster at the model's own shapes on this machine, float32 otherwise.

Why a measurement and not a rule: on CPUs with AMX or AVX512-BF16, large bf16 products run
several times faster than fp32 ones, but a decode step's products are a few rows thin, and there
oneDNN's bf16 kernels can lose to its fp32 ones; on a CPU without native bf16 every bf16 product
is emulated and slower. So ``auto`` asks three questions, in order:

1. Does the device compute bf16 natively? CUDA: ``torch.cuda.is_bf16_supported()``. CPU: the
   ``amx_bf16`` or ``avx512_bf16`` flag in ``/proc/cpuinfo``. No: float32, and the reason says so.
2. Is the model big enough? Hidden size below :data:`MIN_BF16_HIDDEN`: float32 without a probe.
   Such products are bound by per-call overhead, not arithmetic, so there is nothing to win, and
   tiny models (the built-in tasks, the test suite) keep their exact fp32 runs on every machine.
3. On a CPU: is it faster here? A timed probe (:func:`probe_speedup`) runs the model's widest
   product (the fused gate/up projection) at the use's row count, fp32 against bf16, each as the
   engine runs it (oneDNN with packed weights where that works), and picks bf16 only at
   :data:`MIN_SPEEDUP` or more. The result is cached per machine, thread count, torch version and
   shape in ``$DAPO_RL_CACHE/precision.json``, so a machine decides once and then every run on it
   makes the same choice (a run's samples must not depend on a timing). On CUDA bf16 is used
   without a probe, as every GPU recipe does.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dapo_rl.cache_dir import default_cache_dir
from dapo_rl.models.decode import Projection, can_pack, packs_by_default
from dapo_rl.models.native import cpu_info

MIN_BF16_HIDDEN = 256  # below: float32 without probing (see the module docstring)
MIN_SPEEDUP = 1.25  # bf16 must be at least this much faster at the probed shape
DECODE_ROWS = 32  # rows of a probed decode product (a group of samples decoding together)
TRAIN_ROWS = 1024  # rows (tokens) of a probed training product
BF16_FLAGS = ("amx_bf16", "avx512_bf16")

__all__ = ["BF16_FLAGS", "Precision", "native_bf16", "probe_speedup", "product_shape", "resolve_precision", "training_precision"]


@dataclass(frozen=True)
class Precision:
    """A resolved precision: ``dtype`` and, in a few words, why (for the run's log)."""

    dtype: torch.dtype
    reason: str

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The dtype to autocast a training forward to; None = plain float32."""
        return None if self.dtype == torch.float32 else self.dtype


def product_shape(model_config) -> tuple[int, int]:
    """A model config's hidden size and the width of its widest product, the fused gate/up
    projection (``2 · intermediate_size``; ``2 · 4 · hidden`` where the config names none)."""
    hidden = model_config.hidden_size
    return hidden, 2 * (getattr(model_config, "intermediate_size", None) or 4 * hidden)


def native_bf16(device: torch.device) -> str | None:
    """None when ``device`` computes bf16 natively; else why not (one phrase)."""
    if device.type == "cuda":
        return None if torch.cuda.is_bf16_supported() else "this GPU has no native bf16"
    if device.type != "cpu":
        return f"bf16 is not probed on {device.type}"
    flags = set(cpu_info("flags").split())
    if not flags & set(BF16_FLAGS):
        return "this CPU has no native bf16 (neither amx_bf16 nor avx512_bf16)"
    return None


def _seconds(product, x: torch.Tensor, repeats: int) -> float:
    product(x)  # first call: kernel selection, packing caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        product(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def probe_speedup(hidden: int, width: int, rows: int, repeats: int = 15) -> float:
    """fp32 time over bf16 time of a ``[rows, hidden] · [hidden, width]`` product on the CPU (at
    torch's current thread count), each as the decoder runs it (its :class:`Projection`, packed
    where :func:`packs_by_default` and :func:`can_pack` say); the median of ``repeats`` calls."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(width, hidden, generator=generator) / hidden**0.5
    x = torch.randn(rows, hidden, generator=generator)
    packs = packs_by_default(hidden, x.device)
    seconds = {dtype: _seconds(Projection.copied(weight, None, packed=packs and can_pack(weight.to(dtype)), dtype=dtype),
                               x.to(dtype), repeats)
               for dtype in (torch.float32, torch.bfloat16)}
    return seconds[torch.float32] / seconds[torch.bfloat16]


def _cache_file() -> Path:
    return default_cache_dir() / "precision.json"


def _machine_key(hidden: int, width: int, rows: int) -> str:
    flags = hashlib.sha256(cpu_info("flags").encode()).hexdigest()[:12]
    return "|".join([cpu_info("model name"), f"flags={flags}", f"torch={torch.__version__}",
                     f"threads={torch.get_num_threads()}", f"{rows}x{hidden}x{width}"])


@functools.cache
def _cached_speedup(hidden: int, width: int, rows: int) -> float:
    """:func:`probe_speedup`, measured once per machine and kept in ``$DAPO_RL_CACHE/precision.json``."""
    path, key = _cache_file(), _machine_key(hidden, width, rows)
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return float(known[key])
    speedup = probe_speedup(hidden, width, rows)
    known[key] = speedup
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass  # an unwritable cache only means probing again next time
    return speedup


def resolve_precision(setting: str, device: torch.device, hidden: int, width: int, use: str = "decode") -> Precision:
    """The dtype ``setting`` (``auto``, ``float32`` or ``bfloat16``) means for a model of hidden size
    ``hidden`` whose widest product has ``width`` outputs, on ``device``, for ``use`` (``decode``:
    a sampling step's few rows; ``train``: a training forward's many tokens)."""
    if setting == "float32":
        return Precision(torch.float32, "float32 as configured")
    if setting == "bfloat16":
        return Precision(torch.bfloat16, "bfloat16 as configured")
    if setting != "auto":
        raise ValueError(f"precision {setting!r}: use auto, float32 or bfloat16")
    missing = native_bf16(device)
    if missing is not None:
        return Precision(torch.float32, f"auto: float32, {missing}")
    if hidden < MIN_BF16_HIDDEN:
        return Precision(torch.float32, f"auto: float32, hidden size {hidden} < {MIN_BF16_HIDDEN} is too small for bf16 to pay")
    if device.type == "cuda":
        return Precision(torch.bfloat16, "auto: bfloat16 on a GPU with native bf16")
    rows = DECODE_ROWS if use == "decode" else TRAIN_ROWS
    speedup = _cached_speedup(hidden, width, rows)
    if speedup >= MIN_SPEEDUP:
        return Precision(torch.bfloat16, f"auto: bfloat16, measured {speedup:.2f}x faster than float32 at this model's "
                                         f"{use} shape on this CPU ({rows} x {hidden} x {width})")
    return Precision(torch.float32, f"auto: float32, bfloat16 measured only {speedup:.2f}x at this model's {use} shape "
                                    f"on this CPU ({rows} x {hidden} x {width}; it needs {MIN_SPEEDUP}x)")


TRAINING_SETTINGS = {"float32": "float32", "bf16-autocast": "bfloat16", "auto": "auto"}


def training_precision(setting: str, model_config, device: torch.device) -> Precision:
    """What ``model.dtype`` (``auto``, ``float32``, ``bf16-autocast``) means for training a model
    with ``model_config`` on ``device``: the dtype of the forward's and backward's products under
    autocast (float32 = no autocast). ``auto`` is :func:`resolve_precision` at a training
    forward's row count (:data:`TRAIN_ROWS`): bf16 on a GPU with native bf16 and on a CPU where
    the probe measures it faster, float32 otherwise, and for models narrower than
    :data:`MIN_BF16_HIDDEN` on every device. Master weights, optimiser state, log-softmax, the
    loss and every reduction stay float32 either way."""
    if setting not in TRAINING_SETTINGS:
        raise ValueError(f"model.dtype {setting!r}: use {', '.join(TRAINING_SETTINGS)}")
    return resolve_precision(TRAINING_SETTINGS[setting], device, *product_shape(model_config), use="train")
