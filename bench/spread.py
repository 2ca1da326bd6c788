"""The run-to-run spread of repeated runs: per row, the median and range of the figures
that targets read, and how many of the runs met each target.

A cell whose server crashed or that failed to run measured nothing whole: its
figures are left out (they would be zeros or a fraction of a cell), and the
row's run count says how many of its runs it was measured in.
"""

from __future__ import annotations

import statistics
from collections import defaultdict

from bench.report import row
from bench.results import Result
from bench.scenarios import SCENARIOS
from bench.targets import Status, Verdict, judge

FIGURES = (  # (Result attribute, header)
    ("acked_per_s", "acked/s"),
    ("deliveries_per_s", "deliveries/s"),
    ("connects_per_s", "connects/s"),
    ("kib_per_conn", "KiB/conn"),
    ("joins_per_s", "joins/s"),
    ("p99_ms", "p99 ms"),
    ("ack_p99_ms", "ack p99 ms"),
    ("redis_ms_per_1k_deliveries", "redis ms/1k del"),
    ("pg_commits_per_message", "PG commits/msg"),
    ("wal_bytes_per_message", "WAL B/msg"),
)


def spread(runs: list[list[Result]]) -> str:
    """A table of median (min-max) over the runs, then each target's count of runs met."""
    cells: defaultdict[tuple[str, str], list[Result]] = defaultdict(list)
    for results in runs:
        for r in results:
            cells[(r.scenario, r.label)].append(r)
    order = [sc.name for sc in SCENARIOS]
    keys = sorted(cells, key=lambda k: order.index(k[0]))
    headers = ["scenario", "backend", "runs", *(h for _, h in FIGURES)]
    lines = [
        f"### spread over {len(runs)} runs: median (min-max)",
        "",
        row(headers),
        row(["---"] * len(headers)),
    ]
    for scenario, label in keys:
        rows = cells[(scenario, label)]
        measured = [r for r in rows if not (r.crashed or r.error)]
        count = f"{len(measured)}" + ("" if len(measured) == len(rows) else f" of {len(rows)}")
        figures = [summary([getattr(r, f) for r in measured]) for f, _ in FIGURES]
        lines.append(row([scenario, label, count, *figures]))
    lines += ["", *tally([judge(results) for results in runs])]
    return "\n".join(lines)


def summary(values: list[float | None]) -> str:
    known = [v for v in values if v is not None]
    if not known:
        return ""
    median = statistics.median(known)
    if len(known) == 1:
        return fmt(median)
    return f"{fmt(median)} ({fmt(min(known))}-{fmt(max(known))})"


def tally(per_run: list[list[Verdict]]) -> list[str]:
    met: defaultdict[tuple[str, str, str], list[Status]] = defaultdict(list)
    for verdicts in per_run:
        for v in verdicts:
            met[(v.scenario, v.row, v.target)].append(v.status)
    order = [sc.name for sc in SCENARIOS]
    return [
        f"- {scenario}: {target_row}: {target}: met in {statuses.count(Status.MET)} of "
        f"{len(statuses)} runs{unjudged(statuses)}"
        for (scenario, target_row, target), statuses in sorted(
            met.items(), key=lambda item: order.index(item[0][0])
        )
    ]


def unjudged(statuses: list[Status]) -> str:
    count = statuses.count(Status.UNJUDGED)
    return f" ({count} not judged)" if count else ""


def fmt(value: float) -> str:
    return f"{value:,.2f}" if abs(value) < 10 else f"{value:,.0f}"
