"""The targets a run is judged against (issue 12), met or missed from the rows of that run.

A ratio is taken against another row of the same run, same scenario and same instance
count (the original, or the bare aiohttp server); an absolute bound against the figure
itself. Every sharechat row, in every scenario, must lose, duplicate, reorder, cross or
leave stale nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from bench.backends import BACKENDS
from bench.results import Result


class Status(StrEnum):
    MET = "met"
    MISSED = "missed"
    UNJUDGED = "not judged"  # a figure or the row to compare with is missing


@dataclass(frozen=True)
class Verdict:
    scenario: str
    row: str  # the row judged (its label), or the rows, for the delivery checks
    target: str
    status: Status
    detail: str


@dataclass(frozen=True)
class Target:
    scenario: str
    backend: str  # the row judged
    field: str  # a Result attribute
    header: str  # as the table calls it
    at_least: float | None = None
    at_most: float | None = None
    against: str | None = None  # a bound relative to this backend's figure, in the same run

    @property
    def text(self) -> str:
        sign, bound = ("≥", self.at_least) if self.at_least is not None else ("≤", self.at_most)
        if self.against and bound == 1:
            return f"{self.header} {sign} {self.against}'s"
        if self.against:
            return f"{self.header} {sign} {bound:g}x {self.against}"
        return f"{self.header} {sign} {bound:,g}"

    def judge(self, row: Result, rows: list[Result]) -> Verdict:
        def verdict(status: Status, detail: str) -> Verdict:
            return Verdict(self.scenario, row.label, self.text, status, detail)

        if row.crashed or row.error:
            return verdict(Status.MISSED, "crashed" if row.crashed else row.error)
        value = figure(row, self.field)
        if value is None:
            return verdict(Status.UNJUDGED, f"no {self.header}")
        if not self.against:
            return verdict(self.status(value), fmt(value))
        other = find(rows, self.scenario, self.against, row.instances)
        if other is None:
            return verdict(Status.UNJUDGED, f"no {self.against} row in this run")
        if other.crashed or other.error:
            return verdict(Status.UNJUDGED, f"{self.against} crashed or failed")
        base = figure(other, self.field)
        if not base:
            return verdict(Status.UNJUDGED, f"no {self.header} for {self.against}")
        ratio = value / base
        return verdict(self.status(ratio), f"{fmt(value)} vs {fmt(base)}: {ratio:.2f}x")

    def status(self, value: float) -> Status:
        low_ok = self.at_least is None or value >= self.at_least
        high_ok = self.at_most is None or value <= self.at_most
        return Status.MET if low_ok and high_ok else Status.MISSED


PG = "postgres+redis"
P99 = "p99 ms (ack and delivery)"
TARGETS: tuple[Target, ...] = (
    Target("latency", PG, "acked_per_s", "acked/s", at_least=1.5, against="original"),
    Target("latency", PG, "p99_ms", "p99 ms", at_most=1.0, against="original"),
    Target("latency", "memory", "acked_per_s", "acked/s", at_least=0.8, against="bare"),
    Target("throughput", PG, "acked_per_s", "acked/s", at_least=20, against="original"),
    Target("big-room", PG, "deliveries_per_s", "deliveries/s", at_least=10, against="original"),
    Target("many-rooms", PG, "acked_per_s", "acked/s", at_least=20, against="original"),
    Target("open-loop-2000", PG, "worst_p99_ms", P99, at_most=5),
    Target("open-loop-5000", PG, "worst_p99_ms", P99, at_most=20),
    Target("open-loop-5000", "memory", "worst_p99_ms", P99, at_most=2),
    Target("connections", PG, "connects_per_s", "connects/s", at_least=1000),
    Target("connections", PG, "kib_per_conn", "KiB/conn", at_most=16),
    Target("churn", PG, "joins_per_s", "joins/s", at_least=1000),
    Target("churn", PG, "errors", "errors", at_most=0),
    Target("churn", "memory", "joins_per_s", "joins/s", at_least=0.8, against="bare"),
)
DELIVERY = "0 lost, duplicated, reordered, cross-room, stale"


def judge(rows: list[Result]) -> list[Verdict]:
    """Every target whose row ran, then the delivery checks of each scenario that ran."""
    verdicts = [
        target.judge(row, rows)
        for target in TARGETS
        for row in rows
        if row.scenario == target.scenario and row.backend == target.backend
    ]
    for scenario in dict.fromkeys(r.scenario for r in rows):
        own = [r for r in rows if r.scenario == scenario and not BACKENDS[r.backend].reference]
        if own:
            verdicts.append(delivery(scenario, own))
    return verdicts


def delivery(scenario: str, rows: list[Result]) -> Verdict:
    bad = [r for r in rows if not r.clean]
    names = ", ".join(r.label for r in rows)
    if not bad:
        return Verdict(scenario, names, DELIVERY, Status.MET, "")
    detail = "; ".join(f"{r.label}: {problems(r)}" for r in bad)
    return Verdict(scenario, names, DELIVERY, Status.MISSED, detail)


def problems(r: Result) -> str:
    if r.crashed or r.error:
        return "crashed" if r.crashed else r.error
    counts = {
        "lost": r.lost,
        "dup": r.duplicated,
        "reord": r.reordered,
        "x-room": r.cross_room,
        "stale": r.stale,
    }
    return ", ".join(f"{n} {name}" for name, n in counts.items() if n)


def figure(row: Result, field: str) -> float | None:
    value = getattr(row, field)
    return None if value is None else float(value)


def find(rows: list[Result], scenario: str, backend: str, instances: int) -> Result | None:
    return next(
        (
            r
            for r in rows
            if r.scenario == scenario and r.backend == backend and r.instances == instances
        ),
        None,
    )


def fmt(value: float) -> str:
    return f"{value:,.2f}" if abs(value) < 10 and not value.is_integer() else f"{value:,.0f}"
