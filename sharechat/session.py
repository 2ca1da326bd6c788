"""One connected member: its rate limit, its bounded outbox, and the writer that empties it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from uuid import UUID

from sharechat.config import Config
from sharechat.domain import Member
from sharechat.ports import Peer

log = logging.getLogger(__name__)

CLOSE_GOING_AWAY = 1001
CLOSE_POLICY_VIOLATION = 1008
MAX_IN_FLIGHT = 8  # messages of one member being stored or published at once


class RateLimiter:
    """A token bucket: `burst` at once, `rate` a second sustained; rate 0 = no limit."""

    __slots__ = ("_burst", "_rate", "_tokens", "_updated")

    def __init__(self, rate: float, burst: int) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._updated = time.monotonic()

    def allow(self) -> bool:
        if not self._rate:
            return True
        now = time.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._updated) * self._rate)
        self._updated = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


class Session:
    """One connected member: its bounded outbox and the task that writes it out.

    Delivery never waits for the peer: frames queue here, and a member whose
    queue overflows is disconnected rather than allowed to slow the room down.
    """

    # Thousands of idle members each hold one: slots keep them small.
    __slots__ = (
        "_closing",
        "_joined_payload",
        "_max_outbox",
        "_outbox",
        "_peer",
        "_writer",
        "in_flight",
        "joined",
        "last_message",
        "limiter",
        "member",
        "room_id",
    )

    def __init__(self, room_id: UUID, member: Member, peer: Peer, config: Config) -> None:
        self.room_id = room_id
        self.member = member
        self.limiter = RateLimiter(config.rate_limit, config.rate_burst)
        self.in_flight = asyncio.Semaphore(MAX_IN_FLIGHT)
        self.last_message: asyncio.Task[None] | None = None  # the newest one under way
        self._peer = peer
        self._outbox: deque[bytes] = deque()  # UTF-8 JSON, encoded once per message
        self._max_outbox = config.send_queue
        self._joined_payload: bytes | None = None
        self.joined = asyncio.Event()  # set once its own `joined` is in the outbox
        self._closing: asyncio.Task[None] | None = None
        # Started when there is something to write, gone when the outbox is empty:
        # thousands of idle members cost no task at all.
        self._writer: asyncio.Task[None] | None = None

    def expect_joined(self, payload: bytes) -> None:
        self._joined_payload = payload

    def deliver(self, payload: bytes) -> None:
        if not self.joined.is_set():
            # What the room said before this member's own `joined` is history to it:
            # its first frame must be that `joined`.
            if payload != self._joined_payload:
                return
            self._joined_payload = None  # a few hundred bytes a member, for its lifetime
            self.joined.set()
        self.send(payload)

    def send(self, payload: bytes) -> None:
        if self._closing is not None:
            return
        if len(self._outbox) >= self._max_outbox:
            log.info("member %s too slow, disconnecting", self.member.id)
            self.close(CLOSE_POLICY_VIOLATION, "too slow: outgoing buffer full")
            return
        self._outbox.append(payload)
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_out())

    def close(self, code: int, reason: str) -> None:
        """Stop writing and close the connection; the reader then leaves the room."""
        if self._closing is not None:
            return
        self._outbox.clear()
        if self._writer is not None:
            self._writer.cancel()
        self._closing = asyncio.create_task(self._peer.close(code=code, message=reason.encode()))

    async def stop(self) -> asyncio.Task[None] | None:
        """Stop the writer; returns the close handshake still under way, if any."""
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
        return self._closing

    async def _write_out(self) -> None:
        try:
            while self._outbox:
                # Everything queued goes out together: one write for many frames.
                batch = list(self._outbox)
                self._outbox.clear()
                await self._peer.send_texts(batch)
        except (ConnectionError, RuntimeError) as error:
            # The connection is going away; the reader notices and leaves.
            log.debug("writer of %s stopped: %s", self.member.id, error)
        finally:
            self._writer = None
