"""The fast path beneath redis_queue.py: Redis spoken on redis-py's connection-level APIs.

redis-py's Pipeline and PubSub do per-command bookkeeping that showed in profiles, so
the queue reaches Redis through two small pieces instead:

- PublishBatcher: publishes that arrive while a batch is in flight go together in the
  next one (both Redis queues publish through one); PublishPipeline, the one of
  redis_queue, sends every publish of the instance over one connection it keeps,
  packed by hiredis;
- PubSubConnection: a RESP2 connection of its own for the subscriber, written by one
  task, read as plain arrays.

Failures are redis-py's and OS errors; describe() turns one into a short reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import ssl
from typing import Any

import hiredis
from redis.asyncio import BlockingConnectionPool
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import RedisError

from sharechat.domain import BackendUnavailable

# Seconds for a connect, a pipeline, a ping and a subscribe confirmation: an outage must
# turn into BackendUnavailable quickly, not hang a member's join or message. These are
# our own asyncio.timeout()s, not redis-py's socket_timeout, which wraps each write in
# asyncio.wait_for() (see housekeeping._raise_if_cancelled for why we avoid it).
TIMEOUT = 1.5
_MAX_BATCH = 1_000  # publishes per pipeline; the rest go in the next one
_POOL_SIZE = 8  # for PING; publishing and subscribing keep connections of their own

Command = tuple[bytes, ...]


def connection_pool(
    url: str, *, ssl_ca_certs: str | None = None, ssl_cert_reqs: str | None = None
) -> BlockingConnectionPool:
    """A pool for `url`; the TLS settings, when given, win over the URL's query."""
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=_POOL_SIZE,
        timeout=TIMEOUT,
        socket_connect_timeout=TIMEOUT,
        socket_keepalive=True,
        protocol=2,
    )
    options = pool.connection_kwargs
    options["socket_timeout"] = None  # even if the URL sets one: see TIMEOUT
    if ssl_ca_certs is not None:
        options["ssl_ca_certs"] = ssl_ca_certs
    if ssl_cert_reqs is not None:
        options["ssl_cert_reqs"] = ssl_cert_reqs
    return pool


def _new_connection(pool: BlockingConnectionPool) -> AbstractConnection:
    """A connection outside the pool, not yet connected; RESP2 whatever the URL says,
    because replies are read as plain arrays."""
    options: dict[str, Any] = {**pool.connection_kwargs, "protocol": 2}
    return pool.connection_class(**options)


async def _connect(conn: AbstractConnection) -> None:
    """Connect unless connected; the caller bounds the time."""
    await conn.connect()  # type: ignore[no-untyped-call]  # unannotated in redis-py


class PubSubConnection:
    """One subscriber connection: send() queues a command, read() waits for a reply.

    Callers never write themselves: redis-py drops a connection whose write is
    cancelled, and this one carries every room of the instance. So one task writes,
    and a command queued for a connection is never sent on its successor.
    """

    def __init__(self, conn: AbstractConnection) -> None:
        self._conn = conn
        self._outbox: list[Command] = []
        self._queued = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, pool: BlockingConnectionPool) -> PubSubConnection:
        conn = _new_connection(pool)
        try:
            async with asyncio.timeout(TIMEOUT):
                await _connect(conn)
        except BaseException:
            await conn.disconnect()
            raise
        opened = cls(conn)
        opened._writer = asyncio.create_task(
            opened._write(), name="redis-queue-subscription-writer"
        )
        return opened

    def send(self, *command: bytes) -> None:
        self._outbox.append(command)
        self._queued.set()

    async def read(self) -> Any:
        """The next reply; a read cut short (by the caller's deadline) may be resumed."""
        return await self._conn.read_response(timeout=math.inf, disconnect_on_error=False)

    async def has_reply(self) -> bool:
        return await self._conn.can_read()

    async def close(self) -> None:
        # Disconnect first: it closes the socket before its first await, so a cancellation
        # arriving meanwhile cannot leave the connection open.
        if self._writer is not None:
            self._writer.cancel()
        try:
            await self._conn.disconnect()
        finally:
            if self._writer is not None:
                await asyncio.wait([self._writer])

    async def _write(self) -> None:
        conn = self._conn
        while True:
            await self._queued.wait()
            self._queued.clear()
            commands, self._outbox = self._outbox, []
            # Sending on a broken connection would make redis-py reconnect it behind our back.
            if not conn.is_connected:
                continue
            # A failed or timed out write drops the connection, and the reader sees the loss.
            with contextlib.suppress(RedisError, OSError):
                async with asyncio.timeout(TIMEOUT):
                    await conn.send_packed_command(conn.pack_commands(commands), check_health=False)


Publish = tuple[bytes, bytes, asyncio.Future[None]]


class PublishBatcher:
    """Publishes sent in call order as batches: while one is in flight, the next fills up.

    A subclass sends a batch (_send_batch) and returns a reply per publish, an exception
    for a publish that failed. Run run() as a task; publish() raises BackendUnavailable
    once it ends. Both Redis queues publish through one: redis_queue as PublishPipeline,
    redis_cluster_queue as a PublishLane per master.
    """

    def __init__(self, service: str) -> None:
        self._service = service  # what errors name: "redis", "redis cluster"
        self._pending: list[Publish] = []
        self._wakeup = asyncio.Event()
        self._closed = False

    async def publish(self, channel: bytes, payload: bytes) -> None:
        if self._closed:
            raise BackendUnavailable(f"{self._service}: queue closed")
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((channel, payload, done))
        self._wakeup.set()
        await done

    async def run(self) -> None:
        batch: list[Publish] = []
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
            self._fail(batch + self._pending, "queue closed")

    async def _send(self, batch: list[Publish]) -> None:
        # A caller cancelled before its turn has given up: do not publish behind its back.
        batch = [entry for entry in batch if not entry[2].done()]
        if not batch:
            return
        try:
            replies = await self._send_batch(batch)
        except Exception as exc:  # a connection broken mid-pipeline raises more than RedisError
            self._fail(batch, describe(exc))
            return
        for (_, _, done), reply in zip(batch, replies, strict=True):
            if done.done():
                continue
            if isinstance(reply, Exception):
                done.set_exception(BackendUnavailable(f"{self._service}: {describe(reply)}"))
            else:
                done.set_result(None)

    async def _send_batch(self, batch: list[Publish]) -> list[Any]:
        raise NotImplementedError

    def _fail(self, entries: list[Publish], reason: str) -> None:
        for _, _, done in entries:
            if not done.done():
                done.set_exception(BackendUnavailable(f"{self._service}: {reason}"))


class PublishPipeline(PublishBatcher):
    """Every publish of the instance, as pipelines on one connection it keeps."""

    def __init__(self, pool: BlockingConnectionPool) -> None:
        super().__init__("redis")
        # Kept for the pipeline's life, outside the pool: a pool round trip per pipeline
        # (locks, metrics, events) costs more than the PUBLISH itself on a quiet room.
        self._conn = _new_connection(pool)

    async def run(self) -> None:
        try:
            await super().run()
        finally:
            await self._conn.disconnect()

    async def _send_batch(self, batch: list[Publish]) -> list[Any]:
        commands: list[Command] = [(b"PUBLISH", channel, payload) for channel, payload, _ in batch]
        return await self._pipeline(commands)

    async def _pipeline(self, commands: list[Command]) -> list[Any]:
        """Send the commands in one write, then read every reply, all under one deadline.

        A failure half-way leaves replies unread on the connection: it is disconnected,
        and the next pipeline connects it again.
        """
        conn = self._conn
        async with asyncio.timeout(TIMEOUT):
            try:
                if conn.is_connected and await conn.can_read():
                    # Closed by Redis meanwhile (its idle timeout, CLIENT KILL): no reply
                    # can be due, as every pipeline reads all of its own. Not the pool's
                    # ensure_connection(): its retry hides the OS error that describe names.
                    await conn.disconnect()
                await _connect(conn)
                # hiredis packs in C, several times faster than redis-py's own packer;
                # its stub types the command as a 1-tuple, yet any length is packed.
                packed = b"".join(hiredis.pack_command(c) for c in commands)  # type: ignore[arg-type]
                await conn.send_packed_command(packed, check_health=False)
                # An error reply raises here, failing the whole pipeline.
                return [await conn.read_response(timeout=math.inf) for _ in commands]
            except BaseException:
                await conn.disconnect(nowait=True)
                raise


def describe(exc: BaseException) -> str:
    """A short reason for logs and health answers, e.g. "connection refused" or
    "TLS CERTIFICATE_VERIFY_FAILED: self-signed certificate"."""
    # redis-py's messages repeat the address and errno; the error behind them says it best.
    origin = exc.__context__
    if isinstance(origin, ssl.SSLCertVerificationError):
        return f"TLS {origin.reason}: {origin.verify_message}"
    if isinstance(origin, ssl.SSLError):  # its errno is OpenSSL's, not the OS's
        return f"TLS {origin.reason or origin.strerror}"
    if isinstance(exc, RedisError) and isinstance(origin, OSError) and origin.errno:
        return os.strerror(origin.errno).lower()
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = str(exc).rstrip(".") or type(exc).__name__
    return text[:1].lower() + text[1:]


def as_utf8(payload: bytes) -> bytes:
    """Members get payloads as text frames: a foreign, non-UTF-8 one is repaired, not
    passed on, as a browser fails the whole connection on invalid UTF-8."""
    try:
        payload.decode()
    except UnicodeDecodeError:
        return payload.decode(errors="replace").encode()
    return payload
