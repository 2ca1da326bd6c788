"""Benchmark sharechat: start it on each backend, drive each scenario, report.

python -m bench.run [--backends memory,postgres,postgres+redis,bare]
                    [--scenarios latency,throughput,...] [--quick]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from bench.backends import BACKENDS, ROOT, Backend, running
from bench.driver import run_scenario
from bench.procfs import raise_fd_limit, wait_quiet
from bench.report import load_json, markdown, plot, save_json
from bench.results import Result, summarize
from bench.scenarios import NAMES, Scenario, select

RESULTS = ROOT / "bench" / "results"
PLOT = ROOT / "docs" / "bench.png"
QUIET_CORES = 0.3  # background load under which the machine counts as idle


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--backends", default=",".join(BACKENDS), type=names(list(BACKENDS)))
    parser.add_argument("--scenarios", default=",".join(NAMES), type=names(list(NAMES)))
    parser.add_argument("--quick", action="store_true", help="~3 s per scenario, smoke test")
    parser.add_argument("--duration", type=float, help="seconds measured per scenario")
    parser.add_argument("--warmup", type=float, help="seconds of warm-up per scenario")
    parser.add_argument("--processes", type=int, default=2, help="load-generating processes")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=60.0,
        help=f"seconds to wait, before each scenario, for under {QUIET_CORES} cores busy",
    )
    parser.add_argument(
        "--report",
        type=Path,
        nargs="+",
        metavar="JSON",
        help="run nothing: table and plot from saved records (a later one wins per row)",
    )
    parser.add_argument(
        "--plot",
        type=Path,
        help=f"PNG path (default {PLOT}; with --quick, next to the JSON record)",
    )
    return parser.parse_args(argv)


def names(allowed: list[str]) -> Any:
    def parse(text: str) -> list[str]:
        chosen = [n.strip() for n in text.split(",") if n.strip()]
        unknown = set(chosen) - set(allowed)
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {sorted(unknown)}; choose from {allowed}")
        return chosen

    return parse


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.report:
        report(args.report, args.plot or PLOT)
        return
    raise_fd_limit()
    scenarios = select(args.scenarios, args.quick, args.duration, args.warmup)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results = [
        bench(BACKENDS[b], sc, args, RESULTS / f"{stamp}-{b}-{sc.name}.log")
        for b in args.backends
        for sc in scenarios
    ]
    commit = ", ".join(dict.fromkeys(r.commit for r in results))
    print(f"\n## sharechat {commit}, {os.cpu_count()} cores\n\n{markdown(results)}")
    meta = {
        "timestamp": stamp,
        "commit": commit,
        "quick": args.quick,
        "processes": args.processes,
        "scenarios": [vars(sc) for sc in scenarios],
    }
    save_json(RESULTS / f"{stamp}.json", meta, results)
    plot_path = args.plot or (RESULTS / f"{stamp}.png" if args.quick else PLOT)
    plot(plot_path, results, f"sharechat {commit} — {stamp}{' (quick)' if args.quick else ''}")
    print(f"\nsaved {RESULTS / f'{stamp}.json'} and {plot_path}", file=sys.stderr)


def report(paths: list[Path], plot_path: Path) -> None:
    """Merge saved records: one row per scenario and backend, the latest file winning."""
    rows: dict[tuple[str, str], Result] = {}
    commits: list[str] = []
    for path in paths:
        meta, results = load_json(path)
        commits.extend(r.commit or meta["commit"] for r in results)
        rows.update({(r.scenario, r.backend): r for r in results})
    title = f"sharechat {', '.join(dict.fromkeys(commits))}"
    print(f"## {title}, {os.cpu_count()} cores\n\n{markdown(list(rows.values()))}")
    plot(plot_path, list(rows.values()), title)
    print(f"\nsaved {plot_path}", file=sys.stderr)


def bench(backend: Backend, sc: Scenario, args: argparse.Namespace, log_path: Path) -> Result:
    """One scenario on a freshly started server; a failure becomes a row, not an abort."""
    print(f"{backend.name} / {sc.name} ...", end=" ", file=sys.stderr, flush=True)
    background = wait_quiet(QUIET_CORES, args.quiet_wait)
    if background >= QUIET_CORES:
        print(f"(machine busy: {background:.2f} cores)", end=" ", file=sys.stderr, flush=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    commit = server_commit()
    with log_path.open("wb") as log:
        try:
            with running(backend, log) as server:
                result = summarize(
                    run_scenario(sc, server.base_url, server.pid, args.processes), backend.name
                )
                result.crashed = server.crashed
        except Exception as exc:  # reported in the table and the log
            log.write(traceback.format_exc().encode())
            result = Result(sc.name, backend.name, error=f"{type(exc).__name__}: {exc}")
    result.background_cpu = background
    result.commit = commit
    print("crashed" if result.crashed else result.error or "done", file=sys.stderr)
    return result


def server_commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=False
        ).stdout.strip()

    dirty = git("status", "--porcelain", "--", "sharechat", "sql")
    return git("rev-parse", "--short", "HEAD") + ("-dirty" if dirty else "")


if __name__ == "__main__":
    main()
