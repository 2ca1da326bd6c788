"""The Redis pub/sub adapter of the Queue port: how instances see each other's messages.

Each room is the channel `<prefix>room:<room_id>`, subscribed while the instance has
members there; subscribe() returns once Redis confirmed it. One subscriber connection
carries every room; when it is lost it is rebuilt with backoff, every room is
subscribed again, and the consumer is told (on_recovered) that something may have been
missed. The instance also publishes a canary to its own channel
`<prefix>instance:<id>` every `canary_interval` seconds: a subscription that stops
delivering without the connection failing (a half-open socket, a proxy that lost its
state) shows up as an overdue canary, and is then rebuilt like a lost one.

The wire work (publishes pipelined on one kept connection, the subscriber's own
connection) is in redis_wire.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from uuid import UUID

from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import RedisError

from sharechat.domain import BackendUnavailable
from sharechat.ports import Deliver, no_listener
from sharechat.redis_wire import (
    TIMEOUT,
    PublishPipeline,
    PubSubConnection,
    as_utf8,
    connection_pool,
    describe,
)

log = logging.getLogger(__name__)

_BACKOFF_MIN = 0.1
_BACKOFF_MAX = 2.0
_STALL_INTERVALS = 3  # canary intervals without any reply, once Redis took a canary


@contextlib.asynccontextmanager
async def open_redis_queue(
    url: str,
    *,
    prefix: str = "sharechat:",
    instance_id: UUID,
    canary_interval: float = 2.0,
    ssl_ca_certs: str | None = None,
    ssl_cert_reqs: str | None = None,
    on_canary_missed: Callable[[], None] | None = None,
) -> AsyncIterator[RedisQueue]:
    """Connect, subscribe and listen; on exit stop every task and close every connection.

    Waits up to a couple of seconds for the first subscription; if Redis is not there
    yet, the queue is yielded anyway: ping() reports it and the listener keeps trying.
    `ssl_ca_certs` and `ssl_cert_reqs` are redis-py's, for a rediss:// URL.
    `on_canary_missed` is told each time the subscription is found stalled (the metrics).
    """
    pool = connection_pool(url, ssl_ca_certs=ssl_ca_certs, ssl_cert_reqs=ssl_cert_reqs)
    client = Redis.from_pool(pool)
    canary_channel = f"{prefix}instance:{instance_id}".encode()
    publisher = PublishPipeline(pool)
    subscriber = _Subscriber(pool, canary_channel, _STALL_INTERVALS * canary_interval)
    if on_canary_missed is not None:
        subscriber.stalled = on_canary_missed
    tasks = [
        asyncio.create_task(publisher.run(), name="redis-queue-publisher"),
        asyncio.create_task(subscriber.run(), name="redis-queue-listener"),
        asyncio.create_task(
            _publish_canaries(publisher, subscriber, canary_channel, canary_interval),
            name="redis-queue-canary",
        ),
    ]
    try:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(TIMEOUT):
                await subscriber.ready()
        yield RedisQueue(client, publisher, subscriber, prefix)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.aclose()


class RedisQueue:
    """The Queue port over Redis pub/sub. Build it with open_redis_queue()."""

    def __init__(
        self, client: Redis, publisher: PublishPipeline, subscriber: _Subscriber, prefix: str
    ) -> None:
        self._client = client
        self._publisher = publisher
        self._subscriber = subscriber
        self._prefix = prefix

    async def ping(self) -> None:
        """Raises BackendUnavailable unless Redis answers and the subscription delivers."""
        reason = self._subscriber.down_reason
        if reason is not None:
            raise BackendUnavailable(f"redis: {reason}")
        try:
            async with asyncio.timeout(TIMEOUT):
                await self._client.ping()
        except TimeoutError:
            raise BackendUnavailable("redis: ping timed out") from None
        except (RedisError, OSError) as exc:
            raise BackendUnavailable(f"redis: {describe(exc)}") from exc

    async def publish(self, room_id: UUID, payload: bytes) -> None:
        await self._publisher.publish(self._channel(room_id), payload)

    async def subscribe(self, room_id: UUID) -> None:
        await self._subscriber.subscribe(self._channel(room_id), room_id)

    async def unsubscribe(self, room_id: UUID) -> None:
        self._subscriber.unsubscribe(self._channel(room_id))

    def on_message(self, deliver: Deliver, /) -> None:
        self._subscriber.deliver = deliver

    def on_recovered(self, recovered: Callable[[], None], /) -> None:
        self._subscriber.recovered = recovered

    def _channel(self, room_id: UUID) -> bytes:
        return f"{self._prefix}room:{room_id}".encode()


@dataclass(eq=False)
class _Claim:
    """One subscribe() call's claim on a channel; identity tells a later call's claim apart."""

    room_id: UUID


class _Subscriber:
    """The subscriber connection: subscriptions, the listener loop, the canary watchdog."""

    def __init__(self, pool: BlockingConnectionPool, canary_channel: bytes, stall_after: float):
        self._pool = pool
        self._canary_channel = canary_channel
        self._stall_after = stall_after
        self._rooms: dict[bytes, _Claim] = {}
        # Redis confirms subscribes in the order they were sent on the connection, so each
        # channel's pending subscribe() calls wait in a FIFO for their confirmations.
        self._waiters: defaultdict[bytes, deque[asyncio.Future[None]]] = defaultdict(deque)
        self._conn: PubSubConnection | None = None
        self._ready = asyncio.Event()
        self._deadline: asyncio.Timeout | None = None  # of the session, armed by canary_sent()
        self._warned = False
        self._subscribed_once = False
        self.down_reason: str | None = "not connected yet"
        self.deliver: Deliver = no_listener
        self.recovered: Callable[[], None] = _nothing
        self.stalled: Callable[[], None] = _nothing  # no reply to a canary in time

    async def ready(self) -> None:
        await self._ready.wait()

    async def subscribe(self, channel: bytes, room_id: UUID) -> None:
        """Return once Redis confirmed; if this raises or is cancelled, the room is left
        unsubscribed (unless a later subscribe() took the channel over meanwhile)."""
        claim = _Claim(room_id)
        self._rooms[channel] = claim
        try:
            await self._confirm_subscribe(channel)
        except BaseException:
            if self._rooms.get(channel) is claim:
                self.unsubscribe(channel)
            raise

    def unsubscribe(self, channel: bytes) -> None:
        self._rooms.pop(channel, None)
        self._send(b"UNSUBSCRIBE", channel)

    async def _confirm_subscribe(self, channel: bytes) -> None:
        try:
            async with asyncio.timeout(TIMEOUT):
                while not self._ready.is_set():
                    await self._ready.wait()
                confirmed = asyncio.get_running_loop().create_future()
                self._waiters[channel].append(confirmed)
                self._send(b"SUBSCRIBE", channel)
                await confirmed
        except TimeoutError:
            reason = self.down_reason or "subscribe not confirmed"
            raise BackendUnavailable(f"redis: {reason}") from None

    def _send(self, *command: bytes) -> None:
        # Without a connection there is nothing to do: the next one subscribes self._rooms.
        if self._conn is not None:
            self._conn.send(*command)

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
        conn = await PubSubConnection.open(self._pool)
        try:
            rooms = list(self._rooms)
            self._conn = conn
            # The canary channel goes last: its confirmation means every room is subscribed.
            conn.send(b"SUBSCRIBE", *rooms, self._canary_channel)
            while True:
                await self._listen_until_silent(conn, len(rooms))
                # Replies waiting past the deadline mean a late event loop, not a stall.
                if not await conn.has_reply():
                    self.stalled()
                    raise _Stalled("subscription stalled")
        finally:
            self._conn = None
            await conn.close()

    async def _listen_until_silent(self, conn: PubSubConnection, rooms: int) -> None:
        """Listen until a reply is overdue (see canary_sent); raise if the connection fails."""
        # Armed from the start: the subscribe confirmations are the first replies due.
        try:
            async with asyncio.timeout(self._stall_after) as deadline:
                self._deadline = deadline
                await self._listen(conn, deadline, rooms)
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

    async def _listen(self, conn: PubSubConnection, deadline: asyncio.Timeout, rooms: int) -> None:
        while True:
            reply = await conn.read()
            if deadline.when() is not None:
                deadline.reschedule(None)  # any reply proves that the subscription delivers
            kind, channel = reply[0], reply[1]
            if kind == b"message":
                claim = self._rooms.get(channel)
                if claim is None:
                    continue  # the canary, or a room unsubscribed a moment ago
                self._hand_over(claim.room_id, as_utf8(reply[2]))
            elif kind == b"subscribe":
                self._confirmed(channel)
                if channel == self._canary_channel:
                    self._back(rooms)

    def _hand_over(self, room_id: UUID, payload: bytes) -> None:
        try:
            self.deliver(room_id, payload)
        except Exception:
            # A consumer's bug must not take the subscription of every room down with it.
            log.exception("delivering a message of room %s failed", room_id)

    def _confirmed(self, channel: bytes) -> None:
        waiters = self._waiters.get(channel)
        if not waiters:
            return  # a resubscription after a reconnect: nobody waits for it
        confirmed = waiters.popleft()
        if not waiters:
            del self._waiters[channel]
        if not confirmed.done():  # its caller may have given up already
            confirmed.set_result(None)

    def _back(self, rooms: int) -> None:
        self.down_reason = None
        self._ready.set()
        if self._warned:
            self._warned = False
            log.info("redis back: resubscribed %d rooms", rooms)
        if self._subscribed_once:
            # Whatever was published between losing the old subscription and this one
            # confirming is gone for us: the consumer fetches it from elsewhere.
            try:
                self.recovered()
            except Exception:
                log.exception("catching up after the subscription came back failed")
        self._subscribed_once = True

    def _lost(self, reason: str) -> None:
        if not self._warned:
            self._warned = True
            log.warning("redis lost: %s", reason)
        self._reset(reason)

    def _reset(self, reason: str) -> None:
        self._conn = None
        self._ready.clear()
        self.down_reason = reason
        for waiters in self._waiters.values():
            for confirmed in waiters:
                if not confirmed.done():
                    confirmed.set_exception(BackendUnavailable(f"redis: {reason}"))
        self._waiters.clear()


async def _publish_canaries(
    publisher: PublishPipeline, subscriber: _Subscriber, channel: bytes, interval: float
) -> None:
    while True:
        # A canary Redis refuses proves nothing about the subscription: the listener sees
        # an outage by itself, and ping() reports it.
        with contextlib.suppress(BackendUnavailable):
            await publisher.publish(channel, b"canary")
            subscriber.canary_sent()
        await asyncio.sleep(interval)


class _Stalled(Exception):
    pass


def _nothing() -> None:
    """The recovery callback of a queue nobody listens to."""

