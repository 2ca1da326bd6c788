"""Refusals an operator should see without being flooded: one log line a minute per kind.

A client over a budget can be refused thousands of times a second; logging each
refusal would let that client fill the disk and hide everything else. Each kind
of refusal ("ip-rate", "too-slow", "bad-request", ...) logs its first occurrence
at once, then at most one line per interval with how many happened meanwhile.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

INTERVAL = 60.0  # seconds between two lines of the same kind


class RefusalLog:
    def __init__(
        self,
        interval: float = INTERVAL,
        logger: logging.Logger = log,
        count: Callable[[str], None] | None = None,
    ) -> None:
        self._interval = interval
        self._logger = logger
        self._count = count  # told every refusal's kind (the metrics), logged or not
        self._next_line: dict[str, float] = {}  # kind -> when it may log again
        self._unlogged: dict[str, int] = {}  # kind -> refusals since its last line

    def refused(self, kind: str, detail: str) -> None:
        """Count one refusal; `detail` (client-supplied parts already %r-quoted) is
        logged only when this refusal gets a line of its own."""
        if self._count is not None:
            self._count(kind)
        count = self._unlogged.get(kind, 0) + 1
        now = time.monotonic()
        if now < self._next_line.get(kind, 0.0):
            self._unlogged[kind] = count
            return
        self._next_line[kind] = now + self._interval
        self._unlogged[kind] = 0
        self._logger.warning(
            "refused %s: %s (%d refusal%s of this kind since the last line)",
            kind, detail, count, "" if count == 1 else "s",
            extra={"refusal": kind},
        )
