"""The bounds on a room's history, on every backend: no answer holds more than
1000 messages."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any
from uuid import uuid4

import aiohttp
import pytest

from sharechat.domain import Member, Message, Room
from sharechat.memory import MemoryRepository
from sharechat.ports import MAX_PAGE, Page, Repository
from tests.conftest import Chat, StartServer
from tests.helpers import WAIT, receive_json

# Sending fast is the point here: no budget may stand in the way.
UNLIMITED = {"rate_limit": 0, "ip_rate_limit": 0, "frame_budget": 0}
LONG = 60.0  # the deadline of a test that stores a thousand messages and more


async def say_all(ws: aiohttp.ClientWebSocketResponse, texts: list[str]) -> list[dict[str, Any]]:
    """Send the texts, a hundred in flight at most, and return their echoes: the
    room's history from here on, if nobody else talks."""
    echoes = []
    for start in range(0, len(texts), 100):
        window = texts[start : start + 100]
        for text in window:
            await ws.send_str(text)
        for _ in window:
            echo = await receive_json(ws)
            assert echo["type"] == "chat", echo
            echoes.append(echo)
    return echoes


async def get(chat: Chat, path: str) -> tuple[int, bytes]:
    async with asyncio.timeout(WAIT):
        response = await chat.client.get(path)
        return response.status, await response.read()


# --- through the API, on every backend -------------------------------------------------


async def test_no_answer_holds_more_than_1000_messages(start_server: StartServer) -> None:
    size = 64
    client = await start_server(max_message_bytes=size, **UNLIMITED)
    chat = Chat(client)
    # Each message as large as JSON makes it: a control character is six bytes (\u0001).
    texts = [f"{n:04}" + "\x01" * (size - 4) for n in range(1200)]
    async with asyncio.timeout(LONG):
        room = await chat.room()
        ws, joined = await chat.join(room)
        history = [joined, *await say_all(ws, texts)]
        ids = [message["id"] for message in history]

        async def page(query: str) -> list[dict[str, Any]]:
            status, body = await get(chat, f"/api/room/{room}/messages{query}")
            assert status == 200, body
            assert len(body) <= MAX_PAGE * (size * 6 + 300)
            messages: list[dict[str, Any]] = json.loads(body)
            return messages

        assert await page("") == history[-1000:]
        assert await page(f"?before={ids[1100]}") == history[100:1100]
        assert await page(f"?after={ids[100]}") == history[101:1101]
        assert await page(f"?after={ids[0]}&limit=1000") == history[1:1001]
        # A selection of fewer is answered whole.
        assert await page(f"?before={ids[500]}") == history[:500]
        assert await page(f"?after={ids[700]}") == history[701:]
        await ws.close()


# --- the repositories themselves -------------------------------------------------------

OpenRepository = Callable[[int], AbstractAsyncContextManager[Repository]]


@pytest.fixture(params=["memory", pytest.param("postgres", marks=pytest.mark.services)])
def open_repository(request: pytest.FixtureRequest) -> OpenRepository:
    """Opens a repository of the parameter's kind with a given room_max_messages."""
    if request.param == "memory":

        @contextlib.asynccontextmanager
        async def memory(room_max_messages: int) -> AsyncIterator[Repository]:
            yield MemoryRepository()

        return memory
    from sharechat.postgres import open_postgres_repository

    database_url = request.getfixturevalue("database_url")

    @contextlib.asynccontextmanager
    async def postgres(room_max_messages: int) -> AsyncIterator[Repository]:
        async with open_postgres_repository(database_url) as repository:
            yield repository

    return postgres


async def new_room(repository: Repository) -> Room:
    room = Room(id=uuid4(), name="Blue Lagoon")
    await repository.create_room(room)
    return room


async def texts(repository: Repository, room: Room, page: Page | None = None) -> list[str]:
    return [m.message for m in await repository.list_messages(room.id, page or Page())]


async def test_a_page_holds_1000_messages_at_most(open_repository: OpenRepository) -> None:
    async with asyncio.timeout(LONG), open_repository(0) as repository:
        room = await new_room(repository)
        member = Member(uuid4(), "Teal Otter")
        calls = [repository.add_message(room.id, member, f"m{n}") for n in range(1200)]
        stored: list[Message] = await asyncio.gather(*calls)
        assert await repository.list_messages(room.id, Page()) == stored[-1000:]
        assert await repository.list_messages(room.id, Page(after=stored[0].id)) == stored[1:1001]
        assert await repository.list_messages(room.id, Page(before=stored[-1].id)) == stored[199:-1]


def test_a_page_asks_for_one_cursor_and_1_to_1000_messages() -> None:
    for limit in (0, MAX_PAGE + 1):
        with pytest.raises(ValueError, match="1 to 1000"):
            Page(limit=limit)
    with pytest.raises(ValueError, match="one cursor"):
        Page(before=uuid4(), after=uuid4())
    assert Page().limit == MAX_PAGE
    assert Page(after=uuid4()).window(10, 2000) == (10, 1010)
    assert Page(before=uuid4()).window(0, 2000) == (1000, 2000)
    assert Page(limit=5).window(0, 3) == (0, 3)
