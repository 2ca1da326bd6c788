"""The PostgreSQL repository: the statements of statements.py on an aiopg pool
(postgres_pool.Connections).

Reads, leases and housekeeping are one statement each on a pooled connection.
Writes (joins, leaves, chat messages) go through a GroupCommit, which applies
whatever queued up meanwhile in one transaction, with the statements of
write_statements.py (see storing.Store). Whatever adds or removes a member or
stores a message first locks its room (statements.locked_rooms).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, timedelta
from typing import Any
from uuid import UUID

import aiopg

from sharechat import domain, statements
from sharechat.domain import (
    BackendUnavailable,
    Draft,
    Member,
    Message,
    MessageNotFound,
    MessageType,
    Room,
    RoomNotFound,
)
from sharechat.group_commit import GroupCommit, Kind, Write
from sharechat.ports import MAX_NUMBER, Page
from sharechat.postgres_pool import DRIVER_ERRORS, Connections, reason
from sharechat.storing import Store, prepare_on

log = logging.getLogger(__name__)



class PostgresRepository:
    """The Repository port on PostgreSQL."""

    def __init__(
        self,
        pool: aiopg.Pool,
        *,
        timeout: float,
        max_batch: int = 500,
        room_max_messages: int = 0,
        prepared_statements: bool = True,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        """`room_max_messages`: the history a room keeps, oldest dropped first; 0 = all.
        `prepared_statements`: whether the pool's connections prepared the writer's
        statements (see open_postgres_repository). `on_batch`: told the size of each
        batch the group commit applies (the metrics)."""
        self._on_batch = on_batch
        self._connections = Connections(pool, timeout)
        self._cursor = self._connections.cursor
        self._transaction = self._connections.transaction
        self._store = Store(room_max_messages or MAX_NUMBER, prepared=prepared_statements)
        self._writes = GroupCommit(
            self._commit, self._find, max_batch=max_batch, room_max_messages=room_max_messages
        )

    async def drain(self) -> None:
        """Finish the writes already handed to add_member, remove_member and add_message,
        and give the writer's connection back to the pool."""
        await self._writes.drain()
        await self._connections.give_back()

    async def ping(self) -> None:
        async with self._cursor() as cursor:
            await statements.PING.run(cursor)

    async def create_room(self, room: Room) -> None:
        async with self._cursor() as cursor:
            await statements.CREATE_ROOM.run(cursor, room_id=room.id, name=room.name)

    async def get_room(self, room_id: UUID) -> Room:
        async with self._cursor() as cursor:
            await statements.GET_ROOM.run(cursor, room_id=room_id)
            row = await cursor.fetchone()
        if row is None:
            raise RoomNotFound(str(room_id))
        return Room(id=room_id, name=row[0])

    async def list_members(self, room_id: UUID) -> list[Member]:
        async with self._cursor() as cursor:
            await statements.LIST_MEMBERS.run(cursor, room_id=room_id)
            rows = await cursor.fetchall()
        if not rows:
            raise RoomNotFound(str(room_id))
        return [
            Member(id=member_id, name=name) for member_id, name in rows if member_id is not None
        ]

    async def list_messages(self, room_id: UUID, page: Page) -> list[Message]:
        async with self._cursor() as cursor:
            after, before = page.numbers(await _number(cursor, room_id, page.cursor))
            await (statements.PAGE_FORWARD if page.forward else statements.PAGE_BACKWARD).run(
                cursor, room_id=room_id, after_number=after, before_number=before, limit=page.limit
            )
            rows = await cursor.fetchall()
        if not page.forward:
            rows.reverse()  # the newest came first
        return [_message(room_id, row) for row in rows]

    async def add_member(self, room_id: UUID, member: Member, instance_id: UUID) -> Message:
        return await self._writes.join(room_id, member, instance_id)

    async def remove_member(self, room_id: UUID, member: Member) -> Message | None:
        return await self._writes.leave(room_id, member)

    async def add_message(self, draft: Draft) -> Message:
        return await self._writes.say(draft)

    async def message_number(self, room_id: UUID, message_id: UUID) -> int:
        async with self._cursor() as cursor:
            return await _number(cursor, room_id, message_id)

    async def messages_after(self, room_id: UUID, number: int, limit: int) -> list[Message]:
        async with self._cursor() as cursor:
            await statements.PAGE_FORWARD.run(
                cursor, room_id=room_id, after_number=number, before_number=MAX_NUMBER, limit=limit
            )
            rows = await cursor.fetchall()
        return [_message(room_id, row) for row in rows]

    async def newest_numbers(self, room_ids: Sequence[UUID]) -> dict[UUID, int]:
        async with self._cursor() as cursor:
            await statements.NEWEST_NUMBERS.run(cursor, room_ids=[str(r) for r in room_ids])
            rows = await cursor.fetchall()
        return {room_id: number for room_id, number in rows if number}

    async def renew_lease(self, instance_id: UUID, lease_seconds: float) -> None:
        async with self._cursor() as cursor:
            await statements.RENEW_LEASE.run(
                cursor, instance_id=instance_id, lease=timedelta(seconds=lease_seconds)
            )

    async def release_lease(self, instance_id: UUID) -> None:
        async with self._cursor() as cursor:
            await statements.RELEASE_LEASE.run(cursor, instance_id=instance_id)

    async def reap_expired_instances(self) -> list[Message]:
        async with self._transaction() as cursor:
            # SKIP LOCKED: an instance another reaper holds is that reaper's job.
            await statements.LOCK_EXPIRED.run(cursor)
            expired = [instance_id for (instance_id,) in await cursor.fetchall()]
            await statements.LOCK_ROOMS_OF_DEAD.run(cursor, expired=expired)
            room_ids = [room_id for (room_id,) in await cursor.fetchall()]
            if not expired and not room_ids:
                return []
            # Rooms are locked now: these members cannot leave under our feet,
            # and a concurrent reaper sees them gone once we commit.
            await statements.DELETE_DEAD.run(cursor, expired=expired, room_ids=room_ids)
            dead = await cursor.fetchall()
            drafts = [
                domain.left(room_id, Member(member_id, name)) for member_id, room_id, name in dead
            ]
            reaped = await self._store.all_messages(cursor, drafts)
            await statements.SETTLE_ROOMS.run(cursor, room_ids=room_ids)
            await statements.DELETE_INSTANCES.run(cursor, expired=expired)
        if expired or reaped:
            log.info("reaped %s dead instances and %s of their members", len(expired), len(reaped))
        return reaped

    async def trim_rooms(self) -> int:
        """Drop the messages of every room beyond the bound: those a lowered bound, or a
        history from before sql/002, left over. Returns how many were dropped.

        Stores drop only what their own messages push out, so this runs once, as the
        repository opens. It may take long on a big database: it gets a minute at least.
        """
        keep = self._store.keep
        if keep == MAX_NUMBER:
            return 0
        async with self._cursor(max(self._connections.timeout, 60.0)) as cursor:
            await statements.TRIM_ROOMS.run(cursor, keep=keep)
            dropped: int = cursor.rowcount
        if dropped:
            log.info("dropped %s messages of rooms over the bound of %s", dropped, keep)
        return dropped

    async def delete_idle_rooms(self, idle_seconds: float) -> list[UUID]:
        async with self._cursor() as cursor:
            await statements.DELETE_IDLE_ROOMS.run(cursor, idle=timedelta(seconds=idle_seconds))
            deleted = [room_id for (room_id,) in await cursor.fetchall()]
        if deleted:
            log.info("deleted %s idle rooms", len(deleted))
        return deleted

    async def _commit(self, writes: list[Write]) -> list[Message]:
        """Apply a batch of the group commit."""
        if self._on_batch is not None:
            self._on_batch(len(writes))
        # Lock and write in one query outside a transaction block: PostgreSQL runs it
        # as one transaction and commits it on its own, no round trips for BEGIN and
        # COMMIT. The writer is one task at a time: it keeps its connection.
        async with self._cursor(kept=True) as cursor:
            if all(write.kind is Kind.CHAT for write in writes):
                drafts = [write.draft for write in writes]
                return await self._store.messages(cursor, drafts, lock=True)
            return await self._store.changes(cursor, writes)

    async def _find(self, drafts: list[Draft]) -> list[Message]:
        """Which drafts of a batch in doubt are stored (see GroupCommit._resolve)."""
        async with self._transaction() as cursor:
            return await self._store.find(cursor, drafts)


async def _number(cursor: aiopg.Cursor, room_id: UUID, message_id: UUID | None) -> int:
    """The number of the room's message (0 for no message); raises RoomNotFound, or
    MessageNotFound for a message that is not the room's."""
    await statements.FIND_CURSOR.run(cursor, room_id=room_id, cursor_id=message_id)
    row = await cursor.fetchone()
    if row is None:
        raise RoomNotFound(str(room_id))
    if message_id is None:
        return 0
    if row[1] is None:
        raise MessageNotFound(str(message_id))
    number: int = row[1]
    return number


def _message(room_id: UUID, row: Sequence[Any]) -> Message:
    message_id, member_id, member_name, kind, text, sent, number = row
    return Message(
        id=message_id,
        room_id=room_id,
        member_id=member_id,
        member_name=member_name,
        type=MessageType(kind),
        message=text,
        sent=sent.astimezone(UTC),
        number=number,
    )


@contextlib.asynccontextmanager
async def open_postgres_repository(
    dsn: str,
    *,
    pool_min: int = 1,
    pool_max: int = 10,
    timeout: float = 5.0,  # noqa: ASYNC109 - bounds each statement, it is no deadline
    room_max_messages: int = 0,
    prepared_statements: bool = True,
    on_batch: Callable[[int], None] | None = None,
) -> AsyncIterator[PostgresRepository]:
    """A repository on a pool of `dsn` (postgresql:// or postgres://); does not migrate.

    `timeout` bounds each call, from the wait for a connection to the commit:
    past it the call raises BackendUnavailable. `room_max_messages`: the history
    a room keeps, oldest dropped first; 0 = all (see PostgresRepository.trim_rooms).
    `prepared_statements`: prepare the writer's statements on each connection;
    off behind a pooler in transaction mode, which would run a preparation and
    its uses on different server connections. `on_batch`: see PostgresRepository.
    """
    try:
        async with asyncio.timeout(timeout):
            pool = await aiopg.create_pool(
                dsn,
                minsize=pool_min,
                maxsize=pool_max,
                # No aiopg timeout: it awaits statements with asyncio.wait_for (see
                # housekeeping._raise_if_cancelled for why we avoid it); asyncio.timeout,
                # above and in postgres_pool.Connections.cursor, bounds every call instead.
                timeout=None,  # type: ignore[arg-type]
                enable_json=False,
                enable_hstore=False,
                on_connect=prepare_on if prepared_statements else None,
            )
    except DRIVER_ERRORS as error:
        raise BackendUnavailable(f"PostgreSQL: {reason(error)}") from error
    repository = PostgresRepository(
        pool,
        timeout=timeout,
        room_max_messages=room_max_messages,
        prepared_statements=prepared_statements,
        on_batch=on_batch,
    )
    try:
        try:
            await repository.trim_rooms()
        except BackendUnavailable as error:  # the next start tries again
            log.warning("rooms over the bound not trimmed: %s", error)
        yield repository
    finally:
        await repository.drain()
        pool.close()
        await pool.wait_closed()
