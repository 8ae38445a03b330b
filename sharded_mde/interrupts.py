"""SIGINT / SIGTERM as an exception that cannot be lost.

Python runs a signal handler between any two bytecodes, including inside a weakref callback or a
`__del__`, where an exception is printed as "Exception ignored" and dropped: a Ctrl-C landing there
(seen during an import) was lost and the run went on to the end. The handler here raises
`Interrupted` and also remembers the signal; `raise_if_pending` (called before every file write and
every pipeline stage) raises it again until the command's top level has handled it.
"""

from __future__ import annotations

import contextlib
import signal
from typing import Any, Iterator, Optional

_pending: Optional[int] = None


class Interrupted(KeyboardInterrupt):
    """The command was interrupted by signal `signum` (SIGINT or SIGTERM)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _handler(signum: int, frame: Any) -> None:
    global _pending
    _pending = signum
    raise Interrupted(signum)


def raise_if_pending() -> None:
    """Raises `Interrupted` again if a signal arrived whose first exception was swallowed."""
    if _pending is not None:
        raise Interrupted(_pending)


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """SIGINT and SIGTERM raise `Interrupted` in the block; the previous handlers are restored after it."""
    global _pending
    previous = {s: signal.signal(s, _handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        _pending = None
