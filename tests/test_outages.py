"""Backend outages are survived: reported, refused cleanly, and recovered from alone."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from sharechat.app import create_app
from sharechat.config import Config
from tests.conftest import Chat
from tests.helpers import WAIT, eventually, receive_json, receive_until
from tests.pg_support import ThrowawayCluster, throwaway_cluster
from tests.redis_support import RedisServer, redis_server, unique_prefix

pytestmark = pytest.mark.services  # real PostgreSQL/Redis: see conftest --backends

OUTAGE_WAIT = 15.0  # detection and recovery involve reconnect backoff


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    with redis_server(tmp_path) as server:
        yield server


@pytest.fixture
async def own_postgres() -> AsyncIterator[ThrowawayCluster]:
    async with throwaway_cluster() as cluster:
        yield cluster


async def health(client: TestClient[Any, Any]) -> tuple[int, dict[str, str]]:
    response = await client.get("/api/healthz")
    body: dict[str, str] = await response.json()
    return response.status, body


async def wait_for_health(client: TestClient[Any, Any], status: int) -> dict[str, str]:
    async def reached() -> bool:
        return (await health(client))[0] == status

    await eventually(reached, wait=OUTAGE_WAIT)
    return (await health(client))[1]


class Chatting(NamedTuple):
    client: TestClient[Any, Any]
    chat: Chat
    room: str
    alice: aiohttp.ClientWebSocketResponse
    bob: aiohttp.ClientWebSocketResponse


async def chatting(aiohttp_client: Any, config: Config) -> Chatting:
    """An app on `config` with a room where alice and bob exchanged "before"."""
    client = await aiohttp_client(create_app(config))
    chat = Chat(client)
    room = await chat.room()
    alice, _ = await chat.join(room)
    bob, _ = await chat.join(room)
    await chat_works(chat, room, alice, bob, "before")
    return Chatting(client, chat, room, alice, bob)


async def chat_works(chat: Chat, room: str, alice: Any, bob: Any, text: str) -> None:
    await alice.send_str(text)
    echo, _ = await receive_until(alice, lambda m: m["type"] == "chat")
    assert echo["message"] == text
    assert (await receive_until(bob, lambda m: m["type"] == "chat"))[0] == echo


async def test_redis_outage_is_survived(
    aiohttp_client: Any, database_url: str, own_redis: RedisServer
) -> None:
    config = Config(database_url=database_url, redis_url=own_redis.url)
    config = dataclasses.replace(config, redis_prefix=unique_prefix("outage"))
    client, chat, room, alice, bob = await chatting(aiohttp_client, config)

    own_redis.kill()
    body = await wait_for_health(client, 503)
    assert body["repository"] == "ok"
    assert body["queue"] != "ok"
    await alice.send_str("into the void")
    failed = await receive_json(alice)
    assert failed["type"] == "failed"
    assert "into the void" not in [m["message"] for m in await chat.history(room)]

    own_redis.start()
    await wait_for_health(client, 200)
    await chat_works(chat, room, alice, bob, "after")
    chats = [m["message"] for m in await chat.history(room) if m["type"] == "chat"]
    assert chats == ["before", "after"]


async def test_postgres_outage_is_survived(
    aiohttp_client: Any, own_postgres: ThrowawayCluster
) -> None:
    config = Config(database_url=own_postgres.dsn, backend_timeout=2.0)
    client, chat, room, alice, bob = await chatting(aiohttp_client, config)

    await own_postgres.stop()
    body = await wait_for_health(client, 503)
    assert body["queue"] == "ok"
    assert body["repository"] != "ok"
    await alice.send_str("not stored")
    failed = await receive_json(alice)
    assert failed["type"] == "failed"
    assert (await client.get(f"/api/room/{room}")).status == 503
    await assert_join_refused(client, room)

    await own_postgres.start()
    await wait_for_health(client, 200)
    await chat_works(chat, room, alice, bob, "after")
    carol, _ = await chat.join(room)
    await chat_works(chat, room, alice, carol, "with carol")
    chats = [m["message"] for m in await chat.history(room) if m["type"] == "chat"]
    assert chats == ["before", "after", "with carol"]


async def assert_join_refused(client: TestClient[Any, Any], room: str) -> None:
    """Upgraded, then closed with 1011 and a reason: what a browser can actually see."""
    ws = await client.ws_connect(f"/api/serve/{room}")
    async with asyncio.timeout(WAIT):
        frame = await ws.receive()
    assert frame.type is aiohttp.WSMsgType.CLOSE
    assert (frame.data, frame.extra) == (1011, "service unavailable, try again")
