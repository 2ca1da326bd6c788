"""The repository and the queue, measured: what the metrics learn at the ports.

The composition root wraps whichever adapters it picked, so no adapter and not
the controller knows about metrics: every repository call is timed by operation
(the method's name, a fixed set), stores and joins and leaves are counted as
they succeed, publishes are timed and counted, and a message this instance
stored is timed again when the queue hands it back for the room's members here
(sharechat_delivery_seconds).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, cast
from uuid import UUID

from sharechat.delivery import framed_number
from sharechat.domain import Message
from sharechat.metrics import Metrics
from sharechat.ports import Deliver, Queue, Repository

# Messages stored here and not handed back by the queue yet (a publish that failed
# is handed out directly, never by the queue): past this many the oldest are forgotten.
MAX_UNDELIVERED = 10_000


class DeliveryClock:
    """When each message stored here was stored, until the queue hands it back."""

    def __init__(self, metrics: Metrics) -> None:
        self._stored: dict[tuple[UUID, int], float] = {}
        self._observe = metrics.delivery_seconds.observe

    def stored(self, message: Message) -> None:
        stored = self._stored
        if len(stored) >= MAX_UNDELIVERED:
            del stored[next(iter(stored))]
        stored[message.room_id, message.number] = time.perf_counter()

    def handed_out(self, room_id: UUID, number: int) -> None:
        started = self._stored.pop((room_id, number), None)
        if started is not None:
            self._observe(time.perf_counter() - started)


class _MeasuredRepository:
    """Delegates every call to the repository, timing each by its method's name."""

    def __init__(self, inner: Repository, metrics: Metrics, clock: DeliveryClock) -> None:
        self._inner = inner
        self._metrics = metrics
        self._clock = clock

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._inner, name)
        if not callable(method):
            return method
        measured = self._measure(name, method)
        setattr(self, name, measured)  # made once per method: later calls skip __getattr__
        return measured

    def _measure(self, name: str, method: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
        observe = self._metrics.repository_seconds.labels(name).observe
        counted = self._counter(name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                result = await method(*args, **kwargs)
            finally:
                observe(time.perf_counter() - started)
            if counted is not None and result is not None:
                counted(result)
            return result

        return call

    def _counter(self, name: str) -> Callable[[Message], None] | None:
        """What a successful call of `name` counts, given the message it stored."""
        metrics, clock = self._metrics, self._clock

        def stored(counter: Any) -> Callable[[Message], None]:
            def count(message: Message) -> None:
                counter.inc()
                clock.stored(message)

            return count

        if name == "add_message":
            return stored(metrics.messages_stored)
        if name == "add_member":
            return stored(metrics.members_joined)
        if name == "remove_member":  # None (nothing stored) when it was reaped already
            return stored(metrics.members_left)
        return None


class _MeasuredQueue:
    """Delegates to the queue; times and counts publishes, counts recoveries, and stops
    the delivery clock of what comes back."""

    def __init__(self, inner: Queue, metrics: Metrics, clock: DeliveryClock) -> None:
        self._inner = inner
        self._metrics = metrics
        self._clock = clock
        self._observe_publish = metrics.queue_publish_seconds.observe
        self._published = metrics.messages_published.inc

    async def ping(self) -> None:
        await self._inner.ping()

    async def publish(self, room_id: UUID, payload: bytes) -> None:
        started = time.perf_counter()
        try:
            await self._inner.publish(room_id, payload)
        finally:
            self._observe_publish(time.perf_counter() - started)
        self._published()

    async def subscribe(self, room_id: UUID) -> None:
        await self._inner.subscribe(room_id)

    async def unsubscribe(self, room_id: UUID) -> None:
        await self._inner.unsubscribe(room_id)

    def on_recovered(self, recovered: Callable[[], None], /) -> None:
        reconnected = self._metrics.queue_reconnects.inc

        def counted() -> None:
            reconnected()
            recovered()

        self._inner.on_recovered(counted)

    def on_message(self, deliver: Deliver, /) -> None:
        handed_out = self._clock.handed_out

        def timed(room_id: UUID, payload: bytes) -> None:
            deliver(room_id, payload)
            handed_out(room_id, framed_number(payload))

        self._inner.on_message(timed)


def measured_repository(inner: Repository, metrics: Metrics, clock: DeliveryClock) -> Repository:
    return cast(Repository, _MeasuredRepository(inner, metrics, clock))


def measured_queue(inner: Queue, metrics: Metrics, clock: DeliveryClock) -> Queue:
    return _MeasuredQueue(inner, metrics, clock)
