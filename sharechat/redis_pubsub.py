"""What the two Redis queues share (redis_queue for one Redis, redis_cluster_queue for a
Redis Cluster): the Queue port's room methods, the rooms an instance subscribed, and a
pub/sub connection kept subscribed.

- RoomChannelQueue: each room is the channel `<prefix>room:<room_id>`; publishes go to
  a publisher, subscriptions to a Rooms.
- Rooms: each room held by the subscribe() call that claimed it, handed to the consumer
  by on_message() and on_recovered(); an adapter says how a room is confirmed and dropped.
- Subscription: one pub/sub connection, rebuilt with capped, jittered backoff, whose
  subscribes are confirmed in order, and watched by a canary: a subscription that stops
  delivering without the connection failing shows up as an overdue canary.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol
from uuid import UUID

from sharechat.domain import BackendUnavailable
from sharechat.ports import Deliver, no_listener
from sharechat.redis_wire import TIMEOUT, describe

log = logging.getLogger(__name__)

_BACKOFF_MIN = 0.1
_BACKOFF_MAX = 2.0
_STALL_INTERVALS = 3  # canary intervals without any reply, once Redis took a canary

Listen = Callable[[asyncio.Timeout], Awaitable[None]]  # reads replies until one fails


class Publisher(Protocol):
    async def publish(self, channel: bytes, payload: bytes) -> None: ...


class RoomChannelQueue:
    """The Queue port's room methods, forwarded to a publisher and a Rooms."""

    def __init__(self, publisher: Publisher, rooms: Rooms, prefix: str) -> None:
        self._publisher = publisher
        self._rooms = rooms
        self._prefix = prefix

    async def publish(self, room_id: UUID, payload: bytes) -> None:
        await self._publisher.publish(self._channel(room_id), payload)

    async def subscribe(self, room_id: UUID) -> None:
        """Return once Redis confirmed the subscription; raise BackendUnavailable
        otherwise, leaving the room unsubscribed."""
        await self._rooms.subscribe(self._channel(room_id), room_id)

    async def unsubscribe(self, room_id: UUID) -> None:
        self._rooms.unsubscribe(self._channel(room_id))

    def on_message(self, deliver: Deliver, /) -> None:
        self._rooms.deliver_to = deliver

    def on_recovered(self, recovered: Callable[[], None], /) -> None:
        self._rooms.recovered = recovered

    def _channel(self, room_id: UUID) -> bytes:
        return f"{self._prefix}room:{room_id}".encode()


@dataclass(eq=False)
class Claim:
    """One subscribe() call's claim on a channel; identity tells a later call's claim apart."""

    room_id: UUID


class Rooms:
    """The rooms subscribed, by channel, and the consumer's callbacks.

    A subclass confirms a room's subscription (_confirm) and drops one (_drop).
    """

    def __init__(self) -> None:
        self._rooms: dict[bytes, Claim] = {}
        self.deliver_to: Deliver = no_listener
        self.recovered: Callable[[], None] = _nothing

    async def subscribe(self, channel: bytes, room_id: UUID) -> None:
        """Return once Redis confirmed; if this raises or is cancelled, the room is left
        unsubscribed (unless a later subscribe() took the channel over meanwhile)."""
        claim = Claim(room_id)
        self._rooms[channel] = claim
        try:
            await self._confirm(channel, room_id)
        except BaseException:
            if self._rooms.get(channel) is claim:
                self.unsubscribe(channel)
            raise

    def unsubscribe(self, channel: bytes) -> None:
        self._rooms.pop(channel, None)
        self._drop(channel)

    async def _confirm(self, channel: bytes, room_id: UUID) -> None:
        raise NotImplementedError

    def _drop(self, channel: bytes) -> None:
        raise NotImplementedError

    def deliver(self, room_id: UUID, payload: bytes) -> None:
        try:
            self.deliver_to(room_id, payload)
        except Exception:
            # A consumer's bug must not take the subscription of every room down with it.
            log.exception("delivering a message of room %s failed", room_id)

    def _recover(self) -> None:
        # Whatever was published between losing a subscription and its successor
        # confirming is gone for us: the consumer fetches it from elsewhere.
        try:
            self.recovered()
        except Exception:
            log.exception("catching up after the subscription came back failed")


class Subscription:
    """One pub/sub connection: the reconnect loop, subscribe confirmations, the canary watchdog.

    A subclass holds a session (_session: connect, subscribe, listen through
    _listen_for_stalls), sends commands on it (_send) and says what losing it means (_lost).
    """

    def __init__(self, canary_interval: float, service: str, where: str) -> None:
        self._stall_after = _STALL_INTERVALS * canary_interval
        self._service = service  # what errors name: "redis", "redis cluster"
        self._where = where  # what an unconfirmed subscribe names: the service, or its node
        # Redis confirms subscribes in the order they were sent on the connection, so each
        # channel's pending subscribes wait in a FIFO for their confirmations.
        self._waiters: defaultdict[bytes, deque[asyncio.Future[None]]] = defaultdict(deque)
        self._ready = asyncio.Event()
        self._deadline: asyncio.Timeout | None = None  # of the session, armed by canary_sent()
        self._warned = False
        self._subscribed_once = False
        self.down_reason: str | None = "not connected yet"
        self.stalled: Callable[[], None] = _nothing  # no reply to a canary in time

    async def run(self) -> None:
        """Keep one subscribed connection, reconnecting with capped, jittered backoff."""
        delay = _BACKOFF_MIN
        try:
            while True:
                try:
                    await self._session()
                except Exception as exc:  # whatever broke the connection, rebuild it
                    if self._ready.is_set():
                        delay = _BACKOFF_MIN
                    self._lost(describe(exc))
                await asyncio.sleep(random.uniform(delay / 2, delay))
                delay = min(delay * 2, _BACKOFF_MAX)
        finally:
            self._reset("queue closed")

    async def _session(self) -> None:
        raise NotImplementedError

    def _send(self, command: bytes, channel: bytes) -> None:
        raise NotImplementedError

    def _lost(self, reason: str) -> None:
        raise NotImplementedError

    async def _listen_for_stalls(
        self, listen: Listen, has_reply: Callable[[], Awaitable[bool]]
    ) -> None:
        """Run listen(deadline) until no reply came in the stall window; raise then."""
        while True:
            await self._listen_until_silent(listen)
            # Replies waiting past the deadline mean a late event loop, not a stall.
            if not await has_reply():
                self.stalled()
                raise _Stalled("subscription stalled")

    async def _listen_until_silent(self, listen: Listen) -> None:
        """Listen until a reply is overdue (see canary_sent); raise if the connection fails.

        Each reply received should disarm the deadline (see _replied).
        """
        # Armed from the start: the subscribe confirmations are the first replies due.
        try:
            async with asyncio.timeout(self._stall_after) as deadline:
                self._deadline = deadline
                await listen(deadline)
        except TimeoutError:
            if not deadline.expired():
                raise
        finally:
            self._deadline = None

    def canary_sent(self) -> None:
        """Redis accepted a canary: some reply is now due within the stall window.

        Counting from a canary that Redis accepted, rather than from the last reply, means
        an event loop too busy to publish canaries is never mistaken for a stall.
        """
        deadline = self._deadline
        if deadline is not None and deadline.when() is None:
            deadline.reschedule(asyncio.get_running_loop().time() + self._stall_after)

    @staticmethod
    def _replied(deadline: asyncio.Timeout) -> None:
        if deadline.when() is not None:
            deadline.reschedule(None)  # any reply proves that the subscription delivers

    async def _confirm_subscribe(self, command: bytes, channel: bytes) -> None:
        try:
            async with asyncio.timeout(TIMEOUT):
                while not self._ready.is_set():
                    await self._ready.wait()
                confirmed = asyncio.get_running_loop().create_future()
                self._waiters[channel].append(confirmed)
                self._send(command, channel)
                await confirmed
        except TimeoutError:
            reason = self.down_reason or "subscribe not confirmed"
            raise BackendUnavailable(f"{self._where}: {reason}") from None

    def _confirmed(self, channel: bytes) -> None:
        waiters = self._waiters.get(channel)
        if not waiters:
            return  # a resubscription after a reconnect: nobody waits for it
        confirmed = waiters.popleft()
        if not waiters:
            del self._waiters[channel]
        if not confirmed.done():  # its caller may have given up already
            confirmed.set_result(None)

    def _reset(self, reason: str) -> None:
        self._ready.clear()
        self.down_reason = reason
        for waiters in self._waiters.values():
            for confirmed in waiters:
                if not confirmed.done():
                    confirmed.set_exception(BackendUnavailable(f"{self._service}: {reason}"))
        self._waiters.clear()


async def publish_canary(publisher: Publisher, channel: bytes, subscription: Subscription) -> None:
    # A canary Redis refuses proves nothing about the subscription: the listener sees an
    # outage by itself, and ping() reports it.
    with contextlib.suppress(BackendUnavailable):
        await publisher.publish(channel, b"canary")
        subscription.canary_sent()


class _Stalled(Exception):
    pass


def _nothing() -> None:
    """A callback nobody set: recovered or stalled, of a queue nobody listens to."""
