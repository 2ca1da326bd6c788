"""The HTTP layer on the open internet: header and keep-alive timeouts, JSON answers to
malformed requests, and logs that a client can neither flood nor forge.

Timeouts and aiohttp's own error answers belong to the server, not to the app: these
tests run a real `sharechat serve`, talking raw HTTP over sockets.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import struct
import time
from base64 import b64encode
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest

from sharechat.app import create_app
from sharechat.config import Config
from tests.helpers import WAIT, eventually, receive_until
from tests.servers import Server, create_room, get_json, join, running_servers

HEADER_TIMEOUT = 1.0
KEEPALIVE_TIMEOUT = 2.0
LATE = 1.0  # how long after its deadline a connection may still be open
SECURITY_HEADERS = ("content-security-policy", "x-content-type-options", "referrer-policy")
OTHER_CLIENT = "127.0.0.2"  # a second client address, on the same loopback


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    flags = ("--header-timeout", str(HEADER_TIMEOUT), "--keepalive-timeout", str(KEEPALIVE_TIMEOUT))
    async with running_servers(1, {}, *flags) as (server,):
        yield server


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        assert self.headers.get("content-type", "").startswith("application/json"), self
        return json.loads(self.body)


Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def connect(server: Server, local: str | None = None) -> Connection:
    address = urlsplit(server.url)
    async with asyncio.timeout(WAIT):
        return await asyncio.open_connection(
            address.hostname, address.port, local_addr=(local, 0) if local else None
        )


async def exchange(server: Server, raw: bytes) -> Answer:
    """Send `raw` on a fresh connection; the answer, read to the end of the connection."""
    reader, writer = await connect(server)
    try:
        writer.write(raw)
        async with asyncio.timeout(WAIT):
            data = await reader.read()
    finally:
        writer.close()
    return parse(data)


def parse(data: bytes) -> Answer:
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Answer(int(status_line.split()[1]), headers, body)


async def closed_after(reader: asyncio.StreamReader, opened: float) -> float:
    """Seconds from `opened` until the server closed the connection, sending nothing."""
    async with asyncio.timeout(HEADER_TIMEOUT + KEEPALIVE_TIMEOUT + LATE + WAIT):
        assert await reader.read() == b""
    return time.monotonic() - opened


def log_lines(server: Server) -> list[str]:
    return server.output().splitlines()


# -- timeouts ----------------------------------------------------------------------------


async def test_slow_headers_are_cut_while_others_are_served(server: Server) -> None:
    """200 connections that send half a request line are closed after the header
    timeout; another client is served meanwhile."""
    held = []
    for _ in range(200):
        # Before the connect: the server's clock starts at its accept, and this loop
        # may resume later than that on a loaded machine.
        opened = time.monotonic()
        reader, writer = await connect(server)
        writer.write(b"GET /api/hea")
        held.append((reader, writer, opened))

    connector = aiohttp.TCPConnector(local_addr=(OTHER_CLIENT, 0))
    async with aiohttp.ClientSession(connector=connector) as http:
        health = await get_json(http, f"{server.url}/api/healthz")
    assert health["status"] == "ok"

    waits = await asyncio.gather(*(closed_after(reader, opened) for reader, _, opened in held))
    for _, writer, _ in held:
        writer.close()
    assert min(waits) >= HEADER_TIMEOUT - 0.1, waits
    assert max(waits) <= HEADER_TIMEOUT + LATE, waits
    refusals = [line for line in log_lines(server) if "refused slow-headers" in line]
    assert len(refusals) == 1, refusals  # one line a minute, however many connections


async def test_a_connection_that_sends_nothing_is_cut_too(server: Server) -> None:
    reader, writer = await connect(server)
    waited = await closed_after(reader, time.monotonic())
    writer.close()
    assert HEADER_TIMEOUT - 0.1 <= waited <= HEADER_TIMEOUT + LATE


async def test_idle_keepalive_connection_is_closed_after_the_keepalive_timeout(
    server: Server,
) -> None:
    """Between requests the keep-alive timeout applies, not the header timeout; once the
    next request has begun, its headers have the header timeout again."""
    reader, writer = await connect(server)
    writer.write(b"GET /api/healthz HTTP/1.1\r\nHost: sharechat\r\n\r\n")
    async with asyncio.timeout(WAIT):
        await reader.readuntil(b"\r\n\r\n")
        answered = time.monotonic()
        await reader.readuntil(b"}")  # the body: the connection now idles
    waited = await closed_after(reader, answered)
    writer.close()
    assert KEEPALIVE_TIMEOUT - 0.1 <= waited <= KEEPALIVE_TIMEOUT + LATE

    reader, writer = await connect(server)
    writer.write(b"GET /api/healthz HTTP/1.1\r\nHost: sharechat\r\n\r\n")
    async with asyncio.timeout(WAIT):
        await reader.readuntil(b"}")
    writer.write(b"GET /api/hea")
    started = time.monotonic()
    waited = await closed_after(reader, started)
    writer.close()
    assert HEADER_TIMEOUT - 0.1 <= waited <= HEADER_TIMEOUT + LATE


async def test_websockets_outlive_both_timeouts(server: Server) -> None:
    async with aiohttp.ClientSession() as http:
        room = await create_room(http, server)
        ws, _ = await join(http, server, room)
        # An idle keep-alive connection opened now: once it is closed, both timers
        # would have fired for the websocket too.
        reader, writer = await connect(server)
        writer.write(b"GET /api/healthz HTTP/1.1\r\nHost: sharechat\r\n\r\n")
        async with asyncio.timeout(WAIT):
            await reader.readuntil(b"}")
        await closed_after(reader, time.monotonic())
        writer.close()

        await ws.send_str("still here")
        echo, _ = await receive_until(ws, lambda m: m["type"] == "chat")
        assert echo["message"] == "still here"
        await ws.close()


# -- errors are JSON -------------------------------------------------------------------------

MALFORMED = {
    "request line": b"GARBAGE\r\n\r\n",
    "header": b"GET / HTTP/1.1\r\nHost: sharechat\r\nBad Header\r\n\r\n",
    "oversize header": b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 10_000 + b"\r\n\r\n",
    "oversize target": b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: sharechat\r\n\r\n",
    "TLS hello": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(32),
    "content length": b"POST /api/room HTTP/1.1\r\nHost: sharechat\r\nContent-Length: x\r\n\r\n",
}


async def test_malformed_requests_get_json_400_without_a_traceback(server: Server) -> None:
    for what, raw in MALFORMED.items():
        answer = await exchange(server, raw)
        assert answer.status == 400, (what, answer)
        assert set(answer.json()) == {"error"}, (what, answer)
        for header in SECURITY_HEADERS:
            assert header in answer.headers, (what, answer)
    async with aiohttp.ClientSession() as http:  # the server is fine
        assert (await get_json(http, f"{server.url}/api/healthz"))["status"] == "ok"
    lines = log_lines(server)
    assert not [line for line in lines if "Traceback" in line or "ERROR" in line], lines
    refusals = [line for line in lines if "refused bad-request" in line]
    assert len(refusals) == 1, lines  # one line a minute, with the client address
    assert "'127.0.0.1'" in refusals[0]


@pytest.mark.parametrize(
    "path", ["/static/nope.css", "/static/../setup.cfg", "/static/%2e%2e/setup.cfg", "/static/"]
)
async def test_static_misses_are_json_404(server: Server, path: str) -> None:
    answer = await exchange(
        server, f"GET {path} HTTP/1.1\r\nHost: sharechat\r\nConnection: close\r\n\r\n".encode()
    )
    assert answer.status == 404, answer
    assert answer.json() == {"error": "not found"}
    for header in SECURITY_HEADERS:
        assert header in answer.headers, answer


async def test_static_files_are_still_served(server: Server) -> None:
    answer = await exchange(
        server, b"GET /static/app.css HTTP/1.1\r\nHost: sharechat\r\nConnection: close\r\n\r\n"
    )
    assert answer.status == 200
    assert answer.headers["content-type"] == "text/css"
    assert answer.headers["cache-control"] == "no-cache"


# -- logs ------------------------------------------------------------------------------------


async def test_a_path_with_line_breaks_cannot_forge_a_log_line(server: Server) -> None:
    for path in ("/api/room/%0a%0dINFO%20fake", "/%0d%0aINFO%20fake", "/api/%0aINFO%20fake"):
        answer = await exchange(
            server, f"GET {path} HTTP/1.1\r\nHost: sharechat\r\nConnection: close\r\n\r\n".encode()
        )
        assert answer.status == 404
    assert not [line for line in log_lines(server) if line.startswith("INFO fake")]


async def test_a_failing_path_with_line_breaks_is_logged_on_one_line(
    aiohttp_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A path does reach the log when a handler fails: quoted, on one line."""
    app = create_app(Config())

    async def broken(request: Any) -> Any:
        raise ValueError("a bug")

    app.router.add_get(r"/api/broken/{rest:[\s\S]*}", broken)
    client = await aiohttp_client(app)
    with caplog.at_level(logging.ERROR, logger="sharechat.web"):
        response = await client.get("/api/broken/%0a%0dINFO%20fake")
    assert response.status == 500
    assert await response.json() == {"error": "internal error"}
    (record,) = [record for record in caplog.records if record.name == "sharechat.web"]
    line = record.getMessage()
    assert "\n" not in line
    assert "\r" not in line
    assert "INFO fake" in line


def _upgrade_request(room: str) -> bytes:
    key = b64encode(os.urandom(16)).decode()
    return (
        f"GET /api/serve/{room} HTTP/1.1\r\nHost: sharechat\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def _ping_frame() -> bytes:
    payload, mask = b"p" * 125, os.urandom(4)
    masked = bytes(byte ^ mask[index % 4] for index, byte in enumerate(payload))
    return bytes((0x89, 0x80 | len(payload))) + mask + masked


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset, as a client that vanishes does."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def test_resets_and_ping_floods_log_no_traceback(server: Server) -> None:
    async with aiohttp.ClientSession() as http:
        room = await create_room(http, server)
        for _ in range(30):  # gone before the handshake answer can be written
            _, writer = await connect(server)
            writer.write(_upgrade_request(room))
            _reset(writer)
        for _ in range(30):  # gone in the middle of a body
            _, writer = await connect(server)
            writer.write(b"POST /api/room HTTP/1.1\r\nHost: x\r\nContent-Length: 99\r\n\r\nab")
            _reset(writer)

        # A member that floods pings without reading the pongs, then vanishes. From an
        # address of its own: the joins of the upgrades above that the server handled
        # before their reset spent this one's join budget.
        reader, writer = await connect(server, OTHER_CLIENT)
        writer.write(_upgrade_request(room))
        async with asyncio.timeout(WAIT):
            await reader.readuntil(b"\r\n\r\n")
            await reader.readuntil(b'"joined"')

        async def member_count() -> int:
            return len((await get_json(http, f"{server.url}/api/room/{room}"))["members"])

        assert await member_count() == 1
        flood = _ping_frame() * 1000

        async def server_stopped_reading() -> bool:
            # It answers every ping, we read no pong: soon it waits for its socket to
            # drain, and ours fills up. (Or it closes a flooder: fine too.)
            writer.write(flood)
            return (
                writer.transport.is_closing() or writer.transport.get_write_buffer_size() > 1 << 20
            )

        await eventually(server_stopped_reading)
        _reset(writer)

        async def left() -> bool:
            return await member_count() == 0

        await eventually(left)
        assert (await get_json(http, f"{server.url}/api/healthz"))["status"] == "ok"
    lines = log_lines(server)
    assert not [line for line in lines if "Traceback" in line or "ERROR" in line], lines
