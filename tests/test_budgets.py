"""Budgets per client, tried as an attacker would against a real `sharechat serve`.

Each test abuses one budget from one address (127.0.0.1) and checks the refusal
and its figure against the bound, while a fresh two-member chat from another
address (127.0.0.2) on the same instance exchanges messages: every one
acknowledged, delivered to both in one order, and in the history.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import time
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.helpers import WAIT, eventually, receive_json, receive_until
from tests.raw_websocket import RawWebSocket
from tests.servers import Server, create_room, join, running_servers

ATTACKER = "127.0.0.1"
VISITOR = "127.0.0.2"
OTHER = "127.0.0.3"


@contextlib.asynccontextmanager
async def serve(*flags: str) -> AsyncIterator[Server]:
    """A `sharechat serve` on the embedded backends (the budgets are the instance's own)."""
    async with running_servers(1, {}, *flags) as (server,):
        yield server


@contextlib.asynccontextmanager
async def client_from(address: str) -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(local_addr=(address, 0), force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:
        yield http


async def history(http: aiohttp.ClientSession, server: Server, room: str) -> list[Any]:
    async with asyncio.timeout(WAIT), http.get(f"{server.url}/api/room/{room}/messages") as r:
        assert r.status == 200
        return list(await r.json())


async def member_ids(http: aiohttp.ClientSession, server: Server, room: str) -> set[str]:
    async with asyncio.timeout(WAIT), http.get(f"{server.url}/api/room/{room}") as r:
        assert r.status == 200
        return {member["id"] for member in (await r.json())["members"]}


async def refused_status(http: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, Any]]:
    """The status and JSON body of a websocket upgrade the server refuses."""
    async with asyncio.timeout(WAIT), http.get(
        url,
        headers={
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version": "13",
        },
    ) as response:
        assert response.status != 101
        assert response.content_type == "application/json"
        return response.status, await response.json()


async def assert_visitors_chat(server: Server, room: str | None = None, count: int = 3) -> None:
    """Two members from VISITOR trade messages: all acknowledged, one order, all stored.

    Two joins and 2 x `count` messages: within the smallest address budget used here.
    """
    async with client_from(VISITOR) as http:
        room = room or await create_room(http, server)
        alice, _ = await join(http, server, room)
        bob, bob_joined = await join(http, server, room)
        await receive_until(alice, lambda m: m["id"] == bob_joined["id"])
        texts = [f"{name} {n}" for n in range(count) for name in ("alice", "bob")]
        for n in range(count):
            await alice.send_str(f"alice {n}")
            await bob.send_str(f"bob {n}")
        seen = []
        for ws in (alice, bob):
            mine = []
            async with asyncio.timeout(3 * WAIT):
                while len(mine) < len(texts):
                    message = await receive_json(ws, 3 * WAIT)
                    assert message["type"] != "failed", message
                    if message["type"] == "chat" and message["message"] in texts:
                        mine.append(message["id"])
            seen.append(mine)
        assert seen[0] == seen[1]  # one order for both, every message acknowledged
        stored = [m["id"] for m in await history(http, server, room) if m["id"] in set(seen[0])]
        assert stored == seen[0]
        await alice.close()
        await bob.close()


def rss_bytes(server: Server) -> int:
    for line in Path(f"/proc/{server.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def test_connections_per_address_are_capped() -> None:
    async with serve("--ip-connection-limit", "5") as server, client_from(ATTACKER) as http:
        room = await create_room(http, server)
        held = [await join(http, server, room) for _ in range(5)]
        status, body = await refused_status(http, f"{server.url}/api/serve/{room}")
        assert status == 429
        assert "too many connections" in body["error"]
        await assert_visitors_chat(server, room)
        # A connection that closes gives its place back.
        await held[0][0].close()
        await eventually(lambda: _joinable(http, server, room))


async def _joinable(
    http: aiohttp.ClientSession, server: Server, room: str, refused: int = 429
) -> bool:
    try:
        ws, _ = await join(http, server, room)
    except aiohttp.WSServerHandshakeError as error:
        status = error.status
    else:
        await ws.close()
        return True
    assert status == refused
    return False


async def test_connections_per_instance_are_capped() -> None:
    async with (
        serve("--max-connections", "7", "--ip-connection-limit", "0") as server,
        client_from(ATTACKER) as attacker,
        client_from(OTHER) as other,
    ):
        room = await create_room(attacker, server)
        held = [await join(attacker, server, room) for _ in range(5)]
        await assert_visitors_chat(server, room)  # 7 at once: within the bound
        # Once the visitors' sockets are gone, two more fit.
        await eventually(lambda: _joinable(other, server, room, refused=503))
        visitors = [await join(other, server, room) for _ in range(2)]
        status, body = await refused_status(other, f"{server.url}/api/serve/{room}")
        assert status == 503
        assert "full" in body["error"]
        for ws, _ in held + visitors:
            await ws.close()


async def test_members_per_room_are_capped() -> None:
    async with (
        serve("--room-member-limit", "3", "--ip-connection-limit", "0") as server,
        client_from(ATTACKER) as http,
    ):
        room = await create_room(http, server)
        held = [await join(http, server, room) for _ in range(3)]
        status, body = await refused_status(http, f"{server.url}/api/serve/{room}")
        assert status == 503
        assert "room is full" in body["error"]
        joined = [m for m in await history(http, server, room) if m["type"] == "joined"]
        assert len(joined) == 3  # the refused join left no trace
        await assert_visitors_chat(server)  # another room of the same instance
        for ws, _ in held:
            await ws.close()


async def test_reconnecting_does_not_refill_the_address_budget() -> None:
    """The attack: {open, send 20, close} in a loop. Joins and messages of one address,
    all its connections together, stay within burst + rate x time."""
    rate, burst = 10, 20
    async with serve(
        "--ip-rate-limit", str(rate), "--rate-burst", str(burst), "--rate-limit", "0"
    ) as server, client_from(ATTACKER) as http:
        room = await create_room(http, server)
        started = time.monotonic()
        refused_joins = 0
        statuses: set[int] = set()
        visitors = None
        while time.monotonic() - started < 2.0:
            try:
                ws, _ = await join(http, server, room)
            except aiohttp.WSServerHandshakeError as refused:
                statuses.add(refused.status)
                refused_joins += 1
                await asyncio.sleep(0.01)
                continue
            for n in range(20):
                await ws.send_str(f"flood {n}")
            await ws.close()
            if visitors is None:  # the abuse goes on meanwhile
                visitors = asyncio.create_task(assert_visitors_chat(server))
        elapsed = time.monotonic() - started
        assert visitors is not None
        await visitors
        stored = await history(http, server, room)
        spent = [m for m in stored if m["type"] in ("joined", "chat")]
        flood = [m for m in stored if m["type"] == "chat"]
        assert len(spent) <= burst + rate * elapsed + 1, (len(spent), elapsed)
        assert flood, "the budget allowed nothing at all"
        assert refused_joins > 0
        assert statuses == {429}


async def test_messages_over_the_address_budget_get_failed() -> None:
    async with serve(
        "--ip-rate-limit", "5", "--rate-burst", "10", "--rate-limit", "0"
    ) as server, client_from(ATTACKER) as http:
        room = await create_room(http, server)
        first, _ = await join(http, server, room)
        await join(http, server, room)  # two joins spent: 8 messages left
        for n in range(10):
            await first.send_str(f"m{n}")
        frames = [await receive_json(first) for _ in range(1 + 10)]  # second's joined + 10
        failed = [f for f in frames if f["type"] == "failed"]
        assert failed
        assert all("too many messages from your address" in f["message"] for f in failed)
        chats = [m for m in await history(http, server, room) if m["type"] == "chat"]
        assert len(chats) <= 8 + 1  # + what 0.1 s of refill may add
        await assert_visitors_chat(server)


async def test_room_creation_per_address_is_capped() -> None:
    async with serve("--room-create-limit", "1", "--room-create-burst", "10") as server:
        async with client_from(ATTACKER) as http:
            statuses = []
            started = time.monotonic()
            for _ in range(40):
                async with asyncio.timeout(WAIT), http.post(f"{server.url}/api/room") as r:
                    statuses.append(r.status)
                    if r.status == 429:
                        assert int(r.headers["Retry-After"]) >= 1
                        assert "rooms" in (await r.json())["error"]
            elapsed = time.monotonic() - started
            assert statuses.count(200) <= 10 + elapsed + 1
            assert statuses.count(429) >= 40 - 10 - elapsed - 1
        await assert_visitors_chat(server)  # its room creation is its own budget


@pytest.mark.parametrize("kind", ["ping", "blank", "binary"])
async def test_frame_flood_closes_with_1008(kind: str) -> None:
    opcode, payload = {"ping": (0x9, b"x"), "blank": (0x1, b" "), "binary": (0x2, b"\0")}[kind]
    async with serve("--frame-budget", "50", "--frame-burst", "100") as server:
        async with client_from(ATTACKER) as http:
            room = await create_room(http, server)
        port = int(server.url.rsplit(":", 1)[1])
        raw = await RawWebSocket.connect("127.0.0.1", port, f"/api/serve/{room}")
        started = time.monotonic()
        for _ in range(300):
            raw.send_frame(opcode, payload)
        await raw.writer.drain()
        assert await raw.read_close_code() == 1008
        assert time.monotonic() - started < WAIT
        await raw.close()
        await assert_visitors_chat(server, room)


async def test_a_frame_over_four_times_the_limit_is_refused_from_its_header() -> None:
    """A header announcing 1 MiB, and then nothing: closed with 1009 at once, nothing held."""
    async with serve("--max-message-bytes", "1000", "--ip-rate-limit", "0") as server:
        async with client_from(ATTACKER) as http:
            room = await create_room(http, server)
        port = int(server.url.rsplit(":", 1)[1])
        raws = []
        for _ in range(20):
            raw = await RawWebSocket.connect("127.0.0.1", port, f"/api/serve/{room}")
            raw.writer.write(struct.pack("!BBQ", 0x81, 0x80 | 127, 1 << 20) + b"mask")
            raws.append(raw)
        for raw in raws:
            assert await raw.read_close_code() == 1009
            await raw.close()
        # 4 x 1000 bytes is still a frame that gets `failed`, not a closed connection.
        raw = await RawWebSocket.connect("127.0.0.1", port, f"/api/serve/{room}")
        await raw.read_frame()  # joined
        raw.send_frame(0x1, b"y" * 4000)
        _, payload = await raw.read_frame()
        assert json.loads(payload)["type"] == "failed"
        await raw.close()
        await assert_visitors_chat(server, room)


async def test_compression_is_not_negotiated_and_a_deflate_bomb_is_refused() -> None:
    async with serve() as server:
        async with client_from(ATTACKER) as http:
            room = await create_room(http, server)
            async with asyncio.timeout(WAIT):
                ws = await http.ws_connect(f"{server.url}/api/serve/{room}", compress=15)
            assert ws.compress == 0  # offered, not accepted
            await ws.close()
        port = int(server.url.rsplit(":", 1)[1])
        raw = await RawWebSocket.connect("127.0.0.1", port, f"/api/serve/{room}")
        await raw.read_frame()  # joined
        bomb = zlib.compressobj(9, zlib.DEFLATED, -15)
        payload = bomb.compress(b"a" * (8 << 20)) + bomb.flush(zlib.Z_SYNC_FLUSH)
        assert len(payload) < 10_000
        mask = b"\0\0\0\0"
        # RSV1 (0x40): "compressed", which nobody agreed on.
        raw.writer.write(struct.pack("!BBH", 0x80 | 0x40 | 0x1, 0x80 | 126, len(payload)))
        raw.writer.write(mask + payload)
        started = time.monotonic()
        assert await raw.read_close_code() == 1002  # protocol error
        assert time.monotonic() - started < 1.0
        await raw.close()
        await assert_visitors_chat(server, room)


async def test_member_that_never_reads_but_sends_pongs_is_dropped() -> None:
    """It never reads (so it cannot fall behind "politely") yet keeps its heartbeat
    alive with unsolicited pongs: its unsent bytes stay under --send-buffer-bytes and
    it is gone within a ping interval of its socket filling up."""
    async with serve(
        "--ping-interval", "1", "--rate-limit", "0", "--ip-rate-limit", "0",
        "--frame-budget", "0", "--max-message-bytes", "60000",
    ) as server, client_from(ATTACKER) as http:
        room = await create_room(http, server)
        port = int(server.url.rsplit(":", 1)[1])
        sloth = await _never_reading_socket(port, room)
        talker, _ = await join(http, server, room)
        joined_frames = await history(http, server, room)
        sloth_id = joined_frames[0]["memberId"]
        baseline = rss_bytes(server)
        pongs = asyncio.create_task(_send_pongs(sloth))
        big = "x" * 50_000
        started = time.monotonic()
        try:
            async with asyncio.timeout(6 * WAIT):
                while sloth_id in await member_ids(http, server, room):
                    await talker.send_str(big)
                    await receive_json(talker)
            took = time.monotonic() - started
        finally:
            pongs.cancel()
        growth = rss_bytes(server) - baseline
        assert took < 10, took
        assert growth < 16 << 20, growth  # 1 MiB of backlog, not the room's whole output
        left = [m for m in await history(http, server, room) if m["type"] == "left"]
        assert [m["memberId"] for m in left] == [sloth_id]
        await talker.close()
        await assert_visitors_chat(server, room)
        sloth.abort()


async def _never_reading_socket(port: int, room: str) -> RawWebSocket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(
        f"GET /api/serve/{room} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    async with asyncio.timeout(WAIT):
        head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    return RawWebSocket(reader, writer)


async def _send_pongs(raw: RawWebSocket) -> None:
    with contextlib.suppress(ConnectionError):
        while True:
            raw.send_frame(0xA, b"")
            await asyncio.sleep(0.2)


async def test_server_log_has_one_line_a_minute_per_kind_of_refusal() -> None:
    async with serve("--room-create-limit", "1", "--room-create-burst", "1") as server:
        async with client_from(ATTACKER) as http:
            for _ in range(200):
                async with asyncio.timeout(WAIT), http.post(f"{server.url}/api/room") as r:
                    assert r.status in (200, 429)
        log_lines = [line for line in server.output().splitlines() if "room-create" in line]
        assert len(log_lines) == 1, log_lines
        assert "'127.0.0.1'" in log_lines[0]


@pytest.mark.parametrize("trusted", [True, False], ids=["behind-a-trusted-proxy", "untrusted"])
async def test_budgets_follow_x_forwarded_for_only_from_a_trusted_proxy(trusted: bool) -> None:
    """Every connection comes from the proxy (127.0.0.1); the clients behind it are
    told apart by X-Forwarded-For, and only when the proxy is trusted."""
    flags = ["--ip-connection-limit", "2"]
    if trusted:
        flags += ["--forwarded-allow-ips", "127.0.0.1"]
    async with serve(*flags) as server, client_from(ATTACKER) as http:
        room = await create_room(http, server)
        url = f"{server.url}/api/serve/{room}"

        async def connect(client: str) -> aiohttp.ClientWebSocketResponse:
            async with asyncio.timeout(WAIT):
                ws = await http.ws_connect(url, headers={"X-Forwarded-For": client})
            assert (await receive_json(ws))["type"] == "joined"
            return ws

        held = [await connect("203.0.113.1"), await connect("203.0.113.1")]
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await connect("203.0.113.1")
        assert refused.value.status == 429
        if trusted:
            held.append(await connect("203.0.113.2"))  # another client: its own budget
        else:
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await connect("203.0.113.2")  # the header is ignored: the same address
            assert refused.value.status == 429
        for ws in held:
            await ws.close()
