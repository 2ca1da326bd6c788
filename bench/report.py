"""Markdown tables, the JSON record and the PNG plot of a run."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.reference import GO, HEADLINE, REFERENCE, go_figure
from bench.results import Result
from bench.scenarios import SCENARIOS, Kind

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
COLUMNS: dict[Kind, list[Column]] = {
    Kind.CHAT: [
        ("acked/s", lambda r: num(r.acked_per_s)),
        ("deliveries/s", lambda r: num(r.deliveries_per_s)),
        *LATENCY,
        ("ack p50/p99", lambda r: f"{ms(r.ack_p50_ms)} / {ms(r.ack_p99_ms)}"),
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
    Kind.CONNECTIONS: "latency ms: one probe message per room to its idle members",
    Kind.CHURN: "latency ms: connect to own `joined`; lost: `joined` never followed by `left`",
}


def markdown(results: list[Result]) -> str:
    sections = []
    for sc in SCENARIOS:
        rows = [r for r in results if r.scenario == sc.name]
        if rows:
            sections.append(section(sc.name, sc.kind, rows))
    return "\n\n".join(sections)


def section(name: str, kind: Kind, rows: list[Result]) -> str:
    columns = COLUMNS[kind]
    headers = ["backend", *(h for h, _ in columns)]
    lines = [f"### {name} ({NOTES[kind]})", "", row(headers), row(["---"] * len(headers))]
    for r in rows:
        cells = [r.backend, *(f(r) for _, f in columns)]
        lines.append(row(cells) + (f" {r.error}" if r.error else ""))
    for label, figures in REFERENCE.get(name, {}).items():
        lines.append(row([label, *(figures.get(h, "") for h, _ in columns)]))
    return "\n".join(lines)


def row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def save_json(path: Path, meta: dict[str, Any], results: list[Result]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {**meta, "results": [asdict(r) for r in results]}
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")


def load_json(path: Path) -> tuple[dict[str, Any], list[Result]]:
    """A saved record: its metadata and its results."""
    record = json.loads(path.read_text())
    fields = Result.__dataclass_fields__
    results = [Result(**{k: v for k, v in r.items() if k in fields}) for r in record.pop("results")]
    return record, results


def plot(path: Path, results: list[Result], title: str) -> None:
    """Headline rate and latency percentiles per scenario, one bar per backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [sc.name for sc in SCENARIOS if any(r.scenario == sc.name for r in results)]
    backends = list(dict.fromkeys(r.backend for r in results))
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 5.5))
    rate_panel(left, names, backends, results)
    latency_panel(right, names, backends, results)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


GO_STYLE = {"color": "lightgrey", "hatch": "//", "edgecolor": "grey"}
Series = tuple[str, list[float], dict[str, str]]


def bars(ax: Any, names: list[str], series: list[Series]) -> list[list[float]]:
    """One bar group per scenario, one bar per series; the x of every bar, per series."""
    width = 0.8 / len(series)
    placed = []
    for k, (label, values, style) in enumerate(series):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(names))]
        ax.bar(xs, values, width, label=label, **style)
        placed.append(xs)
    ax.set_yscale("log")
    ax.legend(fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    return placed


def rate_panel(ax: Any, names: list[str], backends: list[str], results: list[Result]) -> None:
    series: list[Series] = [(b, [headline(results, n, b) for n in names], {}) for b in backends]
    go = [go_figure(n, HEADLINE[n][1]) or 0.0 for n in names]
    bars(ax, names, [*series, (GO, go, GO_STYLE)])
    ax.set_xticks(range(len(names)), [f"{n}\n{HEADLINE[n][1]}" for n in names])
    ax.set_title("throughput (higher is better)")


def latency_panel(ax: Any, names: list[str], backends: list[str], results: list[Result]) -> None:
    """p99 as the bar, p50 and p95 as marks on it."""
    found = [[find(results, n, b) for n in names] for b in backends]
    series: list[Series] = [
        (f"{b} p99", [(r.p99_ms or 0.0) if r else 0.0 for r in got], {})
        for b, got in zip(backends, found, strict=True)
    ]
    go = [go_figure(n, "p99") or 0.0 for n in names]
    placed = bars(ax, names, [*series, (f"{GO} p99", go, GO_STYLE)])
    for xs, got in zip(placed, found, strict=False):
        for mark, field in (("_", "p50_ms"), ("x", "p95_ms")):
            marks = [getattr(r, field) if r else None for r in got]
            ax.scatter(xs, marks, marker=mark, color="black", zorder=3, s=40)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("ms (bar p99, - p50, x p95)")
    ax.set_title("latency (lower is better)")


def find(results: list[Result], scenario: str, backend: str) -> Result | None:
    return next((r for r in results if r.scenario == scenario and r.backend == backend), None)


def headline(results: list[Result], scenario: str, backend: str) -> float:
    r = find(results, scenario, backend)
    value = getattr(r, HEADLINE[scenario][0]) if r else None
    return float(value or 0.0)
