"""One connected member: what it may send (rate limits, size, messages in flight), its
bounded outbox, and the Flusher that writes every outbox out once per turn of the loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Sequence
from uuid import UUID

from sharechat.budgets import RateLimiter
from sharechat.config import Config
from sharechat.domain import Member, unstorable, wire_id, with_ref
from sharechat.ports import Peer
from sharechat.refusals import RefusalLog

log = logging.getLogger(__name__)

CLOSE_GOING_AWAY = 1001
CLOSE_POLICY_VIOLATION = 1008
CLOSE_SERVICE_RESTART = 1012
MAX_IN_FLIGHT = 8  # messages of one member being stored or published at once


class Flusher:
    """Writes out, at the end of each turn of the event loop, every outbox that
    filled during it: a member gets one write however many messages reached it
    meanwhile, and no task is made per delivery. It also holds what every
    session of the instance shares: the bounds and the refusal log.
    """

    def __init__(self, config: Config, refusals: RefusalLog) -> None:
        self._due: list[Session] = []
        self.max_frames = config.send_queue
        self.max_message_bytes = config.max_message_bytes
        self.max_bytes = config.send_buffer_bytes
        self.drain_timeout = config.ping_interval
        self.refusals = refusals

    def add(self, session: Session) -> None:
        if not self._due:
            asyncio.get_running_loop().call_soon(self._flush)
        self._due.append(session)

    def _flush(self) -> None:
        due, self._due = self._due, []
        for session in due:
            session.flush()


class Sender:
    """What a member may send: its rate limits, the size limit and the storable rule,
    and its messages under way (at most MAX_IN_FLIGHT at once)."""

    __slots__ = (
        "_client_limiter",
        "_flusher",
        "_in_flight",
        "_last_message",
        "_limiter",
        "member",
        "room_id",
    )

    def __init__(
        self, room_id: UUID, member: Member, config: Config, flusher: Flusher, limiter: RateLimiter
    ) -> None:
        self.room_id = room_id
        self.member = member
        self._flusher = flusher
        self._limiter = RateLimiter(config.rate_limit, config.rate_burst)
        # Shared by every connection of the member's client address.
        self._client_limiter = limiter
        self._in_flight = asyncio.Semaphore(MAX_IN_FLIGHT)
        self._last_message: asyncio.Task[None] | None = None  # the newest one under way

    def admit(self, text: str) -> str | None:
        """Why this chat text may not go to the room (a `failed` says it), or None.

        Every text counts against the member's rate limit and its address's.
        """
        refusals = self._flusher.refusals
        if not self._limiter.allow():
            refusals.refused("member-rate", f"member {self.member.id}")
            return "rate limited: slow down"
        if not self._client_limiter.allow():
            refusals.refused("ip-rate", f"member {self.member.id}")
            return "rate limited: too many messages from your address, slow down"
        limit = self._flusher.max_message_bytes
        # Encoding only a text that could be over the limit: most are far under it.
        if len(text) > limit or (len(text) * 4 > limit and len(text.encode()) > limit):
            return f"message too long: {len(text.encode())} bytes, the limit is {limit}"
        return unstorable(text)

    def slot(self) -> Awaitable[bool]:
        """Wait until fewer than MAX_IN_FLIGHT of the member's messages are under way."""
        return self._in_flight.acquire()

    def sending(self, message: asyncio.Task[None]) -> None:
        """`message`, holding a slot, is being stored and published."""
        self._last_message = message

    def release_slot(self) -> None:
        """A message is done with its slot (see Session.expect_echo for one that keeps it)."""
        self._in_flight.release()

    @property
    def slots_full(self) -> bool:
        return self._in_flight.locked()

    async def messages_sent(self) -> None:
        """Return once every message the member sent is stored and published, or failed."""
        if self._last_message is not None:
            await asyncio.wait([self._last_message])


class Session(Sender):
    """One connected member: what it may send (Sender), and its bounded outbox and
    how it gets written out.

    Delivery never waits for the peer: frames queue here, and a member that
    falls behind (its queue over a bound in frames or in bytes, counting what
    the connection holds unsent, or a connection that has not drained for a
    ping interval) is disconnected rather than allowed to slow the room down.
    """

    # Thousands of idle members each hold one: slots keep them small.
    __slots__ = (
        "_backlog",
        "_closing",
        "_echoes",
        "_held",
        "_joined",
        "_joined_number",
        "_outbox",
        "_outbox_bytes",
        "_peer",
        "_writer",
    )

    def __init__(
        self,
        room_id: UUID,
        member: Member,
        peer: Peer,
        config: Config,
        flusher: Flusher,
        client_limiter: RateLimiter,
    ) -> None:
        super().__init__(room_id, member, config, flusher, client_limiter)
        self._peer = peer
        # UTF-8 JSON, encoded once per message; a list, as an empty deque is much larger.
        self._outbox: list[bytes] = []
        self._outbox_bytes = 0
        self._backlog = 0  # bytes the connection held unsent after the last write
        # What the room delivers before the member is ready for it (its `joined` is
        # not stored yet, or a resumed member's replay is being fetched), numbered.
        self._held: list[tuple[int, bytes]] | None = []
        self._joined_number: int | None = None
        self._joined: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._closing: asyncio.Task[None] | None = None
        # (message id as in the wire form, ref) of its messages whose echo carries a ref,
        # in publish order; each holds an in-flight slot, so there are MAX_IN_FLIGHT at most.
        self._echoes: list[tuple[bytes, str]] = []
        # Only while the peer reads slower than the room talks: waits for it to drain.
        self._writer: asyncio.Task[None] | None = None

    def expect_joined(self, number: int) -> None:
        """The member's `joined` was stored as message `number` of the room."""
        self._joined_number = number
        held = self._held
        if held is not None and any(n == number for n, _ in held):
            self._joined.set_result(None)

    async def joined(self) -> None:
        """Return once the room has delivered the member's own `joined`."""
        await asyncio.shield(self._joined)

    def begin(self, replay: Sequence[bytes] = ()) -> None:
        """From now on the member gets what the room delivers: first `replay` (the
        history it asked to resume), then its own `joined` and what came after it."""
        held, self._held = self._held or [], None
        first = self._joined_number
        assert first is not None
        for payload in replay:
            self.send(payload)
        for number, payload in held:
            if number >= first:
                self.deliver(number, payload)

    def deliver(self, number: int, payload: bytes) -> None:
        """Message `number` of the room, delivered in the room's order."""
        held = self._held
        if held is not None:
            held.append((number, payload))
            if number == self._joined_number:
                self._joined.set_result(None)
            elif len(held) > self._flusher.max_frames:
                self._too_slow("outgoing buffer full")
            return
        if self._echoes:
            payload = self._echo(payload)
        self.send(payload)

    def expect_echo(self, message_id: UUID, ref: str) -> None:
        """The echo of this message, about to be stored, carries `ref`.

        It takes over the message's in-flight slot: the slot is released when the
        echo is delivered (a stored message always is, see rooms.LiveRooms.publish),
        or by forget_echo.
        """
        self._echoes.append((str(message_id).encode(), ref))

    def forget_echo(self, message_id: UUID) -> None:
        """The message was not stored: no echo will come. Releases its slot, unless a
        later message's echo released it already (see _echo)."""
        key = str(message_id).encode()
        for index, (pending, _) in enumerate(self._echoes):
            if pending == key:
                del self._echoes[index]
                self._in_flight.release()
                return

    def _echo(self, payload: bytes) -> bytes:
        """The room's bytes, with its ref spliced in if this is one of the member's messages.

        A member's messages reach it in the order of the history, which is the order
        they were registered in; should one registered before this one not have come,
        it never will, and its slot is released too.
        """
        key = wire_id(payload)
        for index, (pending, ref) in enumerate(self._echoes):
            if pending == key:
                del self._echoes[: index + 1]
                for _ in range(index + 1):
                    self._in_flight.release()
                return with_ref(payload, ref)
        return payload

    def send(self, payload: bytes) -> None:
        if self._closing is not None:
            return
        flusher = self._flusher
        self._outbox_bytes += len(payload)
        if (
            len(self._outbox) >= flusher.max_frames
            or self._outbox_bytes + self._backlog > flusher.max_bytes
        ):
            self._too_slow("outgoing buffer full")
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
        self._outbox_bytes = 0
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

    def _too_slow(self, why: str) -> None:
        self._flusher.refusals.refused("too-slow", f"member {self.member.id}: {why}")
        self.close(CLOSE_POLICY_VIOLATION, f"too slow: {why}")

    def _write(self) -> bool:
        """False when the peer wants no more until it drains."""
        batch, self._outbox = self._outbox, []
        self._outbox_bytes = 0
        try:
            self._backlog = self._peer.write_texts(batch)
        except (ConnectionError, RuntimeError) as error:
            # The connection is going away; the reader notices and leaves.
            log.debug("writer of %s stopped: %s", self.member.id, error)
            return True
        return not self._backlog

    async def _write_when_drained(self) -> None:
        try:
            while True:
                # A peer that answers pings but does not read must not stay forever.
                async with asyncio.timeout(self._flusher.drain_timeout):
                    await self._peer.drain()
                self._backlog = 0  # drained: what it still holds is under its low-water mark
                if not self._outbox:
                    return
                self._write()
        except TimeoutError:
            self._writer = None  # close() must not cancel this task: it is ending anyway
            self._too_slow("not reading")
        except (ConnectionError, RuntimeError) as error:
            log.debug("writer of %s stopped: %s", self.member.id, error)
        finally:
            self._writer = None
