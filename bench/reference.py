"""Static figures quoted in issue 5 (2 cores, PG 15, Redis 7 loopback), shown beside ours.

Keys are the table headers of report.py; a figure the issue does not give is left out.
"""

from __future__ import annotations

GO = "ref: Go original, PG+Redis (issue)"
BARE = "ref: bare aiohttp (issue)"
TARGET = "target: PG+Redis (issue)"

REFERENCE: dict[str, dict[str, dict[str, str]]] = {
    "latency": {
        GO: {"acked/s": "2,550", "p50": "0.8", "p99": "1.5"},
        BARE: {"acked/s": "24,000", "p99": "0.2"},
        TARGET: {"p50": "≤ 1", "p99": "≤ 2"},
    },
    "throughput": {
        GO: {"acked/s": "430", "p50": "950", "p99": "1,600"},
        BARE: {"acked/s": "13,400", "p99": "53"},
    },
    "big-room": {
        GO: {"acked/s": "370", "deliveries/s": "37,000", "p99": "440"},
        BARE: {"deliveries/s": "166,000"},
        TARGET: {"deliveries/s": "≥ 100,000", "p99": "< 100"},
    },
    "many-rooms": {
        GO: {"acked/s": "460", "p99": "5,400", "failed": "696", "lost": "3"},
        BARE: {"acked/s": "40,000"},
        TARGET: {"acked/s": "≥ 4,600", "p99": "< 100"},
    },
    "connections": {
        GO: {"connects/s": "285", "KiB/conn": "33"},
        BARE: {"connects/s": "1,800", "KiB/conn": "18"},
        TARGET: {"connects/s": "≥ 1,000", "KiB/conn": "≤ 20"},
    },
    "churn": {
        GO: {"joins/s": "186", "errors": "crashed"},
        BARE: {"joins/s": "3,200"},
        TARGET: {"joins/s": "≥ 1,000", "errors": "0"},
    },
}

# The headline rate of each scenario in the plot: (Result field, table header).
HEADLINE: dict[str, tuple[str, str]] = {
    "latency": ("acked_per_s", "acked/s"),
    "throughput": ("acked_per_s", "acked/s"),
    "big-room": ("deliveries_per_s", "deliveries/s"),
    "many-rooms": ("acked_per_s", "acked/s"),
    "connections": ("connects_per_s", "connects/s"),
    "churn": ("joins_per_s", "joins/s"),
}


def go_figure(scenario: str, header: str) -> float | None:
    """The Go original's figure under a header, as a number, if the issue gives one."""
    text = REFERENCE.get(scenario, {}).get(GO, {}).get(header)
    try:
        return float(text.replace(",", "")) if text else None
    except ValueError:
        return None
