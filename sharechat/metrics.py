"""Prometheus metrics: what an operator watches, served at /metrics.

Each app has a registry of its own (not prometheus-client's global one), so that
several apps in one process (the tests) never share or collide. Names follow
Prometheus conventions: the `sharechat_` prefix, `_total` counters, `_seconds`
histograms, and labels with a fixed set of values (an operation, a refusal kind,
a reason): never a room, a member or an address.

`/metrics` is served either on the main port to the addresses of
`--metrics-allow-ips` only (default: this machine), or with `--metrics-port` on a
port of its own to anyone who reaches it, and then not on the main port at all.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
from collections.abc import AsyncIterator, Iterable, Iterator
from ipaddress import ip_address, ip_network

from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# The `reason` label of a `failed`: the start of the text it is sent with, in the order
# tried; anything else is "other", so the label's values stay this fixed set.
FAILURE_REASONS = (
    ("empty message", "empty"),
    ("rate limited: too many messages from your address", "ip-rate"),
    ("rate limited", "member-rate"),
    ("message too long", "too-long"),
    ("message contains a NUL", "nul"),
    ("message contains a lone surrogate", "surrogate"),
    ("binary frames", "binary"),
    ("malformed frame", "malformed"),
    ("not sent", "not-stored"),
)
SLOW_MEMBER = "too-slow"  # the refusal kind of a member dropped for reading too slowly
LAG_INTERVAL = 0.5  # seconds between two measurements of the event loop's lag


class Metrics:
    """Every metric of one app, registered in its own registry."""

    def __init__(self) -> None:
        # No `_created` series: in the text format each would be one more gauge per
        # counter and histogram, which nothing here reads. (A switch of the library's.)
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = registry = CollectorRegistry()
        ProcessCollector(registry=registry)  # CPU, memory, open file descriptors
        self.websockets_open = Gauge(
            "sharechat_websockets_open", "Websockets open on this instance", registry=registry
        )
        self.rooms_live = Gauge(
            "sharechat_rooms_live", "Rooms with members on this instance", registry=registry
        )
        # What every message touches is counted in plain numbers (one event loop, no
        # lock) and read by the registry at scrape time: prometheus-client's own
        # metrics take a lock per update, a tenth of what the server spends on a message.
        hot = _HotMetrics(registry)
        self.members_joined = hot.counter(
            "sharechat_members_joined", "Members who joined a room here"
        )
        self.members_left = hot.counter("sharechat_members_left", "Members who left a room here")
        self.messages_stored = hot.counter(
            "sharechat_messages_stored", "Chat messages of members here stored in the repository"
        )
        self.messages_published = hot.counter(
            "sharechat_messages_published", "Messages (chat, joined, left) published to the queue"
        )
        self.messages_delivered = hot.counter(
            "sharechat_messages_delivered", "Messages handed to members here, one per member"
        )
        self.failed = Counter(
            "sharechat_failed",
            "`failed` answers sent to members, by reason",
            ["reason"],
            registry=registry,
        )
        # Every reason's series exists from the start, at 0, bound once.
        reasons = {reason for _, reason in FAILURE_REASONS} | {"other"}
        self._failed = {reason: self.failed.labels(reason) for reason in reasons}
        self.refusals = Counter(
            "sharechat_refusals",
            "Requests, connections and frames refused by a budget or a bound, by kind",
            ["kind"],
            registry=registry,
        )
        self.slow_members_dropped = Counter(
            "sharechat_slow_members_dropped",
            "Members disconnected for reading slower than their room talks",
            registry=registry,
        )
        self.queue_reconnects = Counter(
            "sharechat_queue_reconnects",
            "Times the queue's subscription was recovered after a loss",
            registry=registry,
        )
        self.queue_canary_misses = Counter(
            "sharechat_queue_canary_misses",
            "Canaries this instance published to itself that did not come back in time",
            registry=registry,
        )
        self.repository_seconds = hot.histogram(
            "sharechat_repository_seconds",
            "Time a repository call takes, by operation",
            LATENCY_BUCKETS,
            label="operation",
        )
        self.queue_publish_seconds = hot.histogram(
            "sharechat_queue_publish_seconds", "Time a publish to the queue takes", LATENCY_BUCKETS
        ).labels()
        self.delivery_seconds = hot.histogram(
            "sharechat_delivery_seconds",
            "From a message stored by this instance to its hand-out to the room's members here",
            LATENCY_BUCKETS,
        ).labels()
        self.commit_batch_size = hot.histogram(
            "sharechat_commit_batch_size",
            "Writes committed together by the repository's group commit",
            BATCH_BUCKETS,
        ).labels()
        self.event_loop_lag_seconds = Histogram(
            "sharechat_event_loop_lag_seconds",
            f"How late a {LAG_INTERVAL:g} s timer fires: time the event loop was busy",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

    def failed_message(self, text: str) -> None:
        """One `failed` sent to a member, with this text."""
        for start, reason in FAILURE_REASONS:
            if text.startswith(start):
                self._failed[reason].inc()
                return
        self._failed["other"].inc()

    def refused(self, kind: str) -> None:
        """One refusal of `kind` (a fixed word of the code: "ip-rate", "too-slow", ...)."""
        self.refusals.labels(kind).inc()
        if kind == SLOW_MEMBER:
            self.slow_members_dropped.inc()

    def exposition(self, accept: str) -> tuple[bytes, str]:
        """The registry in the format the scraper asked for, and its content type."""
        encode, content_type = choose_encoder(accept)
        return encode(self.registry), content_type

    @contextlib.asynccontextmanager
    async def watching_event_loop(self) -> AsyncIterator[None]:
        """Measure the event loop's lag in the background while inside."""
        task = asyncio.create_task(self._watch_event_loop(), name="event-loop-lag")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _watch_event_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await asyncio.sleep(LAG_INTERVAL)
            self.event_loop_lag_seconds.observe(max(0.0, loop.time() - started - LAG_INTERVAL))


METRICS = web.AppKey("metrics", Metrics)


class AllowList:
    """Addresses and networks (`("*",)`: any) that may read /metrics on the main port."""

    def __init__(self, allow: Iterable[str]) -> None:
        allow = tuple(allow)
        self._anyone = "*" in allow
        self._networks = tuple(ip_network(item, strict=False) for item in allow if item != "*")

    def __contains__(self, peer: str | None) -> bool:
        if self._anyone:
            return True
        try:
            address = ip_address(peer or "")
        except ValueError:
            return False
        return any(address in network for network in self._networks)


def add_route(app: web.Application, metrics_port: int, allow: Iterable[str]) -> None:
    """/metrics on the main port, for the allow-list; with a port of its own, not here."""
    allowed = AllowList(allow)

    async def scrape(request: web.Request) -> web.Response:
        # request.remote: behind a trusted proxy, the client's address, not the proxy's.
        if metrics_port or request.remote not in allowed:
            raise web.HTTPNotFound()
        return _scrape_response(request.app[METRICS], request)

    app.router.add_get("/metrics", scrape)


def metrics_app(metrics: Metrics) -> web.Application:
    """The app of --metrics-port: /metrics and nothing else."""

    async def scrape(request: web.Request) -> web.Response:
        return _scrape_response(metrics, request)

    app = web.Application()
    app.router.add_get("/metrics", scrape)
    return app


def _scrape_response(metrics: Metrics, request: web.Request) -> web.Response:
    body, content_type = metrics.exposition(request.headers.get("Accept", ""))
    response = web.Response(body=body)
    response.headers["Content-Type"] = content_type
    return response


class Tally:
    """A counter as a plain number."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        self.value += amount


class Buckets:
    """One histogram series as plain numbers: the count of each bucket, and the sum."""

    __slots__ = ("_bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self._bounds, value)] += 1  # le: value <= bound
        self.sum += value


class _Histogram:
    """A histogram family: one Buckets a label value (or one, without a label)."""

    def __init__(self, name: str, documentation: str, bounds: tuple[float, ...], label: str):
        self.name, self.documentation, self.bounds, self.label = name, documentation, bounds, label
        self.series: dict[str, Buckets] = {}

    def labels(self, value: str = "") -> Buckets:
        series = self.series.get(value)
        if series is None:
            series = self.series[value] = Buckets(self.bounds)
        return series


class _HotMetrics(Collector):
    """The counters and histograms of the hot path, exposed from plain numbers."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._counters: list[tuple[str, str, Tally]] = []
        self._histograms: list[_Histogram] = []
        registry.register(self)

    def counter(self, name: str, documentation: str) -> Tally:
        tally = Tally()
        self._counters.append((name, documentation, tally))
        return tally

    def histogram(
        self, name: str, documentation: str, bounds: tuple[float, ...], label: str = ""
    ) -> _Histogram:
        histogram = _Histogram(name, documentation, bounds, label)
        self._histograms.append(histogram)
        return histogram

    def collect(self) -> Iterator[Metric]:
        for name, documentation, tally in self._counters:
            yield CounterMetricFamily(name, documentation, value=tally.value)
        for histogram in self._histograms:
            labels = [histogram.label] if histogram.label else []
            family = HistogramMetricFamily(histogram.name, histogram.documentation, labels=labels)
            bounds = (*histogram.bounds, float("inf"))
            for value, series in histogram.series.items():
                cumulative, buckets = 0, []
                for bound, count in zip(bounds, series.counts, strict=True):
                    cumulative += count
                    buckets.append((_bound(bound), cumulative))
                family.add_metric([value] if labels else [], buckets, sum_value=series.sum)
            yield family


def _bound(bound: float) -> str:
    """An `le` as prometheus-client writes its own: 0.0005, 1.0, +Inf."""
    return "+Inf" if bound == float("inf") else repr(float(bound))
