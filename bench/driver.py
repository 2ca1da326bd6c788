"""Runs one scenario against a running server with several load-generating processes."""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import aiohttp

from bench.backends import Servers
from bench.costs import Probe, Spent
from bench.plan import Plan, Seat, Tally
from bench.procfs import Meter, Usage, rss_kib
from bench.scenarios import Kind, Scenario
from bench.worker import process_main

START_DELAY_NS = 200_000_000  # lets every process get the "go" before t0
SETTLE_S = 1.0  # after the connections are made, before reading the server's memory
PHASE_TIMEOUT = 120.0
STALE_TIMEOUT = 10.0  # for the server to record every leave once all connections closed


@dataclass
class Sample:
    """What the coordinator saw of the server and the machine while the scenario ran."""

    rss_before_kib: int = 0
    rss_connected_kib: int = 0
    # From the "connect" order until all processes are connected:
    connecting: Usage = field(default_factory=Usage)
    connecting_seconds: float = 0.0
    # From t0 (warm-up included) until the window ends:
    sending: Usage = field(default_factory=Usage)
    sending_seconds: float = 0.0
    # What PostgreSQL and Redis spent in the measured window (warm-up excluded):
    spent: Spent = field(default_factory=Spent)


@dataclass
class Raw:
    scenario: Scenario
    processes: int
    tallies: list[Tally]
    sample: Sample
    stale: int  # members still listed STALE_TIMEOUT after every connection closed
    instances_per_room: float = 1.0  # that its members are connected to, on average


def run_scenario(sc: Scenario, servers: Servers, processes: int) -> Raw:
    base_url, server_pids = servers.base_urls[0], servers.pids
    room_ids = asyncio.run(create_rooms(base_url, sc.rooms))
    plans = make_plans(sc, servers.base_urls, room_ids, processes)
    sample = Sample(rss_before_kib=rss_kib(server_pids))
    probe = Probe(servers.database_url, servers.redis_url)
    with closing(probe), workers(plans) as conns:
        gather(conns, "spawned")
        meter, started = Meter(server_pids), time.monotonic()
        broadcast(conns, "connect", None)
        gather(conns, "ready")
        sample.connecting = meter.read()
        sample.connecting_seconds = time.monotonic() - started
        time.sleep(SETTLE_S)
        sample.rss_connected_kib = rss_kib(server_pids)
        t0 = time.monotonic_ns() + START_DELAY_NS
        broadcast(conns, "go", t0)
        window_ns = t0 + int(sc.warmup * 1e9), t0 + int((sc.warmup + sc.duration) * 1e9)
        measure(sample, server_pids, probe, t0, window_ns)
        sent: dict[int, tuple[int, int]] = {}
        for part in gather(conns, "sent"):
            sent.update(part)
        broadcast(conns, "expect", {idx: n - failed for idx, (n, failed) in sent.items()})
        tallies: list[Tally] = gather(conns, "result")
    seated = [sum(1 for p in plans for seat in p.seats if seat.room == r) for r in range(sc.rooms)]
    # A crashed server lists nobody: its row says crashed instead.
    stale = 0 if servers.crashed else asyncio.run(stale_members(base_url, room_ids, seated))
    return Raw(sc, len(plans), tallies, sample, stale, instances_per_room(plans))


def instances_per_room(plans: list[Plan]) -> float:
    """The instances a room's members are connected to, on average over the rooms: each
    subscribes to the room, so each publish costs Redis that many deliveries."""
    spanned: defaultdict[int, set[int]] = defaultdict(set)
    for plan in plans:
        for seat in plan.seats:
            spanned[seat.room].add(seat.instance)
    return sum(map(len, spanned.values())) / len(spanned) if spanned else 0.0


async def create_rooms(base_url: str, count: int) -> tuple[str, ...]:
    async with aiohttp.ClientSession(raise_for_status=True) as session:

        async def one() -> str:
            async with session.post(f"{base_url}/api/room") as resp:
                room_id: str = (await resp.json())["roomId"]
                return room_id

        return tuple(await asyncio.gather(*(one() for _ in range(count))))


async def stale_members(base_url: str, room_ids: tuple[str, ...], seated: list[int]) -> int:
    """Members still listed once every connection closed, after STALE_TIMEOUT at most.

    A room the server cannot answer for (503) keeps its last count, at first all its seats.
    """
    deadline = time.monotonic() + STALE_TIMEOUT
    counts = dict(zip(room_ids, seated, strict=True))
    async with aiohttp.ClientSession() as session:

        async def listed(room_id: str) -> None:
            try:
                async with session.get(f"{base_url}/api/room/{room_id}") as resp:
                    if resp.status == 200:  # the original lists nobody as `null`
                        counts[room_id] = len((await resp.json())["members"] or ())
                    elif resp.status == 404:
                        counts[room_id] = 0
            except aiohttp.ClientError:  # a server that died now: its row says crashed
                pass

        while True:
            await asyncio.gather(*(listed(r) for r in room_ids))
            if not any(counts.values()) or time.monotonic() > deadline:
                return sum(counts.values())
            await asyncio.sleep(0.25)


def make_plans(
    sc: Scenario, base_urls: tuple[str, ...], room_ids: tuple[str, ...], processes: int
) -> list[Plan]:
    """Seats dealt round-robin over the processes and over the server instances, so that
    every room spans both."""
    instances = len(base_urls)
    seats = list(make_seats(sc, instances))
    processes = max(1, min(processes, sc.members if sc.kind is Kind.CHURN else len(seats)))
    room_of = tuple(seat.room for seat in seats)
    churners = range(sc.members) if sc.kind is Kind.CHURN else range(0)
    return [
        Plan(
            base_urls=base_urls,
            room_ids=room_ids,
            room_of=room_of,
            seats=tuple(seats[p::processes]),
            churners=tuple(c % instances for c in churners[p::processes]),
            concurrency=max(1, sc.connect_concurrency // processes),
            warmup_ns=int(sc.warmup * 1e9),
            duration_ns=int(sc.duration * 1e9),
        )
        for p in range(processes)
    ]


def make_seats(sc: Scenario, instances: int = 1) -> Iterator[Seat]:
    """Member `idx` connects to instance `idx % instances`: a room's members follow each
    other, so each room spans min(members, instances) instances."""
    if sc.kind is Kind.CHURN:  # one observer; the churning clients are not seats
        yield Seat(idx=0, room=0, observer=True)
        return
    period_ns = int(sc.seats * 1e9 / sc.rate) if sc.kind is Kind.OPEN_LOOP else 0
    for room in range(sc.rooms):
        for i in range(sc.members):
            idx = room * sc.members + i
            instance = idx % instances
            if sc.kind is Kind.CONNECTIONS:  # the first member of each room probes it once
                yield Seat(idx, room, inflight=1 if i == 0 else 0, limit=1, instance=instance)
            elif sc.kind is Kind.OPEN_LOOP:  # sends spread evenly over the period
                phase_ns = idx * period_ns // sc.seats
                yield Seat(idx, room, instance=instance, period_ns=period_ns, phase_ns=phase_ns)
            else:
                yield Seat(idx, room, inflight=sc.inflight, instance=instance)


def measure(
    sample: Sample, pids: tuple[int, ...], probe: Probe, t0: int, window_ns: tuple[int, int]
) -> None:
    """CPU of the server and of the whole machine from t0 to the window's end (monotonic);
    what the stores spent in the window itself, as the throughput figures count it."""
    start_ns, end_ns = window_ns
    sleep_until(t0)
    meter = Meter(pids)
    sleep_until(start_ns)
    before = probe.read()
    sleep_until(end_ns)
    sample.sending = meter.read()
    sample.sending_seconds = (end_ns - t0) / 1e9
    sample.spent = probe.read() - before


def sleep_until(t_ns: int) -> None:
    time.sleep(max(0, t_ns - time.monotonic_ns()) / 1e9)


@contextmanager
def workers(plans: list[Plan]) -> Iterator[list[Connection]]:
    ctx = multiprocessing.get_context("spawn")
    pairs = [ctx.Pipe() for _ in plans]
    procs = [
        ctx.Process(target=process_main, args=(child, plan), daemon=True)
        for (_, child), plan in zip(pairs, plans, strict=True)
    ]
    for proc in procs:
        proc.start()
    try:
        yield [parent for parent, _ in pairs]
    finally:
        for parent, _ in pairs:  # a process still waiting for an order stops at once
            parent.close()
        for proc in procs:
            proc.join(timeout=PHASE_TIMEOUT)
            if proc.is_alive():
                proc.kill()


def broadcast(conns: list[Connection], tag: str, payload: Any) -> None:
    for conn in conns:
        conn.send((tag, payload))


def gather(conns: list[Connection], tag: str) -> list[Any]:
    """One `tag` answer from every process; a process's error is raised here."""
    deadline = time.monotonic() + PHASE_TIMEOUT
    answers = []
    for conn in conns:
        if not conn.poll(max(0.0, deadline - time.monotonic())):
            raise TimeoutError(f"no {tag!r} from a load generator in {PHASE_TIMEOUT:.0f} s")
        got, payload = conn.recv()
        if got != tag:
            raise RuntimeError(f"load generator answered {got!r}: {payload}")
        answers.append(payload)
    return answers
