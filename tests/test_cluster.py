"""Several real instances sharing one PostgreSQL and one Redis behave as one server."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator
from typing import Any
from uuid import uuid4

import aiohttp
import aiopg
import pytest

from tests.helpers import WAIT, eventually, receive_close, receive_json, receive_until
from tests.pg_support import temporary_database
from tests.redis_support import REDIS_URL
from tests.servers import (
    MANY_CLIENTS_FROM_ONE_ADDRESS,
    Server,
    create_room,
    get_json,
    join,
    running_servers,
)

pytestmark = pytest.mark.services  # real PostgreSQL/Redis: see conftest --backends

Socket = aiohttp.ClientWebSocketResponse


@pytest.fixture
async def cluster_env() -> AsyncIterator[dict[str, str]]:
    async with temporary_database(migrated=False) as database_url:
        yield {
            "DATABASE_URL": database_url,
            "REDIS_URL": REDIS_URL,
            "SHARECHAT_REDIS_PREFIX": f"sharechat-cluster-{uuid4().hex[:12]}:",
            "SHARECHAT_RATE_LIMIT": "0",
            **MANY_CLIENTS_FROM_ONE_ADDRESS,
        }


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def join_all(
    session: aiohttp.ClientSession, servers: list[Server], room: str, count: int
) -> list[tuple[Socket, dict[str, Any]]]:
    """`count` members spread round-robin over the servers, each having seen all later joins."""
    members = [await join(session, servers[n % len(servers)], room) for n in range(count)]
    for index, (ws, _) in enumerate(members):
        for _, later in members[index + 1 :]:
            await receive_until(ws, lambda m, later=later: m["id"] == later["id"])
    return members


async def member_ids(session: aiohttp.ClientSession, server: Server, room: str) -> list[str]:
    body = await get_json(session, f"{server.url}/api/room/{room}")
    return [member["id"] for member in body["members"]]


async def test_members_on_three_instances_share_one_room(
    cluster_env: dict[str, str], session: aiohttp.ClientSession
) -> None:
    async with running_servers(3, cluster_env) as servers:
        room = await create_room(session, servers[0])
        members = await join_all(session, servers, room, 6)

        for round_ in range(5):
            await asyncio.gather(
                *(ws.send_str(f"{n}:{round_}") for n, (ws, _) in enumerate(members))
            )
        sequences = [[(await receive_json(ws))["message"] for _ in range(30)] for ws, _ in members]
        assert all(sequence == sequences[0] for sequence in sequences)
        for n in range(6):
            assert [t for t in sequences[0] if t.startswith(f"{n}:")] == [
                f"{n}:{r}" for r in range(5)
            ]

        lists = [await member_ids(session, server, room) for server in servers]
        assert lists[0] == lists[1] == lists[2]
        assert sorted(lists[0]) == sorted(joined["memberId"] for _, joined in members)


async def test_killed_instance_leaves_no_ghosts(
    cluster_env: dict[str, str], session: aiohttp.ClientSession
) -> None:
    async with running_servers(3, cluster_env) as servers:  # the default lease
        room = await create_room(session, servers[0])
        members = await join_all(session, servers, room, 6)
        doomed = {joined["memberId"] for n, (_, joined) in enumerate(members) if n % 3 == 2}
        survivors = [ws for n, (ws, _) in enumerate(members) if n % 3 != 2]

        killed_at = time.monotonic()
        servers[2].signal(signal.SIGKILL)
        for ws in survivors:
            seen: set[str] = set()
            async with asyncio.timeout(10 - (time.monotonic() - killed_at)):
                while seen != doomed:
                    message = await receive_json(ws, wait=10)
                    if message["type"] == "left":
                        seen.add(message["memberId"])
        for server in servers[:2]:
            assert doomed.isdisjoint(await member_ids(session, server, room))

        await survivors[0].send_str("we carry on")
        for ws in survivors:
            assert (await receive_json(ws))["message"] == "we carry on"


async def test_sigterm_closes_with_1001_and_records_left(
    cluster_env: dict[str, str], session: aiohttp.ClientSession
) -> None:
    async with running_servers(2, cluster_env) as (staying, leaving):
        room = await create_room(session, staying)
        watcher, _ = await join(session, staying, room)
        first, first_joined = await join(session, leaving, room)
        second, second_joined = await join(session, leaving, room)
        await receive_until(watcher, lambda m: m["memberId"] == second_joined["memberId"])

        leaving.signal(signal.SIGTERM)
        assert await receive_close(first) == 1001
        assert await receive_close(second) == 1001
        assert await leaving.wait_exit(within=10) == 0

        gone = {first_joined["memberId"], second_joined["memberId"]}
        seen: set[str] = set()
        while seen != gone:
            message = await receive_until(watcher, lambda m: m["type"] == "left")
            seen.add(message[0]["memberId"])
        history = await get_json(session, f"{staying.url}/api/room/{room}/messages")
        assert {m["memberId"] for m in history if m["type"] == "left"} == gone
        assert gone.isdisjoint(await member_ids(session, staying, room))


async def test_empty_room_expires_on_every_instance(
    cluster_env: dict[str, str], session: aiohttp.ClientSession
) -> None:
    async with running_servers(3, cluster_env, "--room-idle-ttl", "1") as servers:
        room = await create_room(session, servers[0])
        ws, _ = await join(session, servers[1], room)
        await ws.send_str("to be forgotten")
        await receive_json(ws)
        await ws.close()

        async def gone_everywhere() -> bool:
            statuses = []
            for server in servers:
                async with session.get(f"{server.url}/api/room/{room}/messages") as response:
                    statuses.append(response.status)
            return statuses == [404, 404, 404]

        await eventually(gone_everywhere, wait=10)
        for server in servers:
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await session.ws_connect(f"{server.url}/api/serve/{room}")
            assert refused.value.status == 404
        assert await rows_of_room(cluster_env["DATABASE_URL"], room) == (0, 0, 0)


async def rows_of_room(database_url: str, room: str) -> tuple[int, int, int]:
    async with aiopg.connect(database_url) as connection, connection.cursor() as cursor:
        counts = []
        for query in (
            "SELECT count(*) FROM rooms WHERE id = %(room)s",
            "SELECT count(*) FROM members WHERE room_id = %(room)s",
            "SELECT count(*) FROM messages WHERE room_id = %(room)s",
        ):
            await cursor.execute(query, {"room": room})
            (count,) = await cursor.fetchone()
            counts.append(count)
        return counts[0], counts[1], counts[2]


async def test_burst_reaches_100_members_on_three_instances(
    cluster_env: dict[str, str], session: aiohttp.ClientSession
) -> None:
    async with running_servers(3, cluster_env) as servers:
        room = await create_room(session, servers[0])
        members = [await join(session, servers[n % 3], room) for n in range(100)]
        last = members[-1][1]["id"]
        for ws, _ in members[:-1]:
            await receive_until(ws, lambda m: m["id"] == last, wait=3 * WAIT)

        senders, per_sender = members[:10], 10
        await asyncio.gather(
            *(
                ws.send_str(json.dumps([n, k]))
                for k in range(per_sender)
                for n, (ws, _) in enumerate(senders)
            )
        )
        expected = len(senders) * per_sender
        received = [
            [(await receive_json(ws, wait=3 * WAIT))["message"] for _ in range(expected)]
            for ws, _ in members
        ]
        assert all(sequence == received[0] for sequence in received)
        assert sorted(received[0]) == sorted(
            json.dumps([n, k]) for n in range(len(senders)) for k in range(per_sender)
        )
        for ws, _ in members:
            await ws.close()


async def test_history_survives_a_restart(
    cluster_env: dict[str, str], session: aiohttp.ClientSession
) -> None:
    env = {"DATABASE_URL": cluster_env["DATABASE_URL"]}  # one instance: no Redis
    async with running_servers(1, env) as (server,):
        room = await create_room(session, server)
        ws, _ = await join(session, server, room)
        for text in ("one", "two", "three"):
            await ws.send_str(text)
            await receive_json(ws)
        await ws.close()
        history = f"{server.url}/api/room/{room}/messages"

        async def member_left() -> bool:
            return (await get_json(session, history))[-1]["type"] == "left"

        await eventually(member_left)  # the leave is recorded once the close is seen
        before = await get_json(session, history)
        server.signal(signal.SIGTERM)
        assert await server.wait_exit(within=10) == 0
    async with running_servers(1, env) as (server,):
        after = await get_json(session, f"{server.url}/api/room/{room}/messages")
    assert after == before
    assert [m["message"] for m in after if m["type"] == "chat"] == ["one", "two", "three"]
