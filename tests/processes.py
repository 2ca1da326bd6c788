"""A throwaway server process of the tests' own (redis-server, PgBouncer, a cluster node).

Started, waited on until it answers (with a deadline), and killed with SIGKILL, as when
a machine dies. tests/servers.py runs sharechat itself, which is asyncio-driven and
reads its output; this is for the services around it.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from collections.abc import Callable

POLL = 0.02  # seconds between two "does it answer yet?": a poll interval, not a wait


class ServerProcess:
    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None

    def spawn(self, command: list[str]) -> None:
        """Start `command` (its output thrown away) and return at once."""
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def launch(self, command: list[str], answers: Callable[[], bool], timeout: float) -> None:
        """Start `command` and return once `answers()`; kill it if it exits or times out first."""
        self.spawn(command)
        deadline = time.monotonic() + timeout
        try:
            while not answers():
                assert self.process is not None
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(self.did_not_start())
                time.sleep(POLL)
        except BaseException:
            self.kill()
            raise

    def did_not_start(self) -> str:
        """What launch() says when the process never answered."""
        return "the process did not start"

    def kill(self) -> None:
        """SIGKILL: no goodbye to the clients (nor to a cluster's other nodes), as when a
        machine dies."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)
        self.process = None

    def signal(self, signum: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(signum)
