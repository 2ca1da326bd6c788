"""The PostgreSQL repository: Core tables, statements compiled once, an aiopg pool.

Locking, in one sentence: everything that adds or removes a member or stores a
message first locks its room row (FOR NO KEY UPDATE, several rooms in id order),
so membership changes of a room never race each other, and a room's `seq`
numbers are handed out in commit order (a reader paging with `after` can never
see a gap that a slower transaction fills in later).

Writing, in one more: joins, leaves and chat messages all queue for one writer
task (group commit), which applies whatever queued up meanwhile in one
transaction (lock the rooms, then one statement for all the changes), so a
burst costs a few commits (fsyncs) and round trips instead of a few per call,
and a room's messages get their `seq` in the order the calls were made.
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
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.dml import ReturningDelete

from sharechat.domain import (
    STORED_TYPES,
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

metadata = sa.MetaData()

message_type = postgresql.ENUM(
    *(kind.value for kind in STORED_TYPES), name="message_type", create_type=False
)

rooms = sa.Table(
    "rooms",
    metadata,
    sa.Column("id", sa.Uuid, primary_key=True),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("created", sa.DateTime(timezone=True), nullable=False),
    sa.Column("emptied_at", sa.DateTime(timezone=True), nullable=True),
)
sa.Index(
    "rooms_emptied_at_idx",
    rooms.c.emptied_at,
    postgresql_where=rooms.c.emptied_at.is_not(None),
)

members = sa.Table(
    "members",
    metadata,
    sa.Column("id", sa.Uuid, primary_key=True),
    sa.Column("room_id", sa.Uuid, sa.ForeignKey("rooms.id", ondelete="CASCADE"), nullable=False),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("instance_id", sa.Uuid, nullable=False),
    sa.Column("joined", sa.DateTime(timezone=True), nullable=False),
    sa.Index("members_room_id_idx", "room_id"),
    sa.Index("members_instance_id_idx", "instance_id"),
)

messages = sa.Table(
    "messages",
    metadata,
    sa.Column("id", sa.Uuid, primary_key=True),
    sa.Column("seq", sa.BigInteger, sa.Identity(always=True), nullable=False),
    sa.Column("room_id", sa.Uuid, sa.ForeignKey("rooms.id", ondelete="CASCADE"), nullable=False),
    sa.Column("member_id", sa.Uuid, nullable=False),
    sa.Column("member_name", sa.Text, nullable=False),
    sa.Column("type", message_type, nullable=False),
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("sent", sa.DateTime(timezone=True), nullable=False),
    sa.Index("messages_room_id_seq_idx", "room_id", "seq"),
)

instances = sa.Table(
    "instances",
    metadata,
    sa.Column("id", sa.Uuid, primary_key=True),
    sa.Column("lease_expires", sa.DateTime(timezone=True), nullable=False),
)

_dialect = postgresql.psycopg2.dialect()  # type: ignore[no-untyped-call]
# The same, with $1, $2, ... placeholders: the form PREPARE takes.
_numbered_dialect = postgresql.psycopg2.dialect(paramstyle="numeric_dollar")  # type: ignore[no-untyped-call]
_MAX_SEQ = 2**63 - 1


@dataclass(frozen=True, slots=True)
class _Statement:
    """A statement compiled once for psycopg2; `constants` are the binds Core made itself.

    A hot one is also prepared on every connection (see _prepare_on): PostgreSQL
    then parses and plans it once per connection instead of once per call, a
    tenth of a millisecond of the ~0.4 that storing a lone message takes.
    """

    sql: str
    constants: dict[str, Any]
    preparation: str | None = None

    @classmethod
    def compile(cls, statement: sa.ClauseElement) -> _Statement:
        compiled = statement.compile(dialect=_dialect)
        return cls(str(compiled), _constants(compiled))

    @classmethod
    def prepared(cls, name: str, statement: sa.ClauseElement) -> _Statement:
        """Runs as EXECUTE `name` on connections that _prepare_on has prepared."""
        numbered = statement.compile(dialect=_numbered_dialect)
        assert isinstance(numbered, SQLCompiler)
        arguments = ", ".join(f"%({param})s" for param in numbered.positiontup or ())
        return cls(
            f"EXECUTE {name}({arguments})", _constants(numbered), f"PREPARE {name} AS {numbered}"
        )

    async def run(self, cursor: aiopg.Cursor, /, **params: Any) -> None:
        await cursor.execute(self.sql, {**self.constants, **params})


def _constants(compiled: sa.Compiled) -> dict[str, Any]:
    return {name: value for name, value in compiled.params.items() if value is not None}


def _uuids(name: str) -> sa.Cast[Any]:
    """An array of uuids, sent as text: psycopg2 quotes a list of str in C, while
    its uuid adapter is Python code called per element (half the cost of a batch)."""
    as_text = sa.cast(sa.bindparam(name), postgresql.ARRAY(sa.Text))
    return sa.cast(as_text, postgresql.ARRAY(sa.Uuid))


def _texts(name: str) -> sa.Cast[Any]:
    return sa.cast(sa.bindparam(name), postgresql.ARRAY(sa.Text))


def _locked_rooms(which: sa.ColumnElement[bool]) -> sa.Select[tuple[UUID]]:
    """Lock rooms in id order, so that two transactions never wait on each other in a cycle."""
    return sa.select(rooms.c.id).where(which).order_by(rooms.c.id).with_for_update(key_share=True)


def _drafts() -> sa.CTE:
    """The messages to store, from one JSON parameter: an array of objects, each
    with its position `n` in the batch.

    One parameter rather than an array per column: psycopg2 adapts every element
    of an array by a call of its own, while orjson writes the whole batch at C speed.
    """
    rows = (
        sa.func.json_to_recordset(sa.cast(sa.bindparam("drafts"), sa.JSON))
        .table_valued(
            sa.column("n", sa.Integer),
            sa.column("id", sa.Uuid),
            sa.column("room_id", sa.Uuid),
            sa.column("member_id", sa.Uuid),
            sa.column("member_name", sa.Text),
            sa.column("type", sa.Text),
            sa.column("message", sa.Text),
        )
        .render_derived(name="draft", with_types=True)
    )
    return sa.select(rows).cte("new")


def _message_rows(new: sa.CTE) -> sa.Select[Any]:
    return sa.select(
        new.c.id,
        new.c.room_id,
        new.c.member_id,
        new.c.member_name,
        sa.cast(new.c.type, message_type),
        new.c.message,
        # Evaluated per row after the ORDER BY, so `sent` follows `seq`.
        sa.func.clock_timestamp(),
    ).order_by(new.c.n)


def _insert_rows(rows: sa.Select[Any]) -> sa.Insert:
    columns = ["id", "room_id", "member_id", "member_name", "type", "message", "sent"]
    # The id as text: it is matched with the text the caller sent, no uuid parsed per row.
    stored_id = sa.cast(messages.c.id, sa.Text).label("id")
    return sa.insert(messages).from_select(columns, rows).returning(stored_id, messages.c.sent)


def _locked_cte(which: sa.ColumnElement[bool]) -> sa.CTE:
    # MATERIALIZED: the rooms are locked before any row is inserted.
    return _locked_rooms(which).cte("locked").prefix_with("MATERIALIZED")


def _insert_messages() -> sa.Insert:
    """Store many messages in one statement, in the order given, rooms locked first.

    Rows whose room no longer exists are skipped instead of failing the batch.
    """
    new = _drafts()
    locked = _locked_cte(rooms.c.id.in_(sa.select(new.c.room_id)))
    return _insert_rows(_message_rows(new).join_from(new, locked, locked.c.id == new.c.room_id))


def _insert_message() -> sa.Insert:
    """_insert_messages for one message: no arrays to unnest, a quarter less time in
    PostgreSQL, which is most of what a message costs when it travels alone."""
    locked = _locked_cte(rooms.c.id == sa.bindparam("room_id", type_=sa.Uuid))
    row = sa.select(
        sa.bindparam("id", type_=sa.Uuid),
        locked.c.id,
        sa.bindparam("member_id", type_=sa.Uuid),
        sa.bindparam("member_name", type_=sa.Text),
        sa.cast(sa.bindparam("type", type_=sa.Text), message_type),
        sa.bindparam("message", type_=sa.Text),
        sa.func.clock_timestamp(),
    )
    return _insert_rows(row)


def _insert_members() -> sa.Insert:
    """Add many members in one statement, in the order given; returns their rooms."""
    new = (
        sa.func.unnest(
            _uuids("join_ids"), _uuids("join_room_ids"), _texts("names"), _uuids("instance_ids")
        )
        .table_valued("id", "room_id", "name", "instance_id", with_ordinality="ord")
        .render_derived()
        .alias("joining")
    )
    rows = sa.select(
        new.c.id, new.c.room_id, new.c.name, new.c.instance_id, sa.func.clock_timestamp()
    ).order_by(new.c.ord)
    columns = ["id", "room_id", "name", "instance_id", "joined"]
    return sa.insert(members).from_select(columns, rows).returning(members.c.room_id)


def _delete_members() -> ReturningDelete[tuple[UUID, UUID]]:
    """Delete many members, each only from the room given with it; returns those deleted."""
    leaving = (
        sa.func.unnest(_uuids("exit_ids"), _uuids("exit_room_ids"))
        .table_valued("id", "room_id")
        .render_derived()
        .alias("leaving")
    )
    return (
        sa.delete(members)
        .where(members.c.id == leaving.c.id, members.c.room_id == leaving.c.room_id)
        .returning(members.c.id, members.c.room_id)
    )


def _settle(which: sa.ColumnElement[bool], occupied: sa.ColumnElement[bool]) -> sa.Update:
    """Make `emptied_at` agree with the members: NULL while the room has some, else
    the moment it became empty. Touches only the rooms where the two disagree, so
    that a room that was empty keeps its moment, and one that just emptied gets now.
    """
    return (
        sa.update(rooms)
        .where(which, rooms.c.emptied_at.is_(None) != occupied)
        .values(emptied_at=sa.case((occupied, sa.null()), else_=sa.func.clock_timestamp()))
    )


def _apply_changes() -> sa.Select[tuple[UUID, datetime]]:
    """Joins, leaves and their messages in one statement, for rooms that an earlier
    statement of the transaction locked (so they exist); returns the stored messages.

    Earlier, because a statement's snapshot is taken as it starts: this one must
    see every change that others made to these rooms before we held them.
    """
    joined = _insert_members().cte("joined")
    gone = _delete_members().cte("gone")
    were_here = sa.select(gone.c.id)
    new = _drafts()
    # A `left` only for a member removed here: one that was gone already had its own.
    kept = sa.or_(new.c.type != MessageType.LEFT.value, new.c.member_id.in_(were_here))
    stored = _insert_rows(_message_rows(new).where(kept)).cte("stored")
    erased = (
        sa.delete(messages)
        .where(messages.c.id == sa.any_(_uuids("erased_ids")), messages.c.member_id.in_(were_here))
        .cte("erased")
    )
    settled = _settle_changed(joined, gone).cte("settled")
    # Data-modifying CTEs run whether or not the query reads them; add_cte renders them.
    return sa.select(stored.c.id, stored.c.sent).add_cte(joined, gone, erased, settled)


def _settle_changed(joined: sa.CTE, gone: sa.CTE) -> sa.Update:
    """_settle for the rooms that `joined` and `gone` changed. Their own statement's
    snapshot shows neither change: occupancy is reckoned with both."""
    occupied = sa.or_(
        sa.exists().where(
            members.c.room_id == rooms.c.id, members.c.id.not_in(sa.select(gone.c.id))
        ),
        sa.exists().where(joined.c.room_id == rooms.c.id),
    )
    changed = sa.union(sa.select(joined.c.room_id), sa.select(gone.c.room_id))
    return _settle(rooms.c.id.in_(changed), occupied)


def _delete_idle_rooms() -> ReturningDelete[tuple[UUID]]:
    idle = rooms.alias("idle")
    # SKIP LOCKED: a room locked right now is in use; the next sweep looks again.
    candidates = (
        sa.select(idle.c.id)
        .where(
            idle.c.emptied_at < sa.func.clock_timestamp() - sa.bindparam("idle", type_=sa.Interval),
            ~sa.exists().where(members.c.room_id == idle.c.id),
        )
        .with_for_update(skip_locked=True)
    )
    return sa.delete(rooms).where(rooms.c.id.in_(candidates)).returning(rooms.c.id)


def _renew_lease() -> sa.Insert:
    insert = postgresql.insert(instances).values(
        id=sa.bindparam("instance_id"),
        lease_expires=sa.func.clock_timestamp() + sa.bindparam("lease", type_=sa.Interval),
    )
    return insert.on_conflict_do_update(
        index_elements=[instances.c.id],
        set_={"lease_expires": insert.excluded.lease_expires},
    )


# Members of an expired instance (locked by this reaper), or of no instance at all.
_dead = sa.or_(
    members.c.instance_id == sa.any_(_uuids("expired")),
    ~sa.exists().where(instances.c.id == members.c.instance_id),
)

_PING = _Statement.compile(sa.select(sa.true()))
_CREATE_ROOM = _Statement.compile(
    sa.insert(rooms).values(
        id=sa.bindparam("room_id"),
        name=sa.bindparam("name"),
        created=sa.func.now(),
        # Empty from birth: a room nobody ever joins expires like any other.
        emptied_at=sa.func.now(),
    )
)
_GET_ROOM = _Statement.compile(sa.select(rooms.c.name).where(rooms.c.id == sa.bindparam("room_id")))
# An outer join tells a missing room (no row) from an empty one (a row of NULLs).
_LIST_MEMBERS = _Statement.compile(
    sa.select(members.c.id, members.c.name)
    .select_from(rooms.outerjoin(members))
    .where(rooms.c.id == sa.bindparam("room_id"))
    .order_by(members.c.joined, members.c.id)
)
_FIND_CURSOR = _Statement.compile(
    sa.select(
        rooms.c.id,
        sa.select(messages.c.seq)
        .where(messages.c.id == sa.bindparam("cursor_id"), messages.c.room_id == rooms.c.id)
        .scalar_subquery(),
    ).where(rooms.c.id == sa.bindparam("room_id"))
)


def _page(order: sa.UnaryExpression[Any]) -> _Statement:
    return _Statement.compile(
        sa.select(
            messages.c.id,
            messages.c.member_id,
            messages.c.member_name,
            messages.c.type,
            messages.c.message,
            messages.c.sent,
        )
        .where(
            messages.c.room_id == sa.bindparam("room_id"),
            messages.c.seq > sa.bindparam("after_seq"),
            messages.c.seq < sa.bindparam("before_seq"),
        )
        .order_by(order)
        .limit(sa.bindparam("limit"))
    )


_PAGE_BACKWARD = _page(messages.c.seq.desc())
_PAGE_FORWARD = _page(messages.c.seq.asc())

_LOCK_ROOMS = _Statement.prepared(
    "sharechat_lock_rooms", _locked_rooms(rooms.c.id == sa.any_(_uuids("room_ids")))
)
_APPLY_CHANGES = _Statement.prepared("sharechat_apply_changes", _apply_changes())
_SETTLE_ROOMS = _Statement.compile(
    _settle(
        rooms.c.id == sa.any_(_uuids("room_ids")),
        sa.exists().where(members.c.room_id == rooms.c.id),
    )
)
_INSERT_MESSAGES = _Statement.prepared("sharechat_insert_messages", _insert_messages())
_INSERT_MESSAGE = _Statement.prepared("sharechat_insert_message", _insert_message())
_DELETE_MESSAGE = _Statement.compile(
    sa.delete(messages).where(messages.c.id == sa.bindparam("message_id"))
)

# The statements of the writer, which runs for every message, join and leave.
_HOT = (_LOCK_ROOMS, _APPLY_CHANGES, _INSERT_MESSAGES, _INSERT_MESSAGE)


async def _prepare_on(connection: aiopg.Connection) -> None:
    """Prepare the hot statements on a new connection of the pool.

    A connection pooler in transaction mode (PgBouncer's pool_mode=transaction)
    would run them on one server connection and the EXECUTEs on others: point
    DATABASE_URL at PostgreSQL itself, or at a pooler in session mode.
    """
    async with connection.cursor() as cursor:
        await cursor.execute("; ".join(cast(str, hot.preparation) for hot in _HOT))


_RENEW_LEASE = _Statement.compile(_renew_lease())
_RELEASE_LEASE = _Statement.compile(
    sa.delete(instances).where(instances.c.id == sa.bindparam("instance_id"))
)
_LOCK_EXPIRED = _Statement.compile(
    sa.select(instances.c.id)
    .where(instances.c.lease_expires < sa.func.clock_timestamp())
    .with_for_update(skip_locked=True)
)
_LOCK_ROOMS_OF_DEAD = _Statement.compile(
    _locked_rooms(rooms.c.id.in_(sa.select(members.c.room_id).where(_dead)))
)
_DELETE_DEAD = _Statement.compile(
    sa.delete(members)
    .where(members.c.room_id == sa.any_(_uuids("room_ids")), _dead)
    .returning(members.c.id, members.c.room_id, members.c.name)
)
_DELETE_INSTANCES = _Statement.compile(
    sa.delete(instances).where(instances.c.id == sa.any_(_uuids("expired")))
)
_DELETE_IDLE_ROOMS = _Statement.compile(_delete_idle_rooms())

# What aiopg and psycopg2 raise when the server is away, slow or confused; callers
# see BackendUnavailable instead. Pool timeouts are TimeoutError.
_DRIVER_ERRORS = (psycopg2.Error, OSError, TimeoutError)


@dataclass(frozen=True, slots=True)
class _Draft:
    """A message about to be stored: everything but `sent`."""

    id: UUID
    room_id: UUID
    member: Member
    type: MessageType
    text: str

    def stored(self, sent: datetime) -> Message:
        return Message(
            id=self.id,
            room_id=self.room_id,
            member_id=self.member.id,
            member_name=self.member.name,
            type=self.type,
            message=self.text,
            sent=sent.astimezone(UTC),
        )


def _joined(room_id: UUID, member: Member) -> _Draft:
    return _Draft(uuid4(), room_id, member, MessageType.JOINED, f"{member.name} joined")


def _left(room_id: UUID, member: Member) -> _Draft:
    return _Draft(uuid4(), room_id, member, MessageType.LEFT, f"{member.name} left")


async def _store(cursor: aiopg.Cursor, drafts: Sequence[_Draft]) -> list[Message]:
    """Store the drafts in one statement; those whose room is gone are left out."""
    if not drafts:
        return []
    if len(drafts) == 1:
        (draft,) = drafts
        await _INSERT_MESSAGE.run(
            cursor,
            id=str(draft.id),
            room_id=str(draft.room_id),
            member_id=str(draft.member.id),
            member_name=draft.member.name,
            type=draft.type.value,
            message=draft.text,
        )
    else:
        await _INSERT_MESSAGES.run(cursor, drafts=_drafts_json(drafts))
    return _stored(drafts, await cursor.fetchall())


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


def _stored(drafts: Sequence[_Draft], rows: Sequence[tuple[str, datetime]]) -> list[Message]:
    """The drafts that `rows` (id as text, sent) say were stored, as messages."""
    sent = dict(rows)
    stored = []
    for draft in drafts:
        moment = sent.get(str(draft.id))
        if moment is not None:
            stored.append(draft.stored(moment))
    return stored


class _Kind(enum.Enum):
    CHAT = enum.auto()
    JOIN = enum.auto()
    LEAVE = enum.auto()
    # A join whose caller was cancelled once its batch had started: the member
    # may be stored, yet nobody will announce it nor ever remove it. ERASE takes
    # it and its `joined` back out, as if it had never joined.
    ERASE = enum.auto()


@dataclass(frozen=True, slots=True)
class _Write:
    """One change queued for the writer. `draft` is the message it stores; for
    ERASE, the `joined` message it deletes."""

    kind: _Kind
    draft: _Draft
    instance_id: UUID | None = None  # of a joining member

    @property
    def room_id(self) -> UUID:
        return self.draft.room_id

    @property
    def member_id(self) -> UUID:
        return self.draft.member.id


async def _apply(cursor: aiopg.Cursor, writes: Sequence[_Write]) -> list[Message]:
    """Apply a batch of writes inside a transaction; return the messages stored.

    Two statements: lock the rooms (all in one statement, so in id order), then
    change the members and store the messages of those that exist. A write to a
    room that is gone stores nothing, nor does the leave of a member that is
    gone already. A batch changes each member once at most (see
    _GroupCommit._next_batch), so within the statement no member's changes
    need ordering; the messages are stored in the order of the writes.
    """
    await _LOCK_ROOMS.run(cursor, room_ids=list({str(write.room_id) for write in writes}))
    live = {room_id for (room_id,) in await cursor.fetchall()}
    writes = [write for write in writes if write.room_id in live]
    if not writes:
        return []
    joins = [write for write in writes if write.kind is _Kind.JOIN]
    exits = [write for write in writes if write.kind in (_Kind.LEAVE, _Kind.ERASE)]
    drafts = [write.draft for write in writes if write.kind is not _Kind.ERASE]
    await _APPLY_CHANGES.run(
        cursor,
        join_ids=[str(join.member_id) for join in joins],
        join_room_ids=[str(join.room_id) for join in joins],
        names=[join.draft.member.name for join in joins],
        instance_ids=[str(join.instance_id) for join in joins],
        exit_ids=[str(write.member_id) for write in exits],
        exit_room_ids=[str(write.room_id) for write in exits],
        erased_ids=[str(write.draft.id) for write in exits if write.kind is _Kind.ERASE],
        drafts=_drafts_json(drafts),
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
        self, apply: Callable[[list[_Write]], Awaitable[list[Message]]], max_batch: int
    ) -> None:
        self._apply = apply
        self._max_batch = max_batch
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
        """The oldest writes, in call order, up to `max_batch` or to a second join or
        leave of one member, which waits for the next batch: a batch that both added
        and removed a member would have to know which came first."""
        batch: list[_Pending] = []
        changing: set[UUID] = set()
        while self._queue and len(batch) < self._max_batch:
            write, _ = self._queue[0]
            if write.kind is not _Kind.CHAT:
                if write.member_id in changing:
                    break
                changing.add(write.member_id)
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
                self._erase(write)
        elif message is not None or write.kind in (_Kind.LEAVE, _Kind.ERASE):
            future.set_result(message)
        else:
            future.set_exception(RoomNotFound(str(write.room_id)))

    def _erase(self, join: _Write) -> None:
        erasing = self._enqueue(_Write(_Kind.ERASE, join.draft))
        erasing.add_done_callback(functools.partial(_report_erase, join.member_id))


def _report_erase(member_id: UUID, erasing: asyncio.Future[Message | None]) -> None:
    error = None if erasing.cancelled() else erasing.exception()
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

    def __init__(self, pool: aiopg.Pool, *, timeout: float, max_batch: int = 500) -> None:
        self._pool = pool
        self._timeout = timeout
        self._writes = _GroupCommit(self._commit, max_batch)
        self._available = True

    async def drain(self) -> None:
        """Finish the writes already handed to add_member, remove_member and add_message."""
        await self._writes.drain()

    async def ping(self) -> None:
        async with self._cursor() as cursor:
            await _PING.run(cursor)

    async def create_room(self, room: Room) -> None:
        async with self._cursor() as cursor:
            await _CREATE_ROOM.run(cursor, room_id=room.id, name=room.name)

    async def get_room(self, room_id: UUID) -> Room:
        async with self._cursor() as cursor:
            await _GET_ROOM.run(cursor, room_id=room_id)
            row = await cursor.fetchone()
        if row is None:
            raise RoomNotFound(str(room_id))
        return Room(id=room_id, name=row[0])

    async def list_members(self, room_id: UUID) -> list[Member]:
        async with self._cursor() as cursor:
            await _LIST_MEMBERS.run(cursor, room_id=room_id)
            rows = await cursor.fetchall()
        if not rows:
            raise RoomNotFound(str(room_id))
        return [
            Member(id=member_id, name=name) for member_id, name in rows if member_id is not None
        ]

    async def list_messages(self, room_id: UUID, page: Page) -> list[Message]:
        async with self._cursor() as cursor:
            after_seq, before_seq = await _page_bounds(cursor, room_id, page)
            forward = page.after is not None
            await (_PAGE_FORWARD if forward else _PAGE_BACKWARD).run(
                cursor,
                room_id=room_id,
                after_seq=after_seq,
                before_seq=before_seq,
                limit=page.limit,
            )
            rows = await cursor.fetchall()
        if not forward:
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

    async def delete_message(self, message_id: UUID) -> None:
        async with self._cursor() as cursor:
            await _DELETE_MESSAGE.run(cursor, message_id=message_id)

    async def renew_lease(self, instance_id: UUID, lease_seconds: float) -> None:
        async with self._cursor() as cursor:
            await _RENEW_LEASE.run(
                cursor, instance_id=instance_id, lease=timedelta(seconds=lease_seconds)
            )

    async def release_lease(self, instance_id: UUID) -> None:
        async with self._cursor() as cursor:
            await _RELEASE_LEASE.run(cursor, instance_id=instance_id)

    async def reap_expired_instances(self) -> list[Message]:
        async with self._transaction() as cursor:
            # SKIP LOCKED: an instance another reaper holds is that reaper's job.
            await _LOCK_EXPIRED.run(cursor)
            expired = [instance_id for (instance_id,) in await cursor.fetchall()]
            await _LOCK_ROOMS_OF_DEAD.run(cursor, expired=expired)
            room_ids = [room_id for (room_id,) in await cursor.fetchall()]
            if not expired and not room_ids:
                return []
            # Rooms are locked now: these members cannot leave under our feet,
            # and a concurrent reaper sees them gone once we commit.
            await _DELETE_DEAD.run(cursor, expired=expired, room_ids=room_ids)
            dead = await cursor.fetchall()
            left = await _store(
                cursor,
                [_left(room_id, Member(member_id, name)) for member_id, room_id, name in dead],
            )
            await _SETTLE_ROOMS.run(cursor, room_ids=room_ids)
            await _DELETE_INSTANCES.run(cursor, expired=expired)
        if expired or left:
            log.info("reaped %s dead instances and %s of their members", len(expired), len(left))
        return left

    async def delete_idle_rooms(self, idle_seconds: float) -> list[UUID]:
        async with self._cursor() as cursor:
            await _DELETE_IDLE_ROOMS.run(cursor, idle=timedelta(seconds=idle_seconds))
            deleted = [room_id for (room_id,) in await cursor.fetchall()]
        if deleted:
            log.info("deleted %s idle rooms", len(deleted))
        return deleted

    async def _commit(self, writes: list[_Write]) -> list[Message]:
        if all(write.kind is _Kind.CHAT for write in writes):
            # One statement outside a transaction block, which PostgreSQL commits
            # on its own: no round trips for BEGIN and COMMIT.
            async with self._cursor() as cursor:
                return await _store(cursor, [write.draft for write in writes])
        async with self._transaction() as cursor:
            return await _apply(cursor, writes)

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiopg.Cursor]:
        async with self._cursor() as cursor, cursor.begin():
            yield cursor

    @contextlib.asynccontextmanager
    async def _cursor(self) -> AsyncIterator[aiopg.Cursor]:
        try:
            async with asyncio.timeout(self._timeout), self._pool.acquire() as connection:
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
    """The `seq` range (exclusive) that the page selects from; checks room and cursor."""
    cursor_id = page.after if page.after is not None else page.before
    await _FIND_CURSOR.run(cursor, room_id=room_id, cursor_id=cursor_id)
    row = await cursor.fetchone()
    if row is None:
        raise RoomNotFound(str(room_id))
    seq = row[1]
    if cursor_id is None:
        return 0, _MAX_SEQ
    if seq is None:
        raise MessageNotFound(str(cursor_id))
    return (seq, _MAX_SEQ) if page.after is not None else (0, seq)


def _message(room_id: UUID, row: Sequence[Any]) -> Message:
    message_id, member_id, member_name, kind, text, sent = row
    return Message(
        id=message_id,
        room_id=room_id,
        member_id=member_id,
        member_name=member_name,
        type=MessageType(kind),
        message=text,
        sent=sent.astimezone(UTC),
    )


@contextlib.asynccontextmanager
async def open_postgres_repository(
    dsn: str,
    *,
    pool_min: int = 1,
    pool_max: int = 10,
    timeout: float = 5.0,  # noqa: ASYNC109 - bounds each statement, it is no deadline
) -> AsyncIterator[PostgresRepository]:
    """A repository on a pool of `dsn` (postgresql:// or postgres://); does not migrate.

    `timeout` bounds each call, from the wait for a connection to the commit:
    past it the call raises BackendUnavailable.
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
                on_connect=_prepare_on,
            )
    except _DRIVER_ERRORS as error:
        raise BackendUnavailable(f"PostgreSQL: {_reason(error)}") from error
    repository = PostgresRepository(pool, timeout=timeout)
    try:
        yield repository
    finally:
        await repository.drain()
        pool.close()
        await pool.wait_closed()
