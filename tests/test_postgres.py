"""What only the PostgreSQL repository does, against a real server: migrations, the
schema, group commit, locks, prepared statements, reaping across instances, outages.
Each test gets a database of its own. The Repository contract that every adapter
honours is tested in test_repository_contract.py."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from uuid import UUID, uuid4

import aiopg
import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from sharechat.domain import (
    BackendUnavailable,
    InDoubt,
    Member,
    Message,
    MessageType,
    Room,
    RoomNotFound,
    chat,
)
from sharechat.migrations import MigrationError, default_sql_dir, migrate
from sharechat.ports import Page
from sharechat.postgres import PostgresRepository, open_postgres_repository
from sharechat.statements import instances, members, messages, metadata, rooms
from sharechat.write_statements import PREPARED
from tests.faults import TcpProxy, with_port
from tests.helpers import eventually, new_member, new_room, texts
from tests.pg_support import temporary_database, throwaway_cluster

pytestmark = pytest.mark.services  # real PostgreSQL/Redis: see conftest --backends

WAIT = 20.0  # the deadline of a whole test body
PROMPT = 5.0  # how long a call may take to fail when PostgreSQL is away
DIALECT = postgresql.psycopg2.dialect()  # type: ignore[no-untyped-call]


@pytest.fixture
async def dsn() -> AsyncIterator[str]:
    async with temporary_database() as dsn:
        yield dsn


@pytest.fixture
async def repository(dsn: str) -> AsyncIterator[PostgresRepository]:
    async with contextlib.AsyncExitStack() as stack:
        async with asyncio.timeout(WAIT):
            repository = await stack.enter_async_context(open_postgres_repository(dsn, pool_max=20))
        yield repository
        async with asyncio.timeout(WAIT):
            await stack.aclose()


async def query(dsn: str, statement: sa.ClauseElement) -> list[Any]:
    """Rows of an ad-hoc Core statement, on a connection of its own."""
    # render_postcompile: an IN list's parameters are known only now.
    compiled = statement.compile(dialect=DIALECT, compile_kwargs={"render_postcompile": True})
    async with (
        asyncio.timeout(WAIT),
        aiopg.connect(dsn, enable_hstore=False) as connection,
        connection.cursor() as cursor,
    ):
        await cursor.execute(str(compiled), compiled.params)
        return await cursor.fetchall() if cursor.description else []


@contextlib.asynccontextmanager
async def pooled_cursor(repository: PostgresRepository) -> AsyncIterator[aiopg.Cursor]:
    """A cursor on a connection of the repository's own pool."""
    async with (
        repository._connections.pool.acquire() as connection,
        connection.cursor() as cursor,
    ):
        yield cursor


async def emptied_at(dsn: str, room_id: UUID) -> Any:
    [(moment,)] = await query(dsn, sa.select(rooms.c.emptied_at).where(rooms.c.id == room_id))
    return moment


# --- schema and migrations -------------------------------------------------------------


def _reflect(dsn: str) -> sa.MetaData:
    engine = sa.create_engine(dsn.replace("postgresql://", "postgresql+psycopg2://", 1))
    try:
        reflected = sa.MetaData()
        reflected.reflect(bind=engine)
        return reflected
    finally:
        engine.dispose()


def _describe(table: sa.Table) -> dict[str, Any]:
    """What must agree between the Core tables and the migrated database."""
    return {
        "columns": {
            column.name: (
                str(column.type.compile(dialect=DIALECT)),
                getattr(column.type, "enums", None),
                column.nullable,
                column.primary_key,
                column.identity is not None and column.identity.always,
            )
            for column in table.columns
        },
        "foreign_keys": {
            (fk.parent.name, fk.target_fullname, fk.ondelete) for fk in table.foreign_keys
        },
        "indexes": {
            (
                index.name,
                tuple(column.name for column in index.columns),
                index.unique,
                index.dialect_options["postgresql"]["where"] is not None,
            )
            for index in table.indexes
        },
    }


async def test_core_tables_match_the_migrated_schema(dsn: str) -> None:
    async with asyncio.timeout(WAIT):
        reflected = await asyncio.to_thread(_reflect, dsn)
    assert set(reflected.tables) == {*metadata.tables, "schema_migrations"}
    for name, table in metadata.tables.items():
        assert _describe(reflected.tables[name]) == _describe(table), name


async def test_migrate_applies_each_file_once_in_order(tmp_path: Path) -> None:
    (tmp_path / "001_first.sql").write_text("CREATE TABLE first (id int);")
    (tmp_path / "002_second.sql").write_text("INSERT INTO first VALUES (1), (2);")
    async with asyncio.timeout(WAIT), temporary_database(migrated=False) as dsn:
        assert await migrate(dsn, tmp_path) == ["001_first.sql", "002_second.sql"]
        assert await migrate(dsn, tmp_path) == []
        (tmp_path / "003_third.sql").write_text("INSERT INTO first VALUES (3);")
        assert await migrate(dsn, tmp_path) == ["003_third.sql"]
        first = sa.table("first", sa.column("id"))
        assert await query(dsn, sa.select(sa.func.count()).select_from(first)) == [(3,)]


async def test_concurrent_migrations_apply_each_file_once() -> None:
    expected = sorted(path.name for path in default_sql_dir().glob("*.sql"))
    async with asyncio.timeout(WAIT), temporary_database(migrated=False) as dsn:
        applied = await asyncio.gather(*(migrate(dsn) for _ in range(5)))
        assert sorted(name for names in applied for name in names) == expected
        recorded = sa.table("schema_migrations", sa.column("name"))
        assert sorted(name for (name,) in await query(dsn, sa.select(recorded.c.name))) == expected


async def test_message_numbers_are_given_to_the_existing_history(tmp_path: Path) -> None:
    """002 numbers the messages stored before it, room by room, in `seq` order."""
    (tmp_path / "001_schema.sql").write_text((default_sql_dir() / "001_schema.sql").read_text())
    async with asyncio.timeout(WAIT), temporary_database(migrated=False) as dsn:
        await migrate(dsn, tmp_path)
        old = sa.table(
            "messages",
            *(sa.column(name) for name in ("id", "room_id", "member_id", "member_name")),
            *(sa.column(name) for name in ("type", "message", "sent")),
        )
        room_ids = [uuid4(), uuid4()]
        for room_id in room_ids:
            values = {"id": room_id, "name": "Blue Lagoon", "created": sa.func.now()}
            await query(dsn, sa.insert(rooms).values(values))
        order = [(room_ids[n % 2], uuid4(), f"m{n}") for n in range(7)]
        for room_id, message_id, text in order:
            row = {"id": message_id, "room_id": room_id, "member_id": uuid4()}
            row |= {"member_name": "Teal Otter", "type": "chat", "message": text}
            await query(dsn, sa.insert(old).values({**row, "sent": sa.func.now()}))

        assert await migrate(dsn) == sorted(p.name for p in default_sql_dir().glob("*.sql"))[1:]
        numbered = sa.select(messages.c.room_id, messages.c.message, messages.c.number)
        rows = await query(dsn, numbered.order_by(messages.c.seq))
        assert rows == [
            (room_ids[0], "m0", 1),
            (room_ids[1], "m1", 1),
            (room_ids[0], "m2", 2),
            (room_ids[1], "m3", 2),
            (room_ids[0], "m4", 3),
            (room_ids[1], "m5", 3),
            (room_ids[0], "m6", 4),
        ]
        async with open_postgres_repository(dsn) as repository:
            stored = await repository.add_message(chat(room_ids[1], new_member(), "m7"))
        number_of_stored = sa.select(messages.c.number).where(messages.c.id == stored.id)
        assert await query(dsn, number_of_stored) == [(4,)]


async def test_a_failing_migration_is_rolled_back_and_named(tmp_path: Path) -> None:
    (tmp_path / "001_good.sql").write_text("CREATE TABLE good (id int);")
    (tmp_path / "002_bad.sql").write_text("CREATE TABLE half (id int); SELECT no_such_column;")
    async with asyncio.timeout(WAIT), temporary_database(migrated=False) as dsn:
        with pytest.raises(MigrationError, match=r"^002_bad\.sql: "):
            await migrate(dsn, tmp_path)
        tables = sa.table("pg_tables", sa.column("tablename"), sa.column("schemaname"))
        names = {name for (name,) in await query(dsn, sa.select(tables.c.tablename))}
        assert "good" in names
        assert "half" not in names
        (tmp_path / "002_bad.sql").write_text("CREATE TABLE half (id int);")
        assert await migrate(dsn, tmp_path) == ["002_bad.sql"]


async def test_migrate_without_a_server_raises_backend_unavailable() -> None:
    async with asyncio.timeout(WAIT), throwaway_cluster() as cluster:
        await cluster.stop()
        await expect_unavailable(migrate(cluster.dsn))


# --- rooms and members -----------------------------------------------------------------


async def test_a_room_is_marked_empty_when_its_last_member_leaves(
    repository: PostgresRepository, dsn: str
) -> None:
    """`emptied_at`, which the idle-room sweep reads: set from birth, cleared by a
    join, set again by the last one out."""
    async with asyncio.timeout(WAIT):
        room = await new_room(repository)
        assert await emptied_at(dsn, room.id) is not None
        stays, leaves = new_member("Red Fox"), new_member()
        await repository.add_member(room.id, stays, uuid4())
        assert await emptied_at(dsn, room.id) is None
        await repository.add_member(room.id, leaves, uuid4())
        await repository.remove_member(room.id, leaves)
        assert await emptied_at(dsn, room.id) is None
        await repository.remove_member(room.id, leaves)  # gone already: nothing changes
        assert await emptied_at(dsn, room.id) is None
        left = await repository.remove_member(room.id, stays)
        assert left is not None
        assert await emptied_at(dsn, room.id) >= left.sent


async def test_the_last_of_many_concurrent_leavers_marks_the_room_empty(
    repository: PostgresRepository, dsn: str
) -> None:
    async with asyncio.timeout(WAIT):
        for _ in range(5):
            room = await new_room(repository)
            crowd = [new_member() for _ in range(12)]
            await asyncio.gather(*(repository.add_member(room.id, m, uuid4()) for m in crowd))
            assert await emptied_at(dsn, room.id) is None
            left = await asyncio.gather(*(repository.remove_member(room.id, m) for m in crowd))
            assert all(message is not None for message in left)
            assert await emptied_at(dsn, room.id) is not None


# --- group commit of joins and leaves --------------------------------------------------


async def transactions(dsn: str, message_ids: list[UUID]) -> int:
    """How many transactions stored these messages (each row's xmin names its own)."""
    xmin = sa.func.count(sa.distinct(sa.cast(sa.literal_column("xmin"), sa.Text)))
    where = messages.c.id.in_(message_ids)
    [(count,)] = await query(dsn, sa.select(xmin).select_from(messages).where(where))
    return int(count)


@contextlib.asynccontextmanager
async def room_locked_elsewhere(
    dsn: str, room_id: UUID, *, key_share: bool = False
) -> AsyncIterator[None]:
    """The room's row locked by a transaction of another connection, until the block ends:
    FOR UPDATE, or with `key_share` FOR NO KEY UPDATE, as our own writers lock rooms."""
    lock = sa.select(rooms.c.id).where(rooms.c.id == room_id).with_for_update(key_share=key_share)
    compiled = lock.compile(dialect=DIALECT)
    async with (
        aiopg.connect(dsn, enable_hstore=False) as blocker,
        blocker.cursor() as cursor,
        cursor.begin(),
    ):
        await cursor.execute(str(compiled), compiled.params)
        yield


@contextlib.asynccontextmanager
async def writer_held_up(repository: PostgresRepository, dsn: str) -> AsyncIterator[None]:
    """Inside, the writer is stuck on a batch of its own (a join to a room locked
    elsewhere): calls started meanwhile queue up, and go in one batch on the way out."""
    spare = await new_room(repository)
    async with room_locked_elsewhere(dsn, spare.id):
        stuck = asyncio.create_task(repository.add_member(spare.id, new_member(), uuid4()))
        await backend_waiting_for_a_lock(dsn)
        yield
        await asyncio.sleep(0)  # the calls started inside take their first step: they queue
    await stuck


async def test_group_commit_applies_concurrent_joins_and_leaves_in_few_transactions(
    repository: PostgresRepository, dsn: str
) -> None:
    async with asyncio.timeout(WAIT):
        room_list = [await new_room(repository) for _ in range(4)]
        crowd = [(room_list[i % 4], new_member(f"Member {i}")) for i in range(100)]
        stayers = {member.id for _, member in crowd[3::4][:10]}  # ten stay in the last room
        strangers = [(room_list[i % 4], new_member()) for i in range(10)]  # never joined

        async def visit(room: Room, member: Member) -> tuple[Message, Message | None]:
            joined = await repository.add_member(room.id, member, uuid4())
            if member.id in stayers:
                return joined, None
            return joined, await repository.remove_member(room.id, member)

        # 200 calls: 100 joins, 90 leaves, 10 leaves of members who never joined.
        visits, nobodies = await asyncio.gather(
            asyncio.gather(*(visit(room, member) for room, member in crowd)),
            asyncio.gather(*(repository.remove_member(r.id, m) for r, m in strangers)),
        )

        assert nobodies == [None] * 10
        stored: list[Message] = []
        for (room, member), (joined, left) in zip(crowd, visits, strict=True):
            assert (joined.room_id, joined.member_id, joined.type, joined.message) == (
                room.id,
                member.id,
                MessageType.JOINED,
                f"{member.name} joined",
            )
            stored.append(joined)
            if member.id in stayers:
                assert left is None
                continue
            assert left is not None
            assert (left.room_id, left.member_id, left.type, left.message) == (
                room.id,
                member.id,
                MessageType.LEFT,
                f"{member.name} left",
            )
            stored.append(left)
        assert await transactions(dsn, [message.id for message in stored]) < 50

        in_rooms = await query(dsn, sa.select(members.c.id, members.c.room_id))
        assert sorted(in_rooms) == sorted((member_id, room_list[3].id) for member_id in stayers)
        for room in room_list:
            saved = await repository.list_messages(room.id, Page())
            assert sorted(saved, key=by_id) == sorted(
                (m for m in stored if m.room_id == room.id), key=by_id
            )
            assert [m.sent for m in saved] == sorted(m.sent for m in saved)
            order = {(m.member_id, m.type): index for index, m in enumerate(saved)}
            for member_id, kind in order:
                if kind is MessageType.LEFT:
                    assert order[member_id, MessageType.JOINED] < order[member_id, kind]
            if room is room_list[3]:
                assert await emptied_at(dsn, room.id) is None
            else:  # set by the last one out, after its `left`
                assert await emptied_at(dsn, room.id) >= saved[-1].sent


def by_id(message: Message) -> UUID:
    return message.id


async def test_one_batch_keeps_the_call_order_and_the_rooms_emptiness(
    repository: PostgresRepository, dsn: str
) -> None:
    async with asyncio.timeout(WAIT):
        filled, staying, emptied = [await new_room(repository) for _ in range(3)]
        old_fox, old_owl = new_member("Old Fox"), new_member("Old Owl")
        await repository.add_member(staying.id, old_fox, uuid4())
        await repository.add_member(emptied.id, old_owl, uuid4())
        ant, bee = new_member("Red Ant"), new_member("Busy Bee")
        async with writer_held_up(repository, dsn):
            calls = asyncio.gather(
                repository.add_member(filled.id, ant, uuid4()),
                repository.add_message(chat(filled.id, ant, "hi")),
                repository.remove_member(staying.id, old_fox),
                repository.add_member(staying.id, bee, uuid4()),
                repository.remove_member(emptied.id, old_owl),
                repository.add_message(chat(staying.id, bee, "hello")),
            )
        results = await calls

        assert all(message is not None for message in results)
        stored = [message.id for message in results if message is not None]
        assert await transactions(dsn, stored) == 1
        in_seq_order = sa.select(messages.c.id).where(messages.c.id.in_(stored))
        assert [i for (i,) in await query(dsn, in_seq_order.order_by(messages.c.seq))] == stored
        assert await texts(repository, filled.id) == ["Red Ant joined", "hi"]
        assert await texts(repository, staying.id) == [
            "Old Fox joined",
            "Old Fox left",
            "Busy Bee joined",
            "hello",
        ]
        assert await repository.list_members(staying.id) == [bee]
        assert await repository.list_members(emptied.id) == []
        assert await emptied_at(dsn, filled.id) is None
        assert await emptied_at(dsn, staying.id) is None
        assert await emptied_at(dsn, emptied.id) >= results[4].sent  # type: ignore[union-attr]


async def test_a_member_joining_and_leaving_at_once_joins_then_leaves(
    repository: PostgresRepository, dsn: str
) -> None:
    async with asyncio.timeout(WAIT):
        room = await new_room(repository)
        member = new_member()
        async with writer_held_up(repository, dsn):
            calls = asyncio.gather(
                repository.add_member(room.id, member, uuid4()),
                repository.remove_member(room.id, member),
            )
        joined, left = await calls

        assert left is not None
        assert await texts(repository, room.id) == ["Teal Otter joined", "Teal Otter left"]
        assert await repository.list_members(room.id) == []
        assert await emptied_at(dsn, room.id) >= left.sent
        # A batch changes a member once at most: the leave waited for the next one.
        assert await transactions(dsn, [joined.id, left.id]) == 2


async def test_a_batch_with_a_deleted_room_fails_only_that_rooms_callers(
    repository: PostgresRepository, dsn: str
) -> None:
    async with asyncio.timeout(WAIT):
        live, doomed = await new_room(repository), await new_room(repository)
        resident, newcomer, ghost = new_member("Red Fox"), new_member(), new_member("Grey Owl")
        stranger = new_member("Lost Lamb")  # never joined: its leave has nothing to remove
        await repository.add_member(live.id, resident, uuid4())
        async with writer_held_up(repository, dsn):
            calls = asyncio.gather(
                repository.add_member(doomed.id, ghost, uuid4()),
                repository.add_member(live.id, newcomer, uuid4()),
                repository.add_message(chat(doomed.id, ghost, "anyone?")),
                repository.add_message(chat(live.id, resident, "welcome")),
                repository.remove_member(doomed.id, stranger),
                repository.remove_member(live.id, resident),
                return_exceptions=True,
            )
            await asyncio.sleep(0)  # queued behind the held-up batch, then the room goes
            assert doomed.id in await repository.delete_idle_rooms(0)
        results = await calls

        assert isinstance(results[0], RoomNotFound)
        assert isinstance(results[2], RoomNotFound)
        assert results[4] is None
        kept = [results[1], results[3], results[5]]
        assert [m.message for m in kept] == [  # type: ignore[union-attr]
            "Teal Otter joined",
            "welcome",
            "Red Fox left",
        ]
        assert await transactions(dsn, [m.id for m in kept]) == 1  # type: ignore[union-attr]
        assert await texts(repository, live.id) == [
            "Red Fox joined",
            "Teal Otter joined",
            "welcome",
            "Red Fox left",
        ]
        assert await repository.list_members(live.id) == [newcomer]
        assert await query(dsn, sa.select(members.c.id).where(members.c.id == ghost.id)) == []


async def test_a_join_cancelled_in_flight_leaves_at_once(
    repository: PostgresRepository, dsn: str
) -> None:
    async with asyncio.timeout(WAIT):
        room = await new_room(repository)
        async with room_locked_elsewhere(dsn, room.id):
            joining = asyncio.create_task(
                repository.add_member(room.id, new_member("Teal Otter"), uuid4())
            )
            await backend_waiting_for_a_lock(dsn)  # its batch is under way
            joining.cancel()
            with pytest.raises(asyncio.CancelledError):
                await joining
        await repository.drain()

        # Nobody would ever remove that member: it leaves, and nothing stored is taken
        # back (the room gets both messages from the repository; numbers never repeat).
        assert await repository.list_members(room.id) == []
        assert await texts(repository, room.id) == ["Teal Otter joined", "Teal Otter left"]
        assert await emptied_at(dsn, room.id) is not None
        joined = await repository.add_member(room.id, new_member("Red Fox"), uuid4())
        assert joined.number == 3


# --- the bound on a room's history ----------------------------------------------------


async def numbers_by_room(dsn: str) -> dict[UUID, list[int]]:
    rows = await query(
        dsn, sa.select(messages.c.room_id, messages.c.number).order_by(messages.c.number)
    )
    found: dict[UUID, list[int]] = {}
    for room_id, number in rows:
        found.setdefault(room_id, []).append(number)
    return found


async def test_rooms_keep_the_bound_exactly_under_concurrent_writers(dsn: str) -> None:
    """Two instances store into the same rooms at once, joins and leaves among the
    chat: no room is ever seen over the bound, and each ends with exactly its newest."""
    bound = 20
    async with (
        asyncio.timeout(WAIT * 2),
        open_postgres_repository(dsn, room_max_messages=bound) as one,
        open_postgres_repository(dsn, room_max_messages=bound) as two,
    ):
        room_list = [await new_room(one) for _ in range(4)]
        writing = True

        async def watch() -> int:
            looks = 0
            while writing:
                for room_id, numbers in (await numbers_by_room(dsn)).items():
                    assert len(numbers) <= bound, (room_id, len(numbers))
                looks += 1
            return looks

        async def visit(repository: PostgresRepository, n: int) -> list[Message | None]:
            room, member = room_list[n % 4], new_member(f"Member {n}")
            stored: list[Message | None] = [await repository.add_member(room.id, member, uuid4())]
            for i in range(n % 7):
                stored.append(await repository.add_message(chat(room.id, member, f"{n}.{i}")))
            stored.append(await repository.remove_member(room.id, member))
            return stored

        watcher = asyncio.create_task(watch())
        try:
            visits = await asyncio.gather(
                *(visit(one, n) for n in range(0, 80, 2)),
                *(visit(two, n) for n in range(1, 80, 2)),
                *(
                    one.add_message(chat(room_list[n % 4].id, new_member(), "burst"))
                    for n in range(300)
                ),
                *(
                    two.add_message(chat(room_list[n % 4].id, new_member(), "burst"))
                    for n in range(300)
                ),
            )
        finally:
            writing = False
        assert await watcher > 0

        stored = [m for v in visits for m in (v if isinstance(v, list) else [v]) if m is not None]
        kept = await numbers_by_room(dsn)
        for room in room_list:
            in_room = [m for m in stored if m.room_id == room.id]
            # Numbered 1, 2, 3, ... with no gap nor twin: the newest is the count.
            assert kept[room.id] == list(range(len(in_room) - bound + 1, len(in_room) + 1))
            history = await one.list_messages(room.id, Page())
            assert len(history) == bound
            assert {m.id for m in history} <= {m.id for m in in_room}
            assert [m.sent for m in history] == sorted(m.sent for m in history)


async def test_a_lowered_bound_trims_every_room_as_the_repository_opens(dsn: str) -> None:
    async with asyncio.timeout(WAIT):
        async with open_postgres_repository(dsn, room_max_messages=100) as repository:
            big, small = await new_room(repository), await new_room(repository)
            member = new_member()
            stored = [
                await repository.add_message(chat(big.id, member, f"m{n}")) for n in range(30)
            ]
            await repository.add_message(chat(small.id, member, "alone"))
        async with open_postgres_repository(dsn, room_max_messages=10) as repository:
            assert await repository.list_messages(big.id, Page()) == stored[-10:]
            assert await texts(repository, small.id) == ["alone"]
            assert await repository.trim_rooms() == 0
            stored.append(await repository.add_message(chat(big.id, member, "m30")))
            assert await repository.list_messages(big.id, Page()) == stored[-10:]


async def test_a_busy_room_at_its_bound_stores_at_a_steady_cost(dsn: str) -> None:
    """Each store drops the one message its own pushes out: the delete does not walk
    the dead index entries of those dropped before, which VACUUM has not cleared yet."""
    async with asyncio.timeout(WAIT), open_postgres_repository(dsn, room_max_messages=10) as repo:
        room = await new_room(repo)
        member = new_member()
        await asyncio.gather(
            *(repo.add_message(chat(room.id, member, f"m{n}")) for n in range(3000))
        )
        explain = "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + PREPARED.insert_message.sql
        params = {"id": str(uuid4()), "room_id": str(room.id), "member_id": str(member.id)}
        params |= {"member_name": member.name, "type": "chat", "message": "next", "keep": 10}
        async with pooled_cursor(repo) as cursor:
            await cursor.execute("BEGIN")
            await PREPARED.lock_room.run(cursor, room_id=str(room.id))
            await cursor.execute(explain, params)
            [([plan],)] = await cursor.fetchall()
            await cursor.execute("ROLLBACK")  # the plan's store is not kept
        [delete] = [node for node in plan_nodes(plan["Plan"]) if node.get("Operation") == "Delete"]
        assert delete["Shared Hit Blocks"] + delete["Shared Read Blocks"] < 20


def plan_nodes(node: dict[str, Any]) -> list[dict[str, Any]]:
    return [node, *(child for plan in node.get("Plans", []) for child in plan_nodes(plan))]


async def test_a_reaper_keeps_the_bound_too(dsn: str) -> None:
    async with asyncio.timeout(WAIT), open_postgres_repository(dsn, room_max_messages=3) as repo:
        dead = uuid4()
        await repo.renew_lease(dead, -1)
        room = await new_room(repo)
        crowd = [new_member(f"Member {n}") for n in range(7)]
        for member in crowd:
            await repo.add_member(room.id, member, dead)
        left = await repo.reap_expired_instances()
        assert len(left) == 7
        assert await repo.list_messages(room.id, Page()) == left[-3:]


# --- chat messages and prepared statements ---------------------------------------------


async def test_a_lone_message_waits_for_a_room_another_writer_holds(
    repository: PostgresRepository, dsn: str
) -> None:
    """Room by room, messages commit in `seq` order even across instances: a reader
    paging with `after` never sees a gap that a slower writer fills in later."""
    async with asyncio.timeout(WAIT):
        room = await new_room(repository)
        async with room_locked_elsewhere(dsn, room.id, key_share=True):
            sending = asyncio.create_task(
                repository.add_message(chat(room.id, new_member(), "next"))
            )
            await backend_waiting_for_a_lock(dsn)
            assert not sending.done()
        assert (await sending).message == "next"


async def test_the_writers_statements_are_planned_once_per_connection(dsn: str) -> None:
    """The writer's statements are prepared on each connection the pool opens, and
    PostgreSQL runs them on one plan instead of planning every call (which, for the
    statement of joins and leaves, would cost more than running it)."""
    prepared = sa.table(
        "pg_prepared_statements",
        sa.column("name"),
        sa.column("generic_plans"),
        sa.column("custom_plans"),
    )
    statistics = sa.select(
        prepared.c.name, prepared.c.generic_plans, prepared.c.custom_plans
    ).compile(dialect=DIALECT)
    async with asyncio.timeout(WAIT), open_postgres_repository(dsn, pool_max=1) as repository:
        room = await new_room(repository)
        for _ in range(10):
            member = new_member()
            await repository.add_member(room.id, member, uuid4())
            await repository.add_message(chat(room.id, member, "hello"))
            await repository.remove_member(room.id, member)
        async with pooled_cursor(repository) as cursor:
            await cursor.execute(str(statistics))
            plans = {name: (generic, custom) for name, generic, custom in await cursor.fetchall()}
    assert set(plans) == {
        "sharechat_lock_rooms",
        "sharechat_lock_room",
        "sharechat_apply_changes",
        "sharechat_insert_messages",
        "sharechat_insert_message",
    }
    for used in ("sharechat_lock_rooms", "sharechat_apply_changes", "sharechat_insert_message"):
        assert plans[used][0] >= 10, (used, plans[used])
    assert all(custom == 0 for _, custom in plans.values()), plans


async def test_without_prepared_statements_no_session_keeps_any(dsn: str) -> None:
    """For a pooler in transaction mode: every statement is sent whole."""
    prepared = sa.table("pg_prepared_statements", sa.column("name"))
    count = sa.select(sa.func.count()).select_from(prepared).compile(dialect=DIALECT)
    async with (
        asyncio.timeout(WAIT),
        open_postgres_repository(dsn, pool_max=1, prepared_statements=False) as repository,
    ):
        room = await new_room(repository)
        member = new_member()
        await repository.add_member(room.id, member, uuid4())
        await asyncio.gather(
            *(repository.add_message(chat(room.id, member, f"m{i}")) for i in range(20))
        )
        await repository.remove_member(room.id, member)
        assert len(await repository.list_messages(room.id, Page())) == 22
        async with pooled_cursor(repository) as cursor:
            await cursor.execute(str(count))
            assert await cursor.fetchall() == [(0,)]


async def test_group_commit_stores_concurrent_messages_in_few_transactions(
    repository: PostgresRepository, dsn: str
) -> None:
    async with asyncio.timeout(WAIT):
        room = await new_room(repository)
        senders = [new_member(f"Sender {i}") for i in range(20)]
        calls = [(senders[i % 20], f"message {i}") for i in range(200)]
        stored = await asyncio.gather(
            *(repository.add_message(chat(room.id, sender, text)) for sender, text in calls)
        )
        assert [(m.member_id, m.message) for m in stored] == [(s.id, t) for s, t in calls]
        assert len({message.id for message in stored}) == 200
        saved = await repository.list_messages(room.id, Page())
        assert sorted(saved, key=lambda m: m.message) == sorted(stored, key=lambda m: m.message)
        assert [m.sent for m in saved] == sorted(m.sent for m in saved)
        # Calls queue in order, so each sender's messages are stored in the order sent.
        assert [m.message for m in saved] == [text for _, text in calls]
        xmin = sa.func.count(sa.distinct(sa.cast(sa.literal_column("xmin"), sa.Text)))
        [(transactions,)] = await query(dsn, sa.select(xmin).select_from(messages))
        assert transactions < 50  # one transaction per batch, not per message


async def test_a_statement_the_server_cancels_raises_backend_unavailable(
    repository: PostgresRepository, dsn: str
) -> None:
    async with asyncio.timeout(WAIT):
        room = await new_room(repository)
        async with room_locked_elsewhere(dsn, room.id):
            joining = asyncio.create_task(repository.add_member(room.id, new_member(), uuid4()))
            waiter = await backend_waiting_for_a_lock(dsn)
            await query(dsn, sa.select(sa.func.pg_cancel_backend(waiter)))
            with pytest.raises(BackendUnavailable, match="cancelled"):
                await joining
        assert (await repository.add_member(room.id, new_member(), uuid4())).type == "joined"


async def backend_waiting_for_a_lock(dsn: str) -> int:
    activity = sa.table(
        "pg_stat_activity",
        sa.column("pid"),
        sa.column("datname"),
        sa.column("wait_event_type"),
    )
    waiting = sa.select(activity.c.pid).where(
        activity.c.datname == sa.func.current_database(),
        activity.c.wait_event_type == "Lock",
    )
    found: list[Any] = []

    async def someone_waits() -> bool:
        found[:] = await query(dsn, waiting)
        return bool(found)

    await eventually(someone_waits)
    [(pid,)] = found
    return int(pid)


# --- leases and reaping ----------------------------------------------------------------


async def test_reaping_removes_the_members_of_dead_instances_only(
    repository: PostgresRepository, dsn: str
) -> None:
    async with asyncio.timeout(WAIT):
        alive, dead, never_renewed = uuid4(), uuid4(), uuid4()
        await repository.renew_lease(alive, 60)
        await repository.renew_lease(dead, -1)  # a lease that ran out a second ago
        shared, deserted, orphaned = [await new_room(repository) for _ in range(3)]
        survivor, victims = new_member("Red Fox"), [new_member() for _ in range(3)]
        await repository.add_member(shared.id, survivor, alive)
        await repository.add_member(shared.id, victims[0], dead)
        await repository.add_member(deserted.id, victims[1], dead)
        await repository.add_member(orphaned.id, victims[2], never_renewed)

        left = await repository.reap_expired_instances()

        assert sorted(m.member_id for m in left) == sorted(v.id for v in victims)
        assert {m.type for m in left} == {MessageType.LEFT}
        assert await repository.list_members(shared.id) == [survivor]
        assert await emptied_at(dsn, shared.id) is None
        assert await emptied_at(dsn, deserted.id) is not None
        assert await emptied_at(dsn, orphaned.id) is not None
        assert await query(dsn, sa.select(instances.c.id)) == [(alive,)]
        assert (await repository.list_messages(deserted.id, Page()))[-1] in left
        assert await repository.reap_expired_instances() == []
        assert await repository.remove_member(deserted.id, victims[1]) is None


async def test_concurrent_reapers_reap_each_dead_member_once(
    repository: PostgresRepository,
) -> None:
    async with asyncio.timeout(WAIT):
        dead_instances = [uuid4() for _ in range(5)]
        for instance in dead_instances:
            await repository.renew_lease(instance, -1)
        room_list = [await new_room(repository) for _ in range(10)]
        victims = [new_member() for _ in range(100)]
        for i, victim in enumerate(victims):
            await repository.add_member(room_list[i % 10].id, victim, dead_instances[i % 5])
        # The members' own connections are closing too: remove_member races the reapers.
        leavers = victims[::10]
        results = await asyncio.gather(
            *(repository.reap_expired_instances() for _ in range(8)),
            *(repository.remove_member(room_list[0].id, victim) for victim in leavers),
        )
        reaped = [message for batch in results[:8] for message in batch]  # type: ignore[union-attr]
        removed = [message for message in results[8:] if message is not None]
        lefts = [message.member_id for message in [*reaped, *removed]]  # type: ignore[union-attr]
        assert sorted(lefts) == sorted(victim.id for victim in victims)
        for room in room_list:
            assert await repository.list_members(room.id) == []
            stored = await repository.list_messages(room.id, Page())
            assert sum(m.type is MessageType.LEFT for m in stored) == 10


async def test_release_lease_forgets_the_instance(repository: PostgresRepository, dsn: str) -> None:
    async with asyncio.timeout(WAIT):
        instance = uuid4()
        await repository.renew_lease(instance, 60)
        await repository.renew_lease(instance, 120)
        [(expires,)] = await query(dsn, sa.select(instances.c.lease_expires))
        [(now,)] = await query(dsn, sa.select(sa.func.now()))
        assert 110 < (expires - now).total_seconds() <= 120
        await repository.release_lease(instance)
        assert await query(dsn, sa.select(instances.c.id)) == []


# --- PostgreSQL away -------------------------------------------------------------------


async def test_calls_fail_promptly_without_postgres_and_recover_after() -> None:
    async with asyncio.timeout(WAIT * 3), throwaway_cluster() as cluster:
        await migrate(cluster.dsn)
        async with open_postgres_repository(cluster.dsn, timeout=2.0) as repository:
            room = await new_room(repository)
            member = new_member()
            await repository.add_member(room.id, member, uuid4())
            await cluster.stop()
            for call in unavailable_calls(repository, room.id, member):
                await expect_unavailable(call)
            await cluster.start()
            # The same object, without re-creation: its pool reconnects by itself.
            await repository.ping()
            await repository.add_message(chat(room.id, member, "back again"))
            assert await texts(repository, room.id) == ["Teal Otter joined", "back again"]


async def test_calls_time_out_on_a_frozen_server_and_recover_after() -> None:
    async with asyncio.timeout(WAIT * 3), throwaway_cluster() as cluster:
        await migrate(cluster.dsn)
        async with open_postgres_repository(cluster.dsn, timeout=1.0) as repository:
            room = await new_room(repository)
            member = new_member()
            await repository.add_member(room.id, member, uuid4())
            with cluster.frozen():  # a server that accepts nothing and answers nothing
                # Sent on the writer's connection, which the server holds unanswered:
                # in doubt, so the calls wait until it answers again.
                writes = asyncio.gather(
                    repository.add_message(chat(room.id, member, "frozen?")),
                    repository.remove_member(room.id, member),
                    return_exceptions=True,
                )
                results = await asyncio.gather(
                    *(expect_unavailable(call) for call in unavailable_reads(repository, room.id)),
                    return_exceptions=True,
                )
                assert not writes.done()
            assert results == [None] * len(results)
            said, left = await writes
            # They went in one batch, so one transaction: both stored, or neither.
            history = await texts(repository, room.id)
            if isinstance(said, Message):
                assert isinstance(left, Message)
                assert history[-2:] == ["frozen?", "Teal Otter left"]
            else:
                assert type(said) is type(left) is BackendUnavailable, (said, left)
                assert history == ["Teal Otter joined"]
            await repository.add_message(chat(room.id, member, "thawed"))
            assert (await texts(repository, room.id))[-1] == "thawed"


@pytest.mark.parametrize("committed", [True, False], ids=["committed", "rolled-back"])
async def test_a_store_whose_connection_breaks_in_flight_is_found_out(
    dsn: str, committed: bool
) -> None:
    """The statement reaches PostgreSQL, waits there for the room's lock, and its
    connection is cut: only PostgreSQL knows whether it commits. The call waits
    until PostgreSQL can be asked again, then answers with what happened."""
    async with (
        asyncio.timeout(WAIT * 3),
        TcpProxy(urlsplit(dsn).port or 5432) as proxy,
        open_postgres_repository(with_port(dsn, proxy.port)) as repository,
    ):
        room = await new_room(repository)
        said = chat(room.id, new_member(), "did it arrive?")
        async with room_locked_elsewhere(dsn, room.id):
            sending = asyncio.create_task(repository.add_message(said))
            in_flight = await backend_waiting_for_a_lock(dsn)
            async with proxy.outage():
                while proxy.open_connections:  # the repository's connections reset
                    await asyncio.sleep(0.01)
                if not committed:
                    await query(dsn, sa.select(sa.func.pg_terminate_backend(in_flight)))
                await asyncio.sleep(0.3)  # unreachable a while: the call must not answer meanwhile
                assert not sending.done()
        # The lock released: the statement in flight commits first, then the look.
        if committed:
            stored = await sending
            assert (stored.id, stored.message) == (said.id, "did it arrive?")
            assert await texts(repository, room.id) == ["did it arrive?"]
        else:
            with pytest.raises(BackendUnavailable) as raised:
                await sending
            assert not isinstance(raised.value, InDoubt)
            assert await texts(repository, room.id) == []


def unavailable_calls(
    repository: PostgresRepository, room_id: UUID, member: Member
) -> list[Awaitable[Any]]:
    return [
        *unavailable_reads(repository, room_id),
        repository.add_message(chat(room_id, member, "into the void")),
        repository.remove_member(room_id, member),
    ]


def unavailable_reads(repository: PostgresRepository, room_id: UUID) -> list[Awaitable[Any]]:
    """Calls outside the group commit: they fail at once, in doubt or not."""
    return [
        repository.ping(),
        repository.get_room(room_id),
        repository.list_messages(room_id, Page()),
        repository.reap_expired_instances(),
        repository.delete_idle_rooms(0),
    ]


async def expect_unavailable(call: Awaitable[Any]) -> None:
    with pytest.raises(BackendUnavailable):
        async with asyncio.timeout(PROMPT):
            await call
