"""Turns what the processes measured into the figures of one table row."""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain

from bench.costs import Spent
from bench.driver import Raw
from bench.plan import Tally
from bench.procfs import Usage
from bench.scenarios import Kind


@dataclass
class Result:
    scenario: str
    backend: str
    acked_per_s: float = 0.0
    deliveries_per_s: float = 0.0
    instances: int = 1  # servers on one database and one Redis
    cluster: bool = False  # sharechat's Redis was a Redis Cluster
    offered_per_s: float | None = None  # open loop: messages a second sent on schedule
    p50_ms: float | None = None  # send -> receipt by the other members (churn: join time)
    p90_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None
    ack_p50_ms: float | None = None  # send -> own echo
    ack_p90_ms: float | None = None
    ack_p99_ms: float | None = None
    ack_max_ms: float | None = None
    lag_p99_ms: float | None = None  # open loop: how late the generator sent (due -> sent)
    failed: int = 0
    lost: int = 0
    duplicated: int = 0
    reordered: int = 0
    cross_room: int = 0
    errors: int = 0
    stale: int = 0  # members still listed 10 s after every connection closed
    connected: int = 0
    connects_per_s: float | None = None
    kib_per_conn: float | None = None
    joins_per_s: float | None = None
    # Cores busy while sending (while connecting, for the connections scenario):
    client_cpu: float = 0.0  # the load generator's processes
    client_cpu_max: float = 0.0  # its busiest process: near 1.0, the generator is the bottleneck
    server_cpu: float = 0.0  # the server process
    machine_cpu: float = 0.0  # the whole machine (server, databases, generator, others)
    background_cpu: float = 0.0  # cores busy on the machine just before the server started
    # What the stores spent on the messages acked in the measured window (sharechat with
    # PostgreSQL and/or Redis). Redis made one delivery per publish per instance with a
    # member in the room: messages x the instances a room spans.
    redis_deliveries: int = 0
    redis_cpu_ms: dict[str, float] = field(default_factory=dict)  # per Redis (master)
    redis_ms_per_1k_deliveries: float | None = None  # all of them together
    pg_commits_per_message: float | None = None  # of the cell's database
    wal_bytes_per_message: float | None = None  # of the whole PostgreSQL server
    processes: int = 0
    crashed: bool = False
    commit: str = ""  # of the server code, when it was started
    error: str = ""

    @property
    def label(self) -> str:
        """The row's name in the tables: the backend, on a Redis Cluster or not, and its
        instance count when several."""
        name = self.backend + (" cluster" if self.cluster else "")
        return name if self.instances == 1 else f"{name} x{self.instances}"

    @property
    def worst_p99_ms(self) -> float | None:
        """The later of the sender's (ack) and the other members' (delivery) p99."""
        known = [v for v in (self.ack_p99_ms, self.p99_ms) if v is not None]
        return max(known) if known else None

    @property
    def clean(self) -> bool:
        """Nothing lost, duplicated, reordered, cross-room or stale; no crash, no error."""
        counts = (self.lost, self.duplicated, self.reordered, self.cross_room, self.stale)
        return not any(counts) and not self.crashed and not self.error


def summarize(raw: Raw, backend: str, instances: int = 1) -> Result:
    sc, tallies = raw.scenario, raw.tallies
    result = Result(
        sc.name,
        backend,
        instances=instances,
        processes=raw.processes,
        connected=sum(t.connected for t in tallies),
        errors=sum(t.errors for t in tallies),
        cross_room=sum(t.cross_room for t in tallies),
        stale=raw.stale,
    )
    add_delivery(result, tallies)
    add_latency(result, raw)
    messages = sum(len(t.ack_us) for t in tallies)
    add_costs(result, raw.sample.spent, messages, round(messages * raw.instances_per_room))
    if sc.kind is Kind.CONNECTIONS:
        add_connections(result, raw)
    else:
        add_cpu(
            result, raw.sample.sending, [t.cpu_seconds for t in tallies], raw.sample.sending_seconds
        )
    if sc.kind is Kind.CHURN:
        result.joins_per_s = sum(t.joins for t in tallies) / sc.duration
    if sc.kind is Kind.OPEN_LOOP:
        result.offered_per_s = sc.rate
        result.lag_p99_ms = percentile(sorted(chain.from_iterable(t.lag_us for t in tallies)), 99)
    return result


def add_latency(result: Result, raw: Raw) -> None:
    sc, tallies = raw.scenario, raw.tallies
    acks = sum(len(t.ack_us) for t in tallies)
    deliveries = sum(len(t.delivery_us) for t in tallies)
    result.acked_per_s = acks / sc.duration
    result.deliveries_per_s = (acks + deliveries) / sc.duration
    latencies = sorted(
        chain.from_iterable(t.join_us if sc.kind is Kind.CHURN else t.delivery_us for t in tallies)
    )
    result.p50_ms, result.p90_ms, result.p95_ms, result.p99_ms, result.max_ms = (
        percentile(latencies, q) for q in (50, 90, 95, 99, 100)
    )
    acked = sorted(chain.from_iterable(t.ack_us for t in tallies))
    result.ack_p50_ms, result.ack_p90_ms, result.ack_p99_ms, result.ack_max_ms = (
        percentile(acked, q) for q in (50, 90, 99, 100)
    )


def add_cpu(result: Result, usage: Usage, client_seconds: list[float], wall: float) -> None:
    if wall > 0:
        result.client_cpu = sum(client_seconds) / wall
        result.client_cpu_max = max(client_seconds, default=0.0) / wall
        result.server_cpu = usage.server / wall
        result.machine_cpu = usage.machine / wall


def add_costs(result: Result, spent: Spent, messages: int, redis_deliveries: int) -> None:
    """The stores' spending per message (PostgreSQL) and per 1,000 deliveries (Redis)."""
    result.redis_cpu_ms = spent.redis_cpu_ms
    if spent.redis_cpu_ms:
        result.redis_deliveries = redis_deliveries
        if redis_deliveries:
            total = sum(spent.redis_cpu_ms.values())
            result.redis_ms_per_1k_deliveries = total * 1000 / redis_deliveries
    if messages and spent.commits is not None:
        result.pg_commits_per_message = spent.commits / messages
    if messages and spent.wal_bytes is not None:
        result.wal_bytes_per_message = spent.wal_bytes / messages


def add_delivery(result: Result, tallies: list[Tally]) -> None:
    """Loss counts every (receiver, sender) pair of a room, the sender's own echo included."""
    sent = {idx: pair for t in tallies for idx, pair in t.sent.items()}
    expected = {idx: n - failed for idx, (n, failed) in sent.items()}
    result.failed = sum(failed for _, failed in sent.values())
    for tally in tallies:
        for (_, sender), (distinct, duplicated, reordered) in tally.pairs.items():
            result.lost += max(0, expected.get(sender, 0) - distinct)
            result.duplicated += duplicated
            result.reordered += reordered
        result.lost += tally.unmatched_presence


def add_connections(result: Result, raw: Raw) -> None:
    spans = [t.connect_span for t in raw.tallies]
    seconds = (max(end for _, end in spans) - min(start for start, _ in spans)) / 1e9
    result.connects_per_s = result.connected / seconds if seconds else None
    client_seconds = [t.connect_cpu_seconds for t in raw.tallies]
    add_cpu(result, raw.sample.connecting, client_seconds, raw.sample.connecting_seconds)
    grown = raw.sample.rss_connected_kib - raw.sample.rss_before_kib
    result.kib_per_conn = grown / result.connected if result.connected else None


def percentile(sorted_us: list[int], q: float) -> float | None:
    if not sorted_us:
        return None
    rank = min(len(sorted_us) - 1, int(len(sorted_us) * q / 100))
    return sorted_us[rank] / 1000
