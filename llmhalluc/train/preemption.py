"""Preemption: SIGTERM or SIGUSR1 on any rank -> every rank stops at the same optimizer step, after a checkpoint."""

from __future__ import annotations

import signal
from types import FrameType

# The exit code of a run stopped by a preemption signal after saving a checkpoint: "requeue me".
PREEMPTED_EXIT_CODE = 85
PREEMPTED_MARKER = "PREEMPTED"
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """Raised on every rank once they agreed to stop; train/sft.py exits with PREEMPTED_EXIT_CODE."""

    exit_code = PREEMPTED_EXIT_CODE


class PreemptionWatch:
    """Records a preemption signal in a handler (no I/O, no collectives there) for the loop to act on."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    def flag(self) -> float:
        """1.0 once this rank was signalled: summed across ranks in each optimizer step's first collective, so every
        rank learns at the same step whether any rank must stop."""
        return 0.0 if self.received is None else 1.0

    def restore(self) -> None:
        """Put the previous handlers back."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
