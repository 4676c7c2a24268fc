"""Fused C kernels for the CPU, compiled on first use; PyTorch ops when they cannot be.

Why: at a decode step's shapes (a few rows of a few hundred floats) PyTorch's ``rms_norm``,
in-place rotary and ``scaled_dot_product_attention`` do little arithmetic per call, and each call's
set-up (dispatch, checks, allocations) outweighs it; a plain C loop has none to pay. And the gated
MLP activation ``act(gate) · up`` of decoding and training is memory-bound: PyTorch reads and
writes the ``[tokens, intermediate]`` tensors three times forward and five times backward, the
fused loop once each. ``native_kernels.c`` does the same float32 arithmetic in plain loops; results
equal PyTorch's to float rounding (sums in another order, ``exp`` by its own polynomial), so
sampling and training are unchanged.

How: the source ships with the package and is compiled once per machine with the system C compiler
(``$CC``, else ``cc``/``gcc``) at ``-O3 -march=native -fopenmp`` into ``kernels/`` of the cache
folder (``$DAPO_RL_CACHE``, default ``~/.cache/dapo-rl``), keyed by the source, the flags, the
compiler and the CPU (``-march=native`` code must not run on another CPU model). A process that
finds the library already built loads it. When there is no compiler, compiling fails, or
``DAPO_RL_NATIVE_KERNELS=0`` is set, :func:`native_kernels` returns None and the decoder and the
trainer keep their PyTorch ops (logged once at INFO).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from dapo_rl.cache_dir import default_cache_dir

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native_kernels.c")
FLAGS = ("-O3", "-march=native", "-fPIC", "-shared")
OPENMP = "-fopenmp"

_i64, _ptr, _f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float


def _ptr_of(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class NativeKernels:
    """Tensor-level wrappers of ``native_kernels.c``. Every tensor is float32 on the CPU, rows
    laid out as the C code reads them (row stride free, the rest contiguous), as the tensors of
    :class:`~dapo_rl.models.decode.SpecDecoder` are by construction."""

    GATED_ACTIVATIONS = {"silu": 0, "gelu_tanh": 1}  # activation name (ModelSpec.activation) → the C code's kind

    def __init__(self, lib: ctypes.CDLL):
        self._norm = lib.dapo_rms_norm
        self._norm.argtypes = [_ptr, _i64, _ptr, _ptr, _i64, _i64, _i64, _f32]
        self._norm.restype = None
        self._rotary = lib.dapo_rotary_append
        self._rotary.argtypes = [_ptr, _i64, _ptr, _i64, _i64, _i64, _i64, _i64, _ptr, _ptr, _f32, _ptr, _i64, _i64, _i64]
        self._rotary.restype = None
        self._attention = lib.dapo_decode_attention
        self._attention.argtypes = [_ptr, _i64, _ptr, _i64, _ptr, _i64, _ptr, _i64, _i64, _i64, _i64, _i64, _i64, _i64, _f32,
                                    _f32, ctypes.c_int]
        self._attention.restype = ctypes.c_int
        self._gated = lib.dapo_gated
        self._gated.argtypes = [_ptr, _i64, _ptr, _i64, _ptr, _i64, _i64, ctypes.c_int, ctypes.c_int]
        self._gated.restype = None
        self._gated_backward = lib.dapo_gated_backward
        self._gated_backward.argtypes = [_ptr, _ptr, _i64, _ptr, _i64, _ptr, _ptr, _i64, _i64, ctypes.c_int, ctypes.c_int]
        self._gated_backward.restype = None

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """``x [rows, n]`` → ``x / sqrt(mean(x²) + eps) · weight`` (a new ``[rows, n]`` tensor)."""
        out = torch.empty_like(x)
        self._norm(x.data_ptr(), x.stride(0), weight.data_ptr(), out.data_ptr(), out.stride(0), x.shape[0], x.shape[1], eps)
        return out

    def rotary_append(self, qkv: torch.Tensor, rotation: torch.Tensor, kv: torch.Tensor, heads: int, pos: int,
                      q_norm: tuple[torch.Tensor, float] | None = None, k_norm: tuple[torch.Tensor, float] | None = None) -> None:
        """Turn the query and key heads of ``qkv [rows, heads + 2·kv_heads, d]`` (rotated pairs
        adjacent in each head's first ``2r`` dims) by ``rotation [rows, …, r]`` complex64, in place,
        after an RMSNorm of each query (key) head with ``q_norm`` (``k_norm``) ``(scale [d], eps)``
        when given; then write its keys and values at position ``pos`` of
        ``kv [≥rows, 2·kv_heads, capacity, d]`` (one layer's cache)."""
        rows, all_heads, d = qkv.shape
        kv_heads = (all_heads - heads) // 2
        rotation = rotation.contiguous()  # read as [rows, r] (re, im) pairs
        eps = q_norm[1] if q_norm is not None else 0.0
        self._rotary(qkv.data_ptr(), qkv.stride(0), rotation.data_ptr(), rotation.shape[-1], rows, heads, kv_heads, d,
                     _ptr_of(None if q_norm is None else q_norm[0]), _ptr_of(None if k_norm is None else k_norm[0]), eps,
                     kv.data_ptr(), kv.stride(0), kv.shape[2], pos)

    def attention(self, qkv: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor | None, heads: int,
                  length: int, scale: float, first: int = 0, softcap: float | None = None) -> torch.Tensor:
        """Attention of the ``heads`` query heads of ``qkv [rows, …, d]`` over positions
        ``first … length−1`` of ``kv`` (as in :meth:`rotary_append`; ``first > 0`` for a sliding
        window); ``mask [≥rows, ≥length]`` additive or None; scores soft-capped
        (``cap · tanh(s / cap)``, before the mask) when ``softcap`` is given. Returns ``[rows, heads·d]``."""
        rows, all_heads, d = qkv.shape
        kv_heads = (all_heads - heads) // 2
        out = qkv.new_empty((rows, heads * d))
        status = self._attention(qkv.data_ptr(), qkv.stride(0), kv.data_ptr(), kv.stride(0), _ptr_of(mask),
                                 0 if mask is None else mask.stride(0), out.data_ptr(), rows, heads, kv_heads, d,
                                 kv.shape[2], first, length, scale, softcap or 0.0, torch.get_num_threads())
        if status != 0:
            raise MemoryError(f"decode attention: no memory for {length - first} scores")
        return out

    def gated(self, gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
        """``act(gate) · up`` of ``gate, up [rows, n]`` (row strides free: e.g. the two halves of one
        gate/up product) → ``[rows, n]``; ``activation`` a key of :attr:`GATED_ACTIVATIONS`."""
        rows, n = gate.shape
        out = gate.new_empty((rows, n))
        self._gated(gate.data_ptr(), gate.stride(0), up.data_ptr(), up.stride(0), out.data_ptr(), rows, n,
                    self.GATED_ACTIVATIONS[activation], torch.get_num_threads())
        return out

    def gated_backward(self, grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                       activation: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The gradients of :meth:`gated` with respect to ``gate`` and ``up``, given ``grad [rows, n]``
        (contiguous) → two ``[rows, n]`` tensors."""
        rows, n = grad.shape
        d_gate, d_up = grad.new_empty((rows, n)), grad.new_empty((rows, n))
        self._gated_backward(grad.data_ptr(), gate.data_ptr(), gate.stride(0), up.data_ptr(), up.stride(0), d_gate.data_ptr(),
                             d_up.data_ptr(), rows, n, self.GATED_ACTIVATIONS[activation], torch.get_num_threads())
        return d_gate, d_up


@functools.cache
def cpu_info(key: str) -> str:
    """The value of ``key`` (``vendor_id``, ``model name``, ``flags``, …) for the first CPU in
    ``/proc/cpuinfo``, or "" where there is no such file or key."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                name, _, value = line.partition(":")
                if name.strip() == key:
                    return value.strip()
    except OSError:
        pass
    return ""


def _cpu_identity() -> str:
    """The CPU model and feature flags (what ``-march=native`` compiles for)."""
    identity = "|".join(cpu_info(key) for key in ("model name", "flags"))
    return identity if identity != "|" else platform.processor() or platform.machine()


def _compiler_version(cc: str) -> str:
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30, check=False).stdout.splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "?"


def _compile(cc: str, target: Path) -> None:
    """Compile ``SOURCE`` to ``target`` (atomically: concurrent processes may race here); without
    OpenMP when the compiler has none (the kernels then run on one thread)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.stem, suffix=".so.tmp", dir=target.parent)
    os.close(fd)
    try:
        for extra in ([OPENMP], []):
            done = subprocess.run([cc, *FLAGS, *extra, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True, timeout=120, check=False)
            if done.returncode == 0:
                os.replace(tmp, target)
                return
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"{cc} exited with {done.returncode}")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def native_kernels() -> NativeKernels | None:
    """The compiled kernels (built on first use, then cached on disk), or None where they cannot
    be built or are turned off with ``DAPO_RL_NATIVE_KERNELS=0``."""
    if os.environ.get("DAPO_RL_NATIVE_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        logger.info("no C compiler found ($CC, cc, gcc): decoding and the MLP activation with PyTorch ops (slower on a CPU)")
        return None
    key = hashlib.sha256("\n".join([SOURCE.read_text(), " ".join(FLAGS), cc, _compiler_version(cc), _cpu_identity()]).encode())
    target = default_cache_dir() / "kernels" / f"native_{key.hexdigest()[:16]}.so"
    try:
        if not target.exists():
            _compile(cc, target)
        return NativeKernels(ctypes.CDLL(str(target)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        logger.info("native kernels unavailable (%s): decoding and the MLP activation with PyTorch ops", exc)
        return None
