"""The Redis queue against real Redis servers: the shared one, and throwaway ones to break.

What every Queue adapter owes is in tests/test_queue_contract.py; here is what is
Redis's own: reasons and log lines, TLS and passwords, killed, hung and silenced
connections, the canary, closing under load.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pytest
from redis.asyncio import Redis

from sharechat.domain import BackendUnavailable
from sharechat.redis_queue import RedisQueue, open_redis_queue
from tests.helpers import eventually, free_port
from tests.redis_support import REDIS_URL, RedisServer, StallingProxy, redis_server, unique_prefix

pytestmark = pytest.mark.services  # real PostgreSQL/Redis: see conftest --backends

OpenQueue = Callable[..., Awaitable[RedisQueue]]
Inbox = AsyncIterator[tuple[UUID, bytes]]
SETTLE = 10.0  # seconds a queue may take to get where a test waits for it (load, loss, return)


@pytest.fixture
async def open_queue() -> AsyncIterator[OpenQueue]:
    """Opens queues ("instances") sharing one unique prefix; closes them all at the end."""
    prefix = unique_prefix()
    async with contextlib.AsyncExitStack() as stack:

        async def open_(url: str = REDIS_URL, **options: Any) -> RedisQueue:
            queue_cm = open_redis_queue(url, prefix=prefix, instance_id=uuid4(), **options)
            async with asyncio.timeout(10):
                queue = await stack.enter_async_context(queue_cm)
            inbox: asyncio.Queue[tuple[UUID, bytes]] = asyncio.Queue()
            queue.on_message(lambda room_id, payload: inbox.put_nowait((room_id, payload)))
            _inboxes[queue] = inbox
            return queue

        yield open_


@pytest.fixture
async def queue(open_queue: OpenQueue) -> RedisQueue:
    return await open_queue()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    with redis_server(tmp_path) as started:
        yield started


@pytest.fixture
def redis_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="sharechat.redis_queue")
    return caplog


_inboxes: weakref.WeakKeyDictionary[RedisQueue, asyncio.Queue[tuple[UUID, bytes]]] = (
    weakref.WeakKeyDictionary()
)


async def received(queue: RedisQueue) -> Inbox:
    """What the queue delivers to its consumer, in order."""
    inbox = _inboxes[queue]
    while True:
        yield await inbox.get()


async def receive(inbox: Inbox) -> tuple[UUID, bytes]:
    async with asyncio.timeout(5):
        return await anext(inbox)


async def call(awaitable: Awaitable[Any]) -> Any:
    async with asyncio.timeout(5):
        return await awaitable


async def unavailable(operation: Awaitable[object]) -> str:
    """Assert that the operation raises BackendUnavailable within 3 s; return its reason."""
    try:
        async with asyncio.timeout(3):
            await operation
    except BackendUnavailable as exc:
        return str(exc)
    raise AssertionError("expected BackendUnavailable")


async def down_reason(queue: RedisQueue) -> str | None:
    """Why the queue is unavailable right now, or None if it answers PING."""
    try:
        await call(queue.ping())
    except BackendUnavailable as exc:
        return str(exc)
    return None


async def answers(queue: RedisQueue) -> bool:
    return await down_reason(queue) is None


async def test_cancelled_subscribes_leave_the_shared_connection_alone(
    queue: RedisQueue, redis_logs: pytest.LogCaptureFixture
) -> None:
    """redis-py drops a connection whose write is cancelled, and the subscriber's carries
    every room: a subscribe() never writes itself. (That a cancelled subscribe leaves
    its room unsubscribed is the port's contract: tests/test_queue_contract.py.)"""
    kept = uuid4()
    await call(queue.subscribe(kept))
    for _ in range(20):
        subscribing = asyncio.create_task(queue.subscribe(uuid4()))
        await asyncio.sleep(0)
        subscribing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call(subscribing)
    await call(queue.publish(kept, b"kept"))
    assert await receive(received(queue)) == (kept, b"kept")
    assert "redis lost" not in redis_logs.text


async def test_a_long_burst_is_delivered_whole_and_in_order(open_queue: OpenQueue) -> None:
    # With a canary deadline shorter than the burst takes to read: busy is not stalled.
    queue = await open_queue(canary_interval=0.05)
    room = uuid4()
    await call(queue.subscribe(room))
    count = 12_000
    async with asyncio.timeout(30):
        await asyncio.gather(*(queue.publish(room, b"%d" % n) for n in range(count)))
        inbox = received(queue)
        assert [(await anext(inbox))[1] for _ in range(count)] == [b"%d" % n for n in range(count)]


async def test_a_foreign_payload_that_is_not_utf8_is_repaired_not_passed_on(
    queue: RedisQueue,
) -> None:
    """Members get payloads as text frames, and invalid UTF-8 fails a browser's socket."""
    room = uuid4()
    await call(queue.subscribe(room))
    async with Redis.from_url(REDIS_URL) as stranger:
        await call(stranger.publish(queue._channel(room), b"caf\xe9 \xff"))
    await call(queue.publish(room, b"ours"))
    inbox = received(queue)
    assert await receive(inbox) == (room, "caf\ufffd \ufffd".encode())
    assert await receive(inbox) == (room, b"ours")


async def test_a_consumer_that_raises_does_not_stop_the_deliveries(
    queue: RedisQueue, redis_logs: pytest.LogCaptureFixture
) -> None:
    inbox = _inboxes[queue]

    def fussy(room_id: UUID, payload: bytes) -> None:
        if payload == b"bad":
            raise RuntimeError("consumer bug")
        inbox.put_nowait((room_id, payload))

    queue.on_message(fussy)
    room = uuid4()
    await call(queue.subscribe(room))
    await call(queue.publish(room, b"bad"))
    await call(queue.publish(room, b"good"))
    assert await receive(received(queue)) == (room, b"good")
    assert "delivering a message of room" in redis_logs.text
    assert "redis lost" not in redis_logs.text


async def test_closing_stops_every_task() -> None:
    async with open_redis_queue(REDIS_URL, prefix=unique_prefix(), instance_id=uuid4()) as queue:
        await call(queue.ping())
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("redis-queue")]
    assert "closed" in await unavailable(queue.publish(uuid4(), b"too late"))


async def test_closing_under_load_stops_every_task() -> None:
    # A cancellation landing just as redis-py completes a write must still stop the tasks.
    for _ in range(5):
        async with asyncio.timeout(10):
            await close_under_load()
        assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("redis-queue")]


async def close_under_load() -> None:
    published = 0
    prefix = unique_prefix()
    async with open_redis_queue(REDIS_URL, prefix=prefix, instance_id=uuid4()) as queue:

        async def publish_until_closed() -> None:
            nonlocal published
            with contextlib.suppress(BackendUnavailable):
                while True:
                    await queue.publish(uuid4(), b"load")
                    published += 1

        async def under_load() -> bool:
            return published > 1000

        publishers = [asyncio.create_task(publish_until_closed()) for _ in range(50)]
        await eventually(under_load, wait=SETTLE)
    await asyncio.gather(*publishers)  # each ends at its first publish after the close


async def test_url_with_password_and_database(open_queue: OpenQueue, tmp_path: Path) -> None:
    with redis_server(tmp_path / "secured", password="s3cret") as secured:
        queue = await open_queue(secured.url.replace("/0", "/3"))
        await call(queue.ping())
        room = uuid4()
        await call(queue.subscribe(room))
        await call(queue.publish(room, b"authenticated"))
        assert await receive(received(queue)) == (room, b"authenticated")

        intruder = await open_queue(secured.url.replace("s3cret", "wrong"))
        assert "redis: " in await unavailable(intruder.ping())


async def test_rediss_url(open_queue: OpenQueue, tmp_path: Path) -> None:
    with redis_server(tmp_path, tls=True) as secured:
        queue = await open_queue(secured.url)
        await call(queue.ping())
        room = uuid4()
        await call(queue.subscribe(room))
        await call(queue.publish(room, b"encrypted"))
        assert await receive(received(queue)) == (room, b"encrypted")


async def test_outage_is_reported_and_survived(
    open_queue: OpenQueue, server: RedisServer, redis_logs: pytest.LogCaptureFixture
) -> None:
    queue = await open_queue(server.url)
    inbox = received(queue)
    room = uuid4()
    await call(queue.subscribe(room))
    await call(queue.publish(room, b"before"))
    assert await receive(inbox) == (room, b"before")

    server.kill()
    assert (await unavailable(queue.ping())).startswith("redis: ")
    assert await unavailable(queue.publish(room, b"during")) == "redis: connection refused"
    concurrent = await call(
        asyncio.gather(*(queue.publish(room, b"during") for _ in range(5)), return_exceptions=True)
    )
    assert all(isinstance(result, BackendUnavailable) for result in concurrent)
    await unavailable(queue.subscribe(uuid4()))

    server.start()
    await eventually(lambda: answers(queue), wait=SETTLE)
    await call(queue.publish(room, b"after"))
    assert await receive(inbox) == (room, b"after")
    assert "redis lost: connection closed by server" in redis_logs.text
    assert "redis back: resubscribed 1 rooms" in redis_logs.text


async def test_hung_server_is_reported_within_seconds(
    open_queue: OpenQueue, server: RedisServer
) -> None:
    queue = await open_queue(server.url)
    inbox = received(queue)
    room = uuid4()
    await call(queue.subscribe(room))

    server.freeze()
    try:
        assert await unavailable(queue.ping()) == "redis: ping timed out"
        assert await unavailable(queue.publish(room, b"during")) == "redis: timed out"
    finally:
        server.thaw()
    await eventually(lambda: answers(queue), wait=SETTLE)
    await call(queue.publish(room, b"after"))
    # A timeout cannot tell whether Redis got the command: the thawed server may still
    # run the PUBLISH it had buffered.
    while (message := await receive(inbox)) != (room, b"after"):
        assert message == (room, b"during")


async def test_pubsub_connection_killed_by_redis_is_rebuilt(
    open_queue: OpenQueue, server: RedisServer, redis_logs: pytest.LogCaptureFixture
) -> None:
    queue = await open_queue(server.url)
    room = uuid4()
    await call(queue.subscribe(room))
    async with Redis.from_url(server.url) as admin:
        assert await call(admin.client_kill_filter(_type="pubsub")) == 1

    async def noticed() -> bool:
        return "redis back: resubscribed 1 rooms" in redis_logs.text

    await eventually(noticed, wait=SETTLE)
    await call(queue.ping())
    await call(queue.publish(room, b"after"))
    assert await receive(received(queue)) == (room, b"after")


async def test_a_publish_after_redis_closed_the_idle_publisher_connection_succeeds(
    open_queue: OpenQueue, server: RedisServer
) -> None:
    """Redis closes idle clients (its `timeout` setting, CLIENT KILL); the publisher
    keeps one connection, and must notice before it sends rather than fail a message."""
    queue = await open_queue(server.url)
    room = uuid4()
    await call(queue.subscribe(room))
    await call(queue.publish(room, b"before"))
    inbox = received(queue)
    assert await receive(inbox) == (room, b"before")
    async with Redis.from_url(server.url) as admin:
        killed = await call(admin.client_kill_filter(_type="normal", skipme=True))
    assert killed >= 1  # the publisher's, and the pool's other idle ones
    await call(queue.publish(room, b"after"))
    assert await receive(inbox) == (room, b"after")


async def test_starts_without_redis_and_connects_once_it_is_up(
    open_queue: OpenQueue, tmp_path: Path
) -> None:
    server = RedisServer(tmp_path, port=free_port())
    queue = await open_queue(server.url)
    assert "connection refused" in await unavailable(queue.ping())
    assert "redis:" in await unavailable(queue.subscribe(uuid4()))
    server.start()
    try:
        await eventually(lambda: answers(queue), wait=SETTLE)
        room = uuid4()
        await call(queue.subscribe(room))
        await call(queue.publish(room, b"hello"))
        assert await receive(received(queue)) == (room, b"hello")
    finally:
        server.kill()


async def test_stalled_subscription_is_detected_and_rebuilt(
    open_queue: OpenQueue, server: RedisServer, redis_logs: pytest.LogCaptureFixture
) -> None:
    proxy = StallingProxy(server.port)
    await call(proxy.start())
    try:
        queue = await open_queue(proxy.url, canary_interval=0.1)
        inbox = received(queue)
        room = uuid4()
        await call(queue.subscribe(room))
        await call(queue.publish(room, b"before"))
        assert await receive(inbox) == (room, b"before")

        # Only the pub/sub connection goes silent: PING and PUBLISH still work, so the
        # canary is the one thing that can tell.
        assert proxy.stall_subscribers() == 1

        async def reports_stall() -> bool:
            return await down_reason(queue) == "redis: subscription stalled"

        await eventually(reports_stall, wait=SETTLE)
        await eventually(lambda: answers(queue), wait=SETTLE)
        await call(queue.publish(room, b"after"))
        assert await receive(inbox) == (room, b"after")
        assert "redis lost: subscription stalled" in redis_logs.text
        assert "redis back: resubscribed 1 rooms" in redis_logs.text
    finally:
        await call(proxy.close())


async def test_the_consumer_is_told_each_time_the_subscription_is_back(
    open_queue: OpenQueue, server: RedisServer
) -> None:
    """What was published while the subscription was gone is never delivered: the
    consumer is told once per recovery (and not at the first subscription), so that
    it can fetch the rest elsewhere."""
    queue = await open_queue(server.url)
    recoveries: list[None] = []
    queue.on_recovered(lambda: recoveries.append(None))
    room = uuid4()
    await call(queue.subscribe(room))
    await call(queue.publish(room, b"before"))
    assert await receive(received(queue)) == (room, b"before")
    assert recoveries == []

    async with Redis.from_url(server.url) as admin:
        assert await call(admin.client_kill_filter(_type="pubsub")) == 1

    async def told(times: int) -> bool:
        return len(recoveries) == times

    await eventually(lambda: told(1), wait=SETTLE)
    server.kill()
    server.start()
    await eventually(lambda: told(2), wait=SETTLE)
