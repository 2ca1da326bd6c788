"""One connected member: sends a window of messages and checks what it receives."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import orjson
from aiohttp import ClientWebSocketResponse, WSMsgType

from bench.plan import Seat, Tally, Window


class Pair:
    """What one receiver got from one sender: seq numbers are checked in order."""

    __slots__ = ("distinct", "duplicated", "gaps", "high", "reordered")

    def __init__(self) -> None:
        self.high = -1
        self.distinct = 0
        self.duplicated = 0
        self.reordered = 0
        self.gaps: set[int] = set()

    def see(self, seq: int) -> None:
        if seq > self.high:
            self.gaps.update(range(self.high + 1, seq))
            self.high = seq
            self.distinct += 1
        elif seq in self.gaps:
            self.gaps.discard(seq)
            self.reordered += 1
            self.distinct += 1
        else:
            self.duplicated += 1


class Presence:
    """Member ids seen joining and not yet seen leaving (and the other way round)."""

    def __init__(self) -> None:
        self.joined: set[str] = set()
        self.left_first: set[str] = set()

    def see(self, kind: str, member_id: str) -> None:
        if kind == "joined":
            self.joined.add(member_id)
        elif member_id in self.joined:
            self.joined.discard(member_id)
        else:
            self.left_first.add(member_id)

    @property
    def unmatched(self) -> int:
        return len(self.joined) + len(self.left_first)


class Member:
    def __init__(
        self,
        seat: Seat,
        ws: ClientWebSocketResponse,
        member_id: str,
        room_id: str,
        room_of: Sequence[int],
        tally: Tally,
    ) -> None:
        self.seat = seat
        self.ws = ws
        self.member_id = member_id
        self.room_id = room_id
        self.room_of = room_of
        self.tally = tally
        self.window = Window(0, 0)
        self.pairs: dict[int, Pair] = {}
        self.presence = Presence() if seat.observer else None
        self.sent = 0
        self.failed = 0
        self.outstanding = 0
        self.closing = False
        self.gone = False  # the connection ended: nothing more will arrive

    @property
    def settled(self) -> bool:
        """Every message sent was answered, or never will be."""
        return self.outstanding <= 0 or self.gone

    async def pump(self) -> None:
        """Read frames until closed; refill the send window on every ack."""
        try:
            async for msg in self.ws:
                if msg.type is WSMsgType.TEXT:
                    self.on_frame(msg.data, time.monotonic_ns())
                    if self.outstanding < self.seat.inflight:
                        await self.fill()
        except (ConnectionError, RuntimeError):
            pass
        self.gone = True
        if not self.closing:
            self.tally.errors += 1

    async def fill(self) -> None:
        limit = self.seat.limit
        while (
            self.outstanding < self.seat.inflight
            and (limit is None or self.sent < limit)
            and time.monotonic_ns() < self.window.end
        ):
            if not await self.send(f"{self.seat.idx}:{self.sent}:{time.monotonic_ns()}"):
                return

    async def paced(self, t0: int) -> None:
        """Open loop: send on the seat's schedule until the window ends, whatever comes back.

        Each body carries the time the message was due, not the time it went out, so a
        late send (a busy generator, a socket that pushes back) counts in the latency
        instead of hiding it (no coordinated omission); the lateness itself is kept apart.
        """
        due = t0 + self.seat.phase_ns
        while due < self.window.end and not self.gone:
            now = time.monotonic_ns()
            if now < due:
                await asyncio.sleep((due - now) / 1e9)
                now = time.monotonic_ns()
            if not await self.send(f"{self.seat.idx}:{self.sent}:{due}"):
                return
            if due in self.window:
                self.tally.lag_us.append((now - due) // 1000)
            due += self.seat.period_ns

    async def send(self, body: str) -> bool:
        """Send one message; False if the connection is broken (the pump counts that)."""
        self.sent += 1
        self.outstanding += 1  # before the send: its echo may come while it drains
        try:
            await self.ws.send_str(body)
        except ConnectionError:
            self.sent -= 1
            self.outstanding -= 1
            return False
        return True

    def on_frame(self, data: str, now: int) -> None:
        msg = orjson.loads(data)
        if msg["roomId"] != self.room_id:
            self.tally.cross_room += 1
        elif msg["type"] == "chat":
            self.on_chat(msg["message"], now)
        elif msg["type"] == "failed":
            self.failed += 1
            self.outstanding -= 1
        elif self.presence is not None:
            self.presence.see(msg["type"], msg["memberId"])

    def on_chat(self, body: str, now: int) -> None:
        sender_text, seq_text, t_text = body.split(":")
        sender, seq, t_sent = int(sender_text), int(seq_text), int(t_text)
        if self.room_of[sender] != self.seat.room:
            self.tally.cross_room += 1
            return
        pair = self.pairs.get(sender)
        if pair is None:
            pair = self.pairs[sender] = Pair()
        pair.see(seq)
        own = sender == self.seat.idx
        if own:
            self.outstanding -= 1
        if t_sent in self.window:
            (self.tally.ack_us if own else self.tally.delivery_us).append((now - t_sent) // 1000)

    def received_all(self, senders: Sequence[int], expected: dict[int, int]) -> bool:
        return all(
            # A sender that never connected is not in `expected`: nothing to wait for.
            self.pairs[s].distinct >= expected.get(s, 0) if s in self.pairs else not expected.get(s)
            for s in senders
        )

    def counts(self, senders: Sequence[int]) -> dict[tuple[int, int], tuple[int, int, int]]:
        empty = Pair()
        return {
            (self.seat.idx, s): (p.distinct, p.duplicated, p.reordered)
            for s in senders
            for p in (self.pairs.get(s, empty),)
        }

    async def close(self) -> None:
        self.closing = True
        await self.ws.close()
