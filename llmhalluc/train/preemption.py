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
    """Records a preemption signal in a handler (no I/O, no collectives there) for the loop to act on. Watches nest
    (a study's around each step's training): an inner watch starts with a signal the outer one already holds, and
    hands back on restore a signal it did not act on (one at a run's last step), so none is lost between runs."""

    def __init__(self) -> None:
        self.previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        outer = [watch_of(handler) for handler in self.previous.values()]
        self.received: int | None = next((w.received for w in outer if w is not None and w.received), None)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    def flag(self) -> float:
        """1.0 once this rank was signalled: summed across ranks in each optimizer step's first collective, so every
        rank learns at the same step whether any rank must stop."""
        return 0.0 if self.received is None else 1.0

    def restore(self) -> None:
        """Put the previous handlers back, passing a received signal on to a watch they belong to."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
            outer = watch_of(handler)
            if outer is not None and outer.received is None:
                outer.received = self.received


def watch_of(handler: object) -> PreemptionWatch | None:
    """The watch whose handler this is, if any."""
    owner = getattr(handler, "__self__", None)
    return owner if isinstance(owner, PreemptionWatch) else None
