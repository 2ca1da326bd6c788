"""The PostgreSQL repository: the statements of statements.py on an aiopg pool.

Locking, in one sentence: everything that adds or removes a member or stores a
message first locks its room row (FOR NO KEY UPDATE, several rooms in id order),
so membership changes of a room never race each other, and a room's message
numbers are handed out in commit order (a reader paging with `after` can never
see a gap that a slower transaction fills in later).

Bounding, in another: the statement that stores a room's messages numbers them
on from the room's newest and deletes those at or below the newest minus
`room_max_messages` (one index range, only for a room over the bound), so the
room never holds more once the call returns, whichever instance stored what.

Writing, in one more: joins, leaves and chat messages all queue for one writer
task (group commit), which applies whatever queued up meanwhile in one
transaction (lock the rooms, then one statement for all the changes), so a
burst costs a few commits (fsyncs) and round trips instead of a few per call,
and a room's messages get their numbers in the order the calls were made.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast
from uuid import UUID, uuid4

import aiopg
import orjson
import psycopg2

from sharechat import statements
from sharechat.domain import (
    BackendUnavailable,
    Member,
    Message,
    MessageNotFound,
    MessageType,
    Room,
    RoomNotFound,
)
from sharechat.ports import Page

log = logging.getLogger(__name__)

# What aiopg and psycopg2 raise when the server is away, slow or confused; callers
# see BackendUnavailable instead. Pool timeouts are TimeoutError. RuntimeError: on
# uvloop, a connection the server refused leaves a closed poll handle on its file
# descriptor, and the next connection given that descriptor fails in add_reader
# (aio-libs/aiopg#909). Caught only around the pool and the statements (_cursor,
# open_postgres_repository), never around code of ours that could have a bug.
_DRIVER_ERRORS = (psycopg2.Error, OSError, TimeoutError, RuntimeError)


@dataclass(frozen=True, slots=True)
class _Draft:
    """A message about to be stored: everything but `sent` and its number."""

    id: UUID
    room_id: UUID
    member: Member
    type: MessageType
    text: str

    def stored(self, sent: datetime, number: int) -> Message:
        return Message(
            id=self.id,
            room_id=self.room_id,
            member_id=self.member.id,
            member_name=self.member.name,
            type=self.type,
            message=self.text,
            sent=sent.astimezone(UTC),
            number=number,
        )


def _joined(room_id: UUID, member: Member) -> _Draft:
    return _Draft(uuid4(), room_id, member, MessageType.JOINED, f"{member.name} joined")


def _left(room_id: UUID, member: Member) -> _Draft:
    return _Draft(uuid4(), room_id, member, MessageType.LEFT, f"{member.name} left")


async def _store(
    cursor: aiopg.Cursor, drafts: Sequence[_Draft], keep: int, *, lock: bool
) -> list[Message]:
    """Store the drafts in one statement, keeping `keep` messages a room; those whose
    room is gone are left out. `lock`: lock their rooms first, in the same round trip;
    else an earlier statement of the transaction has locked them. At most `keep`
    drafts of one room (see statements._store)."""
    if not drafts:
        return []
    if len(drafts) == 1:
        (draft,) = drafts
        await (statements.STORE_MESSAGE if lock else statements.INSERT_MESSAGE).run(
            cursor,
            id=str(draft.id),
            room_id=str(draft.room_id),
            member_id=str(draft.member.id),
            member_name=draft.member.name,
            type=draft.type.value,
            message=draft.text,
            keep=keep,
        )
    else:
        await (statements.STORE_MESSAGES if lock else statements.INSERT_MESSAGES).run(
            cursor,
            room_ids=[str(room_id) for room_id in {draft.room_id for draft in drafts}],
            drafts=_drafts_json(drafts),
            keep=keep,
        )
    return _stored(drafts, await cursor.fetchall())


def _one_statement_each(drafts: Sequence[_Draft], keep: int) -> list[list[_Draft]]:
    """The drafts in order, cut where one statement would store over `keep` of a room."""
    runs: list[list[_Draft]] = [[]]
    in_room: collections.Counter[UUID] = collections.Counter()
    for draft in drafts:
        if in_room[draft.room_id] == keep:
            runs.append([])
            in_room.clear()
        in_room[draft.room_id] += 1
        runs[-1].append(draft)
    return runs


def _drafts_json(drafts: Sequence[_Draft]) -> str:
    return orjson.dumps(
        [
            {
                "n": n,
                "id": draft.id,
                "room_id": draft.room_id,
                "member_id": draft.member.id,
                "member_name": draft.member.name,
                "type": draft.type.value,
                "message": draft.text,
            }
            for n, draft in enumerate(drafts)
        ]
    ).decode()  # a str: psycopg2 would send bytes as bytea


def _stored(
    drafts: Sequence[_Draft], rows: Sequence[tuple[str, datetime, int]]
) -> list[Message]:
    """The drafts that `rows` (id as text, sent, number) say were stored, as messages."""
    by_id = {message_id: (sent, number) for message_id, sent, number in rows}
    stored = []
    for draft in drafts:
        row = by_id.get(str(draft.id))
        if row is not None:
            stored.append(draft.stored(*row))
    return stored


class _Kind(enum.Enum):
    CHAT = enum.auto()
    JOIN = enum.auto()
    LEAVE = enum.auto()


@dataclass(frozen=True, slots=True)
class _Write:
    """One change queued for the writer; `draft` is the message it stores."""

    kind: _Kind
    draft: _Draft
    instance_id: UUID | None = None  # of a joining member

    @property
    def room_id(self) -> UUID:
        return self.draft.room_id

    @property
    def member_id(self) -> UUID:
        return self.draft.member.id


async def _apply(cursor: aiopg.Cursor, writes: Sequence[_Write], keep: int) -> list[Message]:
    """Apply a batch of writes inside a transaction; return the messages stored.

    Two statements: lock the rooms (all in one statement, so in id order), then
    change the members and store the messages of those that exist. A write to a
    room that is gone stores nothing, nor does the leave of a member that is
    gone already. A batch changes each member once at most (see
    _GroupCommit._next_batch), so within the statement no member's changes
    need ordering; the messages are stored in the order of the writes, `keep` of
    a room at most.
    """
    await statements.LOCK_ROOMS.run(cursor, room_ids=list({str(write.room_id) for write in writes}))
    live = {room_id for (room_id,) in await cursor.fetchall()}
    writes = [write for write in writes if write.room_id in live]
    if not writes:
        return []
    joins = [write for write in writes if write.kind is _Kind.JOIN]
    exits = [write for write in writes if write.kind is _Kind.LEAVE]
    drafts = [write.draft for write in writes]
    await statements.APPLY_CHANGES.run(
        cursor,
        join_ids=[str(join.member_id) for join in joins],
        join_room_ids=[str(join.room_id) for join in joins],
        names=[join.draft.member.name for join in joins],
        instance_ids=[str(join.instance_id) for join in joins],
        exit_ids=[str(write.member_id) for write in exits],
        exit_room_ids=[str(write.room_id) for write in exits],
        drafts=_drafts_json(drafts),
        keep=keep,
    )
    return _stored(drafts, await cursor.fetchall())


def _check_storable(text: str) -> None:
    """PostgreSQL text holds neither NUL nor lone surrogates; refuse them up front,
    where one bad message cannot fail the batch it would have shared."""
    if "\0" in text:
        raise ValueError("text contains a NUL character")
    text.encode("utf-8")  # UnicodeEncodeError, a ValueError, for a lone surrogate


def _reason(error: BaseException) -> str:
    if isinstance(error, TimeoutError):
        return "timed out"
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


_Pending = tuple[_Write, asyncio.Future[Message | None]]


class _GroupCommit:
    """Applies concurrent writes together: one transaction, one commit per batch.

    While a batch is in flight, new writes queue up and go together in the next
    one; at low load a write goes alone, at once (there is no timer). A task of
    its own does the writing, so a caller that is cancelled never cancels the
    transaction carrying the writes of others. The queue holds one entry per
    waiting caller, so the callers themselves bound it.
    """

    def __init__(
        self,
        apply: Callable[[list[_Write]], Awaitable[list[Message]]],
        max_batch: int,
        room_max_messages: int,
    ) -> None:
        self._apply = apply
        self._max_batch = max_batch
        self._room_max_messages = room_max_messages
        self._queue: collections.deque[_Pending] = collections.deque()
        self._writer: asyncio.Task[None] | None = None

    async def submit(self, write: _Write) -> Message | None:
        """The message the write stored; None for a leave of a member gone already,
        or of a room gone. Raises RoomNotFound, BackendUnavailable."""
        return await self._enqueue(write)

    async def drain(self) -> None:
        """Wait until every queued write is applied or has failed."""
        if self._writer is not None:
            await asyncio.shield(self._writer)

    def _enqueue(self, write: _Write) -> asyncio.Future[Message | None]:
        future: asyncio.Future[Message | None] = asyncio.get_running_loop().create_future()
        self._queue.append((write, future))
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_all())
        return future

    async def _write_all(self) -> None:
        try:
            while self._queue:
                await self._write_batch(self._next_batch())
        finally:
            self._writer = None

    def _next_batch(self) -> list[_Pending]:
        """The oldest writes, in call order, up to `max_batch` or to one that waits for
        the next batch: a second join or leave of one member (a batch that both added
        and removed a member would have to know which came first), or a message over
        `room_max_messages` for one room (a statement cannot delete its own rows)."""
        batch: list[_Pending] = []
        changing: set[UUID] = set()
        room_max = self._room_max_messages
        in_room: dict[int, int] = {}  # by the room id's int: UUID hashes in Python
        while self._queue and len(batch) < self._max_batch:
            write, _ = self._queue[0]
            if write.kind is not _Kind.CHAT:
                if write.member_id in changing:
                    break
                changing.add(write.member_id)
            if room_max:
                room = write.draft.room_id.int
                stored = in_room.get(room, 0)
                if stored == room_max:
                    break
                in_room[room] = stored + 1
            batch.append(self._queue.popleft())
        return [(write, future) for write, future in batch if not future.cancelled()]

    async def _write_batch(self, batch: list[_Pending]) -> None:
        if not batch:
            return
        try:
            stored = {message.id: message for message in await self._apply([w for w, _ in batch])}
        except asyncio.CancelledError:
            for _, future in batch:
                future.cancel()
            raise
        except Exception as error:
            for _, future in batch:
                if not future.done():
                    future.set_exception(_own_copy(error))
            return
        for write, future in batch:
            self._settle(write, future, stored.get(write.draft.id))

    def _settle(
        self, write: _Write, future: asyncio.Future[Message | None], message: Message | None
    ) -> None:
        if future.cancelled():  # the caller gave up while its write was in flight
            if write.kind is _Kind.JOIN and message is not None:
                self._leave(write)
        elif message is not None or write.kind is _Kind.LEAVE:
            future.set_result(message)
        else:
            future.set_exception(RoomNotFound(str(write.room_id)))

    def _leave(self, join: _Write) -> None:
        """A join whose caller gave up once it was stored: nobody will ever remove the
        member, so it leaves at once. Its `joined` and `left` reach the room like any
        message nobody published (see Controller._audit_rooms): a stored message is
        never taken back, so numbers are never reused."""
        member = join.draft.member
        leaving = self._enqueue(_Write(_Kind.LEAVE, _left(join.room_id, member)))
        leaving.add_done_callback(functools.partial(_report_leave, member.id))


def _report_leave(member_id: UUID, leaving: asyncio.Future[Message | None]) -> None:
    error = None if leaving.cancelled() else leaving.exception()
    if error is not None:
        log.error("member %s of a cancelled join stays listed: %s", member_id, error)


def _own_copy(error: Exception) -> Exception:
    """One exception object raised in many tasks would mix their tracebacks."""
    if not isinstance(error, BackendUnavailable):
        return error
    copy = BackendUnavailable(*error.args)
    copy.__cause__ = error.__cause__
    return copy


class PostgresRepository:
    """The Repository port on PostgreSQL; see the module docstring for the locking."""

    def __init__(
        self,
        pool: aiopg.Pool,
        *,
        timeout: float,
        max_batch: int = 500,
        room_max_messages: int = 0,
    ) -> None:
        """`room_max_messages`: the history a room keeps, oldest dropped first; 0 = all."""
        self._pool = pool
        self._timeout = timeout
        self._writes = _GroupCommit(self._commit, max_batch, room_max_messages)
        self._keep = room_max_messages or statements.MAX_NUMBER
        self._available = True

    async def drain(self) -> None:
        """Finish the writes already handed to add_member, remove_member and add_message."""
        await self._writes.drain()

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
            after_number, before_number = await _page_bounds(cursor, room_id, page)
            await (statements.PAGE_FORWARD if page.forward else statements.PAGE_BACKWARD).run(
                cursor,
                room_id=room_id,
                after_number=after_number,
                before_number=before_number,
                limit=page.limit,
            )
            rows = await cursor.fetchall()
        if not page.forward:
            rows.reverse()
        return [_message(room_id, row) for row in rows]

    async def add_member(self, room_id: UUID, member: Member, instance_id: UUID) -> Message:
        """Store the member and its `joined` together, grouped with concurrent writes.

        Raises ValueError for a name PostgreSQL cannot store, RoomNotFound, or
        BackendUnavailable.
        """
        _check_storable(member.name)
        join = _Write(_Kind.JOIN, _joined(room_id, member), instance_id)
        return cast(Message, await self._writes.submit(join))  # stored, or it raised

    async def remove_member(self, room_id: UUID, member: Member) -> Message | None:
        """None when the member was gone already: whoever removed it told the room."""
        _check_storable(member.name)
        return await self._writes.submit(_Write(_Kind.LEAVE, _left(room_id, member)))

    async def add_message(self, room_id: UUID, member: Member, text: str) -> Message:
        """Store a chat message, grouped with concurrent writes.

        Raises ValueError for text PostgreSQL cannot store, RoomNotFound, or
        BackendUnavailable.
        """
        _check_storable(text)
        _check_storable(member.name)
        chat = _Write(_Kind.CHAT, _Draft(uuid4(), room_id, member, MessageType.CHAT, text))
        return cast(Message, await self._writes.submit(chat))  # stored, or it raised

    async def message_number(self, room_id: UUID, message_id: UUID) -> int:
        async with self._cursor() as cursor:
            return await _cursor_number(cursor, room_id, message_id)

    async def messages_after(self, room_id: UUID, number: int, limit: int) -> list[Message]:
        async with self._cursor() as cursor:
            await statements.PAGE_FORWARD.run(
                cursor,
                room_id=room_id,
                after_number=number,
                before_number=statements.MAX_NUMBER,
                limit=limit,
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
            drafts = [_left(room_id, Member(member_id, name)) for member_id, room_id, name in dead]
            left = []
            for run in _one_statement_each(drafts, self._keep):
                left += await _store(cursor, run, self._keep, lock=False)
            await statements.SETTLE_ROOMS.run(cursor, room_ids=room_ids)
            await statements.DELETE_INSTANCES.run(cursor, expired=expired)
        if expired or left:
            log.info("reaped %s dead instances and %s of their members", len(expired), len(left))
        return left

    async def trim_rooms(self) -> int:
        """Drop the messages of every room beyond the bound: those a lowered bound, or a
        history from before sql/002, left over. Returns how many were dropped.

        Stores drop only what their own messages push out, so this runs once, as the
        repository opens. It may take long on a big database: it gets a minute at least.
        """
        if self._keep == statements.MAX_NUMBER:
            return 0
        async with self._cursor(max(self._timeout, 60.0)) as cursor:
            await statements.TRIM_ROOMS.run(cursor, keep=self._keep)
            dropped: int = cursor.rowcount
        if dropped:
            log.info("dropped %s messages of rooms over the bound of %s", dropped, self._keep)
        return dropped

    async def delete_idle_rooms(self, idle_seconds: float) -> list[UUID]:
        async with self._cursor() as cursor:
            await statements.DELETE_IDLE_ROOMS.run(cursor, idle=timedelta(seconds=idle_seconds))
            deleted = [room_id for (room_id,) in await cursor.fetchall()]
        if deleted:
            log.info("deleted %s idle rooms", len(deleted))
        return deleted

    async def _commit(self, writes: list[_Write]) -> list[Message]:
        if all(write.kind is _Kind.CHAT for write in writes):
            # Lock and store in one query outside a transaction block: PostgreSQL
            # runs it as one transaction and commits it on its own, no round trips
            # for BEGIN and COMMIT.
            async with self._cursor() as cursor:
                drafts = [write.draft for write in writes]
                return await _store(cursor, drafts, self._keep, lock=True)
        async with self._transaction() as cursor:
            return await _apply(cursor, writes, self._keep)

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiopg.Cursor]:
        async with self._cursor() as cursor, cursor.begin():
            yield cursor

    @contextlib.asynccontextmanager
    async def _cursor(self, within: float | None = None) -> AsyncIterator[aiopg.Cursor]:
        try:
            async with (
                asyncio.timeout(within or self._timeout),
                self._pool.acquire() as connection,
            ):
                try:
                    async with connection.cursor() as cursor:
                        yield cursor
                except (*_DRIVER_ERRORS, asyncio.CancelledError):
                    # Its state is unknown now: closed, the pool drops it for a new one.
                    connection.close()
                    raise
        except _DRIVER_ERRORS as error:
            self._lost(error)
            raise BackendUnavailable(f"PostgreSQL: {_reason(error)}") from error
        except asyncio.CancelledError:
            if _cancelled():
                raise
            # aiopg turns a statement the server cancelled (statement_timeout,
            # pg_cancel_backend) into CancelledError, though nobody cancelled us.
            raise BackendUnavailable("PostgreSQL: the statement was cancelled") from None
        self._back()

    def _lost(self, error: BaseException) -> None:
        if self._available:
            log.warning("PostgreSQL unavailable: %s", _reason(error))
        self._available = False

    def _back(self) -> None:
        if not self._available:
            log.info("PostgreSQL available again")
        self._available = True


def _cancelled() -> bool:
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


async def _page_bounds(cursor: aiopg.Cursor, room_id: UUID, page: Page) -> tuple[int, int]:
    """The range of numbers (exclusive) that the page selects from; checks room and cursor."""
    cursor_id = page.after if page.after is not None else page.before
    number = await _cursor_number(cursor, room_id, cursor_id)
    if cursor_id is None:
        return 0, statements.MAX_NUMBER
    return (number, statements.MAX_NUMBER) if page.forward else (0, number)


async def _cursor_number(cursor: aiopg.Cursor, room_id: UUID, message_id: UUID | None) -> int:
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
) -> AsyncIterator[PostgresRepository]:
    """A repository on a pool of `dsn` (postgresql:// or postgres://); does not migrate.

    `timeout` bounds each call, from the wait for a connection to the commit:
    past it the call raises BackendUnavailable. `room_max_messages`: the history
    a room keeps, oldest dropped first; 0 = all (see PostgresRepository.trim_rooms).
    """
    try:
        async with asyncio.timeout(timeout):
            pool = await aiopg.create_pool(
                dsn,
                minsize=pool_min,
                maxsize=pool_max,
                # No aiopg timeout: it awaits statements with asyncio.wait_for, which
                # on Python 3.11 drops a cancel that lands as the statement completes
                # (the caller's task then never stops). asyncio.timeout, above and in
                # PostgresRepository._cursor, bounds every call instead.
                timeout=None,  # type: ignore[arg-type]
                enable_json=False,
                enable_hstore=False,
                on_connect=statements.prepare_on,
            )
    except _DRIVER_ERRORS as error:
        raise BackendUnavailable(f"PostgreSQL: {_reason(error)}") from error
    repository = PostgresRepository(pool, timeout=timeout, room_max_messages=room_max_messages)
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
