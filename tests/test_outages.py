"""Backend outages are survived: reported, refused cleanly, and recovered from alone."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.util
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from sharechat.app import create_app
from sharechat.config import Config
from tests.conftest import Chat
from tests.helpers import WAIT, eventually, receive_json, receive_until
from tests.pg_support import ThrowawayCluster, temporary_database, throwaway_cluster
from tests.redis_support import RedisServer, redis_server, unique_prefix
from tests.servers import create_room, join, running_servers

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
    # Stored is never taken back: the room here gets it at once, other instances
    # from the repository once they notice (see test_delivery_faults).
    await chat_works(chat, room, alice, bob, "while redis is away")
    assert "while redis is away" in [m["message"] for m in await chat.history(room)]

    own_redis.start()
    await wait_for_health(client, 200)
    await chat_works(chat, room, alice, bob, "after")
    chats = [m["message"] for m in await chat.history(room) if m["type"] == "chat"]
    assert chats == ["before", "while redis is away", "after"]


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


class GatedProxy:
    """A TCP proxy in front of PostgreSQL that can cut every connection and turn new ones
    away: "refuse" them (nothing listens on its port any more) or "drop" them (accepted,
    then closed at once), as a database host that went away or a crashing pooler does."""

    def __init__(self, upstream_port: int) -> None:
        self._upstream_port = upstream_port
        self._server: asyncio.Server | None = None
        self._pumps: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._dropping = False
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self, how: str) -> None:
        if how == "refuse":
            await self._stop_listening()
        self._dropping = how == "drop"
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()

    async def restore(self) -> None:
        self._dropping = False
        if self._server is None:
            await self.start()  # the same port again

    async def close(self) -> None:
        await self._stop_listening()
        await self.cut("drop")
        for pump in self._pumps:
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)

    async def _stop_listening(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._dropping:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._upstream_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            pump = asyncio.create_task(self._pump(source, sink))
            self._pumps.add(pump)
            pump.add_done_callback(self._pumps.discard)

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.transport.abort()


@contextlib.asynccontextmanager
async def proxied_database() -> AsyncIterator[tuple[str, GatedProxy]]:
    """A fresh database on the shared PostgreSQL, and its URL through a GatedProxy."""
    async with temporary_database(migrated=False) as dsn:
        address = urlsplit(dsn)
        proxy = GatedProxy(address.port or 5432)
        await proxy.start()
        try:
            netloc = address.netloc.replace(f"{address.hostname}:{address.port}", "")
            yield address._replace(netloc=f"{netloc}127.0.0.1:{proxy.port}").geturl(), proxy
        finally:
            await proxy.close()


@pytest.mark.parametrize("outage", ["refuse", "drop"])
async def test_driver_errors_answer_503_and_failed_on_uvloop(outage: str) -> None:
    """Whatever aiopg raises while PostgreSQL is away (on uvloop a connection refused can
    leave a stale poll handle behind, and the next connect raises RuntimeError) is an
    outage, never a crash: healthz 503, a chat message `failed`, no traceback; and once
    PostgreSQL is reachable again, the instance is healthy without a restart."""
    assert importlib.util.find_spec("uvloop"), "sharechat serve runs on uvloop: install it"
    async with (
        proxied_database() as (database_url, proxy),
        running_servers(
            1, {"DATABASE_URL": database_url}, "--backend-timeout", "1"
        ) as (server,),
        aiohttp.ClientSession() as http,
    ):
        room = await create_room(http, server)
        ws, _ = await join(http, server, room)

        await proxy.cut(outage)
        statuses = []
        async with asyncio.timeout(OUTAGE_WAIT):
            # Every probe is a fresh connection attempt: enough of them to reuse descriptors.
            while statuses.count(503) < 20:
                async with http.get(f"{server.url}/api/healthz") as response:
                    statuses.append(response.status)
                    assert response.content_type == "application/json"
        assert set(statuses) <= {200, 503}, statuses
        await ws.send_str("not stored")
        failed, _ = await receive_until(ws, lambda m: m["type"] == "failed", wait=OUTAGE_WAIT)
        assert failed["memberId"]
        async with http.post(f"{server.url}/api/room") as response:
            assert response.status == 503, await response.text()
        assert "Traceback" not in server.output()

        await proxy.restore()
        await server.wait_healthy(time.monotonic() + OUTAGE_WAIT)
        await ws.send_str("stored")
        echo, _ = await receive_until(ws, lambda m: m["type"] == "chat")
        assert echo["message"] == "stored"
        await ws.close()
