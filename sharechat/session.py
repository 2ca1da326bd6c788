"""One connected member: its rate limit, its bounded outbox, and the writer that empties it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
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


class Flusher:
    """Writes out, at the end of each turn of the event loop, every outbox that
    filled during it: a member gets one write however many messages reached it
    meanwhile, and no task is made per delivery.
    """

    def __init__(self) -> None:
        self._due: list[Session] = []

    def add(self, session: Session) -> None:
        if not self._due:
            asyncio.get_running_loop().call_soon(self._flush)
        self._due.append(session)

    def _flush(self) -> None:
        due, self._due = self._due, []
        for session in due:
            session.flush()


class Session:
    """One connected member: its bounded outbox and how it gets written out.

    Delivery never waits for the peer: frames queue here, and a member whose
    queue overflows is disconnected rather than allowed to slow the room down.
    """

    # Thousands of idle members each hold one: slots keep them small.
    __slots__ = (
        "_closing",
        "_flusher",
        "_joined_payload",
        "_joining",
        "_max_outbox",
        "_outbox",
        "_peer",
        "_writer",
        "in_flight",
        "last_message",
        "limiter",
        "member",
        "room_id",
    )

    def __init__(
        self, room_id: UUID, member: Member, peer: Peer, config: Config, flusher: Flusher
    ) -> None:
        self.room_id = room_id
        self.member = member
        self.limiter = RateLimiter(config.rate_limit, config.rate_burst)
        self.in_flight = asyncio.Semaphore(MAX_IN_FLIGHT)
        self.last_message: asyncio.Task[None] | None = None  # the newest one under way
        self._peer = peer
        self._flusher = flusher
        # UTF-8 JSON, encoded once per message; a list, as an empty deque costs 760 bytes.
        self._outbox: list[bytes] = []
        self._max_outbox = config.send_queue
        # Until its own `joined` arrives, what the room says is history to this member.
        self._joining: asyncio.Future[None] | None = asyncio.get_running_loop().create_future()
        self._joined_payload: bytes | None = None
        self._closing: asyncio.Task[None] | None = None
        # Only while the peer reads slower than the room talks: waits for it to drain.
        self._writer: asyncio.Task[None] | None = None

    def expect_joined(self, payload: bytes) -> None:
        self._joined_payload = payload

    async def joined(self) -> None:
        """Return once the member's own `joined` is in its outbox, its first frame."""
        if self._joining is not None:
            await asyncio.shield(self._joining)

    def deliver(self, payload: bytes) -> None:
        if self._joining is not None:
            if payload != self._joined_payload:
                return
            self._joining.set_result(None)
            self._joining = self._joined_payload = None
        self.send(payload)

    def send(self, payload: bytes) -> None:
        if self._closing is not None:
            return
        if len(self._outbox) >= self._max_outbox:
            log.info("member %s too slow, disconnecting", self.member.id)
            self.close(CLOSE_POLICY_VIOLATION, "too slow: outgoing buffer full")
            return
        self._outbox.append(payload)
        # A second frame finds the member due already, or its writer waiting to drain.
        if len(self._outbox) == 1 and self._writer is None:
            self._flusher.add(self)

    def flush(self) -> None:
        """Write everything queued, in one write; a congested peer gets a writer task."""
        if self._writer is not None or self._closing is not None or not self._outbox:
            return
        if not self._write():
            self._writer = asyncio.create_task(self._write_when_drained())

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

    def _write(self) -> bool:
        """False when the peer wants no more until it drains."""
        batch, self._outbox = self._outbox, []
        try:
            return self._peer.write_texts(batch)
        except (ConnectionError, RuntimeError) as error:
            # The connection is going away; the reader notices and leaves.
            log.debug("writer of %s stopped: %s", self.member.id, error)
            return True

    async def _write_when_drained(self) -> None:
        try:
            while True:
                await self._peer.drain()
                if not self._outbox:
                    return
                self._write()
        except (ConnectionError, RuntimeError) as error:
            log.debug("writer of %s stopped: %s", self.member.id, error)
        finally:
            self._writer = None
