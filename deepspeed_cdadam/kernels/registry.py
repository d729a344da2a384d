"""The fused kernels by ``(scheme, compressor, device)``: where an exchange looks for a whole fused step.

``KERNELS[(scheme, compressor, device)]`` is a ``KernelImpl``: ``scheme`` a name of
``exchange.EXCHANGES`` (an exchange's ``scheme_name``), ``compressor`` a ``Compressor.name``
(``"scaled_sign"``, ``"sign_l2"``, ...), ``device`` ``"cpu"`` or ``"cuda"`` (``device_type``).
``CompressedExchange.run_kernel`` looks its step up here; with no entry, or one whose ``applies``
says no, the exchange runs its eager torch lines (the reference). A new kernel is one entry here
(or a ``KERNELS[...] = ...`` from anywhere): exchange.py is not edited.

A ``KernelImpl``:

* ``applies(ex, x, *state) -> bool``: the checks that are the same on every rank (layout, dtype,
  block sizes, compressor, ``DEEPSPEED_CDADAM_KERNELS``). ``state`` are the exchange's buffers in
  the order its ``exchange`` passes them (``markov``: ``h, ghat, gtil``; ``error_feedback``:
  ``e, ebar``; ``naive``: none).
* ``agree``: whether every rank must agree on the kernel's availability before it runs
  (``CompressedExchange._agree_on_kernel``: one all-reduce, the first time only). Checked after
  ``applies``. Every entry here agrees: the CPU kernels are built per rank and triton is imported
  per rank, and a rank on the eager lines while another runs kernels would leave the ranks' results
  apart (Triton's scales round differently) or, in ``fused`` mode, one rank raising while the others
  wait in a collective.
* ``failure() -> error | str | None``: why the kernels cannot run on this rank (``None``: they can);
  what ``agree`` all-reduces. ``name`` and ``fix`` word the message of ``fused`` mode.
* ``ready(ex, x, *state) -> bool``: per-call buffer checks made after the agreement (contiguity).
* ``run(ex, x, state, step, group) -> Tensor``: the whole fused step, with the same collectives and
  byte counting (``ex._count``) as the eager lines; ``state`` is the tuple of buffers.
* ``prepare(ex, x, state, step, group) -> commit`` (optional): the step's collectives with no state
  changed, and ``commit(state)`` applying the state changes (``MarkovExchange.prepare``, overlap).
* ``device_skip``: ``run`` also takes ``skip=exchange.StepSkip`` (a non-finite step decided on the
  device: the Triton Markov and error-feedback steps); with a ``skip``, an exchange runs its eager lines
  where this is False.

The Triton entries are called through ``triton_exchange``'s module attributes (``applies``,
``run_markov``, ``run_error_feedback``), so the tests' patches of that module take effect.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from . import cpu_exchange, triton_exchange
from .. import kernels

if TYPE_CHECKING:
    from ..exchange import CompressedExchange


def _always(ex: CompressedExchange, x: torch.Tensor, *state: torch.Tensor) -> bool:
    return True


def _no_failure() -> None:
    return None


@dataclass(frozen=True)
class KernelImpl:
    """One fused implementation of one scheme's step (module docstring)."""

    applies: Callable[..., bool]
    run: Callable[..., torch.Tensor]
    agree: bool = False
    ready: Callable[..., bool] = _always
    failure: Callable[[], object] = _no_failure
    name: str = "fused kernel"
    fix: str = "Fix it there"
    prepare: Callable[..., Callable] | None = None
    device_skip: bool = False


def device_type(x: torch.Tensor) -> str:
    """The device key of buffer ``x``: ``"cuda"`` where the compiled GPU kernels run
    (``triton_exchange._on_gpu``, which tests patch to drive the interpreter on CPU), else its device type."""
    return "cuda" if triton_exchange._on_gpu(x) else x.device.type


def lookup(scheme: str, compressor: str, device: str) -> KernelImpl | None:
    return KERNELS.get((scheme, compressor, device))


def _triton_applies(ex: CompressedExchange, x: torch.Tensor, *state: torch.Tensor) -> bool:
    return ex.layout.fixed_blocks and triton_exchange.applies(ex, x, *state)


def _triton_markov(ex, x, state, step, group, skip=None):
    return triton_exchange.run_markov(ex, x, *state, skip=skip)


def _triton_error_feedback(ex, x, state, step, group, skip=None):
    return triton_exchange.run_error_feedback(ex, x, *state, skip=skip)


def _triton_failure() -> str | None:
    """Why triton cannot be imported on this rank (warned once in ``auto`` mode), or ``None``."""
    return triton_exchange.failure()


def _cpu_build_failure():
    return kernels.build_failure()  # looked up per call: tests patch it


def _cpu_markov(ex, x, state, step, group):
    return cpu_exchange.run_markov(ex, x, *state)


def _cpu_prepare_markov(ex, x, state, step, group):
    return cpu_exchange.prepare_markov(ex, x, *state)


def _cpu_error_feedback(ex, x, state, step, group):
    return cpu_exchange.run_error_feedback(ex, x, *state)


_CPU = {"agree": True, "failure": _cpu_build_failure, "name": "fused CPU kernel", "fix": "Fix the build there"}
_TRITON = {"agree": True, "failure": _triton_failure, "name": "Triton GPU kernels", "fix": "Install triton there"}
_CPU_MARKOV = KernelImpl(
    cpu_exchange.markov_applies, _cpu_markov, ready=cpu_exchange.contiguous, prepare=_cpu_prepare_markov, **_CPU
)
_CPU_ERROR_FEEDBACK = KernelImpl(
    cpu_exchange.error_feedback_applies, _cpu_error_feedback, ready=cpu_exchange.contiguous, **_CPU
)
_TRITON_MARKOV = KernelImpl(_triton_applies, _triton_markov, device_skip=True, **_TRITON)
_TRITON_ERROR_FEEDBACK = KernelImpl(_triton_applies, _triton_error_feedback, device_skip=True, **_TRITON)

#: Fused kernels by (exchange scheme, compressor name, device type).
KERNELS: dict[tuple[str, str, str], KernelImpl] = {
    ("markov", "scaled_sign", "cpu"): _CPU_MARKOV,
    ("error_feedback", "scaled_sign", "cpu"): _CPU_ERROR_FEEDBACK,
    ("error_feedback", "sign_l2", "cpu"): _CPU_ERROR_FEEDBACK,
    ("markov", "scaled_sign", "cuda"): _TRITON_MARKOV,
    ("markov", "sign_l2", "cuda"): _TRITON_MARKOV,
    ("error_feedback", "scaled_sign", "cuda"): _TRITON_ERROR_FEEDBACK,
    ("error_feedback", "sign_l2", "cuda"): _TRITON_ERROR_FEEDBACK,
}
