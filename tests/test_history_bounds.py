"""The bounds on a room's history, on every backend: no answer holds more than
1000 messages, and a busy room keeps `--room-max-messages` at most, the oldest
dropped first."""

from __future__ import annotations

import asyncio
import json
from typing import Any
from uuid import uuid4

import aiohttp
import pytest

from sharechat import domain
from sharechat.memory import MemoryRepository
from sharechat.ports import MAX_NUMBER, MAX_PAGE, Page
from tests.conftest import Chat, StartServer
from tests.helpers import WAIT, new_member, new_room, receive_json

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


async def test_a_busy_room_keeps_only_its_newest_messages(start_server: StartServer) -> None:
    client = await start_server(room_max_messages=50, **UNLIMITED)
    chat = Chat(client)
    async with asyncio.timeout(LONG):
        room = await chat.room()
        alice, joined = await chat.join(room)
        history = [joined, *await say_all(alice, [f"m{n}" for n in range(130)])]
        kept = await chat.history(room)
        assert kept == history[-50:]

        # A cursor at a message dropped from the history is one the room no longer has.
        for dropped in (joined["id"], history[-51]["id"]):
            for cursor in ("before", "after"):
                status, body = await get(chat, f"/api/room/{room}/messages?{cursor}={dropped}")
                assert status == 400, body
                assert set(json.loads(body)) == {"error"}
        oldest = kept[0]["id"]
        assert await chat.history(room, f"?after={oldest}") == kept[1:]
        assert await chat.history(room, f"?before={oldest}") == []

        # Joins count as messages too.
        bob, bob_joined = await chat.join(room)
        assert await chat.history(room) == [*kept[1:], bob_joined]
        await alice.close()
        await bob.close()


# --- the repositories themselves -------------------------------------------------------

# The repositories' own bounds (trimming, numbers, pages of 1000) are part of the
# Repository contract: tests/test_repository_contract.py runs them on every adapter.


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
    # The numbers a page selects between, given its cursor's.
    assert Page().numbers(7) == (0, MAX_NUMBER)
    assert Page(before=uuid4()).numbers(7) == (0, 7)
    assert Page(after=uuid4()).numbers(7) == (7, MAX_NUMBER)


async def test_memory_keeps_nothing_of_what_it_dropped() -> None:
    """Trimming is O(1) a message: no list rebuilt per message, and no trace left."""
    repository = MemoryRepository(room_max_messages=10)
    room = await new_room(repository)
    member = new_member()
    stored = [
        await repository.add_message(domain.chat(room.id, member, f"m{n}")) for n in range(10_000)
    ]
    state = repository._rooms[room.id]
    assert len(state.messages) <= 2 * 10
    assert len(state.number_of) == 10
    assert len(repository._message_rooms) == 10
    assert await repository.list_messages(room.id, Page()) == stored[-10:]
    assert await repository.delete_idle_rooms(0) == [room.id]
    assert repository._message_rooms == {}
