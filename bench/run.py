"""Benchmark sharechat: start it on each backend, drive each scenario, report.

python -m bench.run [--backends original,memory,postgres,postgres+redis,bare]
                    [--scenarios latency,throughput,...] [--quick] [--instances N]
                    [--redis-cluster | --own-redis]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import traceback
from contextlib import ExitStack
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

from bench.backends import (
    BACKENDS,
    ORIGINAL_DIR,
    REDIS_URL,
    ROOT,
    Backend,
    Program,
    Setup,
    original_binary,
    own_redis,
    running,
)
from bench.cluster import redis_cluster
from bench.driver import run_scenario
from bench.procfs import raise_fd_limit, wait_quiet
from bench.report import load_json, markdown, plot, save_json
from bench.results import Result, summarize
from bench.scenarios import NAMES, Scenario, select
from bench.spread import spread
from bench.targets import judge

RESULTS = ROOT / "bench" / "results"
PLOT = ROOT / "docs" / "bench.png"
QUIET_CORES = 0.3  # background load under which the machine counts as idle


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--backends",
        type=names(list(BACKENDS)),
        help=f"default: all ({','.join(BACKENDS)}); with --instances, those with Redis",
    )
    parser.add_argument("--scenarios", default=",".join(NAMES), type=names(list(NAMES)))
    parser.add_argument("--quick", action="store_true", help="~3 s per scenario, smoke test")
    parser.add_argument("--duration", type=float, help="seconds measured per scenario")
    parser.add_argument("--warmup", type=float, help="seconds of warm-up per scenario")
    parser.add_argument("--processes", type=int, default=2, help="load-generating processes")
    parser.add_argument(
        "--instances",
        type=int,
        default=1,
        help="servers per cell on one database and one Redis, members dealt round-robin "
        "(backends with Redis only: postgres+redis, original)",
    )
    parser.add_argument(
        "--redis-url", default=REDIS_URL, help="sharechat's REDIS_URL (env BENCH_REDIS_URL)"
    )
    own = parser.add_mutually_exclusive_group()
    own.add_argument(
        "--redis-cluster",
        action="store_true",
        help="start a throwaway Redis Cluster (3 masters) for the run and give sharechat "
        "its redis+cluster:// URL (postgres+redis only)",
    )
    own.add_argument(
        "--own-redis",
        action="store_true",
        help="start a throwaway redis-server for the run instead of --redis-url, so that "
        "its INFO cpu counts this run alone",
    )
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        type=assignment,
        help="a setting for every sharechat server (repeatable), e.g. SHARECHAT_DB_POOL_SIZE=20",
    )
    parser.add_argument(
        "--original",
        type=Path,
        default=ORIGINAL_DIR,
        help="folder of the original Go server (env BENCH_ORIGINAL_DIR); its row is skipped "
        "when the binary is not there",
    )
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
        "--spread",
        type=Path,
        nargs="+",
        metavar="JSON",
        help="run nothing: median and range of each figure over repeated runs' records, "
        "and how many of them met each target",
    )
    parser.add_argument(
        "--plot",
        type=Path,
        help=f"PNG path (default {PLOT}; with --quick, next to the JSON record)",
    )
    args = parser.parse_args(argv)
    redis_backends = [b for b in BACKENDS if BACKENDS[b].redis]
    if args.instances < 1:
        parser.error("--instances: at least 1")
    if args.redis_cluster:  # the original runs on a Redis of its own, never on the cluster
        cluster_backends = [b for b in redis_backends if not BACKENDS[b].reference]
        args.backends = args.backends or cluster_backends
        if set(args.backends) - set(cluster_backends):
            parser.error(f"--redis-cluster: choose backends among {cluster_backends}")
    if args.backends is None:
        args.backends = redis_backends if args.instances > 1 else list(BACKENDS)
    elif args.instances > 1 and set(args.backends) - set(redis_backends):
        parser.error(f"--instances {args.instances}: choose backends among {redis_backends}")
    return args


def assignment(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


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
    if args.spread:
        print(spread([load_json(path)[1] for path in args.spread]))
        return
    raise_fd_limit()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    RESULTS.mkdir(parents=True, exist_ok=True)
    with (RESULTS / f"{stamp}-redis.log").open("wb") as log, ExitStack() as stack:
        redis_url = own_redis_url(args, log, stack) or args.redis_url
        run(args, stamp, Setup(args.instances, redis_url, dict(args.server_env), args.original))


def own_redis_url(args: argparse.Namespace, log: IO[bytes], stack: ExitStack) -> str | None:
    """The URL of the Redis (or Redis Cluster) started for this run, stopped with `stack`."""
    if args.redis_cluster:
        return stack.enter_context(redis_cluster(log))
    if args.own_redis:
        return f"redis://{stack.enter_context(own_redis(log))}/0"
    return None


def run(args: argparse.Namespace, stamp: str, setup: Setup) -> None:
    scenarios = select(args.scenarios, args.quick, args.duration, args.warmup)
    backends = [BACKENDS[b] for b in args.backends]
    if BACKENDS["original"] in backends and original_binary(setup) is None:
        print(
            f"original: no {setup.original_dir / 'sharechat'}: its rows are skipped",
            file=sys.stderr,
        )
        backends.remove(BACKENDS["original"])
    results = [
        bench(backend, sc, setup, args, RESULTS / f"{stamp}-{backend.name}-{sc.name}.log")
        for backend in backends
        for sc in scenarios
    ]
    if not results:
        return
    verdicts = judge(results)
    commit = ", ".join(dict.fromkeys(r.commit for r in results if r.commit))
    heading = title(commit, args.instances, setup.cluster)
    print(f"\n## {heading}\n\n{markdown(results, verdicts)}")
    meta = {
        "timestamp": stamp,
        "commit": commit,
        "quick": args.quick,
        "processes": args.processes,
        "instances": args.instances,
        "redis_url": without_credentials(setup.redis_url),
        "redis_cluster": setup.cluster,
        "scenarios": [vars(sc) for sc in scenarios],
    }
    save_json(RESULTS / f"{stamp}.json", meta, results, verdicts)
    plot_path = args.plot or (RESULTS / f"{stamp}.png" if args.quick else PLOT)
    quick = " (quick)" if args.quick else ""
    plot(plot_path, results, f"{heading} — {stamp}" + quick)
    print(f"\nsaved {RESULTS / f'{stamp}.json'} and {plot_path}", file=sys.stderr)


def report(paths: list[Path], plot_path: Path) -> None:
    """Merge saved records: one row per scenario and backend, the latest file winning."""
    rows: dict[tuple[str, str], Result] = {}
    commits: list[str] = []
    for path in paths:
        _, results = load_json(path)
        commits.extend(r.commit for r in results if r.commit)
        rows.update({(r.scenario, r.label): r for r in results})
    merged = list(rows.values())
    instances = max(r.instances for r in merged)
    heading = title(", ".join(dict.fromkeys(commits)), instances, all(r.cluster for r in merged))
    print(f"## {heading}\n\n{markdown(merged, judge(merged))}")
    plot(plot_path, merged, heading)
    print(f"\nsaved {plot_path}", file=sys.stderr)


def without_credentials(url: str) -> str:
    parts = urlsplit(url)
    host = f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)
    return parts._replace(netloc=host).geturl()


def title(commit: str, instances: int, cluster: bool = False) -> str:
    where = f"{os.cpu_count()} cores"
    several = f", {instances} instances" if instances > 1 else ""
    return f"sharechat {commit}, {where}{several}" + (
        ", Redis Cluster (3 masters)" if cluster else ""
    )


def bench(
    backend: Backend, sc: Scenario, setup: Setup, args: argparse.Namespace, log_path: Path
) -> Result:
    """One scenario on freshly started servers; a failure becomes a row, not an abort."""
    instances = setup.instances if backend.redis else 1
    cluster = backend.redis and not backend.reference and setup.cluster
    label = Result(sc.name, backend.name, instances=instances, cluster=cluster).label
    print(f"{label} / {sc.name} ...", end=" ", file=sys.stderr, flush=True)
    background = wait_quiet(QUIET_CORES, args.quiet_wait)
    if background >= QUIET_CORES:
        print(f"(machine busy: {background:.2f} cores)", end=" ", file=sys.stderr, flush=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    commit = "" if backend.program is Program.ORIGINAL else server_commit()
    crashed = False
    with log_path.open("wb") as log:
        try:
            with running(backend, setup, log) as servers:
                try:
                    raw = run_scenario(sc, servers, args.processes)
                finally:
                    crashed = servers.crashed
            result = summarize(raw, backend.name, instances)
        except Exception as exc:  # reported in the table and the log
            log.write(traceback.format_exc().encode())
            error = "" if crashed else f"{type(exc).__name__}: {exc}"
            result = Result(sc.name, backend.name, instances=instances, error=error)
    result.cluster = cluster
    result.crashed = crashed
    if crashed:  # the memory of a process that is gone says nothing
        result.kib_per_conn = None
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
