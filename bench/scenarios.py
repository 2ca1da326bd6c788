"""The scenarios, with their full and `--quick` sizes."""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum


class Kind(StrEnum):
    CHAT = "chat"  # members send with a window of messages in flight
    OPEN_LOOP = "open-loop"  # members send on a fixed schedule, whatever comes back
    CONNECTIONS = "connections"  # idle members; one probe message per room
    CHURN = "churn"  # clients join, wait for their own `joined`, leave, again


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: Kind
    rooms: int
    members: int  # per room; for churn, the number of concurrent churning clients
    inflight: int = 0  # per member, for chat
    rate: float = 0.0  # messages a second over all members, for open loop
    duration: float = 10.0  # seconds measured, after the warm-up
    warmup: float = 2.0
    connect_concurrency: int = 100  # connections being opened at once, over all processes
    headline: tuple[str, str] = ("acked_per_s", "acked/s")  # in the plot: Result field, header

    @property
    def seats(self) -> int:
        return self.rooms * self.members


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("latency", Kind.CHAT, rooms=1, members=2, inflight=1),
    Scenario("throughput", Kind.CHAT, rooms=10, members=10, inflight=4),
    Scenario(
        "big-room",
        Kind.CHAT,
        rooms=1,
        members=100,
        inflight=1,
        headline=("deliveries_per_s", "deliveries/s"),
    ),
    Scenario("many-rooms", Kind.CHAT, rooms=100, members=2, inflight=8),
    Scenario("open-loop-2000", Kind.OPEN_LOOP, rooms=100, members=2, rate=2000),
    Scenario("open-loop-5000", Kind.OPEN_LOOP, rooms=100, members=2, rate=5000),
    Scenario(
        "connections",
        Kind.CONNECTIONS,
        rooms=50,
        members=100,
        duration=2.0,
        warmup=0.0,
        headline=("connects_per_s", "connects/s"),
    ),
    Scenario("churn", Kind.CHURN, rooms=1, members=20, headline=("joins_per_s", "joins/s")),
)
NAMES = tuple(s.name for s in SCENARIOS)


def select(
    names: list[str], quick: bool, duration: float | None, warmup: float | None
) -> list[Scenario]:
    """The named scenarios, shrunk for `--quick`, with durations overridden when given."""
    chosen = [s for s in SCENARIOS if s.name in names]
    if quick:
        chosen = [_quick(s) for s in chosen]
    if duration is not None:
        chosen = [replace(s, duration=duration) for s in chosen]
    if warmup is not None:  # connections has none: its probe is sent at once
        chosen = [s if s.kind is Kind.CONNECTIONS else replace(s, warmup=warmup) for s in chosen]
    return chosen


def _quick(s: Scenario) -> Scenario:
    if s.kind is Kind.CONNECTIONS:
        return replace(s, rooms=10, duration=1.0)
    return replace(s, duration=3.0, warmup=1.0)
