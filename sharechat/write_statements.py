"""The writer's statements: how PostgreSQL stores messages and member changes, fast.

Each is a trick the plain design (one Core statement per change) would not need:
- a batch of any size is two statements sent as one query (one round trip, one
  transaction, no BEGIN/COMMIT): lock its rooms, then one statement of
  data-modifying CTEs that adds and removes the members and stores, numbers
  and trims the messages;
- the messages travel as one JSON parameter read by `json_to_recordset`, and
  uuids as text, so psycopg2 adapts nothing element by element;
- a message that travels alone takes a one-row statement (no JSON, no window),
  sent with the lock of its room;
- PREPARED has them prepared on each connection, so PostgreSQL parses and plans
  them once per connection; WHOLE sends them whole, for a pooler in transaction
  mode, where nothing may outlive a transaction.

Bounding: the statement that stores a room's messages also deletes those its
own push out of the room's bound (see _store).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

import sqlalchemy as sa
from sqlalchemy.sql.dml import ReturningDelete

from sharechat.domain import MessageType
from sharechat.statements import (
    Statement,
    locked_rooms,
    members,
    message_type,
    messages,
    newest_number,
    rooms,
    settle,
    texts,
    uuids,
)


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


def _numbered(new: sa.CTE) -> sa.CTE:
    """The drafts of `new` whose room exists, numbered on from the room's newest, in
    the order of `n`."""
    newest = (
        sa.select(rooms.c.id, newest_number(rooms.c.id).label("number"))
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
            (newest_number(rooms.c.id) + sa.literal_column("1")).label("number"),
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
    group_commit.GroupCommit), and those never need deleting.

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
    """Add many members in one statement, in the order given; returns their rooms.
    A member of a room that is gone is left out."""
    new = (
        sa.func.unnest(
            uuids("join_ids"), uuids("join_room_ids"), texts("names"), uuids("instance_ids")
        )
        .table_valued("id", "room_id", "name", "instance_id", with_ordinality="ord")
        .render_derived()
        .alias("joining")
    )
    rows = (
        sa.select(new.c.id, new.c.room_id, new.c.name, new.c.instance_id, sa.func.clock_timestamp())
        .where(new.c.room_id.in_(sa.select(rooms.c.id)))
        .order_by(new.c.ord)
    )
    columns = ["id", "room_id", "name", "instance_id", "joined"]
    return sa.insert(members).from_select(columns, rows).returning(members.c.room_id)


def _delete_members() -> ReturningDelete[tuple[UUID, UUID]]:
    """Delete many members, each only from the room given with it; returns those deleted."""
    leaving = (
        sa.func.unnest(uuids("exit_ids"), uuids("exit_room_ids"))
        .table_valued("id", "room_id")
        .render_derived()
        .alias("leaving")
    )
    return (
        sa.delete(members)
        .where(members.c.id == leaving.c.id, members.c.room_id == leaving.c.room_id)
        .returning(members.c.id, members.c.room_id)
    )


def _apply_changes() -> sa.Select[tuple[str, datetime, int]]:
    """Joins, leaves and their messages in one statement, for rooms that an earlier
    statement of the transaction locked; returns the stored messages. Changes to a
    room that is gone are left out (its members went with it).

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
    """settle() for the rooms that `joined` and `gone` changed. Their own statement's
    snapshot shows neither change: occupancy is reckoned with both."""
    occupied = sa.or_(
        sa.exists().where(
            members.c.room_id == rooms.c.id, members.c.id.not_in(sa.select(gone.c.id))
        ),
        sa.exists().where(joined.c.room_id == rooms.c.id),
    )
    changed = sa.union(sa.select(joined.c.room_id), sa.select(gone.c.room_id))
    return settle(rooms.c.id.in_(changed), occupied)


@dataclass(frozen=True, slots=True)
class WriteStatements:
    """The writer's statements, prepared or sent whole."""

    lock_rooms: Statement
    # lock_rooms for one room: with prepared statements, planned once per connection
    # (for an array, PostgreSQL plans each call anew).
    lock_room: Statement
    apply_changes: Statement
    # For rooms locked already (an earlier statement of the transaction): see _store.
    insert_messages: Statement
    insert_message: Statement
    # The same, rooms locked first: two statements, one round trip, one transaction.
    store_messages: Statement
    store_message: Statement
    change_members: Statement

    @classmethod
    def build(cls, make: Callable[[str, sa.ClauseElement], Statement]) -> WriteStatements:
        lock_rooms = make(
            "sharechat_lock_rooms", locked_rooms(rooms.c.id == sa.any_(uuids("room_ids")))
        )
        lock_room = make(
            "sharechat_lock_room",
            locked_rooms(rooms.c.id == sa.bindparam("room_id", type_=sa.Uuid)),
        )
        insert_messages = make("sharechat_insert_messages", _insert_messages())
        insert_message = make("sharechat_insert_message", _insert_message())
        apply_changes = make("sharechat_apply_changes", _apply_changes())
        return cls(
            lock_rooms=lock_rooms,
            lock_room=lock_room,
            apply_changes=apply_changes,
            insert_messages=insert_messages,
            insert_message=insert_message,
            store_messages=Statement.chain(lock_rooms, insert_messages),
            store_message=Statement.chain(lock_room, insert_message),
            change_members=Statement.chain(lock_rooms, apply_changes),
        )

    def preparations(self) -> list[str]:
        named = (
            self.lock_rooms,
            self.lock_room,
            self.apply_changes,
            self.insert_messages,
            self.insert_message,
        )
        return [statement.preparation for statement in named if statement.preparation]


PREPARED = WriteStatements.build(Statement.prepared)
# Without server-side PREPARE, for poolers that hand each transaction another server
# connection (PgBouncer's pool_mode = transaction): nothing outlives a transaction.
WHOLE = WriteStatements.build(lambda name, statement: Statement.compile(statement))
