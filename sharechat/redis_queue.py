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
connection) is in redis_wire.py; what this queue shares with the Redis Cluster one (the
room methods, the claims on rooms, the reconnect loop and canary watchdog) in
redis_pubsub.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from functools import partial
from uuid import UUID

from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import RedisError

from sharechat.domain import BackendUnavailable
from sharechat.redis_pubsub import RoomChannelQueue, Rooms, Subscription, publish_canary
from sharechat.redis_wire import (
    TIMEOUT,
    PublishPipeline,
    PubSubConnection,
    as_utf8,
    connection_pool,
    describe,
)

log = logging.getLogger(__name__)


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
    subscriber = _Subscriber(pool, canary_channel, canary_interval)
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


class RedisQueue(RoomChannelQueue):
    """The Queue port over Redis pub/sub. Build it with open_redis_queue()."""

    def __init__(
        self, client: Redis, publisher: PublishPipeline, subscriber: _Subscriber, prefix: str
    ) -> None:
        super().__init__(publisher, subscriber, prefix)
        self._client = client
        self._subscriber = subscriber

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


class _Subscriber(Rooms, Subscription):
    """The subscriber connection: every room of the instance on it, and its canary."""

    def __init__(self, pool: BlockingConnectionPool, canary_channel: bytes, canary_interval: float):
        Rooms.__init__(self)
        Subscription.__init__(self, canary_interval, "redis", "redis")
        self._pool = pool
        self._canary_channel = canary_channel
        self._conn: PubSubConnection | None = None

    async def ready(self) -> None:
        await self._ready.wait()

    async def _confirm(self, channel: bytes, room_id: UUID) -> None:
        await self._confirm_subscribe(b"SUBSCRIBE", channel)

    def _drop(self, channel: bytes) -> None:
        self._send(b"UNSUBSCRIBE", channel)

    def _send(self, command: bytes, channel: bytes) -> None:
        # Without a connection there is nothing to do: the next one subscribes self._rooms.
        if self._conn is not None:
            self._conn.send(command, channel)

    async def _session(self) -> None:
        conn = await PubSubConnection.open(self._pool)
        try:
            rooms = list(self._rooms)
            self._conn = conn
            # The canary channel goes last: its confirmation means every room is subscribed.
            conn.send(b"SUBSCRIBE", *rooms, self._canary_channel)
            await self._listen_for_stalls(partial(self._listen, conn, len(rooms)), conn.has_reply)
        finally:
            self._conn = None
            await conn.close()

    async def _listen(self, conn: PubSubConnection, rooms: int, deadline: asyncio.Timeout) -> None:
        while True:
            reply = await conn.read()
            self._replied(deadline)
            kind, channel = reply[0], reply[1]
            if kind == b"message":
                claim = self._rooms.get(channel)
                if claim is None:
                    continue  # the canary, or a room unsubscribed a moment ago
                self.deliver(claim.room_id, as_utf8(reply[2]))
            elif kind == b"subscribe":
                self._confirmed(channel)
                if channel == self._canary_channel:
                    self._back(rooms)

    def _back(self, rooms: int) -> None:
        self.down_reason = None
        self._ready.set()
        if self._warned:
            self._warned = False
            log.info("redis back: resubscribed %d rooms", rooms)
        if self._subscribed_once:
            self._recover()
        self._subscribed_once = True

    def _lost(self, reason: str) -> None:
        if not self._warned:
            self._warned = True
            log.warning("redis lost: %s", reason)
        self._reset(reason)


async def _publish_canaries(
    publisher: PublishPipeline, subscriber: _Subscriber, channel: bytes, interval: float
) -> None:
    while True:
        await publish_canary(publisher, channel, subscriber)
        await asyncio.sleep(interval)
