"""The Repository port's contract (sharechat/ports.py), run against every adapter.

`memory` is MemoryRepository; `postgres` is PostgresRepository on a database of
its own; `pgbouncer` is the same through PgBouncer in transaction mode, with
prepared statements off, as a hosted PostgreSQL may have it. A new adapter
starts by passing this file. What only one adapter does (group commit, locks,
prepared statements) is tested in that adapter's own file.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from uuid import uuid4

import pytest

from sharechat.domain import Message, MessageNotFound, MessageType, Room, RoomNotFound, chat
from sharechat.memory import MemoryRepository
from sharechat.ports import MAX_PAGE, Page, Repository
from tests.helpers import new_member, new_room, texts
from tests.pg_support import temporary_database
from tests.pgbouncer_support import PgBouncer, pgbouncer

WAIT = 60.0  # the deadline of a whole test body (some store over a thousand messages)

OpenRepository = Callable[[int], AbstractAsyncContextManager[Repository]]

HOSTILE_TEXTS = [
    "'); DROP TABLE messages; --",
    "Robert'); DELETE FROM rooms; --",
    "double \"quotes\", 'single', `back`; semi;colons;",
    "percent %s %(name)s %% and backslash \\ \\x00 \\n",
    "emoji 🦦🏳️‍🌈😀 and CJK extension B 𠜎𠜱𠝹 (4 bytes each) and 中文 and עברית",
    "tabs\tand\nnew\r\nlines",
    " leading and trailing spaces ",
    "long " + "🦦x'" * 100_000,
]


@pytest.fixture(scope="module")
def bouncer() -> Iterator[PgBouncer]:
    with pgbouncer() as started:
        yield started


@pytest.fixture(
    params=[
        "memory",
        pytest.param("postgres", marks=pytest.mark.services),
        pytest.param("pgbouncer", marks=pytest.mark.services),
    ]
)
def adapter(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def open_repository(adapter: str, request: pytest.FixtureRequest) -> OpenRepository:
    """Opens a fresh, empty repository of the adapter with a given room_max_messages."""

    @contextlib.asynccontextmanager
    async def open_it(room_max_messages: int) -> AsyncIterator[Repository]:
        if adapter == "memory":
            yield MemoryRepository(room_max_messages=room_max_messages)
            return
        from sharechat.postgres import open_postgres_repository

        async with temporary_database() as dsn:
            options = {"room_max_messages": room_max_messages, "pool_max": 20}
            if adapter == "pgbouncer":
                dsn = request.getfixturevalue("bouncer").url(dsn)
                options["prepared_statements"] = False
            async with open_postgres_repository(dsn, **options) as repository:  # type: ignore[arg-type]
                yield repository

    return open_it


@pytest.fixture
async def repository(open_repository: OpenRepository) -> AsyncIterator[Repository]:
    """A repository that keeps every message."""
    async with asyncio.timeout(WAIT), open_repository(0) as opened:
        yield opened


# --- rooms and members -----------------------------------------------------------------


async def test_rooms_are_created_and_found(repository: Repository) -> None:
    async with asyncio.timeout(WAIT):
        room = await new_room(repository)
        assert await repository.get_room(room.id) == room
        assert await repository.list_members(room.id) == []
        assert await repository.list_messages(room.id, Page()) == []
        await repository.ping()


async def test_a_missing_room_is_room_not_found(repository: Repository) -> None:
    missing = uuid4()
    async with asyncio.timeout(WAIT):
        message = await repository.add_message(
            chat((await new_room(repository)).id, new_member(), "x")
        )
        for call in (
            repository.get_room(missing),
            repository.list_members(missing),
            repository.list_messages(missing, Page()),
            repository.list_messages(missing, Page(before=message.id)),
            repository.message_number(missing, message.id),
            repository.add_member(missing, new_member(), uuid4()),
            repository.add_message(chat(missing, new_member(), "nowhere")),
        ):
            with pytest.raises(RoomNotFound):
                await call
        assert await repository.remove_member(missing, new_member()) is None
        assert await repository.messages_after(missing, 0, 10) == []
        assert await repository.newest_numbers([missing]) == {}


async def test_add_member_lists_it_and_stores_its_joined(repository: Repository) -> None:
    async with asyncio.timeout(WAIT):
        room = await new_room(repository)
        member = new_member()
        joined = await repository.add_member(room.id, member, uuid4())
        assert (joined.room_id, joined.member_id, joined.member_name) == (
            room.id,
            member.id,
            member.name,
        )
        assert (joined.type, joined.message, joined.number) == (
            MessageType.JOINED,
            "Teal Otter joined",
            1,
        )
        assert joined.sent.utcoffset() is not None
        assert joined.sent.utcoffset().total_seconds() == 0  # type: ignore[union-attr]
        assert await repository.list_members(room.id) == [member]
        assert await repository.list_messages(room.id, Page()) == [joined]


async def test_remove_member_stores_left_once(repository: Repository) -> None:
    async with asyncio.timeout(WAIT):
        room = await new_room(repository)
        stays, leaves = new_member("Red Fox"), new_member()
        await repository.add_member(room.id, stays, uuid4())
        await repository.add_member(room.id, leaves, uuid4())
        assert await repository.list_members(room.id) == [stays, leaves]  # in join order
        left = await repository.remove_member(room.id, leaves)
        assert left is not None
        assert (left.type, left.message, left.member_id, left.member_name) == (
            MessageType.LEFT,
            "Teal Otter left",
            leaves.id,
            leaves.name,
        )
        assert await repository.list_members(room.id) == [stays]
        assert await repository.remove_member(room.id, leaves) is None
        assert await repository.remove_member(room.id, new_member()) is None  # never joined
        assert await repository.remove_member(room.id, stays) is not None
        assert await repository.list_members(room.id) == []
        assert await texts(repository, room.id) == [
            "Red Fox joined",
            "Teal Otter joined",
            "Teal Otter left",
            "Red Fox left",
        ]


async def test_concurrent_joins_and_leaves_each_store_one_message(repository: Repository) -> None:
    async with asyncio.timeout(WAIT):
        room = await new_room(repository)
        crowd = [new_member(f"Member {n}") for n in range(12)]
        joins = await asyncio.gather(*(repository.add_member(room.id, m, uuid4()) for m in crowd))
        assert [m.member_id for m in joins] == [m.id for m in crowd]
        assert sorted(m.id for m in await repository.list_members(room.id)) == sorted(
            m.id for m in crowd
        )
        leaves = await asyncio.gather(*(repository.remove_member(room.id, m) for m in crowd))
        assert [m.member_id for m in leaves if m is not None] == [m.id for m in crowd]
        assert await repository.list_members(room.id) == []
        assert [m.number for m in await repository.list_messages(room.id, Page())] == list(
            range(1, 25)
        )


async def test_reads_and_writes_at_once(repository: Repository) -> None:
    """Many calls in flight together, as an instance under load makes them: each
    read sees the room's state as of some moment, whole."""
    async with asyncio.timeout(WAIT):
        room = await new_room(repository)
        crowd = [new_member(f"Member {n}") for n in range(8)]
        _, listings, histories, found = await asyncio.gather(
            asyncio.gather(
                *(repository.add_member(room.id, member, uuid4()) for member in crowd),
                *(repository.add_message(chat(room.id, crowd[0], f"m{n}")) for n in range(8)),
            ),
            asyncio.gather(*(repository.list_members(room.id) for _ in range(8))),
            asyncio.gather(*(repository.list_messages(room.id, Page()) for _ in range(8))),
            asyncio.gather(*(repository.get_room(room.id) for _ in range(8))),
        )
        for listed in listings:
            assert {m.id for m in listed} <= {m.id for m in crowd}
        for history in histories:
            numbers = [m.number for m in history]
            assert numbers == list(range(1, len(numbers) + 1))
        assert found == [room] * 8
        assert len(await repository.list_messages(room.id, Page())) == 16


# --- messages: storing, order, numbers -------------------------------------------------


async def test_messages_are_numbered_and_kept_in_call_order(repository: Repository) -> None:
    async with asyncio.timeout(WAIT):
        room, other = await new_room(repository), await new_room(repository)
        member = new_member("Zoë Ω")
        first = await repository.add_message(chat(room.id, member, "alone 🦊"))
        assert (first.room_id, first.member_id, first.member_name) == (room.id, member.id, "Zoë Ω")
        assert (first.type, first.message, first.number) == (MessageType.CHAT, "alone 🦊", 1)
        calls = [(room if n % 3 else other, f"m{n}") for n in range(60)]
        stored = await asyncio.gather(
            *(repository.add_message(chat(r.id, member, t)) for r, t in calls)
        )
        assert [m.message for m in stored] == [t for _, t in calls]
        in_room = [m for m in stored if m.room_id == room.id]
        assert [m.number for m in in_room] == list(range(2, len(in_room) + 2))
        history = await repository.list_messages(room.id, Page())
        assert history == [first, *in_room]
        assert [m.sent for m in history] == sorted(m.sent for m in history)
        assert await repository.newest_numbers([room.id, other.id, uuid4()]) == {
            room.id: len(in_room) + 1,
            other.id: len(stored) - len(in_room),
        }


async def test_add_message_to_a_missing_room_fails_only_that_caller(
    repository: Repository,
) -> None:
    async with asyncio.timeout(WAIT):
        room = await new_room(repository)
        member = new_member()
        said = [f"text {i}" for i in range(30)]
        results = await asyncio.gather(
            *(repository.add_message(chat(room.id, member, text)) for text in said[:15]),
            repository.add_message(chat(uuid4(), member, "nowhere")),
            *(repository.add_message(chat(room.id, member, text)) for text in said[15:]),
            return_exceptions=True,
        )
        assert isinstance(results.pop(15), RoomNotFound)
        assert [message.message for message in results] == said  # type: ignore[union-attr]
        assert await texts(repository, room.id) == said


async def test_any_storable_text_round_trips_exactly(repository: Repository) -> None:
    async with asyncio.timeout(WAIT):
        room = await new_room(repository)
        member = new_member("Robert'); DROP TABLE members; --")
        stored = [
            await repository.add_message(chat(room.id, member, text)) for text in HOSTILE_TEXTS
        ]
        assert [message.message for message in stored] == HOSTILE_TEXTS
        assert await repository.list_messages(room.id, Page()) == stored
        joined = await repository.add_member(room.id, member, uuid4())
        assert joined.member_name == member.name
        assert await repository.list_members(room.id) == [member]


# --- paging ----------------------------------------------------------------------------


@pytest.fixture
async def chatty_room(repository: Repository) -> tuple[Room, list[Message]]:
    """A room with the history `m0` .. `m9`, stored one after the other."""
    async with asyncio.timeout(WAIT):
        room = await new_room(repository)
        member = new_member()
        return room, [
            await repository.add_message(chat(room.id, member, f"m{i}")) for i in range(10)
        ]


async def test_history_is_oldest_first_and_limit_keeps_the_newest(
    repository: Repository, chatty_room: tuple[Room, list[Message]]
) -> None:
    room, stored = chatty_room
    async with asyncio.timeout(WAIT):
        assert await repository.list_messages(room.id, Page()) == stored
        assert await texts(repository, room.id, Page(limit=3)) == ["m7", "m8", "m9"]
        assert await texts(repository, room.id, Page(limit=100)) == [f"m{i}" for i in range(10)]


async def test_paging_backward_and_forward_from_a_cursor(
    repository: Repository, chatty_room: tuple[Room, list[Message]]
) -> None:
    room, stored = chatty_room

    async def page(**cursor: object) -> list[str]:
        return await texts(repository, room.id, Page(**cursor))  # type: ignore[arg-type]

    async with asyncio.timeout(WAIT):
        assert await page(before=stored[5].id) == [f"m{i}" for i in range(5)]
        assert await page(before=stored[5].id, limit=2) == ["m3", "m4"]
        assert await page(after=stored[5].id) == ["m6", "m7", "m8", "m9"]
        assert await page(after=stored[5].id, limit=2) == ["m6", "m7"]
        assert await page(after=stored[7].id, limit=50) == ["m8", "m9"]
        assert await page(before=stored[0].id) == []
        assert await page(after=stored[9].id) == []
        assert await page(after=stored[9].id, limit=1) == []


async def test_a_cursor_must_be_a_message_of_the_room(
    repository: Repository, chatty_room: tuple[Room, list[Message]]
) -> None:
    """What the API answers with 400: a cursor the room does not hold."""
    room, _ = chatty_room
    async with asyncio.timeout(WAIT):
        other = await new_room(repository)
        foreign = await repository.add_message(chat(other.id, new_member(), "elsewhere"))
        for message_id in (foreign.id, uuid4()):
            for page in (Page(before=message_id), Page(after=message_id)):
                with pytest.raises(MessageNotFound):
                    await repository.list_messages(room.id, page)
            with pytest.raises(MessageNotFound):
                await repository.message_number(room.id, message_id)


async def test_numbers_find_messages_and_what_follows(
    repository: Repository, chatty_room: tuple[Room, list[Message]]
) -> None:
    room, stored = chatty_room
    async with asyncio.timeout(WAIT):
        assert await repository.message_number(room.id, stored[4].id) == 5
        after = await repository.messages_after(room.id, 5, 3)
        assert after == stored[5:8]
        assert await repository.messages_after(room.id, 8, 100) == stored[8:]
        assert await repository.messages_after(room.id, 10, 100) == []


async def test_a_page_holds_1000_messages_at_most(repository: Repository) -> None:
    async with asyncio.timeout(WAIT):
        room = await new_room(repository)
        member = new_member()
        calls = [repository.add_message(chat(room.id, member, f"m{n}")) for n in range(1200)]
        stored: list[Message] = await asyncio.gather(*calls)
        assert await repository.list_messages(room.id, Page()) == stored[-MAX_PAGE:]
        assert await repository.list_messages(room.id, Page(after=stored[0].id)) == stored[1:1001]
        assert await repository.list_messages(room.id, Page(before=stored[-1].id)) == stored[199:-1]


# --- the bound on a room's history -----------------------------------------------------


async def test_a_room_never_holds_more_than_the_bound(open_repository: OpenRepository) -> None:
    async with asyncio.timeout(WAIT), open_repository(5) as repository:
        room, other = await new_room(repository), await new_room(repository)
        member = new_member()
        for n in range(12):
            await repository.add_message(chat(room.id, member, f"m{n}"))
            assert await texts(repository, room.id) == [
                f"m{i}" for i in range(max(0, n - 4), n + 1)
            ]
        # Concurrent calls: more than the bound of one room at once.
        calls = [(room if n % 3 else other, f"c{n}") for n in range(40)]
        await asyncio.gather(*(repository.add_message(chat(r.id, member, t)) for r, t in calls))
        assert await texts(repository, room.id) == [t for r, t in calls if r is room][-5:]
        assert await texts(repository, other.id) == [t for r, t in calls if r is other][-5:]
        # Joins and leaves are messages of the room like any other.
        await repository.add_member(room.id, member, uuid4())
        await repository.remove_member(room.id, member)
        assert (await texts(repository, room.id))[-2:] == ["Teal Otter joined", "Teal Otter left"]
        assert len(await texts(repository, room.id)) == 5


async def test_cursors_and_numbers_after_trimming(open_repository: OpenRepository) -> None:
    """A message is numbered one above the room's newest, and a store drops those
    numbered `bound` below it or more: cursors at dropped messages are refused, and
    numbers go on without reuse."""
    async with asyncio.timeout(WAIT), open_repository(3) as repository:
        room = await new_room(repository)
        member = new_member()
        stored = [await repository.add_message(chat(room.id, member, f"m{n}")) for n in range(10)]
        assert [m.number for m in stored] == list(range(1, 11))
        assert await texts(repository, room.id) == ["m7", "m8", "m9"]
        assert await texts(repository, room.id, Page(after=stored[7].id)) == ["m8", "m9"]
        assert await texts(repository, room.id, Page(before=stored[9].id, limit=1)) == ["m8"]
        assert await repository.message_number(room.id, stored[8].id) == 9
        after = await repository.messages_after(room.id, 2, 10)
        assert [m.message for m in after] == ["m7", "m8", "m9"]
        assert await repository.newest_numbers([room.id]) == {room.id: 10}
        for gone in (stored[0].id, stored[6].id):
            for page in (Page(before=gone), Page(after=gone)):
                with pytest.raises(MessageNotFound):
                    await repository.list_messages(room.id, page)
            with pytest.raises(MessageNotFound):
                await repository.message_number(room.id, gone)


async def test_a_bound_of_0_keeps_everything(repository: Repository) -> None:
    async with asyncio.timeout(WAIT):
        room = await new_room(repository)
        member = new_member()
        await asyncio.gather(
            *(repository.add_message(chat(room.id, member, f"m{n}")) for n in range(30))
        )
        assert await texts(repository, room.id) == [f"m{n}" for n in range(30)]


# --- expiry and reaping ----------------------------------------------------------------


async def test_idle_rooms_are_deleted_with_everything_in_them(repository: Repository) -> None:
    async with asyncio.timeout(WAIT):
        idle, busy, never_joined = [await new_room(repository) for _ in range(3)]
        member = new_member()
        await repository.add_member(idle.id, member, uuid4())
        said = await repository.add_message(chat(idle.id, member, "soon gone"))
        await repository.remove_member(idle.id, member)
        await repository.add_member(busy.id, new_member(), uuid4())

        assert await repository.delete_idle_rooms(3600) == []
        assert sorted(await repository.delete_idle_rooms(0)) == sorted([idle.id, never_joined.id])

        with pytest.raises(RoomNotFound):
            await repository.get_room(idle.id)
        with pytest.raises(RoomNotFound):
            await repository.list_messages(idle.id, Page(after=said.id))
        assert await repository.messages_after(idle.id, 0, 10) == []
        assert await repository.get_room(busy.id) == busy
        assert await repository.delete_idle_rooms(0) == []


async def test_reaping_takes_only_members_whose_instance_is_gone(
    repository: Repository, adapter: str
) -> None:
    """A repository of one process (memory) has no other instance to outlive: its
    members live and die with it, and it reaps nobody."""
    async with asyncio.timeout(WAIT):
        alive, dead = uuid4(), uuid4()
        await repository.renew_lease(alive, 60)
        await repository.renew_lease(dead, -1)  # a lease that ran out a second ago
        room = await new_room(repository)
        survivor, victim = new_member("Red Fox"), new_member()
        await repository.add_member(room.id, survivor, alive)
        await repository.add_member(room.id, victim, dead)

        reaped = await repository.reap_expired_instances()

        if adapter == "memory":
            assert reaped == []
            return
        assert [(m.member_id, m.type, m.message) for m in reaped] == [
            (victim.id, MessageType.LEFT, "Teal Otter left")
        ]
        assert await repository.list_members(room.id) == [survivor]
        assert (await repository.list_messages(room.id, Page()))[-1] == reaped[0]
        assert await repository.reap_expired_instances() == []
        assert await repository.remove_member(room.id, victim) is None
        await repository.release_lease(alive)
