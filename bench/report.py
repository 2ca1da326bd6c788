"""Markdown tables, the JSON record and the PNG plot of a run."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.results import Result
from bench.scenarios import SCENARIOS, Kind, Scenario
from bench.targets import Status, Verdict

Column = tuple[str, Callable[[Result], str]]


def num(value: float | None, digits: int = 0) -> str:
    return "" if value is None else f"{value:,.{digits}f}"


def ms(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:,.2f}" if value < 10 else f"{value:,.0f}"


SATURATED = 0.9  # a load-generating process this busy may be what limits the figures


def cpu(r: Result) -> str:
    """Cores: generator (! when one of its processes saturates), server, machine, background."""
    mark = "!" if r.client_cpu_max >= SATURATED else ""
    others = (r.server_cpu, r.machine_cpu, r.background_cpu)
    return f"{r.client_cpu:.2f}{mark}/" + "/".join(f"{v:.2f}" for v in others)


def costs(r: Result) -> str:
    """Redis CPU ms per 1,000 deliveries, PostgreSQL commits and WAL bytes per message."""
    figures = (r.redis_ms_per_1k_deliveries, r.pg_commits_per_message, r.wal_bytes_per_message)
    if all(v is None for v in figures):
        return ""
    redis, commits, wal = (num(v, d) or "-" for v, d in zip(figures, (2, 3, 0), strict=True))
    return f"{redis} · {commits} · {wal}"


COSTS: Column = ("redis ms/1k del · PG commits/msg · WAL B/msg", costs)
CHECKS: list[Column] = [
    ("failed", lambda r: str(r.failed)),
    ("lost", lambda r: str(r.lost)),
    ("dup", lambda r: str(r.duplicated)),
    ("reord", lambda r: str(r.reordered)),
    ("x-room", lambda r: str(r.cross_room)),
    ("stale", lambda r: str(r.stale)),
    ("errors", lambda r: "crashed" if r.crashed else str(r.errors)),
    ("CPU gen/srv/all/bg", cpu),
]
LATENCY: list[Column] = [
    ("p50", lambda r: ms(r.p50_ms)),
    ("p95", lambda r: ms(r.p95_ms)),
    ("p99", lambda r: ms(r.p99_ms)),
    ("max", lambda r: ms(r.max_ms)),
]


def spread(*values: float | None) -> str:
    return " / ".join(ms(v) for v in values)


COLUMNS: dict[Kind, list[Column]] = {
    Kind.CHAT: [
        ("acked/s", lambda r: num(r.acked_per_s)),
        ("deliveries/s", lambda r: num(r.deliveries_per_s)),
        *LATENCY,
        ("ack p50/p99", lambda r: spread(r.ack_p50_ms, r.ack_p99_ms)),
        COSTS,
        *CHECKS,
    ],
    Kind.OPEN_LOOP: [
        ("offered/s", lambda r: num(r.offered_per_s)),
        ("acked/s", lambda r: num(r.acked_per_s)),
        ("p50/p90/p99/max", lambda r: spread(r.p50_ms, r.p90_ms, r.p99_ms, r.max_ms)),
        (
            "ack p50/p90/p99/max",
            lambda r: spread(r.ack_p50_ms, r.ack_p90_ms, r.ack_p99_ms, r.ack_max_ms),
        ),
        ("lag p99", lambda r: ms(r.lag_p99_ms)),
        COSTS,
        *CHECKS,
    ],
    Kind.CONNECTIONS: [
        ("connected", lambda r: str(r.connected)),
        ("connects/s", lambda r: num(r.connects_per_s)),
        ("KiB/conn", lambda r: num(r.kib_per_conn, 1)),
        *LATENCY,
        *CHECKS,
    ],
    Kind.CHURN: [("joins/s", lambda r: num(r.joins_per_s)), *LATENCY, *CHECKS],
}
NOTES = {
    Kind.CHAT: "latency ms: send to receipt by the other members; ack: send to own echo",
    Kind.OPEN_LOOP: "latency ms from the time each message was due: to receipt by the other "
    "member, ack: to own echo; lag: how late the generator sent",
    Kind.CONNECTIONS: "latency ms: one probe message per room to its idle members",
    Kind.CHURN: "latency ms: connect to own `joined`; lost: `joined` never followed by `left`",
}


def markdown(results: list[Result], verdicts: list[Verdict]) -> str:
    """One table per scenario, each followed by its targets; then the count of verdicts."""
    sections = []
    for sc in SCENARIOS:
        rows = [r for r in results if r.scenario == sc.name]
        if rows:
            judged = [v for v in verdicts if v.scenario == sc.name]
            sections.append(section(sc, rows) + targets(judged))
    if verdicts:
        sections.append(summary(verdicts))
    return "\n\n".join(sections)


def section(sc: Scenario, rows: list[Result]) -> str:
    columns = COLUMNS[sc.kind]
    headers = ["backend", *(h for h, _ in columns)]
    lines = [f"### {sc.name} ({NOTES[sc.kind]})", "", row(headers), row(["---"] * len(headers))]
    for r in rows:
        cells = [r.label, *(f(r) for _, f in columns)]
        lines.append(row(cells) + (f" {r.error}" if r.error else ""))
    return "\n".join(lines)


def targets(verdicts: list[Verdict]) -> str:
    return "\n\n" + "\n".join(line(v) for v in verdicts) if verdicts else ""


def line(v: Verdict) -> str:
    detail = f" ({v.detail})" if v.detail else ""
    return f"- target **{v.status}**: {v.row}: {v.target}{detail}"


def summary(verdicts: list[Verdict]) -> str:
    counts = {s: sum(v.status is s for v in verdicts) for s in Status}
    lines = ["### targets: " + ", ".join(f"{n} {s}" for s, n in counts.items())]
    lines += [f"- {v.scenario}: {line(v)[2:]}" for v in verdicts if v.status is Status.MISSED]
    return "\n".join(lines)


def row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def save_json(
    path: Path, meta: dict[str, Any], results: list[Result], verdicts: list[Verdict]
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        **meta,
        "results": [asdict(r) for r in results],
        "targets": [asdict(v) for v in verdicts],
    }
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")


def load_json(path: Path) -> tuple[dict[str, Any], list[Result]]:
    """A saved record: its metadata and its results."""
    record = json.loads(path.read_text())
    record.pop("targets", None)  # judged again from the rows
    fields = Result.__dataclass_fields__
    results = [Result(**{k: v for k, v in r.items() if k in fields}) for r in record.pop("results")]
    return record, results


def plot(path: Path, results: list[Result], title: str) -> None:
    """Headline rate and latency percentiles per scenario, one bar per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = [sc for sc in SCENARIOS if any(r.scenario == sc.name for r in results)]
    labels = list(dict.fromkeys(r.label for r in results))
    fig, (left, right) = plt.subplots(1, 2, figsize=(17, 5.5))
    rate_panel(left, scenarios, labels, results)
    latency_panel(right, scenarios, labels, results)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


ORIGINAL_STYLE = {"color": "lightgrey", "hatch": "//", "edgecolor": "grey"}
Series = tuple[str, list[float], dict[str, str]]


def style(label: str) -> dict[str, str]:
    return ORIGINAL_STYLE if label.startswith("original") else {}


def bars(ax: Any, count: int, series: list[Series]) -> list[list[float]]:
    """One bar group per scenario, one bar per series; the x of every bar, per series."""
    width = 0.8 / len(series)
    placed = []
    for k, (label, values, look) in enumerate(series):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(count)]
        ax.bar(xs, values, width, label=label, **look)
        placed.append(xs)
    ax.set_yscale("log")
    ax.legend(fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    return placed


def rate_panel(
    ax: Any, scenarios: list[Scenario], labels: list[str], results: list[Result]
) -> None:
    series: list[Series] = [
        (label, [headline(results, sc, label) for sc in scenarios], style(label))
        for label in labels
    ]
    bars(ax, len(scenarios), series)
    ax.set_xticks(
        range(len(scenarios)), [f"{sc.name}\n{sc.headline[1]}" for sc in scenarios], fontsize=8
    )
    ax.set_title("throughput (higher is better)")


def latency_panel(
    ax: Any, scenarios: list[Scenario], labels: list[str], results: list[Result]
) -> None:
    """p99 as the bar, p50 and p95 as marks on it."""
    found = [[find(results, sc.name, label) for sc in scenarios] for label in labels]
    series: list[Series] = [
        (f"{label} p99", [(r.p99_ms or 0.0) if r else 0.0 for r in got], style(label))
        for label, got in zip(labels, found, strict=True)
    ]
    placed = bars(ax, len(scenarios), series)
    for xs, got in zip(placed, found, strict=True):
        for mark, field in (("_", "p50_ms"), ("x", "p95_ms")):
            marks = [getattr(r, field) if r else None for r in got]
            ax.scatter(xs, marks, marker=mark, color="black", zorder=3, s=40)
    ax.set_xticks(range(len(scenarios)), [sc.name for sc in scenarios], fontsize=8)
    ax.set_ylabel("ms (bar p99, - p50, x p95)")
    ax.set_title("latency (lower is better)")


def find(results: list[Result], scenario: str, label: str) -> Result | None:
    return next((r for r in results if r.scenario == scenario and r.label == label), None)


def headline(results: list[Result], sc: Scenario, label: str) -> float:
    r = find(results, sc.name, label)
    value = getattr(r, sc.headline[0]) if r else None
    return float(value or 0.0)
