"""The Redis pub/sub adapter of the Queue port: how instances see each other's messages.

Each room is the channel `<prefix>room:<room_id>`. An instance holds one pub/sub
connection for all of its rooms, read by one listener task, and publishes over a
small pool. It also publishes a canary to its own channel `<prefix>instance:<id>`
every `canary_interval` seconds: a subscription that stops delivering without the
connection failing (a half-open socket, a proxy that lost its state) shows up as
an overdue canary, and is then rebuilt like a lost one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import random
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from uuid import UUID

import hiredis
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import RedisError

from sharechat.domain import BackendUnavailable
from sharechat.ports import Deliver, no_listener

log = logging.getLogger(__name__)

# Seconds for a connect, a pipeline, a ping and a subscribe confirmation: an outage must
# turn into BackendUnavailable quickly, not hang a member's join or message. These are
# our own asyncio.timeout()s, not redis-py's socket_timeout: that one wraps each write in
# asyncio.wait_for(), which on Python 3.11 can swallow a task's cancellation, and a
# background task that survives its cancellation hangs the shutdown.
_TIMEOUT = 1.5
_BACKOFF_MIN = 0.1
_BACKOFF_MAX = 2.0
_STALL_INTERVALS = 3  # canary intervals without any reply, once Redis took a canary
_MAX_BATCH = 1_000  # publishes per pipeline; the rest go in the next one
_POOL_SIZE = 8


@contextlib.asynccontextmanager
async def open_redis_queue(
    url: str,
    *,
    prefix: str = "sharechat:",
    instance_id: UUID,
    canary_interval: float = 2.0,
) -> AsyncIterator[RedisQueue]:
    """Connect, subscribe and listen; on exit stop every task and close every connection.

    Waits up to a couple of seconds for the first subscription; if Redis is not there
    yet, the queue is yielded anyway: ping() reports it and the listener keeps trying.
    """
    pool = _connection_pool(url)
    client = Redis.from_pool(pool)
    canary_channel = f"{prefix}instance:{instance_id}".encode()
    publisher = _Publisher(pool)
    subscriber = _Subscriber(pool, canary_channel, _STALL_INTERVALS * canary_interval)
    tasks = [
        asyncio.create_task(publisher.run(), name="redis-queue-publisher"),
        asyncio.create_task(subscriber.run(), name="redis-queue-listener"),
        asyncio.create_task(subscriber.write(), name="redis-queue-subscription-writer"),
        asyncio.create_task(
            _publish_canaries(publisher, subscriber, canary_channel, canary_interval),
            name="redis-queue-canary",
        ),
    ]
    try:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_TIMEOUT):
                await subscriber.ready()
        yield RedisQueue(client, publisher, subscriber, prefix)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.aclose()


def _connection_pool(url: str) -> BlockingConnectionPool:
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=_POOL_SIZE,
        timeout=_TIMEOUT,
        socket_connect_timeout=_TIMEOUT,
        socket_keepalive=True,
        protocol=2,
    )
    pool.connection_kwargs["socket_timeout"] = None  # even if the URL sets one: see _TIMEOUT
    return pool


class RedisQueue:
    """The Queue port over Redis pub/sub. Build it with open_redis_queue()."""

    def __init__(
        self, client: Redis, publisher: _Publisher, subscriber: _Subscriber, prefix: str
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
            async with asyncio.timeout(_TIMEOUT):
                await self._client.ping()
        except TimeoutError:
            raise BackendUnavailable("redis: ping timed out") from None
        except (RedisError, OSError) as exc:
            raise BackendUnavailable(f"redis: {_describe(exc)}") from exc

    async def publish(self, room_id: UUID, payload: bytes) -> None:
        await self._publisher.publish(self._channel(room_id), payload)

    async def subscribe(self, room_id: UUID) -> None:
        """Return once Redis confirmed the subscription; raise BackendUnavailable otherwise.

        When this raises (or is cancelled) the room is left unsubscribed.
        """
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
    """The pub/sub connection: subscriptions, the listener loop, the canary watchdog."""

    def __init__(self, pool: BlockingConnectionPool, canary_channel: bytes, stall_after: float):
        self._pool = pool
        self._canary_channel = canary_channel
        self._stall_after = stall_after
        self._rooms: dict[bytes, _Claim] = {}
        # Redis confirms subscribes in the order they were sent on the connection, so each
        # channel's pending subscribe() calls wait in a FIFO for their confirmations.
        self._waiters: defaultdict[bytes, deque[asyncio.Future[None]]] = defaultdict(deque)
        self._conn: AbstractConnection | None = None
        # Commands for the pub/sub connection, each tagged with the connection it was meant
        # for, so that a command for a lost connection is never sent on its successor.
        self._outbox: list[tuple[AbstractConnection | None, tuple[bytes, ...]]] = []
        self._outbox_ready = asyncio.Event()
        self._ready = asyncio.Event()
        self._deadline: asyncio.Timeout | None = None  # of the session, armed by canary_sent()
        self._warned = False
        self.down_reason: str | None = "not connected yet"
        self.deliver: Deliver = no_listener
        self.recovered: Callable[[], None] = _nothing
        self._subscribed_once = False

    async def ready(self) -> None:
        await self._ready.wait()

    async def subscribe(self, channel: bytes, room_id: UUID) -> None:
        claim = _Claim(room_id)
        self._rooms[channel] = claim
        try:
            await self._confirm_subscribe(channel)
        except BaseException:
            # Raising means "not subscribed", unless a later subscribe() took the channel over.
            if self._rooms.get(channel) is claim:
                self.unsubscribe(channel)
            raise

    def unsubscribe(self, channel: bytes) -> None:
        self._rooms.pop(channel, None)
        self._send(b"UNSUBSCRIBE", channel)

    async def _confirm_subscribe(self, channel: bytes) -> None:
        try:
            async with asyncio.timeout(_TIMEOUT):
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
        self._outbox.append((self._conn, command))
        self._outbox_ready.set()

    async def write(self) -> None:
        """Send queued commands on the pub/sub connection, in order.

        Callers never write themselves: redis-py drops a connection whose write is
        cancelled, and this one carries every room of the instance.
        """
        while True:
            await self._outbox_ready.wait()
            self._outbox_ready.clear()
            conn = self._conn
            # Commands for a lost connection are moot: its successor subscribes self._rooms.
            commands = [command for target, command in self._outbox if target is conn]
            self._outbox.clear()
            # Sending on a broken connection would make redis-py reconnect it behind our back.
            if conn is None or not commands or not conn.is_connected:
                continue
            # A failed or timed out write drops the connection, and the listener sees the loss.
            with contextlib.suppress(RedisError, OSError):
                async with asyncio.timeout(_TIMEOUT):
                    await conn.send_packed_command(conn.pack_commands(commands), check_health=False)

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
                    self._lost(_describe(exc))
                await asyncio.sleep(random.uniform(delay / 2, delay))
                delay = min(delay * 2, _BACKOFF_MAX)
        finally:
            self._reset("queue closed")

    async def _session(self) -> None:
        # A connection of our own, outside the pool: it lives as long as the subscription. RESP2
        # whatever the URL says, because _listen() reads pub/sub replies as plain arrays.
        conn = self._pool.connection_class(**{**self._pool.connection_kwargs, "protocol": 2})
        try:
            async with asyncio.timeout(_TIMEOUT):
                await conn.connect()  # type: ignore[no-untyped-call]  # unannotated in redis-py
            rooms = list(self._rooms)
            self._conn = conn
            # The canary channel goes last: its confirmation means every room is subscribed.
            self._send(b"SUBSCRIBE", *rooms, self._canary_channel)
            while True:
                await self._listen_until_silent(conn, len(rooms))
                # Replies waiting past the deadline mean a late event loop, not a stall.
                if not await conn.can_read():
                    raise _Stalled("subscription stalled")
        finally:
            await conn.disconnect()

    async def _listen_until_silent(self, conn: AbstractConnection, rooms: int) -> None:
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

    async def _listen(
        self, conn: AbstractConnection, deadline: asyncio.Timeout, rooms: int
    ) -> None:
        while True:
            # Not disconnect_on_error: a read cut short by the deadline may be resumed.
            reply = await conn.read_response(timeout=math.inf, disconnect_on_error=False)
            if deadline.when() is not None:
                deadline.reschedule(None)  # any reply proves that the subscription delivers
            kind, channel = reply[0], reply[1]
            if kind == b"message":
                claim = self._rooms.get(channel)
                if claim is None:
                    continue  # the canary, or a room unsubscribed a moment ago
                self._hand_over(claim.room_id, _utf8(reply[2]))
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


_Publish = tuple[bytes, bytes, asyncio.Future[None]]


class _Publisher:
    """Sends concurrent publishes as one pipeline: while one is in flight, the next fills up."""

    def __init__(self, pool: BlockingConnectionPool) -> None:
        self._pool = pool
        self._pending: list[_Publish] = []
        self._wakeup = asyncio.Event()
        self._closed = False
        # Taken from the pool once and kept: a pool round trip per pipeline (locks,
        # metrics, events) cost more than the PUBLISH itself on a quiet room.
        self._conn: AbstractConnection | None = None

    async def publish(self, channel: bytes, payload: bytes) -> None:
        if self._closed:
            raise BackendUnavailable("redis: queue closed")
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((channel, payload, done))
        self._wakeup.set()
        await done

    async def run(self) -> None:
        batch: list[_Publish] = []
        try:
            while True:
                await self._wakeup.wait()
                batch = self._pending[:_MAX_BATCH]
                del self._pending[:_MAX_BATCH]
                if not self._pending:
                    self._wakeup.clear()
                await self._send(batch)
        finally:
            self._closed = True
            _fail(batch + self._pending, "queue closed")
            if self._conn is not None:
                await self._pool.release(self._conn)

    async def _send(self, batch: list[_Publish]) -> None:
        # A caller cancelled before its turn has given up: do not publish behind its back.
        batch = [entry for entry in batch if not entry[2].done()]
        if not batch:
            return
        try:
            await self._pipeline([(b"PUBLISH", channel, payload) for channel, payload, _ in batch])
        except Exception as exc:  # a connection broken mid-pipeline raises more than RedisError
            _fail(batch, _describe(exc))
            return
        for _, _, done in batch:
            if not done.done():
                done.set_result(None)

    async def _pipeline(self, commands: list[tuple[bytes, bytes, bytes]]) -> None:
        """Send the commands in one write, then read every reply, all under one deadline.

        Leaner than redis-py's Pipeline, whose per-command bookkeeping showed in profiles.
        A failure half-way leaves replies unread on the connection: it is disconnected,
        and the next pipeline connects it again.
        """
        async with asyncio.timeout(_TIMEOUT):
            if self._conn is None:
                self._conn = await self._pool.get_connection()  # type: ignore[no-untyped-call]
            conn = self._conn
            try:
                if conn.is_connected and await conn.can_read():
                    # Closed by Redis meanwhile (its idle timeout, CLIENT KILL): no reply
                    # can be due, as every pipeline reads all of its own. Not the pool's
                    # ensure_connection(): its retry hides the OS error that _describe names.
                    await conn.disconnect()
                await conn.connect()  # a no-op while connected
                # hiredis packs in C: redis-py's own packer costs 2 µs a command.
                packed = b"".join(
                    # Its stub types the command as a 1-tuple; any length is packed.
                    hiredis.pack_command(command)  # type: ignore[arg-type]
                    for command in commands
                )
                await conn.send_packed_command(packed, check_health=False)
                for _ in commands:
                    await conn.read_response(timeout=math.inf)
            except BaseException:
                await conn.disconnect(nowait=True)
                raise


async def _publish_canaries(
    publisher: _Publisher, subscriber: _Subscriber, channel: bytes, interval: float
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


def _fail(entries: list[_Publish], reason: str) -> None:
    for _, _, done in entries:
        if not done.done():
            done.set_exception(BackendUnavailable(f"redis: {reason}"))


def _describe(exc: BaseException) -> str:
    """A short reason for logs and health answers, e.g. "connection refused"."""
    # redis-py's messages repeat the address and errno; the OS error behind them says it best.
    origin = exc.__context__
    if isinstance(exc, RedisError) and isinstance(origin, OSError) and origin.errno:
        return os.strerror(origin.errno).lower()
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = str(exc).rstrip(".") or type(exc).__name__
    return text[:1].lower() + text[1:]


def _utf8(payload: bytes) -> bytes:
    """Members get payloads as text frames: a foreign, non-UTF-8 one is repaired, not
    passed on, as a browser fails the whole connection on invalid UTF-8."""
    try:
        payload.decode()
    except UnicodeDecodeError:
        return payload.decode(errors="replace").encode()
    return payload
