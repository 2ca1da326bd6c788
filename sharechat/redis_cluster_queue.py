"""The Redis Cluster adapter of the Queue port: sharded pub/sub (Redis 7+).

Chosen by a `redis+cluster://host:port` URL (`rediss+cluster://` for TLS): one node of
the cluster, from which redis-py's cluster client discovers the others and the slot map.

Each room is the sharded channel `<prefix>room:<room_id>`, which lives on the master
that owns its slot. Publishing is SPUBLISH through the cluster client, which follows
MOVED/ASK, in one lane per master (redis_cluster_shard.PublishLane). Subscribing is
ours, not redis-py's ClusterPubSub: that one polls its per-node connections and hides
when a subscription is confirmed, lost or back, which the port promises to tell. So
the instance keeps one sharded pub/sub connection per master that owns a room it
serves (redis_cluster_shard.Shard), each with a canary on a slot of that master, and
re-maps a room to its slot's new master when a shard is lost (failover), refuses a
subscription (MOVED) or drops one (a slot migrated away). The room methods and the
claims on rooms are redis_pubsub's, shared with the queue for one Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from uuid import UUID

from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot
from redis.exceptions import RedisClusterException, RedisError

from sharechat.domain import BackendUnavailable
from sharechat.redis_cluster_shard import Moved, PublishLane, Shard
from sharechat.redis_pubsub import Claim, RoomChannelQueue, Rooms, publish_canary
from sharechat.redis_wire import TIMEOUT, describe

log = logging.getLogger(__name__)

_CANARY_TAGS = 1 << 16  # hash tags tried for a canary (a few do, unless the prefix has a tag)


@contextlib.asynccontextmanager
async def open_redis_cluster_queue(
    url: str,
    *,
    prefix: str = "sharechat:",
    instance_id: UUID,
    canary_interval: float = 2.0,
    ssl_ca_certs: str | None = None,
    ssl_cert_reqs: str | None = None,
) -> AsyncIterator[RedisClusterQueue]:
    """Discover the cluster, then publish and listen; on exit close every connection.

    If no node answers yet, the queue is yielded anyway: ping() reports it, and the
    slot map is fetched again on the next subscribe.
    """
    # The TLS settings, when given, win over the URL's query (as for one Redis).
    tls = {"ssl_ca_certs": ssl_ca_certs, "ssl_cert_reqs": ssl_cert_reqs}
    cluster = RedisCluster.from_url(
        url.replace("+cluster://", "://", 1),
        protocol=2,
        socket_connect_timeout=TIMEOUT,
        socket_keepalive=True,
        require_full_coverage=False,  # a failed shard must not stop the others
        **{name: value for name, value in tls.items() if value is not None},
    )
    shards = _Shards(cluster, f"{prefix}instance:{instance_id}:".encode(), canary_interval)
    publisher = _Publisher(cluster)
    tasks = [
        asyncio.create_task(shards.remap_when_asked(), name="redis-cluster-remap"),
        asyncio.create_task(
            _publish_canaries(publisher, shards, canary_interval), name="redis-cluster-canary"
        ),
    ]
    try:
        with contextlib.suppress(BackendUnavailable):
            await shards.refresh()
        yield RedisClusterQueue(cluster, publisher, shards, prefix)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(shards.close(), publisher.close())
        await cluster.aclose()


class RedisClusterQueue(RoomChannelQueue):
    """The Queue port over Redis Cluster sharded pub/sub. Build it with
    open_redis_cluster_queue()."""

    def __init__(
        self, cluster: RedisCluster, publisher: _Publisher, shards: _Shards, prefix: str
    ) -> None:
        super().__init__(publisher, shards, prefix)
        self._cluster = cluster
        self._shards = shards

    async def ping(self) -> None:
        """Raises BackendUnavailable naming each master that does not answer and each
        shard whose subscription does not deliver."""
        troubles = [f"{shard.name}: {shard.down_reason}" for shard in self._shards.troubled()]
        primaries = self._cluster.get_primaries()
        if not primaries:
            troubles.append("no master known")
        answers = await asyncio.gather(*(self._ping(node) for node in primaries))
        troubles += [f"{node.name}: {reason}" for node, reason in answers if reason]
        if troubles:
            # The slot map may be the one to blame (a failover it has not seen yet).
            self._shards.remap_soon()
            raise BackendUnavailable(f"redis cluster: {'; '.join(sorted(set(troubles)))}")

    async def _ping(self, node: ClusterNode) -> tuple[ClusterNode, str | None]:
        try:
            async with asyncio.timeout(TIMEOUT):
                await self._cluster.execute_command("PING", target_nodes=node)
        except TimeoutError:
            return node, "ping timed out"
        except (RedisError, RedisClusterException, OSError) as exc:
            return node, describe(exc)
        return node, None


class _Shards(Rooms):
    """The map of rooms to shards: places each room on its slot's master, and re-maps."""

    def __init__(self, cluster: RedisCluster, canary_prefix: bytes, canary_interval: float):
        super().__init__()
        self._cluster = cluster
        self._canary_prefix = canary_prefix
        self._canary_interval = canary_interval
        self._shards: dict[str, Shard] = {}
        self._where: dict[bytes, Shard] = {}  # the shard each room is subscribed on
        self._remap = asyncio.Event()
        self._mapped = False

    def live(self) -> list[Shard]:
        return list(self._shards.values())

    def troubled(self) -> list[Shard]:
        return [shard for shard in self._shards.values() if shard.down_reason is not None]

    async def close(self) -> None:
        await asyncio.gather(*(shard.close() for shard in self._shards.values()))
        self._shards.clear()

    async def refresh(self) -> None:
        """Fetch the slot map again; raises BackendUnavailable if no node answers."""
        try:
            async with asyncio.timeout(TIMEOUT):
                if self._mapped:
                    await self._cluster.nodes_manager.initialize()
                else:  # the client's own, so that it also closes what it opened
                    await self._cluster.initialize()
                    self._mapped = True
        except TimeoutError:
            raise BackendUnavailable("redis cluster: slot map timed out") from None
        except (RedisError, RedisClusterException, OSError) as exc:
            raise BackendUnavailable(f"redis cluster: {describe(exc)}") from exc

    async def _confirm(self, channel: bytes, room_id: UUID) -> None:
        shard: Shard | None = None
        try:
            async with asyncio.timeout(TIMEOUT):
                while True:
                    shard = await self._place(channel)
                    try:
                        return await shard.subscribe(channel, room_id)
                    except Moved:
                        await self.refresh()
        except TimeoutError:
            reason = (shard and shard.down_reason) or "subscribe not confirmed"
            raise BackendUnavailable(f"redis cluster: {reason}") from None

    def _drop(self, channel: bytes) -> None:
        shard = self._where.pop(channel, None)
        if shard is not None:
            shard.unsubscribe(channel)

    async def _place(self, channel: bytes) -> Shard:
        """The shard of the channel's master, the channel moved onto it from any other."""
        node = self._owner(channel)
        if node is None:
            await self.refresh()
            node = self._owner(channel)
            if node is None:
                raise BackendUnavailable("redis cluster: no master owns the room's slot")
        return self._move(channel, node)

    def _move(self, channel: bytes, node: ClusterNode) -> Shard:
        shard = self._shards.get(node.name)
        if shard is None:
            shard = self._shards[node.name] = Shard(node, self, self._canary_interval)
        old = self._where.get(channel)
        if old is not None and old is not shard:
            old.unsubscribe(channel)
        self._where[channel] = shard
        return shard

    def _owner(self, channel: bytes) -> ClusterNode | None:
        slots = self._cluster.nodes_manager.slots_cache.get(key_slot(channel))
        return slots[0] if slots else None

    # What the shards report (the ShardOwner protocol).

    def canary_for(self, node: ClusterNode) -> bytes:
        slots = self._cluster.nodes_manager.slots_cache
        owned = {slot for slot, nodes in slots.items() if nodes and nodes[0].name == node.name}
        if not owned:
            raise Moved(f"{node.name} owns no slot")
        # A hash tag puts the channel in the slot of the tag alone (unless the prefix has
        # one of its own): the first tag that lands on one of the master's slots will do.
        for tag in range(_CANARY_TAGS):
            channel = self._canary_prefix + b"{%d}" % tag
            if key_slot(channel) in owned:
                return channel
        raise Moved(f"no canary channel lands on {node.name}")

    def moved(self, shard: Shard, channels: Sequence[bytes]) -> None:
        for channel in channels:
            if self._where.get(channel) is shard:
                del self._where[channel]
        self._remap.set()

    def lost(self, shard: Shard) -> None:
        self.remap_soon()

    def remap_soon(self) -> None:
        self._remap.set()

    def back(self, shard: Shard) -> None:
        self._recover()

    async def remap_when_asked(self) -> None:
        """Follow failovers and migrations: each room to its slot's master, old shards closed."""
        while True:
            await self._remap.wait()
            self._remap.clear()
            try:
                await self._remap_once()
            except BackendUnavailable as exc:
                # The shard that asked asks again on its next failed reconnect.
                log.debug("re-mapping the cluster failed: %s", exc)
            except Exception:  # a bug here must not stop every later re-mapping
                log.exception("re-mapping the cluster failed")

    async def _remap_once(self) -> None:
        await self.refresh()
        moved = self._rehome()
        await self._close_demoted()
        if moved:
            await asyncio.gather(*(self._resubscribe(channel, claim) for channel, claim in moved))
            self._recover()

    def _rehome(self) -> list[tuple[bytes, Claim]]:
        moved = []
        for channel, claim in list(self._rooms.items()):
            node = self._owner(channel)
            shard = self._where.get(channel)
            if node is not None and (shard is None or shard.name != node.name):
                self._move(channel, node)
                moved.append((channel, claim))
        return moved

    async def _resubscribe(self, channel: bytes, claim: Claim) -> None:
        shard = self._where.get(channel)
        if shard is None or self._rooms.get(channel) is not claim:
            return  # unsubscribed meanwhile
        try:
            await shard.subscribe(channel, claim.room_id)
        except Moved:
            self.moved(shard, [channel])
        except BackendUnavailable:
            shard.owes_recovery = True  # down: it resubscribes, and says so, once it is back

    async def _close_demoted(self) -> None:
        """Close the shards of nodes that are no longer masters (failed, or replicas now)."""
        masters = {node.name for node in self._cluster.get_primaries()}
        for name, shard in list(self._shards.items()):
            if name not in masters and not shard.channels:
                del self._shards[name]
                await shard.close()


class _Publisher:
    """Routes each publish to the lane of its slot's master (see PublishLane).

    A room's publishes keep their call order while its slot stays on one master;
    across a failover or a migration two lanes may carry one room's messages at
    once, and the instances put them back in order by their numbers.
    """

    def __init__(self, cluster: RedisCluster) -> None:
        self._cluster = cluster
        self._lanes: dict[str, PublishLane] = {}
        self._closed = False

    async def publish(self, channel: bytes, payload: bytes) -> None:
        if self._closed:
            raise BackendUnavailable("redis cluster: queue closed")
        slots = self._cluster.nodes_manager.slots_cache.get(key_slot(channel))
        name = slots[0].name if slots else ""  # not mapped yet: the client maps it
        lane = self._lanes.get(name)
        if lane is None:
            lane = self._lanes[name] = PublishLane(self._cluster, name)
        await lane.publish(channel, payload)

    async def close(self) -> None:
        self._closed = True
        await asyncio.gather(*(lane.close() for lane in self._lanes.values()))


async def _publish_canaries(publisher: _Publisher, shards: _Shards, interval: float) -> None:
    while True:
        await asyncio.gather(*(_publish_canary(publisher, shard) for shard in shards.live()))
        await asyncio.sleep(interval)


async def _publish_canary(publisher: _Publisher, shard: Shard) -> None:
    if shard.canary is not None:
        await publish_canary(publisher, shard.canary, shard)
