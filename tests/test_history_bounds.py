"""The bounds on a room's history, on every backend: no answer holds more than
1000 messages, and a busy room keeps `--room-max-messages` at most, the oldest
dropped first."""

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

from sharechat.domain import Member, Message, MessageNotFound, Room
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

OpenRepository = Callable[[int], AbstractAsyncContextManager[Repository]]


@pytest.fixture(params=["memory", pytest.param("postgres", marks=pytest.mark.services)])
def open_repository(request: pytest.FixtureRequest) -> OpenRepository:
    """Opens a repository of the parameter's kind with a given room_max_messages."""
    if request.param == "memory":

        @contextlib.asynccontextmanager
        async def memory(room_max_messages: int) -> AsyncIterator[Repository]:
            yield MemoryRepository(room_max_messages=room_max_messages)

        return memory
    from sharechat.postgres import open_postgres_repository

    database_url = request.getfixturevalue("database_url")

    @contextlib.asynccontextmanager
    async def postgres(room_max_messages: int) -> AsyncIterator[Repository]:
        async with open_postgres_repository(
            database_url, room_max_messages=room_max_messages
        ) as repository:
            yield repository

    return postgres


async def new_room(repository: Repository) -> Room:
    room = Room(id=uuid4(), name="Blue Lagoon")
    await repository.create_room(room)
    return room


async def texts(repository: Repository, room: Room, page: Page | None = None) -> list[str]:
    return [m.message for m in await repository.list_messages(room.id, page or Page())]


async def test_a_room_never_holds_more_than_the_bound(open_repository: OpenRepository) -> None:
    async with asyncio.timeout(LONG), open_repository(5) as repository:
        room, other = await new_room(repository), await new_room(repository)
        member = Member(uuid4(), "Teal Otter")
        for n in range(12):
            await repository.add_message(room.id, member, f"m{n}")
            assert await texts(repository, room) == [f"m{i}" for i in range(max(0, n - 4), n + 1)]
        # Concurrent calls go in a few batches; more than the bound of one room in
        # one batch would leave the batch's own oldest behind.
        calls = [(room if n % 3 else other, f"c{n}") for n in range(40)]
        await asyncio.gather(*(repository.add_message(r.id, member, t) for r, t in calls))
        assert await texts(repository, room) == [t for r, t in calls if r is room][-5:]
        assert await texts(repository, other) == [t for r, t in calls if r is other][-5:]
        # Joins and leaves are messages of the room like any other.
        await repository.add_member(room.id, member, uuid4())
        await repository.remove_member(room.id, member)
        assert (await texts(repository, room))[-2:] == ["Teal Otter joined", "Teal Otter left"]
        assert len(await texts(repository, room)) == 5


async def test_cursors_and_numbers_after_trimming(open_repository: OpenRepository) -> None:
    """A message is numbered one above the room's newest, and a store drops those
    numbered `bound` below it or more: cursors at dropped messages are refused, and
    numbers go on without reuse."""
    async with asyncio.timeout(LONG), open_repository(3) as repository:
        room = await new_room(repository)
        member = Member(uuid4(), "Teal Otter")

        async def say(text: str) -> Message:
            return await repository.add_message(room.id, member, text)

        stored = [await say(f"m{n}") for n in range(10)]
        assert [m.number for m in stored] == list(range(1, 11))
        assert await texts(repository, room) == ["m7", "m8", "m9"]
        assert await texts(repository, room, Page(after=stored[7].id)) == ["m8", "m9"]
        assert await texts(repository, room, Page(before=stored[9].id, limit=1)) == ["m8"]
        assert await repository.message_number(room.id, stored[8].id) == 9
        after = await repository.messages_after(room.id, 2, 10)
        assert [m.message for m in after] == ["m7", "m8", "m9"]
        assert await repository.newest_numbers([room.id, uuid4()]) == {room.id: 10}
        for gone in (stored[0].id, stored[6].id, uuid4()):
            for page in (Page(before=gone), Page(after=gone)):
                with pytest.raises(MessageNotFound):
                    await repository.list_messages(room.id, page)
            with pytest.raises(MessageNotFound):
                await repository.message_number(room.id, gone)


async def test_a_bound_of_0_keeps_everything(open_repository: OpenRepository) -> None:
    async with asyncio.timeout(LONG), open_repository(0) as repository:
        room = await new_room(repository)
        member = Member(uuid4(), "Teal Otter")
        await asyncio.gather(*(repository.add_message(room.id, member, f"m{n}") for n in range(30)))
        assert await texts(repository, room) == [f"m{n}" for n in range(30)]


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


async def test_memory_keeps_nothing_of_what_it_dropped() -> None:
    """Trimming is O(1) a message: no list rebuilt per message, and no trace left."""
    repository = MemoryRepository(room_max_messages=10)
    room = await new_room(repository)
    member = Member(uuid4(), "Teal Otter")
    stored = [await repository.add_message(room.id, member, f"m{n}") for n in range(10_000)]
    state = repository._rooms[room.id]
    assert len(state.messages) <= 2 * 10
    assert len(state.number_of) == 10
    assert len(repository._message_rooms) == 10
    assert await repository.list_messages(room.id, Page()) == stored[-10:]
    assert await repository.delete_idle_rooms(0) == [room.id]
    assert repository._message_rooms == {}
