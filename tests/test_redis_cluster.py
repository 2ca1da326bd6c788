"""The Redis Cluster queue against a real cluster of our own: sharded pub/sub, failover."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import aiohttp
import pytest
from redis import Redis
from redis.crc import key_slot

from sharechat.app import create_app, describe_backends
from sharechat.config import Config
from sharechat.domain import BackendUnavailable
from sharechat.redis_cluster_queue import RedisClusterQueue, open_redis_cluster_queue
from tests.cluster_support import RedisCluster, running_cluster
from tests.conftest import Chat
from tests.helpers import eventually, receive_json, receive_until, suite_config
from tests.pg_support import temporary_database
from tests.redis_support import unique_prefix
from tests.servers import MANY_CLIENTS_FROM_ONE_ADDRESS, create_room, join, running_servers

pytestmark = pytest.mark.services  # real PostgreSQL/Redis: see conftest --backends

FAILOVER_WAIT = 30.0  # seconds for a master's death to be noticed, its replica promoted, rejoined
Inbox = asyncio.Queue[tuple[UUID, bytes]]
Opened = tuple[RedisClusterQueue, Inbox]
OpenQueue = Callable[..., Awaitable[Opened]]


@pytest.fixture
def own_cluster(tmp_path: Path) -> Iterator[RedisCluster]:
    """A cluster for one test that breaks it."""
    with running_cluster(tmp_path) as cluster:
        yield cluster


@pytest.fixture
async def open_queue() -> AsyncIterator[OpenQueue]:
    """Opens queues ("instances") sharing one unique prefix; closes them all at the end."""
    prefix = unique_prefix("cluster")
    async with contextlib.AsyncExitStack() as stack:

        async def open_(cluster: RedisCluster, **options: Any) -> Opened:
            opened = open_redis_cluster_queue(
                cluster.url, prefix=prefix, instance_id=uuid4(), **options
            )
            async with asyncio.timeout(10):
                queue = await stack.enter_async_context(opened)
            inbox: Inbox = asyncio.Queue()
            queue.on_message(lambda room_id, payload: inbox.put_nowait((room_id, payload)))
            queue.on_recovered(lambda: inbox.put_nowait((RECOVERED, b"")))
            return queue, inbox

        yield open_


async def two_instances(open_queue: OpenQueue, cluster: RedisCluster) -> tuple[Opened, Opened]:
    """Two queues ("instances") on `cluster`, opened at once."""
    first, second = await asyncio.gather(open_queue(cluster), open_queue(cluster))
    return first, second


RECOVERED = UUID(int=0)  # what the inbox gets when the queue says "recovered"


async def receive(inbox: Inbox, wait: float = 5.0) -> tuple[UUID, bytes]:
    """The next delivery, recoveries skipped."""
    async with asyncio.timeout(wait):
        while True:
            room_id, payload = await inbox.get()
            if room_id != RECOVERED:
                return room_id, payload


async def call(awaitable: Awaitable[Any]) -> Any:
    async with asyncio.timeout(5):
        return await awaitable


def channel(prefix: str, room: UUID) -> str:
    return f"{prefix}room:{room}"


def rooms_on_every_master(cluster: RedisCluster, prefix: str) -> dict[int, UUID]:
    """One room per master, keyed by the master's port."""
    rooms: dict[int, UUID] = {}
    while len(rooms) < len(cluster.master_ports()):
        room = uuid4()
        rooms.setdefault(cluster.master_port(channel(prefix, room)), room)
    return rooms


def subscribers(cluster: RedisCluster, name: str) -> int:
    """How many connections the channel's master has subscribed to the sharded channel."""
    with Redis(port=cluster.master_port(name)) as client:
        reply = client.execute_command("PUBSUB", "SHARDNUMSUB", name)
    return int(reply[1])


async def test_rooms_on_every_shard_reach_the_other_instance(
    redis_cluster: RedisCluster, open_queue: OpenQueue
) -> None:
    (alpha, alpha_inbox), (beta, beta_inbox) = await two_instances(open_queue, redis_cluster)
    prefix = alpha._prefix
    rooms = rooms_on_every_master(redis_cluster, prefix)
    assert len(rooms) == 3
    for room in rooms.values():
        await call(beta.subscribe(room))
        await call(alpha.publish(room, f"to beta in {room}".encode()))
        assert await receive(beta_inbox) == (room, f"to beta in {room}".encode())
    for room in rooms.values():
        await call(alpha.subscribe(room))
        await call(beta.publish(room, b"both"))
        assert await receive(alpha_inbox) == (room, b"both")
        assert await receive(beta_inbox) == (room, b"both")
    await call(alpha.ping())


async def test_each_room_is_subscribed_on_its_own_master_only_while_served(
    redis_cluster: RedisCluster, open_queue: OpenQueue
) -> None:
    queue, _ = await open_queue(redis_cluster)
    room = uuid4()
    name = channel(queue._prefix, room)
    assert subscribers(redis_cluster, name) == 0
    await call(queue.subscribe(room))
    assert subscribers(redis_cluster, name) == 1  # confirmed means subscribed already
    await call(queue.unsubscribe(room))

    async def gone() -> bool:
        return subscribers(redis_cluster, name) == 0

    await eventually(gone)


async def test_unsubscribe_stops_delivery(
    redis_cluster: RedisCluster, open_queue: OpenQueue
) -> None:
    (queue, inbox), (other, _) = await two_instances(open_queue, redis_cluster)
    left, staying = uuid4(), uuid4()
    await call(queue.subscribe(left))
    await call(queue.subscribe(staying))
    await call(queue.unsubscribe(left))
    await call(other.publish(left, b"nobody here"))
    await call(other.publish(staying, b"still here"))
    assert await receive(inbox) == (staying, b"still here")
    assert inbox.empty()


async def test_a_burst_keeps_each_rooms_order_on_every_instance(
    redis_cluster: RedisCluster, open_queue: OpenQueue
) -> None:
    (alpha, alpha_inbox), (beta, beta_inbox) = await two_instances(open_queue, redis_cluster)
    rooms = list(rooms_on_every_master(redis_cluster, alpha._prefix).values())
    for room in rooms:
        await call(alpha.subscribe(room))
        await call(beta.subscribe(room))
    sent = [(room, f"{n}".encode()) for n in range(300) for room in rooms]
    await call(asyncio.gather(*(alpha.publish(room, payload) for room, payload in sent)))
    for inbox in (alpha_inbox, beta_inbox):
        got = [await receive(inbox) for _ in sent]
        for room in rooms:
            assert [p for r, p in got if r == room] == [p for r, p in sent if r == room]


async def test_concurrent_subscribe_unsubscribe_subscribe_ends_subscribed(
    redis_cluster: RedisCluster, open_queue: OpenQueue
) -> None:
    (queue, inbox), (other, _) = await two_instances(open_queue, redis_cluster)
    room = uuid4()
    first = asyncio.create_task(queue.subscribe(room))
    await queue.unsubscribe(room)
    await call(asyncio.gather(first, queue.subscribe(room)))
    await call(other.publish(room, b"here"))
    assert await receive(inbox) == (room, b"here")


async def test_the_app_chats_on_the_cluster(
    aiohttp_client: Any, database_url: str, redis_cluster: RedisCluster
) -> None:
    config = Config(
        database_url=database_url,
        redis_url=redis_cluster.url,
        redis_prefix=unique_prefix("cluster-app"),
    )
    assert describe_backends(config) == "PostgreSQL, Redis Cluster"
    first = Chat(await aiohttp_client(create_app(config)))
    second = Chat(await aiohttp_client(create_app(config)))
    room = await first.room()
    alice, _ = await first.join(room)
    bob, _ = await second.join(room)
    await alice.send_str("hello over the cluster")
    echo, _ = await receive_until(alice, lambda m: m["type"] == "chat")
    assert (await receive_until(bob, lambda m: m["type"] == "chat"))[0] == echo
    health = await second.client.get("/api/healthz")
    assert health.status == 200


async def test_two_server_processes_share_the_cluster(redis_cluster: RedisCluster) -> None:
    async with temporary_database(migrated=False) as database_url:
        env = {
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_cluster.url,
            "SHARECHAT_REDIS_PREFIX": unique_prefix("cluster-serve"),
            **MANY_CLIENTS_FROM_ONE_ADDRESS,
        }
        async with running_servers(2, env) as servers, aiohttp.ClientSession() as http:
            assert "Redis Cluster" in servers[0].output()
            rooms = [await create_room(http, servers[0]) for _ in range(4)]
            for room in rooms:
                alice, _ = await join(http, servers[0], room)
                bob, _ = await join(http, servers[1], room)
                await receive_until(alice, lambda m: m["type"] == "joined")
                await bob.send_str(f"from the other process to {room}")
                echo, _ = await receive_until(bob, lambda m: m["type"] == "chat")
                assert (await receive_until(alice, lambda m: m["type"] == "chat"))[0] == echo
                await alice.close()
                await bob.close()


async def test_a_subscription_killed_by_a_master_is_rebuilt_and_recovered(
    redis_cluster: RedisCluster, open_queue: OpenQueue
) -> None:
    (queue, inbox), (other, _) = await two_instances(open_queue, redis_cluster)
    room = uuid4()
    await call(queue.subscribe(room))
    with Redis(port=redis_cluster.master_port(channel(queue._prefix, room))) as master:
        assert master.execute_command("CLIENT", "KILL", "TYPE", "pubsub") >= 1
    async with asyncio.timeout(10):
        assert (await inbox.get())[0] == RECOVERED  # resubscribed, and says so
    await call(other.publish(room, b"after"))
    assert await receive(inbox) == (room, b"after")


async def test_a_room_follows_its_slot_to_another_master(
    own_cluster: RedisCluster, open_queue: OpenQueue
) -> None:
    (alpha, alpha_inbox), (beta, _) = await two_instances(open_queue, own_cluster)
    room = uuid4()
    name = channel(alpha._prefix, room)
    await call(alpha.subscribe(room))
    old_port = own_cluster.master_port(name)
    new_port = next(port for port in own_cluster.master_ports() if port != old_port)

    await asyncio.to_thread(own_cluster.move_slot, key_slot(name.encode()), new_port)

    # Redis drops the subscription on the old master (an unasked sunsubscribe); the
    # queue subscribes on the new one and says a gap may need repair.
    async def recovered() -> bool:
        with contextlib.suppress(TimeoutError):
            while True:
                async with asyncio.timeout(0.5):
                    if (await alpha_inbox.get())[0] == RECOVERED:
                        return True
        return False

    await eventually(recovered, wait=FAILOVER_WAIT)
    assert subscribers(own_cluster, name) == 1
    await call(beta.publish(room, b"on the new master"))  # beta's slot map is stale: MOVED
    assert await receive(alpha_inbox) == (room, b"on the new master")


async def test_a_dead_master_is_reported_and_its_replica_takes_over(
    own_cluster: RedisCluster, open_queue: OpenQueue
) -> None:
    (alpha, alpha_inbox), (beta, _) = await two_instances(open_queue, own_cluster)
    rooms = rooms_on_every_master(own_cluster, alpha._prefix)
    for room in rooms.values():
        await call(alpha.subscribe(room))
    doomed_port = own_cluster.master_ports()[1]
    doomed = rooms[doomed_port]

    killing = asyncio.create_task(asyncio.to_thread(own_cluster.kill_master, doomed_port))

    async def reported() -> bool:
        try:
            await call(alpha.ping())
        except BackendUnavailable as exc:
            return f"127.0.0.1:{doomed_port}" in str(exc)
        return False

    await eventually(reported, wait=FAILOVER_WAIT)  # before its replica is promoted
    # The other masters go on taking publishes while this one is dead.
    stuck = asyncio.create_task(beta.publish(doomed, b"to the dead master"))
    try:
        for port, room in rooms.items():
            if port != doomed_port:
                await eventually(lambda room=room: published(beta, room), wait=FAILOVER_WAIT)
    finally:
        with contextlib.suppress(BackendUnavailable):
            await call(stuck)
    assert await killing != doomed_port

    async def delivered(room: UUID, payload: bytes) -> bool:
        with contextlib.suppress(TimeoutError):
            while True:
                if await receive(alpha_inbox, wait=1.0) == (room, payload):
                    return True
        return False

    async def flows() -> bool:
        try:
            await call(beta.publish(doomed, b"after the failover"))
        except BackendUnavailable:
            return False
        return await delivered(doomed, b"after the failover")

    await eventually(flows, wait=FAILOVER_WAIT)
    await eventually(lambda: answers(alpha), wait=FAILOVER_WAIT)
    for room in rooms.values():  # every shard delivers, the new master's included
        await call(beta.publish(room, b"everywhere"))
        assert await delivered(room, b"everywhere")


async def test_publish_and_subscribe_raise_when_the_cluster_is_gone(
    own_cluster: RedisCluster, open_queue: OpenQueue
) -> None:
    queue, _ = await open_queue(own_cluster)
    room = uuid4()
    await call(queue.subscribe(room))
    own_cluster.stop()
    with pytest.raises(BackendUnavailable):
        await call(queue.publish(room, b"nobody can take this"))
    with pytest.raises(BackendUnavailable):
        await call(queue.subscribe(uuid4()))
    with pytest.raises(BackendUnavailable, match=r"127\.0\.0\.1"):
        await call(queue.ping())


async def published(queue: RedisClusterQueue, room: UUID) -> bool:
    try:
        await call(queue.publish(room, b"unaffected"))
    except BackendUnavailable:
        return False
    return True


async def answers(queue: RedisClusterQueue) -> bool:
    try:
        await call(queue.ping())
    except BackendUnavailable:
        return False
    return True


async def test_a_chat_survives_a_master_failover_with_nothing_acknowledged_lost(
    aiohttp_client: Any, database_url: str, own_cluster: RedisCluster
) -> None:
    config = suite_config(
        rate_limit=0,
        database_url=database_url,
        redis_url=own_cluster.url,
        redis_prefix=unique_prefix("cluster-failover"),
    )
    first = Chat(await aiohttp_client(create_app(config)))
    second = Chat(await aiohttp_client(create_app(config)))
    room = await first.room()
    doomed_port = own_cluster.master_port(channel(config.redis_prefix, UUID(room)))
    alice, _ = await first.join(room)
    bob, _ = await second.join(room)
    await receive_until(alice, lambda m: m["type"] == "joined")

    acknowledged: list[str] = []
    failed = 0

    async def say(text: str) -> None:
        nonlocal failed
        await alice.send_str(text)
        answer, _ = await receive_until(alice, lambda m: m["type"] in ("chat", "failed"))
        if answer["type"] == "chat":
            assert answer["message"] == text
            acknowledged.append(answer["id"])
        else:
            failed += 1

    for n in range(5):
        await say(f"before {n}")
    killing = asyncio.create_task(asyncio.to_thread(own_cluster.kill_master, doomed_port))
    n = 0
    while not killing.done():
        await say(f"during {n}")
        n += 1
        await asyncio.sleep(0.05)
    await killing

    async def flows_again() -> bool:
        before = len(acknowledged)
        await say(f"after {len(acknowledged)}")
        return len(acknowledged) > before

    await eventually(flows_again, wait=FAILOVER_WAIT)
    for n in range(5):
        await say(f"after {n}")

    history = [m["id"] for m in await first.history(room) if m["type"] == "chat"]
    assert set(acknowledged) <= set(history)
    seen: list[str] = []
    async with asyncio.timeout(FAILOVER_WAIT):
        while seen[-1:] != acknowledged[-1:]:
            message = await receive_json(bob, wait=FAILOVER_WAIT)
            if message["type"] == "chat":
                seen.append(message["id"])
    assert [m for m in seen if m in acknowledged] == acknowledged, f"{failed} failed"
    assert len(seen) == len(set(seen))  # exactly once
    for app in (first, second):
        await eventually(lambda app=app: healthy(app), wait=FAILOVER_WAIT)


async def healthy(chat: Chat) -> bool:
    response = await chat.client.get("/api/healthz")
    return response.status == 200


def test_a_cluster_url_picks_the_cluster_queue() -> None:
    config = dataclasses.replace(Config(), database_url="postgresql://x/y")
    assert not config.redis_cluster
    assert dataclasses.replace(config, redis_url="redis+cluster://h:7000").redis_cluster
    assert dataclasses.replace(config, redis_url="rediss+cluster://h:7000").redis_cluster
    assert not dataclasses.replace(config, redis_url="redis://h:6379/0").redis_cluster
