"""``reproducible=true``: the same config, seed, thread count and machine give bit-identical runs.

What makes a run differ from itself is a floating-point reduction whose order depends on thread
timing. On a CPU the one such operation PyTorch has is ``index_put_(accumulate=True)`` (the
backward of an advanced-indexing gather ``x[idx]``): above 32768 elements it adds with atomics
from several threads. The training forward never gathers that way (it uses ``index_select``,
whose backward adds serially in index order; ``tests/test_reproducibility.py`` checks every
forward path for it), so our own code is deterministic with or without this switch. The switch
guards the code we do not own: Hugging Face modules, PEFT, a user's ``pkg.module:function``
loss or reward. It turns on ``torch.use_deterministic_algorithms``, which picks the
deterministic implementation of every operation that has one, but without its
``fill_uninitialized_memory`` (filling every ``torch.empty`` with NaN costs the sampler time
and changes no result). On CUDA it also sets ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` when unset
(cuBLAS needs it before its first product) and turns off cuDNN's autotuner.

An operation with no deterministic implementation (some CUDA kernels) does not stop the run: it
is reported once, in one line that names it and this setting. Bit-identity holds per thread
count (1 and 2 threads sum in different orders), per world size and per machine; see
docs/reproducibility.md for what was measured.

Peers: ``torch.use_deterministic_algorithms`` is what TRL's ``full_determinism`` and verl's
``deterministic`` options turn on as well.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

# The text of PyTorch's warning for an operation without a deterministic implementation
# (``warn_only=True``); the operation's name comes first.
_ALERT = " does not have a deterministic implementation"


def _stderr_line(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@contextmanager
def reproducible_torch(enabled: bool, device: torch.device,
                       notice: Callable[[str], None] = _stderr_line) -> Iterator[None]:
    """Run the body with PyTorch's deterministic algorithms on (``enabled``), then restore the
    previous settings. ``notice`` gets one line per operation that has no deterministic version.
    """
    if not enabled:
        yield
        return
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.utils.deterministic.fill_uninitialized_memory, torch.backends.cudnn.benchmark,
                torch.backends.cudnn.deterministic)
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False
    reported: set[str] = set()
    show = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        text = str(message)
        if _ALERT not in text:
            return show(message, category, filename, lineno, file, line)
        op = text.split(_ALERT)[0].strip()
        if op not in reported:
            reported.add(op)
            notice(f"reproducible=true: {op} has no deterministic implementation on {device.type}, so runs may "
                   f"differ in the last bits; set reproducible=false to accept this without the notice")

    warnings.showwarning = showwarning
    try:
        with warnings.catch_warnings():
            # Every occurrence reaches showwarning (which keeps one line per operation), not only
            # the first per call site.
            warnings.filterwarnings("always", message=f".*{_ALERT}.*")
            yield
    finally:
        warnings.showwarning = show
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.utils.deterministic.fill_uninitialized_memory = previous[2]
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = previous[3], previous[4]


def rng_state() -> dict:
    """Every global generator a step may draw from: sampling uses torch's (and CUDA's); Python's
    and NumPy's are kept too, so that a reward function or library drawing from them resumes
    exactly."""
    import random

    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy

        state["numpy"] = numpy.random.get_state()
    except ImportError:
        pass
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    import random

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy

        numpy.random.set_state(state["numpy"])
