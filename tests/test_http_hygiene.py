"""The HTTP layer on the open internet: header and keep-alive timeouts, JSON answers to
malformed requests, and logs that a client can neither flood nor forge.

Timeouts and aiohttp's own error answers belong to the server, not to the app: these
tests run a real `sharechat serve`, talking raw HTTP over sockets.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest

from tests.helpers import WAIT, receive_until
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
        reader, writer = await connect(server)
        opened = time.monotonic()
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


# -- static files -------------------------------------------------------------------------


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
