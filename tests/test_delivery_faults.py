"""Delivery under faults (issue 11): real instances, backends behind proxies the test breaks.

Each test of the matrix runs tests.faults.run_fault(): two instances, two rooms, two
members per instance per room each sending RATE messages a second; once they chat,
one fault for FAULT seconds (its length is the behaviour under test); RECOVERY
seconds of traffic after it; then the report checks, over every socket and the
history: nothing acknowledged or delivered is missing from the history; no
duplicates; no gap on a socket that stayed open (a socket the server closes comes
back with ?after= and counts as open); every socket in the history's order; no
`left` for a connected member; every send answered; chat flowing again within
RECOVERY seconds of the fault's end. A failure lists the first few violations of
each kind, then a summary of the run (timeline, counts, each socket's members).

Run: pytest tests/test_delivery_faults.py (about 20 s a test; PostgreSQL on
127.0.0.1:5432 and redis-server on PATH, as for the other service tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from uuid import uuid4

import aiohttp
import pytest

from tests.faults import (
    FAULT,
    FaultCluster,
    Scenario,
    TcpProxy,
    fault_cluster,
    run_fault,
    until,
)
from tests.helpers import WAIT
from tests.servers import create_room, join

pytestmark = [pytest.mark.services, pytest.mark.timeout(180)]


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[FaultCluster]:
    async with fault_cluster(tmp_path) as cluster:
        yield cluster


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def test_the_proxy_cuts_refuses_and_freezes() -> None:
    """The harness itself: what each fault does to a connection through the proxy."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(1024):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def exchange(text: bytes) -> bytes:
        writer.write(text)
        async with asyncio.timeout(WAIT):
            return await reader.readexactly(len(text))

    upstream = await asyncio.start_server(echo, "127.0.0.1", 0)
    async with upstream, TcpProxy(upstream.sockets[0].getsockname()[1]) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        assert await exchange(b"one") == b"one"
        with proxy.frozen() as held:
            assert held == 1
            writer.write(b"two")
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.3):  # nothing gets through while frozen
                    await reader.read(1)
        async with asyncio.timeout(WAIT):
            assert await reader.readexactly(3) == b"two"  # held, then delivered
        async with proxy.outage() as cut:
            assert cut == 1
            with contextlib.suppress(ConnectionResetError):  # reset, or at least ended
                async with asyncio.timeout(WAIT):
                    assert await reader.read(1) == b""
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        assert await exchange(b"three") == b"three"
        writer.close()


async def test_calm(cluster: FaultCluster, http: aiohttp.ClientSession) -> None:
    async def nothing() -> None:
        await asyncio.sleep(FAULT)  # as long as the faults last, with no fault

    (await run_fault(cluster, http, "calm", nothing)).check()


async def test_redis_connection_of_one_instance_cut(
    cluster: FaultCluster, http: aiohttp.ClientSession
) -> None:
    proxy = cluster.redis_proxies[0]

    async def cut() -> None:
        async with proxy.outage() as connections:
            assert connections, "instance 0 had no Redis connection to cut"
            await asyncio.sleep(FAULT)  # its connections refused for that long

    (await run_fault(cluster, http, "redis of instance 0 cut", cut)).check()


async def test_redis_connection_of_one_instance_frozen(
    cluster: FaultCluster, http: aiohttp.ClientSession
) -> None:
    proxy = cluster.redis_proxies[0]

    async def freeze() -> None:
        with proxy.frozen() as connections:
            assert connections, "instance 0 had no Redis connection to freeze"
            await asyncio.sleep(FAULT)  # every byte held that long, then released

    (await run_fault(cluster, http, "redis of instance 0 frozen", freeze)).check()


async def test_redis_killed_and_restarted(
    cluster: FaultCluster, http: aiohttp.ClientSession
) -> None:
    async def kill() -> None:
        await asyncio.to_thread(cluster.redis.kill)  # SIGKILL: every subscription forgotten
        await asyncio.sleep(FAULT)  # down that long
        await asyncio.to_thread(cluster.redis.start)

    (await run_fault(cluster, http, "redis killed -9 and restarted", kill)).check()


async def test_postgres_unreachable(cluster: FaultCluster, http: aiohttp.ClientSession) -> None:
    async def unreachable() -> None:
        async with cluster.postgres_proxy.outage() as connections:
            assert connections, "no PostgreSQL connection to cut"
            await asyncio.sleep(FAULT)  # connections reset and refused that long

    (await run_fault(cluster, http, "postgres unreachable", unreachable)).check()


async def test_instance_killed_and_restarted(
    cluster: FaultCluster, http: aiohttp.ClientSession
) -> None:
    """Its members reconnect to it with ?after= and must miss nothing."""
    server = cluster.servers[1]

    async def kill() -> None:
        server.signal(signal.SIGKILL)
        assert await server.wait_exit(within=WAIT) is not None
        await asyncio.sleep(FAULT)  # down that long; its members keep trying to reconnect
        await server.restart()

    (await run_fault(cluster, http, "instance 1 killed -9 and restarted", kill)).check()


BURST = 200  # messages each of the 4 members sends at most, back to back


async def test_resume_while_the_room_is_busy(
    cluster: FaultCluster, http: aiohttp.ClientSession
) -> None:
    """Clients resume with ?after= on both instances while members on both send back to
    back (hundreds of messages in flight); each must get every message after its cursor
    exactly once, in history order, then live ones."""
    async with Scenario(cluster, http, "resume while busy", rooms=1) as scenario:
        await scenario.start()
        (room,) = scenario.rooms
        watcher = scenario.chains[0]
        for chain in scenario.chains:
            await chain.send()
        await scenario.warm_up(echoes=1)
        first_joined, before_burst = watcher.start_id, watcher.last_id
        assert first_joined is not None
        assert before_burst is not None

        def watched(count: int) -> bool:
            return len(watcher.texts) >= len(scenario.chains) + count

        enough = asyncio.Event()
        burst = asyncio.create_task(scenario.burst(BURST, stop=enough))
        resumers = [scenario.resume(room, 0, before_burst)]  # as the burst starts
        for count, server, cursor in ((100, 1, None), (250, 0, first_joined), (400, 1, None)):
            assert await until(functools.partial(watched, count), 3 * WAIT)
            # first_joined: the whole history replayed while the room is busy
            resumers.append(scenario.resume(room, server, cursor or watcher.last_id or ""))
        async with asyncio.timeout(WAIT):
            await resumers[-1].joined.wait()
        enough.set()  # the last one is replaying: the senders may stop
        await burst
        for resumer in resumers:
            async with asyncio.timeout(WAIT):
                await resumer.joined.wait()
            await resumer.send()  # its echo names its member
        (await scenario.finish()).check()


async def test_resume_with_a_bad_cursor_is_refused_before_the_upgrade(
    cluster: FaultCluster, http: aiohttp.ClientSession
) -> None:
    room = await create_room(http, cluster.servers[0])
    other = await create_room(http, cluster.servers[0])
    ws, _ = await join(http, cluster.servers[0], other)
    await ws.send_str("elsewhere")
    async with asyncio.timeout(WAIT):
        elsewhere = await ws.receive_json()
    await ws.close()
    problems = []
    for server in cluster.servers:
        for cursor in ("not-a-uuid", str(uuid4()), elsewhere["id"]):
            url = f"{server.url}/api/serve/{room}?after={cursor}"
            try:
                async with asyncio.timeout(WAIT):
                    upgraded = await http.ws_connect(url)
            except aiohttp.WSServerHandshakeError as error:
                if error.status != 400:
                    problems.append(f"{url}: {error.status}, not 400")
            else:
                problems.append(f"{url}: upgraded, not 400")
                await upgraded.close()
    assert not problems, "\n".join(problems)
