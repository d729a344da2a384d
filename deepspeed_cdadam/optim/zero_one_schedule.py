"""0/1 Adam's step schedule: which steps refresh the variance, which steps sync, as DeepSpeed's code does.

DeepSpeed 0.19.6's ``ZeroOneAdam`` counts its calls from 1, and its first call only initialises
buffers; our step ``t`` (every step updates) is its call ``c = t + 1``, and the schedule is written
in ``c`` so that the same settings give the same steps. Upstream keeps counters it updates after
every call (``var_interval``, ``var_counter``, ``local_step_interval``, ``local_step_counter``); here
the same sequences are closed forms of ``t``, so the schedule needs no state of its own (a resumed
or skipped step cannot put it out of step) and costs O(log t) per query:

* **first phase**, ``t <= var_freeze_step``: the variance interval starts at 1 and doubles after
  every ``var_update_scaler`` (kappa) refreshes; a refresh happens at the calls ``c`` that are
  multiples of the interval in force. Level ``j`` (interval ``2**j``) starts at the first multiple
  of ``2**j`` after the previous level's last refresh and holds kappa refreshes. For kappa = 16:
  calls 2-17, then 18, 20, ..., 48, then 52, 56, ..., 112, then 120, ... Between refreshes the
  gradient is averaged with 1 bit (``COMPRESSED``).
* **second phase**, ``t > var_freeze_step``: the local-step interval starts at 1 and doubles,
  up to ``local_step_clipper`` (H), after every ``local_step_scaler`` steps of this phase; a
  step syncs (``AVERAGE``) when ``c`` is a multiple of the interval in force, else it is ``LOCAL``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..schedule import StepKind


@dataclass(frozen=True)
class ZeroOneSchedule:
    var_freeze_step: int
    var_update_scaler: int
    local_step_scaler: int
    local_step_clipper: int

    @staticmethod
    def call(t: int) -> int:
        """Upstream's call count at our step ``t`` (its first call only initialises)."""
        return t + 1

    def frozen(self, t: int) -> bool:
        """Whether step ``t`` is in the second phase (variance frozen, local steps)."""
        return t > self.var_freeze_step

    def variance_interval(self, t: int) -> int:
        """The variance interval in force at first-phase step ``t``."""
        c, kappa = self.call(t), self.var_update_scaler
        last, width = 1, 1  # the init call; level 0 (every call) starts at call 2
        while True:
            first = (last // width + 1) * width  # the level's first refresh: next multiple after the last one
            end = first + (kappa - 1) * width  # ... and its kappa-th
            if c <= end:
                return width
            last, width = end, width * 2

    def local_step_interval(self, t: int) -> int:
        """The local-step interval in force at second-phase step ``t``."""
        doublings = (t - self.var_freeze_step - 1) // self.local_step_scaler
        return min(self.local_step_clipper, 1 << min(doublings, 64))

    def kind(self, t: int) -> StepKind:
        """``EXACT`` (variance refresh), ``COMPRESSED`` (1-bit gradient), ``AVERAGE`` (1-bit sync) or ``LOCAL``."""
        if not self.frozen(t):
            return StepKind.EXACT if self.call(t) % self.variance_interval(t) == 0 else StepKind.COMPRESSED
        return StepKind.AVERAGE if self.call(t) % self.local_step_interval(t) == 0 else StepKind.LOCAL
