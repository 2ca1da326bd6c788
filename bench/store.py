"""Micro-benchmark of the PostgreSQL store path: add_message on the repository alone.

    python -m bench.store                       # 3,000 messages a scenario, 5 rounds
    python -m bench.store --bound 1000          # rooms over the bound: every store trims

Each round gets a fresh database `sharechat_bench_<random>` (migrated, dropped
afterwards) at BENCH_ADMIN_DSN. Scenarios: `sequential` (one call at a time,
each message stored alone), `concurrent` (all calls at once into one room: group
commit), `concurrent-10-rooms` (all at once, spread over 10 rooms),
`joins-and-leaves` (members join and leave one at a time: a write each). Prints the
median of the rounds: messages a second, and microseconds a message of wall time
and of PostgreSQL's CPU (its backends' user + system time, read from /proc: the
figure that other work on the machine disturbs least).
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import psycopg2
from psycopg2 import sql

from bench.backends import ADMIN_DSN, admin
from sharechat.domain import Member, Room, chat
from sharechat.migrations import migrate
from sharechat.postgres import PostgresRepository, open_postgres_repository

Scenario = Callable[[PostgresRepository, list[UUID], int], Awaitable[None]]


async def sequential(repository: PostgresRepository, rooms: list[UUID], count: int) -> None:
    member = Member(uuid4(), "Teal Otter")
    for i in range(count):
        await repository.add_message(chat(rooms[0], member, f"message {i}"))


async def concurrent(repository: PostgresRepository, rooms: list[UUID], count: int) -> None:
    member = Member(uuid4(), "Teal Otter")
    await asyncio.gather(
        *(repository.add_message(chat(rooms[0], member, f"message {i}")) for i in range(count))
    )


async def concurrent_rooms(repository: PostgresRepository, rooms: list[UUID], count: int) -> None:
    member = Member(uuid4(), "Teal Otter")
    await asyncio.gather(
        *(
            repository.add_message(chat(rooms[i % len(rooms)], member, f"message {i}"))
            for i in range(count)
        )
    )


async def joins_and_leaves(
    repository: PostgresRepository, rooms: list[UUID], count: int
) -> None:
    """Members join and leave one at a time: `count` writes, each alone."""
    instance = uuid4()
    for _ in range(count // 2):
        member = Member(uuid4(), "Teal Otter")
        await repository.add_member(rooms[0], member, instance)
        await repository.remove_member(rooms[0], member)


SCENARIOS: dict[str, tuple[Scenario, int]] = {
    "sequential": (sequential, 1),
    "joins-and-leaves": (joins_and_leaves, 1),
    "concurrent": (concurrent, 1),
    "concurrent-10-rooms": (concurrent_rooms, 10),
}


def _backend_cpu(database: str) -> float:
    """CPU seconds used so far by the PostgreSQL backends serving `database`."""
    connection = psycopg2.connect(ADMIN_DSN)
    try:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                (database,),
            )
            pids = [pid for (pid,) in cursor.fetchall()]
    finally:
        connection.close()
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone, or another machine
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


async def one_round(
    scenario: Scenario, room_count: int, count: int, bound: int | None
) -> tuple[float, float]:
    """Seconds the scenario took and PostgreSQL CPU seconds it used, on a fresh
    database, after a warm-up of `count` messages (so that rooms start full when
    `bound` < `count`)."""
    name = f"sharechat_bench_{uuid4().hex}"
    await asyncio.to_thread(admin, sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        dsn = ADMIN_DSN.rsplit("/", 1)[0] + f"/{name}"
        await migrate(dsn)
        options: dict[str, Any] = {"pool_max": 10}
        if bound is not None:
            if "room_max_messages" not in inspect.signature(open_postgres_repository).parameters:
                raise SystemExit("--bound: this version has no room_max_messages")
            options["room_max_messages"] = bound
        async with open_postgres_repository(dsn, **options) as repository:
            rooms = []
            for _ in range(room_count):
                room = Room(uuid4(), "Bench Room")
                await repository.create_room(room)
                rooms.append(room.id)
            await scenario(repository, rooms, count)  # warm-up: connections, plans, full rooms
            cpu = await asyncio.to_thread(_backend_cpu, name)
            started = time.perf_counter()
            await scenario(repository, rooms, count)
            elapsed = time.perf_counter() - started
            return elapsed, await asyncio.to_thread(_backend_cpu, name) - cpu
    finally:
        await asyncio.to_thread(
            admin,
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)),
        )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--bound", type=int, default=None, help="room_max_messages")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    args = parser.parse_args()
    for name in args.scenarios.split(","):
        scenario, room_count = SCENARIOS[name]
        rounds = [
            await one_round(scenario, room_count, args.count, args.bound)
            for _ in range(args.rounds)
        ]
        times = [elapsed for elapsed, _ in rounds]
        median = statistics.median(times)
        cpu = statistics.median(cpu for _, cpu in rounds)
        spread = ", ".join(f"{args.count / t:,.0f}" for t in sorted(times, reverse=True))
        print(
            f"{name:20} {args.count / median:8,.0f} msg/s  {median / args.count * 1e6:5.0f} us/msg"
            f"  PostgreSQL CPU {cpu / args.count * 1e6:4.0f} us/msg  (rounds: {spread})"
        )


if __name__ == "__main__":
    asyncio.run(main())
