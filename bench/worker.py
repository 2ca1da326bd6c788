"""A load-generating process: connects its seats, drives them, reports to the coordinator."""

from __future__ import annotations

import asyncio
import time
import traceback
from collections import defaultdict
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import aiohttp
import orjson
import uvloop

from bench.churn import churn
from bench.member import Member
from bench.plan import Plan, Seat, Tally, Window
from bench.procfs import own_cpu, raise_fd_limit

JOIN_TIMEOUT = 10.0
DRAIN_TIMEOUT = 15.0  # for acks, then for the other members' deliveries
POLL = 0.02


def process_main(conn: Connection, plan: Plan) -> None:
    """Entry point of a load-generating process."""
    raise_fd_limit()
    try:
        uvloop.run(Worker(conn, plan).run())
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        raise


class Worker:
    def __init__(self, conn: Connection, plan: Plan) -> None:
        self.conn = conn
        self.plan = plan
        self.tally = Tally()
        self.members: list[Member] = []
        self.pumps: list[asyncio.Task[None]] = []
        rooms: defaultdict[int, list[int]] = defaultdict(list)
        for idx, room in enumerate(plan.room_of):
            rooms[room].append(idx)
        self.room_members = dict(rooms)

    async def run(self) -> None:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            self.conn.send(("spawned", None))
            await self.recv("connect")
            await self.connect_all(session)
            self.conn.send(("ready", self.tally.connected))
            t0: int = await self.recv("go")
            start = t0 + self.plan.warmup_ns
            window = Window(start, start + self.plan.duration_ns)
            await self.drive(t0, window)
            await until(lambda: all(m.settled for m in self.members), DRAIN_TIMEOUT)
            self.conn.send(("sent", {m.seat.idx: (m.sent, m.failed) for m in self.members}))
            expected: dict[int, int] = await self.recv("expect")
            await until(lambda: self.received_all(expected), DRAIN_TIMEOUT)
            await self.close_all()
        self.conn.send(("result", self.tally))

    async def recv(self, tag: str) -> Any:
        got, payload = await asyncio.to_thread(self.conn.recv)
        if got != tag:
            raise RuntimeError(f"expected {tag!r} from the coordinator, got {got!r}")
        return payload

    async def connect_all(self, session: aiohttp.ClientSession) -> None:
        gate = asyncio.Semaphore(self.plan.concurrency)
        start, cpu = time.monotonic_ns(), own_cpu()
        await asyncio.gather(*(self.connect(session, seat, gate) for seat in self.plan.seats))
        self.tally.connect_span = (start, time.monotonic_ns())
        self.tally.connect_cpu_seconds = own_cpu() - cpu

    async def connect(
        self, session: aiohttp.ClientSession, seat: Seat, gate: asyncio.Semaphore
    ) -> None:
        async with gate:
            try:
                ws = await session.ws_connect(self.plan.serve_url(seat.room, seat.instance))
                first = await ws.receive(timeout=JOIN_TIMEOUT)
                joined = orjson.loads(first.data)
            except (aiohttp.ClientError, ConnectionError, TimeoutError, TypeError, ValueError):
                self.tally.errors += 1
                return
        if joined.get("type") != "joined":
            self.tally.errors += 1
        room_id = self.plan.room_ids[seat.room]
        member = Member(
            seat, ws, joined.get("memberId", ""), room_id, self.plan.room_of, self.tally
        )
        self.members.append(member)
        self.pumps.append(asyncio.create_task(member.pump()))
        self.tally.connected += 1

    async def drive(self, t0: int, window: Window) -> None:
        """Send (or churn) from t0 until the window ends, measuring this process's CPU."""
        for member in self.members:
            member.window = window
        await asyncio.sleep(max(0, t0 - time.monotonic_ns()) / 1e9)
        cpu = own_cpu()
        churners = [
            churn(self.plan.serve_url(0, instance), window, self.tally)
            for instance in self.plan.churners
        ]
        senders = [m.paced(t0) if m.seat.period_ns else m.fill() for m in self.members]
        await asyncio.gather(*senders, *churners)
        await asyncio.sleep(max(0, window.end - time.monotonic_ns()) / 1e9)
        self.tally.cpu_seconds = own_cpu() - cpu

    def received_all(self, expected: dict[int, int]) -> bool:
        """Every member has all it should, or its connection is gone (it never will)."""
        return all(
            m.gone
            or (
                m.received_all(self.room_members[m.seat.room], expected)
                and (m.presence is None or m.presence.unmatched == 0)
            )
            for m in self.members
        )

    async def close_all(self) -> None:
        for member in self.members:
            self.tally.pairs.update(member.counts(self.room_members[member.seat.room]))
            self.tally.sent[member.seat.idx] = (member.sent, member.failed)
            if member.presence is not None:
                self.tally.unmatched_presence += member.presence.unmatched
        await asyncio.gather(*(m.close() for m in self.members), return_exceptions=True)
        await asyncio.gather(*self.pumps, return_exceptions=True)


async def until(done: Callable[[], bool], seconds: float) -> None:
    """Poll: the condition spans every member, no single event marks it."""
    deadline = time.monotonic() + seconds
    while not done() and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(POLL)
