"""Progress reporting and cooperative cancellation for long core computations."""

from __future__ import annotations

import threading
from typing import Callable, Optional

#: ``progress(fraction in 0..1, text)``
ProgressCallback = Callable[[float, str], None]


class CancelledError(Exception):
    """Raised inside a computation when its :class:`CancelToken` was cancelled."""


class CancelToken:
    """A thread-safe flag; computations call :meth:`check` between steps."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        """Ask the computation to stop at its next check."""
        self._event.set()

    @property
    def cancelled(self) -> bool:
        """True once :meth:`cancel` was called."""
        return self._event.is_set()

    def check(self) -> None:
        """Raise :class:`CancelledError` if cancelled."""
        if self._event.is_set():
            raise CancelledError("Cancelled by the user")


def report(progress: Optional[ProgressCallback], fraction: float, text: str,
           cancel: Optional[CancelToken] = None) -> None:
    """Call ``progress`` (if any) and check ``cancel`` (if any)."""
    if cancel is not None:
        cancel.check()
    if progress is not None:
        progress(min(max(float(fraction), 0.0), 1.0), text)
