"""Small helpers shared by the tests: every wait has a deadline."""

from __future__ import annotations

import asyncio
import json
import re
import socket
from collections.abc import Awaitable, Callable
from typing import Any
from uuid import UUID, uuid4

import aiohttp

from sharechat.config import Config
from sharechat.domain import Member, Room
from sharechat.ports import Page, Repository

WAIT = 5.0  # seconds any single expected event may take
MESSAGE_KEYS = {"id", "roomId", "memberId", "memberName", "type", "message", "sent"}
SENT_FORMAT = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$")
NAME_FORMAT = re.compile(r"^[A-Z][a-z]+ [A-Z][a-z]+$")


async def receive_json(ws: aiohttp.ClientWebSocketResponse, wait: float = WAIT) -> Any:
    async with asyncio.timeout(wait):
        frame = await ws.receive()
    assert frame.type is aiohttp.WSMsgType.TEXT, f"expected a text frame, got {frame!r}"
    return json.loads(frame.data)


async def receive_until(
    ws: aiohttp.ClientWebSocketResponse, wanted: Callable[[Any], bool], wait: float = WAIT
) -> tuple[Any, list[Any]]:
    """Read frames until one is `wanted`; returns it and the frames before it."""
    skipped: list[Any] = []
    async with asyncio.timeout(wait):
        while True:
            message = await receive_json(ws, wait)
            if wanted(message):
                return message, skipped
            skipped.append(message)


async def receive_close(ws: aiohttp.ClientWebSocketResponse, wait: float = WAIT) -> int | None:
    """Drain frames until the server closes; returns the close code."""
    async with asyncio.timeout(wait):
        while True:
            frame = await ws.receive()
            if frame.type in (
                aiohttp.WSMsgType.CLOSE,
                aiohttp.WSMsgType.CLOSED,
                aiohttp.WSMsgType.CLOSING,
                aiohttp.WSMsgType.ERROR,
            ):
                return ws.close_code


async def eventually(check: Callable[[], Awaitable[bool]], wait: float = WAIT) -> None:
    """Poll `check` until it holds; fail after `wait` seconds.

    A deadline, not a fixed sleep: a sleep is too short on a loaded machine and time
    wasted on an idle one.
    """
    async with asyncio.timeout(wait):
        while not await check():
            await asyncio.sleep(0.02)


def suite_config(**overrides: Any) -> Config:
    """The Config of an app the suite drives in-process, with `overrides`.

    One address (127.0.0.1) plays every client of the suite, at machine speed: the
    budgets per address and per connection are off here, and tests/test_budgets.py
    tests each of them against a real `sharechat serve`.
    """
    return Config(
        host="127.0.0.1",
        port=0,
        ip_connection_limit=0,
        ip_rate_limit=0,
        room_create_limit=0,
        frame_budget=0,
        **overrides,
    )


async def new_room(repository: Repository) -> Room:
    room = Room(id=uuid4(), name="Blue Lagoon")
    await repository.create_room(room)
    return room


def new_member(name: str = "Teal Otter") -> Member:
    return Member(id=uuid4(), name=name)


async def texts(repository: Repository, room_id: UUID, page: Page | None = None) -> list[str]:
    """The texts of a room's messages in `repository`, oldest first."""
    return [m.message for m in await repository.list_messages(room_id, page or Page())]


_GIVEN_PORTS: set[int] = set()


def free_port() -> int:
    """A port free now, and never given before in this run: the kernel may hand out
    a port again as soon as the probe closes, and two servers (a cluster's nodes, a
    node's client and bus ports) would then be started on one port."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port not in _GIVEN_PORTS:
            _GIVEN_PORTS.add(port)
            return port


class Recorder:
    """A Peer that keeps what it was sent."""

    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []

    def write_texts(self, texts: Any, /) -> int:
        self.frames.extend(json.loads(text) for text in texts)
        return 0

    async def drain(self) -> None:
        return None

    async def close(self, *, code: int, message: bytes) -> None:
        return None
