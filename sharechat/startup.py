"""Start-up with PostgreSQL not there yet: try again with backoff, up to a deadline.

On a platform the database often comes up with the server, or restarts under
it. An instance that cannot reach it at start logs one line an attempt and
tries again, waiting twice as long each time (up to MAX_DELAY), until
`--startup-timeout` has passed since it started; then it gives up with one
line, and the platform restarts it. (Redis needs none of this: its queue
connects and reconnects by itself, and readiness says 503 meanwhile.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar
from urllib.parse import urlsplit

from sharechat.domain import BackendUnavailable

log = logging.getLogger(__name__)

FIRST_DELAY = 0.25  # seconds before the second attempt
MAX_DELAY = 5.0

T = TypeVar("T")


class StartupFailed(Exception):
    """A backend stayed unreachable for the whole start-up timeout; one line saying which."""


class StartupDeadline:
    """One deadline for the whole start-up, whichever backends it waits for."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._deadline = asyncio.get_running_loop().time() + timeout

    async def retry(self, what: str, attempt: Callable[[], Awaitable[T]]) -> T:
        """`attempt()`'s result, retried while it raises BackendUnavailable (or times out)."""
        loop = asyncio.get_running_loop()
        delay = FIRST_DELAY
        number = 0
        reason = "timed out"
        while True:
            number += 1
            try:
                async with asyncio.timeout_at(self._deadline):
                    return await attempt()
            except BackendUnavailable as error:
                reason = str(error)
            except TimeoutError:
                # Cut by the deadline: the reason of the attempts before is the news.
                if number == 1 or loop.time() < self._deadline:
                    reason = "timed out"
            left = self._deadline - loop.time()
            if left <= 0:
                raise StartupFailed(
                    f"{what} unreachable for {self.timeout:g} s (--startup-timeout): {reason}"
                )
            wait = min(delay, left)
            log.warning(
                "%s not reachable (attempt %d): %s; trying again in %.2g s",
                what, number, reason, wait,
            )  # fmt: skip
            await asyncio.sleep(wait)
            delay = min(2 * delay, MAX_DELAY)


async def listening(url: str, default_port: int) -> None:
    """Raise BackendUnavailable unless the URL's host accepts a TCP connection.

    Tried before the driver while the backend is not there yet: aiopg on uvloop
    leaves a broken connection behind each refused attempt (a warning, then an
    error on the next attempt), where a plain connection just says refused.
    A URL without a TCP host (a Unix socket) is left to the driver.
    """
    parts = urlsplit(url)
    if not parts.hostname:
        return
    try:
        _, writer = await asyncio.open_connection(parts.hostname, parts.port or default_port)
    except OSError as error:
        raise BackendUnavailable(
            f"{parts.hostname}:{parts.port or default_port}: {error.strerror or error}"
        ) from error
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
