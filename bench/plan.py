"""What the coordinator tells a load-generating process, and what it answers."""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field

# (receiver index, sender index) -> (distinct messages received, duplicated, reordered)
PairCounts = dict[tuple[int, int], tuple[int, int, int]]


@dataclass(frozen=True)
class Seat:
    """One member to connect: `idx` is global over all processes, `room` an index."""

    idx: int
    room: int
    inflight: int
    limit: int | None = None  # messages to send at most; None = until the window ends
    observer: bool = False  # checks that every `joined` is followed by its `left`


@dataclass(frozen=True)
class Plan:
    base_url: str
    room_ids: tuple[str, ...]
    room_of: tuple[int, ...]  # global member index -> room index
    seats: tuple[Seat, ...]
    churners: int
    concurrency: int
    warmup_ns: int
    duration_ns: int

    def serve_url(self, room: int) -> str:
        return f"{self.base_url.replace('http', 'ws', 1)}/api/serve/{self.room_ids[room]}"


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
    sent: dict[int, tuple[int, int]] = field(default_factory=dict)  # idx -> (sent, failed)
    pairs: PairCounts = field(default_factory=dict)
