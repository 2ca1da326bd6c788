"""One room order: a room's messages reach its members here in the history's order.

Every stored message has a number in its room (1, 2, 3, ... in the order of the
room's history, handed out under the room's lock, never reused). Instances
publish after their own commits, so two instances storing at once may publish
in the other order, and a lost or frozen queue connection loses payloads. So
the queue carries each message with its number, and an instance hands a
room's messages on strictly in number order: one that arrives early waits for
the ones before it, and a number still missing after a moment (never
published, lost in an outage, or trimmed away) is looked up in the repository,
which has the last word: what it holds is delivered, what it does not hold
never will be. After the queue was lost, the whole room is caught up from the
repository the same way.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from uuid import UUID

from sharechat.domain import BackendUnavailable, Message

log = logging.getLogger(__name__)

# How long an early message waits for the ones before it before the repository is
# asked: long enough for a concurrent commit's publish to arrive, short for a person.
GAP_WAIT = 0.05
RETRY_WAIT = 0.5  # when the repository did not answer a repair
# Early messages held for a room whose first member's `joined` is being stored; past
# this the oldest go (they precede that `joined`, so nobody here will want them).
MAX_EARLY = 10_000
PAGE = 1000


def frame(number: int, payload: bytes) -> bytes:
    """What the queue carries: the message's number, a space, its JSON."""
    return b"%d %b" % (number, payload)


def unframe(framed: bytes) -> tuple[int, bytes]:
    space = framed.index(b" ", 0, 21)
    return int(framed[:space]), framed[space + 1 :]


def framed_number(framed: bytes) -> int:
    """The number alone, without copying the message out of its frame."""
    return int(framed[: framed.index(b" ", 0, 21)])


Fetch = Callable[[UUID, int, int], Awaitable[list[Message]]]  # room, after number, limit
Deliver = Callable[[int, bytes], None]


class RoomOrder:
    """The in-order hand-over of one room's messages on this instance."""

    __slots__ = ("_catching_up", "_deliver", "_early", "_fetch", "_repair", "delivered", "room_id")

    def __init__(self, room_id: UUID, fetch: Fetch, deliver: Deliver) -> None:
        self.room_id = room_id
        self._fetch = fetch
        self._deliver = deliver
        # The number handed on last; None until the first member's `joined` is stored:
        # what the room said before that concerns nobody here.
        self.delivered: int | None = None
        self._early: dict[int, bytes] = {}  # arrived before the numbers ahead of them
        self._repair: asyncio.Task[None] | None = None
        self._catching_up = False

    def start(self, number: int) -> None:
        """A member's `joined` was stored as `number`: deliver from it on."""
        if self.delivered is not None:
            return
        self.delivered = number - 1
        for early in [n for n in self._early if n < number]:
            del self._early[early]
        self._hand_on()

    def receive(self, number: int, payload: bytes) -> None:
        delivered = self.delivered
        if delivered is None:
            self._early[number] = payload
            if len(self._early) > MAX_EARLY:  # a busy room while its first join is stored
                del self._early[min(self._early)]
            return
        if number <= delivered:
            return  # a duplicate, or one the repository supplied already
        if number == delivered + 1 and not self._early:
            self.delivered = number
            self._deliver(number, payload)
            return
        self._early[number] = payload
        self._hand_on()

    def catch_up(self) -> None:
        """The queue may have lost messages: deliver all the repository holds past ours."""
        if self.delivered is not None:
            self._catching_up = True
            self._start_repair(wait=0.0)

    def stop(self) -> None:
        if self._repair is not None:
            self._repair.cancel()
            self._repair = None

    def _hand_on(self) -> None:
        """Deliver the early messages that are next in line; repair a gap before the rest."""
        assert self.delivered is not None
        early = self._early
        while early:
            payload = early.pop(self.delivered + 1, None)
            if payload is None:
                self._start_repair(wait=GAP_WAIT)
                return
            self.delivered += 1
            self._deliver(self.delivered, payload)

    def _start_repair(self, wait: float) -> None:
        if self._repair is None:
            self._repair = asyncio.create_task(self._repair_after(wait))

    async def _repair_after(self, wait: float) -> None:
        try:
            await asyncio.sleep(wait)
            while True:
                if await self._repaired():
                    break
                await asyncio.sleep(RETRY_WAIT)  # the repository is away: try again
        finally:
            self._repair = None
        if self._early:  # newer than what the repository had a moment ago
            self._start_repair(wait=GAP_WAIT)

    async def _repaired(self) -> bool:
        """Fetch what lies between the delivered and the early messages (all of the
        room's newer messages, when catching up); False if the repository is away."""
        while self._early or self._catching_up:
            assert self.delivered is not None
            try:
                messages = await self._fetch(self.room_id, self.delivered, PAGE)
            except BackendUnavailable as error:
                log.warning("room %s: missing messages not fetched yet: %s", self.room_id, error)
                return False
            for message in messages:
                if message.number > self.delivered:  # the queue may have been quicker
                    self._early.setdefault(message.number, message.to_json())
            if messages:
                self._skip_to(messages[-1].number)
            self._hand_on()  # a gap left starts no second repair: this one goes on
            if len(messages) < PAGE:
                break
        self._catching_up = False
        return True

    def _skip_to(self, number: int) -> None:
        """The repository answered every number up to `number`: those it does not hold
        are gone (deleted, or trimmed away) and nobody will ever see them."""
        assert self.delivered is not None
        while self.delivered < number:
            payload = self._early.pop(self.delivered + 1, None)
            self.delivered += 1
            if payload is not None:
                self._deliver(self.delivered, payload)
