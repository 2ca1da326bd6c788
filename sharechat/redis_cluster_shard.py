"""What the Redis Cluster queue does with each master: its pub/sub connection, its
publish lane (see redis_cluster_queue).

A shard is the master that owns a set of slots. The instance holds one sharded pub/sub
connection (SSUBSCRIBE) to each master that owns a room it serves, read by one listener
task, plus a canary channel whose slot that master owns: a subscription that stops
delivering without the connection failing shows up as an overdue canary.

The shard knows nothing of the slot map: when its connection fails, or Redis says a
channel lives elsewhere (a MOVED reply, or a `sunsubscribe` it did not ask for, sent
when a slot migrates or its master is demoted), it tells its owner, which re-maps.

The reconnect loop, the confirmations and the canary watchdog are redis_pubsub's
Subscription, the batching redis_wire's PublishBatcher: the same as for one Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import Counter, deque
from collections.abc import Sequence
from functools import partial
from typing import Any, Protocol
from uuid import UUID

from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import AskError, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError

from sharechat.redis_pubsub import Subscription
from sharechat.redis_wire import TIMEOUT, Publish, PublishBatcher, as_utf8, describe

log = logging.getLogger(__name__)


class Moved(Exception):
    """The shard does not own the channel's slot (any more)."""


class ShardOwner(Protocol):
    """What a shard reports to, and asks: the queue's map of slots to shards."""

    def canary_for(self, node: ClusterNode) -> bytes:
        """A channel of this instance whose slot the node owns; raises Moved if none."""
        ...

    def deliver(self, room_id: UUID, payload: bytes) -> None: ...

    def moved(self, shard: Shard, channels: Sequence[bytes]) -> None:
        """The shard dropped these channels: Redis says their slot lives elsewhere."""
        ...

    def lost(self, shard: Shard) -> None:
        """The shard's connection failed or stalled: the slot map may have changed."""
        ...

    def back(self, shard: Shard) -> None:
        """The shard resubscribed its channels after losing them: a gap may need repair."""
        ...


class Shard(Subscription):
    """One master's pub/sub connection: subscriptions, the listener loop, the canary watchdog."""

    def __init__(self, node: ClusterNode, owner: ShardOwner, canary_interval: float) -> None:
        super().__init__(canary_interval, "redis cluster", f"redis cluster: {node.name}")
        self.node = node
        self._owner = owner
        self.channels: dict[bytes, UUID] = {}  # the rooms this shard is to hold
        # `_sent` says which command an error reply answers (see Subscription._waiters).
        self._sent: deque[tuple[bytes, bytes]] = deque()
        self._unsubscribing: Counter[bytes] = Counter()
        self._conn: AbstractConnection | None = None
        self._outbox: list[tuple[AbstractConnection | None, tuple[bytes, bytes]]] = []
        self._outbox_ready = asyncio.Event()
        self.canary: bytes | None = None
        # Set by the owner when rooms moved here could not be confirmed: the first
        # session must then say "back" too, or their gap would go unrepaired.
        self.owes_recovery = False
        self._resubscribing = False
        self._tasks = [
            asyncio.create_task(self.run(), name=f"redis-cluster-shard-{node.name}"),
            asyncio.create_task(self._write(), name=f"redis-cluster-writer-{node.name}"),
        ]

    @property
    def name(self) -> str:
        return self.node.name

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def subscribe(self, channel: bytes, room_id: UUID) -> None:
        """Return once the shard confirmed the channel; raise BackendUnavailable or Moved.

        The channel stays the shard's either way: the owner decides where it goes next.
        """
        self.channels[channel] = room_id
        await self._confirm_subscribe(b"SSUBSCRIBE", channel)

    def unsubscribe(self, channel: bytes) -> None:
        if self.channels.pop(channel, None) is not None:
            self._send(b"SUNSUBSCRIBE", channel)

    def _send(self, command: bytes, channel: bytes) -> None:
        self._outbox.append((self._conn, (command, channel)))
        self._outbox_ready.set()

    async def _write(self) -> None:
        """Send queued commands in order. Callers never write themselves: redis-py drops a
        connection whose write is cancelled, and this one carries every room of the shard."""
        while True:
            await self._outbox_ready.wait()
            self._outbox_ready.clear()
            conn = self._conn
            commands = [command for target, command in self._outbox if target is conn]
            self._outbox.clear()
            if conn is None or not commands or not conn.is_connected:
                continue
            for command, channel in commands:
                self._sent.append((command, channel))
                if command == b"SUNSUBSCRIBE":
                    self._unsubscribing[channel] += 1
            with contextlib.suppress(RedisError, OSError):
                async with asyncio.timeout(TIMEOUT):
                    await conn.send_packed_command(conn.pack_commands(commands), check_health=False)

    async def _session(self) -> None:
        kwargs = {**self.node.connection_kwargs, "protocol": 2, "socket_timeout": None}
        conn = self.node.connection_class(**kwargs)
        try:
            async with asyncio.timeout(TIMEOUT):
                await conn.connect()  # type: ignore[no-untyped-call]  # unannotated in redis-py
            self.canary = self._owner.canary_for(self.node)
            self._sent.clear()
            self._unsubscribing.clear()
            self._conn = conn
            rooms = list(self.channels)
            self._resubscribing = bool(rooms)
            for channel in rooms:
                self._send(b"SSUBSCRIBE", channel)
            # The canary goes last: its confirmation means every room before it is answered.
            self._send(b"SSUBSCRIBE", self.canary)
            await self._listen_for_stalls(partial(self._listen, conn), conn.can_read)
        finally:
            self._conn = None
            await conn.disconnect()

    async def _listen(self, conn: AbstractConnection, deadline: asyncio.Timeout) -> None:
        while True:
            try:
                reply = await conn.read_response(timeout=math.inf, disconnect_on_error=False)
            except ResponseError as error:  # e.g. MOVED: the answer to the oldest command
                self._refused(error)
                continue
            self._replied(deadline)
            kind, channel = reply[0], reply[1]
            if kind == b"smessage":
                room_id = self.channels.get(channel)
                if room_id is not None:  # else the canary, or a room unsubscribed a moment ago
                    self._owner.deliver(room_id, as_utf8(reply[2]))
            elif kind == b"ssubscribe":
                self._answered()
                if channel == self.canary:
                    self._back()
                self._confirmed(channel)
            elif kind == b"sunsubscribe":
                self._unsubscribed(channel)

    def _refused(self, error: ResponseError) -> None:
        command, channel = self._answered() or (b"", b"")
        if command != b"SSUBSCRIBE" or channel == self.canary or not isinstance(error, AskError):
            # Not a room that lives elsewhere (the canary's slot moved, CLUSTERDOWN while
            # the cluster forms again...): start over, after the owner re-maps.
            raise error
        waiters = self._waiters.pop(channel, deque())
        for confirmed in waiters:
            if not confirmed.done():
                confirmed.set_exception(Moved(describe(error)))
        if self.channels.pop(channel, None) is not None and not waiters:
            self._owner.moved(self, [channel])  # a resubscription nobody waits for

    def _unsubscribed(self, channel: bytes) -> None:
        if self._unsubscribing[channel] > 0:
            self._answered()
            self._unsubscribing[channel] -= 1
            return
        # Not asked for: Redis moved the slot away (a migration, or this master demoted).
        if channel == self.canary:
            raise Moved("the canary's slot moved")
        if self.channels.pop(channel, None) is not None:
            self._owner.moved(self, [channel])

    def _answered(self) -> tuple[bytes, bytes] | None:
        return self._sent.popleft() if self._sent else None

    def _back(self) -> None:
        if self._ready.is_set():
            return
        self.down_reason = None
        self._ready.set()
        if self._warned:
            self._warned = False
            log.info("redis cluster shard %s back: %d rooms", self.name, len(self.channels))
        # Back with no room to resubscribe, the shard has no gap to repair.
        if self._resubscribing and (self._subscribed_once or self.owes_recovery):
            self._owner.back(self)
        self._subscribed_once = True
        self.owes_recovery = False

    def _lost(self, reason: str) -> None:
        if not self._warned:
            self._warned = True
            log.warning("redis cluster shard %s lost: %s", self.name, reason)
        self._reset(reason)
        self._owner.lost(self)


class PublishLane(PublishBatcher):
    """One master's publishes, in call order (see PublishBatcher). A lane per master, so
    that a dead master holds up its own rooms only. The pipeline is the cluster client's,
    so a MOVED or ASK reply is followed."""

    def __init__(self, cluster: RedisCluster, name: str) -> None:
        super().__init__("redis cluster")
        self._cluster = cluster
        self._task = asyncio.create_task(self.run(), name=f"redis-cluster-publisher-{name}")

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def _send_batch(self, batch: list[Publish]) -> list[Any]:
        async with asyncio.timeout(TIMEOUT):
            results = await self._pipeline(batch)
            # Most likely a pooled connection the master closed meanwhile (it
            # restarted): once more, on a new one. Should the first have reached
            # Redis after all, receivers drop the repeat by the message's number.
            lost = [n for n, result in enumerate(results) if _connection_lost(result)]
            if lost:
                again = await self._pipeline([batch[n] for n in lost])
                for n, result in zip(lost, again, strict=True):
                    results[n] = result
        return results

    async def _pipeline(self, batch: list[Publish]) -> list[Any]:
        pipe = self._cluster.pipeline(transaction=False)
        for channel, payload, _ in batch:
            pipe.execute_command("SPUBLISH", channel, payload)
        return await pipe.execute(raise_on_error=False)


def _connection_lost(result: object) -> bool:
    return isinstance(result, RedisConnectionError)
