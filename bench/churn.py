"""Churning clients: join, wait for the own `joined` frame, leave, again, until the window ends.

A cycle speaks the websocket protocol by hand: the upgrade, frames read until the
own `joined`, a close frame, frames read until the server's close. aiohttp's
client cost the generator about as much CPU per cycle as the server under test
spent, on the same two cores, so the scenario measured the generator as much as
the server. What the server sees is the same: an upgrade, a join, a clean close.
"""

from __future__ import annotations

import asyncio
import struct
import time
from urllib.parse import urlsplit

import orjson

from bench.frames import CLOSE, TEXT, masked, read_frame, read_upgrade, upgrade_request
from bench.plan import Tally, Window

JOIN_TIMEOUT = 10.0
ERROR_PAUSE = 0.01  # do not spin on a server that refuses connections
CLOSE_NORMAL = struct.pack("!H", 1000)


async def churn(url: str, window: Window, tally: Tally) -> None:
    endpoint = Endpoint(url)
    while (start := time.monotonic_ns()) < window.end:
        try:
            joined = await endpoint.join_and_leave()
        except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError):
            joined = 0
        if not joined:
            tally.errors += 1
            await asyncio.sleep(ERROR_PAUSE)
        elif start in window:
            tally.joins += 1
            tally.join_us.append((joined - start) // 1000)


class Endpoint:
    """A room's websocket URL (ws://host:port/path), joined and left again and again."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme != "ws" or parts.hostname is None or parts.port is None:
            raise ValueError(f"not a ws://host:port URL: {url}")
        self.host, self.port = parts.hostname, parts.port
        self._netloc, self._path = parts.netloc, parts.path

    async def join_and_leave(self) -> int:
        """Monotonic time at which the own `joined` frame arrived, 0 if another frame
        came first. Raises OSError, TimeoutError, ValueError (an answer that is not a
        websocket's) or IncompleteReadError (the server hung up)."""
        async with asyncio.timeout(JOIN_TIMEOUT):
            reader, writer = await asyncio.open_connection(self.host, self.port)
            try:
                writer.write(upgrade_request(self._netloc, self._path))
                await read_upgrade(reader)
                opcode, payload = await read_frame(reader)
                arrived = time.monotonic_ns()
                writer.write(masked(CLOSE, CLOSE_NORMAL))
                last = opcode
                while last != CLOSE:  # the others' frames, then the server's close
                    last, _ = await read_frame(reader)
            finally:
                writer.close()
        if opcode != TEXT or orjson.loads(payload)["type"] != "joined":
            return 0
        return arrived
