"""The PostgreSQL tables as SQLAlchemy Core, and every statement the repository
runs, built with Core and compiled once for psycopg2 (see postgres.py for how
they are used, and for the locking they do).

The tables mirror sql/*.sql; a test proves them equal to the migrated schema.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast
from uuid import UUID

import aiopg
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.dml import ReturningDelete

from sharechat.domain import STORED_TYPES, MessageType

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
    # 1, 2, 3, ... in the room's history; see sql/002_message_numbers.sql.
    sa.Column("number", sa.BigInteger, nullable=False),
    sa.Index("messages_room_id_number_idx", "room_id", "number", unique=True),
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
MAX_NUMBER = 2**63 - 1


@dataclass(frozen=True, slots=True)
class Statement:
    """A statement compiled once for psycopg2; `constants` are the binds Core made itself.

    A hot one is also prepared on every connection (see prepare_on): PostgreSQL
    then parses and plans it once per connection instead of once per call, a
    tenth of a millisecond of the ~0.4 that storing a lone message takes.
    """

    sql: str
    constants: dict[str, Any]
    preparation: str | None = None

    @classmethod
    def compile(cls, statement: sa.ClauseElement) -> Statement:
        compiled = statement.compile(dialect=_dialect)
        return cls(str(compiled), _constants(compiled))

    @classmethod
    def prepared(cls, name: str, statement: sa.ClauseElement) -> Statement:
        """Runs as EXECUTE `name` on connections that prepare_on has prepared."""
        numbered = statement.compile(dialect=_numbered_dialect)
        assert isinstance(numbered, SQLCompiler)
        arguments = ", ".join(f"%({param})s" for param in numbered.positiontup or ())
        return cls(
            f"EXECUTE {name}({arguments})", _constants(numbered), f"PREPARE {name} AS {numbered}"
        )

    @classmethod
    def chain(cls, *statements: Statement) -> Statement:
        """The statements sent as one query, in one round trip. PostgreSQL runs
        them in one transaction (an implicit one, unless inside a block), each
        with a snapshot of its own; the rows are the last one's."""
        constants = {name: value for s in statements for name, value in s.constants.items()}
        return cls("; ".join(statement.sql for statement in statements), constants)

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


def _newest_number(room_id: sa.ColumnElement[UUID]) -> sa.ScalarSelect[int]:
    """The number of the room's newest message, 0 for none; one step down an index."""
    newest = sa.func.coalesce(sa.func.max(messages.c.number), sa.literal_column("0"))
    return sa.select(newest).where(messages.c.room_id == room_id).scalar_subquery()


def _numbered(new: sa.CTE) -> sa.CTE:
    """The drafts of `new` whose room exists, numbered on from the room's newest, in
    the order of `n`."""
    newest = (
        sa.select(rooms.c.id, _newest_number(rooms.c.id).label("number"))
        .where(rooms.c.id.in_(sa.select(new.c.room_id)))
        .cte("newest")
        .prefix_with("MATERIALIZED")  # once per room, not once per draft
    )
    rank = sa.func.row_number().over(partition_by=new.c.room_id, order_by=new.c.n)
    return (
        sa.select(new, (newest.c.number + rank).label("number"))
        .join_from(new, newest, newest.c.id == new.c.room_id)
        .cte("numbered")
    )


def _lone_numbered() -> sa.CTE:
    """_numbered for one message, a parameter per column: no JSON to parse, no window."""
    return (
        sa.select(
            sa.literal_column("0", sa.Integer).label("n"),
            sa.bindparam("id", type_=sa.Uuid).label("id"),
            rooms.c.id.label("room_id"),
            sa.bindparam("member_id", type_=sa.Uuid).label("member_id"),
            sa.bindparam("member_name", type_=sa.Text).label("member_name"),
            sa.bindparam("type", type_=sa.Text).label("type"),
            sa.bindparam("message", type_=sa.Text).label("message"),
            (_newest_number(rooms.c.id) + sa.literal_column("1")).label("number"),
        )
        .where(rooms.c.id == sa.bindparam("room_id", type_=sa.Uuid))
        .cte("numbered")
    )


def _store(numbered: sa.CTE, spans: sa.FromClause) -> tuple[sa.CTE, sa.CTE]:
    """Store the `numbered` drafts in the order of `n`, and trim their rooms to the
    newest `keep` messages. `spans` has a row (room_id, first, last) for each room:
    the numbers of its first and last draft. Returns `stored` (id as text and sent
    of each message stored) and `trimmed`, the delete: add both to the statement.

    The rooms must be locked by an earlier statement of the transaction: then this
    statement's snapshot, taken after, holds every message of those rooms, so the
    numbers go on from the true newest and the delete sees every message it must
    delete, whichever instance stored it. It cannot see the rows of its own
    statement: a statement stores `keep` messages of a room at most (see
    postgres._GroupCommit), and those never need deleting.

    Storing `first`..`last` drops `first - keep`..`last - keep`: what lies below was
    dropped by the stores before (TRIM_ROOMS makes it so at start-up, for a bound
    lowered since). Bounded below, the delete never walks the dead index entries of
    the messages dropped before, which pile up in a busy room until VACUUM.
    """
    rows = sa.select(
        numbered.c.id,
        numbered.c.room_id,
        numbered.c.member_id,
        numbered.c.member_name,
        sa.cast(numbered.c.type, message_type),
        numbered.c.message,
        numbered.c.number,
        # Evaluated per row after the ORDER BY, so `sent` follows `seq` and `number`.
        sa.func.clock_timestamp(),
    ).order_by(numbered.c.n)
    columns = ["id", "room_id", "member_id", "member_name", "type", "message", "number", "sent"]
    # The id as text: it is matched with the text the caller sent, no uuid parsed per row.
    stored_id = sa.cast(messages.c.id, sa.Text).label("id")
    stored = (
        sa.insert(messages)
        .from_select(columns, rows)
        .returning(stored_id, messages.c.sent, messages.c.number)
        .cte("stored")
    )
    keep = sa.bindparam("keep", type_=sa.BigInteger)
    trimmed = (
        sa.delete(messages)
        .where(
            messages.c.room_id == spans.c.room_id,
            messages.c.number.between(spans.c.first - keep, spans.c.last - keep),
            # Only the rooms over the bound: below it the delete reads no index at all.
            spans.c.last > keep,
        )
        .cte("trimmed")
    )
    return stored, trimmed


def _spans(numbered: sa.CTE) -> sa.Subquery:
    first, last = sa.func.min(numbered.c.number), sa.func.max(numbered.c.number)
    return (
        sa.select(numbered.c.room_id, first.label("first"), last.label("last"))
        .group_by(numbered.c.room_id)
        .subquery("spans")
    )


def _insert_messages() -> sa.Select[tuple[str, datetime, int]]:
    """Store many messages in one statement, in the order given (see _store).

    Rows whose room no longer exists are skipped instead of failing the batch.
    """
    numbered = _numbered(_drafts())
    stored, trimmed = _store(numbered, _spans(numbered))
    return sa.select(stored.c.id, stored.c.sent, stored.c.number).add_cte(trimmed)


def _insert_message() -> sa.Select[tuple[str, datetime, int]]:
    """_insert_messages for one message, the cheaper for it when it travels alone."""
    numbered = _lone_numbered()
    span = sa.select(
        numbered.c.room_id, numbered.c.number.label("first"), numbered.c.number.label("last")
    ).subquery("spans")
    stored, trimmed = _store(numbered, span)
    return sa.select(stored.c.id, stored.c.sent, stored.c.number).add_cte(trimmed)


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


def _apply_changes() -> sa.Select[tuple[str, datetime, int]]:
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
    numbered = _numbered(sa.select(new).where(kept).cte("kept"))
    stored, trimmed = _store(numbered, _spans(numbered))
    settled = _settle_changed(joined, gone).cte("settled")
    # Data-modifying CTEs run whether or not the query reads them; add_cte renders them.
    return sa.select(stored.c.id, stored.c.sent, stored.c.number).add_cte(
        joined, gone, settled, trimmed
    )


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

PING = Statement.compile(sa.select(sa.true()))
CREATE_ROOM = Statement.compile(
    sa.insert(rooms).values(
        id=sa.bindparam("room_id"),
        name=sa.bindparam("name"),
        created=sa.func.now(),
        # Empty from birth: a room nobody ever joins expires like any other.
        emptied_at=sa.func.now(),
    )
)
GET_ROOM = Statement.compile(sa.select(rooms.c.name).where(rooms.c.id == sa.bindparam("room_id")))
# An outer join tells a missing room (no row) from an empty one (a row of NULLs).
LIST_MEMBERS = Statement.compile(
    sa.select(members.c.id, members.c.name)
    .select_from(rooms.outerjoin(members))
    .where(rooms.c.id == sa.bindparam("room_id"))
    .order_by(members.c.joined, members.c.id)
)
FIND_CURSOR = Statement.compile(
    sa.select(
        rooms.c.id,
        sa.select(messages.c.number)
        .where(messages.c.id == sa.bindparam("cursor_id"), messages.c.room_id == rooms.c.id)
        .scalar_subquery(),
    ).where(rooms.c.id == sa.bindparam("room_id"))
)


def _page(order: sa.UnaryExpression[Any]) -> Statement:
    return Statement.compile(
        sa.select(
            messages.c.id,
            messages.c.member_id,
            messages.c.member_name,
            messages.c.type,
            messages.c.message,
            messages.c.sent,
            messages.c.number,
        )
        .where(
            messages.c.room_id == sa.bindparam("room_id"),
            messages.c.number > sa.bindparam("after_number"),
            messages.c.number < sa.bindparam("before_number"),
        )
        .order_by(order)
        .limit(sa.bindparam("limit"))
    )


PAGE_BACKWARD = _page(messages.c.number.desc())
PAGE_FORWARD = _page(messages.c.number.asc())

LOCK_ROOMS = Statement.prepared(
    "sharechat_lock_rooms", _locked_rooms(rooms.c.id == sa.any_(_uuids("room_ids")))
)
# LOCK_ROOMS for one room: planned once per connection (for an array, PostgreSQL
# plans each call anew).
LOCK_ROOM = Statement.prepared(
    "sharechat_lock_room", _locked_rooms(rooms.c.id == sa.bindparam("room_id", type_=sa.Uuid))
)
APPLY_CHANGES = Statement.prepared("sharechat_apply_changes", _apply_changes())
SETTLE_ROOMS = Statement.compile(
    _settle(
        rooms.c.id == sa.any_(_uuids("room_ids")),
        sa.exists().where(members.c.room_id == rooms.c.id),
    )
)
# For rooms locked already (an earlier statement of the transaction): see _store.
INSERT_MESSAGES = Statement.prepared("sharechat_insert_messages", _insert_messages())
INSERT_MESSAGE = Statement.prepared("sharechat_insert_message", _insert_message())
# The same, rooms locked first: two statements, one round trip, one transaction.
STORE_MESSAGES = Statement.chain(LOCK_ROOMS, INSERT_MESSAGES)
STORE_MESSAGE = Statement.chain(LOCK_ROOM, INSERT_MESSAGE)
# The newest number of each of the rooms (those without a message answer none).
NEWEST_NUMBERS = Statement.compile(
    sa.select(rooms.c.id, _newest_number(rooms.c.id)).where(
        rooms.c.id == sa.any_(_uuids("room_ids"))
    )
)

# The statements of the writer, which runs for every message, join and leave.
HOT = (LOCK_ROOMS, LOCK_ROOM, APPLY_CHANGES, INSERT_MESSAGES, INSERT_MESSAGE)


async def prepare_on(connection: aiopg.Connection) -> None:
    """Prepare the hot statements on a new connection of the pool.

    A connection pooler in transaction mode (PgBouncer's pool_mode=transaction)
    would run them on one server connection and the EXECUTEs on others: point
    DATABASE_URL at PostgreSQL itself, or at a pooler in session mode.
    """
    async with connection.cursor() as cursor:
        await cursor.execute("; ".join(cast(str, hot.preparation) for hot in HOT))


RENEW_LEASE = Statement.compile(_renew_lease())
RELEASE_LEASE = Statement.compile(
    sa.delete(instances).where(instances.c.id == sa.bindparam("instance_id"))
)
LOCK_EXPIRED = Statement.compile(
    sa.select(instances.c.id)
    .where(instances.c.lease_expires < sa.func.clock_timestamp())
    .with_for_update(skip_locked=True)
)
LOCK_ROOMS_OF_DEAD = Statement.compile(
    _locked_rooms(rooms.c.id.in_(sa.select(members.c.room_id).where(_dead)))
)
DELETE_DEAD = Statement.compile(
    sa.delete(members)
    .where(members.c.room_id == sa.any_(_uuids("room_ids")), _dead)
    .returning(members.c.id, members.c.room_id, members.c.name)
)
DELETE_INSTANCES = Statement.compile(
    sa.delete(instances).where(instances.c.id == sa.any_(_uuids("expired")))
)
DELETE_IDLE_ROOMS = Statement.compile(_delete_idle_rooms())


def _trim_rooms() -> sa.Delete:
    """Drop every room's messages beyond the newest `keep`, whatever lies below."""
    keep = sa.bindparam("keep", type_=sa.BigInteger)
    newest = sa.select(rooms.c.id, _newest_number(rooms.c.id).label("number")).subquery("newest")
    return sa.delete(messages).where(
        messages.c.room_id == newest.c.id,
        messages.c.number <= newest.c.number - keep,
        newest.c.number > keep,
    )


# Once at start-up: the stores only drop what their own messages push out (see _store).
TRIM_ROOMS = Statement.compile(_trim_rooms())
