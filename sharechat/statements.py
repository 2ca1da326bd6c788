"""The PostgreSQL tables as SQLAlchemy Core, and the statements the repository
runs for rooms, history, leases and housekeeping, each compiled once for
psycopg2. The writer's statements (storing messages, joins and leaves) are in
storing.py, built from the pieces here.

The tables mirror sql/*.sql; a test proves them equal to the migrated schema.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from uuid import UUID

import aiopg
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.dml import ReturningDelete

from sharechat.domain import STORED_TYPES

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


@dataclass(frozen=True, slots=True)
class Statement:
    """A statement compiled once for psycopg2; `constants` are the binds Core made itself.

    `preparation` is set for one made by `prepared`: the PREPARE that a connection
    must have run before `sql` (an EXECUTE) can run on it.
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
        """Runs as EXECUTE `name`, on connections that ran its `preparation`."""
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


# --- pieces the statements here and in storing.py share --------------------------------


def uuids(name: str) -> sa.Cast[Any]:
    """An array of uuids, sent as text: psycopg2 quotes a list of str in C, while
    its uuid adapter is Python code called per element."""
    return sa.cast(texts(name), postgresql.ARRAY(sa.Uuid))


def texts(name: str) -> sa.Cast[Any]:
    return sa.cast(sa.bindparam(name), postgresql.ARRAY(sa.Text))


def locked_rooms(which: sa.ColumnElement[bool]) -> sa.Select[tuple[UUID]]:
    """Lock rooms in id order, so that two transactions never wait on each other in a cycle.

    FOR NO KEY UPDATE: whatever adds or removes a member or stores a message
    locks its room first, so that a room's changes never race each other and its
    messages are numbered in commit order.
    """
    return sa.select(rooms.c.id).where(which).order_by(rooms.c.id).with_for_update(key_share=True)


def newest_number(room_id: sa.ColumnElement[UUID]) -> sa.ScalarSelect[int]:
    """The number of the room's newest message, 0 for none; one step down an index."""
    newest = sa.func.coalesce(sa.func.max(messages.c.number), sa.literal_column("0"))
    return sa.select(newest).where(messages.c.room_id == room_id).scalar_subquery()


def settle(which: sa.ColumnElement[bool], occupied: sa.ColumnElement[bool]) -> sa.Update:
    """Make `emptied_at` agree with the members: NULL while the room has some, else
    the moment it became empty. Touches only the rooms where the two disagree, so
    that a room that was empty keeps its moment, and one that just emptied gets now.
    """
    return (
        sa.update(rooms)
        .where(which, rooms.c.emptied_at.is_(None) != occupied)
        .values(emptied_at=sa.case((occupied, sa.null()), else_=sa.func.clock_timestamp()))
    )


# --- the statements --------------------------------------------------------------------


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
    members.c.instance_id == sa.any_(uuids("expired")),
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

# Messages by id, as storing.Store returns them: id as text, sent, number.
FIND_MESSAGES = Statement.compile(
    sa.select(sa.cast(messages.c.id, sa.Text), messages.c.sent, messages.c.number).where(
        messages.c.id == sa.any_(uuids("ids"))
    )
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
# The newest number of each of the rooms (those without a message answer none).
NEWEST_NUMBERS = Statement.compile(
    sa.select(rooms.c.id, newest_number(rooms.c.id)).where(rooms.c.id == sa.any_(uuids("room_ids")))
)

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
    locked_rooms(rooms.c.id.in_(sa.select(members.c.room_id).where(_dead)))
)
DELETE_DEAD = Statement.compile(
    sa.delete(members)
    .where(members.c.room_id == sa.any_(uuids("room_ids")), _dead)
    .returning(members.c.id, members.c.room_id, members.c.name)
)
SETTLE_ROOMS = Statement.compile(
    settle(
        rooms.c.id == sa.any_(uuids("room_ids")), sa.exists().where(members.c.room_id == rooms.c.id)
    )
)
DELETE_INSTANCES = Statement.compile(
    sa.delete(instances).where(instances.c.id == sa.any_(uuids("expired")))
)
DELETE_IDLE_ROOMS = Statement.compile(_delete_idle_rooms())


def _trim_rooms() -> sa.Delete:
    """Drop every room's messages beyond the newest `keep`, whatever lies below."""
    keep = sa.bindparam("keep", type_=sa.BigInteger)
    newest = sa.select(rooms.c.id, newest_number(rooms.c.id).label("number")).subquery("newest")
    return sa.delete(messages).where(
        messages.c.room_id == newest.c.id,
        messages.c.number <= newest.c.number - keep,
        newest.c.number > keep,
    )


# Once at start-up: the stores only drop what their own messages push out (see storing.py).
TRIM_ROOMS = Statement.compile(_trim_rooms())
