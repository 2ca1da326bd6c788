"""The Queue port's contract (sharechat/ports.py), run against every adapter.

An adapter joins by adding one entry to ADAPTERS: an async context manager that
yields an Adapter, which opens instances of the queue (each queue object is one
sharechat instance) and, when asked for a breakable one, takes its backend away and
brings it back. Two queue objects of an adapter that spans instances see each
other's publishes; those of one that does not (the in-process queue) never do.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pytest

from sharechat.domain import BackendUnavailable
from sharechat.memory import MemoryQueue
from sharechat.ports import Queue
from sharechat.redis_cluster_queue import open_redis_cluster_queue
from sharechat.redis_queue import open_redis_queue
from tests.cluster_support import running_cluster
from tests.helpers import WAIT, eventually
from tests.redis_support import REDIS_URL, RedisServer, unique_prefix

SETTLE = 15.0  # seconds for an adapter to notice an outage, or to come back from one

Outage = Callable[[], AbstractAsyncContextManager[None]]


@dataclass
class Adapter:
    open: Callable[[], Awaitable[Queue]]  # one more instance, closed with the adapter
    spans_instances: bool  # a publish reaches the other instances' subscriptions
    # The backend gone inside, back on exit; None: nothing to lose, it is this process.
    outage: Outage | None = None


OpenAdapter = Callable[[Path, bool], AbstractAsyncContextManager[Adapter]]


@contextlib.asynccontextmanager
async def memory_adapter(directory: Path, breakable: bool) -> AsyncIterator[Adapter]:
    async def open_() -> Queue:
        return MemoryQueue()

    yield Adapter(open_, spans_instances=False)


@contextlib.asynccontextmanager
async def redis_adapter(directory: Path, breakable: bool) -> AsyncIterator[Adapter]:
    """The shared Redis under a prefix of the test's own; a throwaway one to break."""
    prefix = unique_prefix("contract")
    async with contextlib.AsyncExitStack() as stack:
        server = RedisServer(directory) if breakable else None
        if server is not None:
            server.start()
            stack.callback(server.kill)  # last: after every queue is closed
        url = server.url if server is not None else REDIS_URL

        async def open_() -> Queue:
            queue = open_redis_queue(url, prefix=prefix, instance_id=uuid4())
            async with asyncio.timeout(WAIT):
                return await stack.enter_async_context(queue)

        @contextlib.asynccontextmanager
        async def outage() -> AsyncIterator[None]:
            assert server is not None
            server.kill()
            try:
                yield
            finally:
                server.start()

        yield Adapter(open_, spans_instances=True, outage=outage if server else None)


@contextlib.asynccontextmanager
async def redis_cluster_adapter(directory: Path, breakable: bool) -> AsyncIterator[Adapter]:
    """A Redis Cluster of the test's own (three masters, three replicas); every node
    killed for an outage."""
    prefix = unique_prefix("contract-cluster")
    async with contextlib.AsyncExitStack() as stack:
        cluster = stack.enter_context(running_cluster(directory))

        async def open_() -> Queue:
            queue = open_redis_cluster_queue(cluster.url, prefix=prefix, instance_id=uuid4())
            async with asyncio.timeout(WAIT):
                return await stack.enter_async_context(queue)

        @contextlib.asynccontextmanager
        async def outage() -> AsyncIterator[None]:
            cluster.stop()
            try:
                yield
            finally:
                await asyncio.to_thread(cluster.restart)

        yield Adapter(open_, spans_instances=True, outage=outage if breakable else None)


ADAPTERS: dict[str, OpenAdapter] = {
    "memory": memory_adapter,
    "redis": redis_adapter,
    "redis-cluster": redis_cluster_adapter,
}
IN_PROCESS = {"memory"}  # the others need services (see conftest --backends)
PARAMS = [
    pytest.param(name, marks=() if name in IN_PROCESS else pytest.mark.services)
    for name in ADAPTERS
]


@pytest.fixture(params=PARAMS)
async def adapter(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Adapter]:
    async with ADAPTERS[request.param](tmp_path, False) as opened:
        yield opened


@pytest.fixture(params=PARAMS)
async def breakable(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Adapter]:
    async with ADAPTERS[request.param](tmp_path, True) as opened:
        yield opened


@dataclass(eq=False)
class Instance:
    """One queue object and what it handed to its consumer."""

    queue: Queue
    inbox: asyncio.Queue[tuple[UUID, bytes]] = field(default_factory=asyncio.Queue)
    recoveries: int = 0

    async def next(self) -> tuple[UUID, bytes]:
        async with asyncio.timeout(WAIT):
            return await self.inbox.get()

    async def still_receives_only(self, room: UUID) -> None:
        """A publish to `room` arrives, and nothing else: what the test stopped stays stopped."""
        await call(self.queue.publish(room, b"kept"))
        assert await self.next() == (room, b"kept")
        await self.received_nothing_more()

    async def received_nothing_more(self) -> None:
        """Nothing is delivered beyond what was taken: a marker published now arrives first.

        The marker is published by this instance after every publish of the test returned,
        so on one pub/sub connection anything else would arrive before it.
        """
        marker = uuid4()
        await call(self.queue.subscribe(marker))
        await call(self.queue.publish(marker, b"marker"))
        assert await self.next() == (marker, b"marker")
        await call(self.queue.unsubscribe(marker))


async def instance(adapter: Adapter) -> Instance:
    opened = Instance(await adapter.open())
    opened.queue.on_message(lambda room_id, payload: opened.inbox.put_nowait((room_id, payload)))

    def recovered() -> None:
        opened.recoveries += 1

    opened.queue.on_recovered(recovered)
    return opened


async def instances(adapter: Adapter, count: int) -> list[Instance]:
    return [await instance(adapter) for _ in range(count)]


def senders_to(adapter: Adapter, receiver: Instance, others: list[Instance]) -> list[Instance]:
    """The instances whose publishes reach `receiver`'s subscriptions."""
    return [receiver, *others] if adapter.spans_instances else [receiver]


async def call(awaitable: Awaitable[Any]) -> Any:
    async with asyncio.timeout(WAIT):
        return await awaitable


async def test_what_is_published_once_subscribe_returned_is_delivered(adapter: Adapter) -> None:
    own, other = await instances(adapter, 2)
    senders = senders_to(adapter, own, [other])
    for n in range(20):
        room, payload = uuid4(), f'{{"n":{n},"text":"héllo ✓ \\"quoted\\""}}'.encode()
        await call(own.queue.subscribe(room))
        await call(senders[n % len(senders)].queue.publish(room, payload))
        assert await own.next() == (room, payload)


async def test_every_receiver_gets_a_room_in_one_order_and_each_senders_in_its_own(
    adapter: Adapter,
) -> None:
    first, second = await instances(adapter, 2)
    receivers = [first, second] if adapter.spans_instances else [first]
    senders = senders_to(adapter, first, [second])
    room = uuid4()
    await call(asyncio.gather(*(receiver.queue.subscribe(room) for receiver in receivers)))
    # Published concurrently: each sender's call order is its publish order.
    sent = [(senders[n % len(senders)], b"%d" % n) for n in range(300)]
    await call(asyncio.gather(*(sender.queue.publish(room, text) for sender, text in sent)))

    orders = [[(await receiver.next())[1] for _ in sent] for receiver in receivers]
    assert all(order == orders[0] for order in orders)
    assert sorted(orders[0], key=int) == [text for _, text in sent]
    for sender in senders:
        own = [text for text in orders[0] if senders[int(text) % len(senders)] is sender]
        assert own == sorted(own, key=int)
    for receiver in receivers:
        await receiver.received_nothing_more()


async def test_exactly_the_subscribed_instances_receive(adapter: Adapter) -> None:
    sender, subscriber, bystander = await instances(adapter, 3)
    room = uuid4()
    await call(asyncio.gather(sender.queue.subscribe(room), subscriber.queue.subscribe(room)))
    await call(sender.queue.publish(room, b"to the subscribers"))

    assert await sender.next() == (room, b"to the subscribers")
    if adapter.spans_instances:
        assert await subscriber.next() == (room, b"to the subscribers")
    for instance_ in (sender, subscriber, bystander):
        await instance_.received_nothing_more()


async def test_a_room_nobody_subscribes_takes_publishes_and_delivers_nothing(
    adapter: Adapter,
) -> None:
    own, other = await instances(adapter, 2)
    await call(own.queue.publish(uuid4(), b"into the void"))
    await call(other.queue.publish(uuid4(), b"into the void"))
    await own.received_nothing_more()
    await other.received_nothing_more()


async def test_unsubscribe_stops_delivery(adapter: Adapter) -> None:
    own, other = await instances(adapter, 2)
    left, kept = uuid4(), uuid4()
    await call(asyncio.gather(own.queue.subscribe(left), own.queue.subscribe(kept)))
    await call(own.queue.unsubscribe(left))
    for sender in senders_to(adapter, own, [other]):
        await call(sender.queue.publish(left, b"after unsubscribe"))
    await own.still_receives_only(kept)


async def test_subscribe_then_unsubscribe_at_once_ends_unsubscribed(adapter: Adapter) -> None:
    (own,) = await instances(adapter, 1)
    at_once, overlapping, after_return = uuid4(), uuid4(), uuid4()
    queue = own.queue
    await call(asyncio.gather(queue.subscribe(at_once), queue.unsubscribe(at_once)))
    await call(
        asyncio.gather(
            queue.subscribe(overlapping),
            queue.unsubscribe(overlapping),
            queue.subscribe(overlapping),
            queue.unsubscribe(overlapping),
        )
    )
    await call(queue.subscribe(after_return))
    await call(queue.unsubscribe(after_return))
    for room in (at_once, overlapping, after_return):
        await call(queue.publish(room, b"nobody listens"))
    await own.received_nothing_more()


async def test_subscribing_again_ends_subscribed_once(adapter: Adapter) -> None:
    (own,) = await instances(adapter, 1)
    sequential, concurrent, twice = uuid4(), uuid4(), uuid4()
    queue = own.queue
    await call(queue.subscribe(sequential))
    await call(queue.unsubscribe(sequential))
    await call(queue.subscribe(sequential))
    await call(
        asyncio.gather(
            queue.subscribe(concurrent), queue.unsubscribe(concurrent), queue.subscribe(concurrent)
        )
    )
    await call(asyncio.gather(queue.subscribe(twice), queue.subscribe(twice)))
    for room in (sequential, concurrent, twice):
        await call(queue.publish(room, b"still here"))
        assert await own.next() == (room, b"still here")
    await own.received_nothing_more()  # delivered once, however often subscribed


async def test_a_cancelled_subscribe_leaves_the_room_unsubscribed(adapter: Adapter) -> None:
    (own,) = await instances(adapter, 1)
    kept, cancelled = uuid4(), uuid4()
    await call(own.queue.subscribe(kept))
    for turns in range(8):  # cancelled at various points of its way
        subscribing = asyncio.create_task(own.queue.subscribe(cancelled))
        for _ in range(turns):
            await asyncio.sleep(0)
        subscribing.cancel()
        try:
            await call(subscribing)
        except asyncio.CancelledError:
            continue
        await call(own.queue.unsubscribe(cancelled))  # it was done before the cancel came
    await call(own.queue.publish(cancelled, b"nobody listens"))
    await own.still_receives_only(kept)


async def test_ping_answers_while_the_backend_is_up(adapter: Adapter) -> None:
    (own,) = await instances(adapter, 1)
    await call(own.queue.ping())


async def test_an_outage_fails_publishes_and_is_recovered_from(breakable: Adapter) -> None:
    """Publishes fail with BackendUnavailable while the backend is away; once it is back,
    on_recovered() is called with every room subscribed again, and only those. An adapter
    with nothing to lose delivers throughout and is never "recovered"."""
    own, other = await instances(breakable, 2)
    senders = senders_to(breakable, own, [other])
    room, left = uuid4(), uuid4()
    await call(own.queue.subscribe(room))
    await call(own.queue.subscribe(left))
    await call(own.queue.unsubscribe(left))
    await call(senders[-1].queue.publish(room, b"before"))
    assert await own.next() == (room, b"before")

    if breakable.outage is None:
        await call(own.queue.ping())
        await call(own.queue.publish(room, b"during"))
        assert await own.next() == (room, b"during")
        assert own.recoveries == 0
        return

    async with breakable.outage():
        await eventually(lambda: is_unavailable(own.queue.ping()), wait=SETTLE)
        for sender in senders:
            with pytest.raises(BackendUnavailable):
                await call(sender.queue.publish(room, b"during"))
        with pytest.raises(BackendUnavailable):
            await call(own.queue.subscribe(uuid4()))

    async def recovered() -> bool:
        return own.recoveries > 0

    await eventually(recovered, wait=SETTLE)
    # Told once the subscriptions are back: what is published from now on arrives.
    await call(senders[-1].queue.publish(left, b"left before the outage"))
    await call(senders[-1].queue.publish(room, b"after"))
    assert await own.next() == (room, b"after")
    assert own.recoveries == 1
    await own.received_nothing_more()
    await eventually(lambda: is_answering(own.queue.ping()), wait=SETTLE)


async def is_unavailable(probe: Awaitable[None]) -> bool:
    try:
        await call(probe)
    except BackendUnavailable:
        return True
    return False


async def is_answering(probe: Awaitable[None]) -> bool:
    return not await is_unavailable(probe)
