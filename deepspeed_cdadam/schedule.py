"""The communication schedule: what kind of step comes next, agreed by every rank each step.

Each optimizer says what its next step is (``CompressedOptimizer.planned_step``); every rank puts
its plan in the same small control message as its non-finite flag (``optim.safety.agree_on_step``),
so all ranks run the same kind of step or all raise, and a non-finite gradient anywhere turns the
step into ``SKIP`` everywhere. The DeepSpeed integration asks the optimizer what the engine must do
for the next step (``engine_allreduces``) instead of checking classes.

* ``EXACT``: full-precision average of the gradients (by the engine's all-reduce when the
  optimizer lets the engine do it, e.g. 1-bit Adam's warm-up; else by the exchange ``none``).
* ``COMPRESSED``: the optimizer's compressed exchange (LIEC-SGD: every step between its averages).
* ``LOCAL``: no communication at all (local steps: 0/1 Adam).
* ``AVERAGE``: periodic averaging of the model or momentum (LIEC-SGD: in full precision; 0/1 Adam:
  its 1-bit sync of the update accumulated over the local steps).
* ``SKIP``: no state changes on any rank (a non-finite gradient on some rank, policy "skip").
"""

from __future__ import annotations

from enum import IntEnum


class StepKind(IntEnum):
    SKIP = 0
    EXACT = 1
    COMPRESSED = 2
    LOCAL = 3
    AVERAGE = 4


class ScheduleMismatchError(RuntimeError):
    """Ranks planned different kinds of step (their states or settings differ)."""
