"""What the probes report: the process answers (livez), and this instance is ready
for traffic (readyz): its backends answer and it is not draining."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

from sharechat.domain import BackendUnavailable
from sharechat.ports import Queue, Repository

CHECK_SECONDS = 2.0  # a backend slower than this to answer a ping counts as down


class Health:
    def __init__(self, repository: Repository, queue: Queue) -> None:
        self._repository = repository
        self._queue = queue
        # From SIGTERM on: a load balancer must stop sending members here.
        self.draining = False

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Whether to send traffic here, and the report that says why."""
        repository, queue = await asyncio.gather(
            _check(self._repository.ping()), _check(self._queue.ping())
        )
        ready = repository == "ok" and queue == "ok" and not self.draining
        report = {
            "status": "ok" if ready else "unavailable",
            "repository": repository,
            "queue": queue,
            "draining": self.draining,
        }
        return ready, report


async def _check(probe: Awaitable[None]) -> str:
    try:
        async with asyncio.timeout(CHECK_SECONDS):
            await probe
    except TimeoutError:
        return "timed out"
    except BackendUnavailable as error:
        return str(error) or "unavailable"
    return "ok"
