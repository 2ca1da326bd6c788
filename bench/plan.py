"""What the coordinator tells a load-generating process, and what it answers."""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field

# (receiver index, sender index) -> (distinct messages received, duplicated, reordered)
PairCounts = dict[tuple[int, int], tuple[int, int, int]]


@dataclass(frozen=True)
class Seat:
    """One member to connect: `idx` is global over all processes, `room` and `instance`
    indexes (the instance is the server it connects to)."""

    idx: int
    room: int
    inflight: int = 0  # closed loop: messages in flight, the next sent on an ack
    limit: int | None = None  # messages to send at most; None = until the window ends
    observer: bool = False  # checks that every `joined` is followed by its `left`
    instance: int = 0
    # Open loop: one message every `period_ns`, the first `phase_ns` after t0, whatever
    # comes back; 0 = closed loop.
    period_ns: int = 0
    phase_ns: int = 0


@dataclass(frozen=True)
class Plan:
    base_urls: tuple[str, ...]  # one per server instance
    room_ids: tuple[str, ...]
    room_of: tuple[int, ...]  # global member index -> room index
    seats: tuple[Seat, ...]
    churners: tuple[int, ...]  # the instance of each churning client of this process
    concurrency: int
    warmup_ns: int
    duration_ns: int

    def serve_url(self, room: int, instance: int) -> str:
        base = self.base_urls[instance].replace("http", "ws", 1)
        return f"{base}/api/serve/{self.room_ids[room]}"


@dataclass(frozen=True)
class Window:
    """Messages sent in [start, end) are measured; sending stops at `end`."""

    start: int
    end: int

    def __contains__(self, t_ns: int) -> bool:
        return self.start <= t_ns < self.end


@dataclass
class Tally:
    """What one process measured; the coordinator merges these."""

    connected: int = 0
    errors: int = 0
    cross_room: int = 0
    joins: int = 0
    unmatched_presence: int = 0
    connect_span: tuple[int, int] = (0, 0)
    connect_cpu_seconds: float = 0.0  # this process's CPU while connecting its seats
    cpu_seconds: float = 0.0  # this process's CPU from t0 until the window ends
    delivery_us: array[int] = field(default_factory=lambda: array("q"))
    ack_us: array[int] = field(default_factory=lambda: array("q"))
    join_us: array[int] = field(default_factory=lambda: array("q"))
    lag_us: array[int] = field(default_factory=lambda: array("q"))  # open loop: sent - due
    sent: dict[int, tuple[int, int]] = field(default_factory=dict)  # idx -> (sent, failed)
    pairs: PairCounts = field(default_factory=dict)
