"""The writer's statements (write_statements.py) bound and run on a cursor: the
PostgreSQL side of group commit."""

from __future__ import annotations

import collections
from collections.abc import Sequence
from datetime import datetime
from uuid import UUID

import aiopg
import orjson

from sharechat.domain import Draft, Message
from sharechat.group_commit import Kind, Write
from sharechat.statements import FIND_MESSAGES
from sharechat.write_statements import PREPARED, WHOLE


class Store:
    """Runs the writer's statements on a cursor; `keep` messages a room at most."""

    def __init__(self, keep: int, *, prepared: bool) -> None:
        """`prepared`: the pool's connections ran prepare_on."""
        self.keep = keep
        self._statements = PREPARED if prepared else WHOLE

    async def messages(
        self, cursor: aiopg.Cursor, drafts: Sequence[Draft], *, lock: bool
    ) -> list[Message]:
        """Store the drafts in one statement; those whose room is gone are left out.
        `lock`: lock their rooms first, in the same round trip; else an earlier
        statement of the transaction has locked them. At most `keep` drafts of one
        room (see write_statements._store)."""
        if not drafts:
            return []
        run = self._statements
        if len(drafts) == 1:
            (draft,) = drafts
            await (run.store_message if lock else run.insert_message).run(
                cursor,
                id=str(draft.id),
                room_id=str(draft.room_id),
                member_id=str(draft.member.id),
                member_name=draft.member.name,
                type=draft.type.value,
                message=draft.text,
                keep=self.keep,
            )
        else:
            await (run.store_messages if lock else run.insert_messages).run(
                cursor,
                room_ids=[str(room_id) for room_id in {draft.room_id for draft in drafts}],
                drafts=_drafts_json(drafts),
                keep=self.keep,
            )
        return _stored(drafts, await cursor.fetchall())

    async def all_messages(self, cursor: aiopg.Cursor, drafts: Sequence[Draft]) -> list[Message]:
        """messages() for any number of drafts of rooms locked already: a statement
        each time one would store over `keep` of a room."""
        stored = []
        for run in _one_statement_each(drafts, self.keep):
            stored += await self.messages(cursor, run, lock=False)
        return stored

    async def changes(self, cursor: aiopg.Cursor, writes: Sequence[Write]) -> list[Message]:
        """Apply a batch of writes in one round trip; return the messages stored.

        Two statements in one query, so one transaction: lock the rooms (all in one
        statement, so in id order), then change the members and store the messages
        of those that exist. A write to a room that is gone stores nothing, nor does
        the leave of a member that is gone already. A batch changes each member once
        at most (see GroupCommit._next_batch), so within the statement no member's
        changes need ordering; the messages are stored in the order of the writes,
        `keep` of a room at most.
        """
        joins = [write for write in writes if write.kind is Kind.JOIN]
        exits = [write for write in writes if write.kind is Kind.LEAVE]
        drafts = [write.draft for write in writes]
        await self._statements.change_members.run(
            cursor,
            room_ids=list({str(write.room_id) for write in writes}),
            join_ids=[str(join.member_id) for join in joins],
            join_room_ids=[str(join.room_id) for join in joins],
            names=[join.draft.member.name for join in joins],
            instance_ids=[str(join.instance_id) for join in joins],
            exit_ids=[str(write.member_id) for write in exits],
            exit_room_ids=[str(write.room_id) for write in exits],
            drafts=_drafts_json(drafts),
            keep=self.keep,
        )
        return _stored(drafts, await cursor.fetchall())

    async def find(self, cursor: aiopg.Cursor, drafts: Sequence[Draft]) -> list[Message]:
        """The drafts stored already, inside a transaction. Their rooms are locked
        first: a statement that stores one of them and is still running (its
        connection broke, PostgreSQL has not noticed yet) holds a room's lock, so
        this waits until it has committed or rolled back, then looks."""
        room_ids = list({str(draft.room_id) for draft in drafts})
        await self._statements.lock_rooms.run(cursor, room_ids=room_ids)
        await FIND_MESSAGES.run(cursor, ids=[str(draft.id) for draft in drafts])
        return _stored(drafts, await cursor.fetchall())


async def prepare_on(connection: aiopg.Connection) -> None:
    """Prepare the writer's statements on a new connection of the pool, planned once.

    Left to choose, PostgreSQL plans a prepared statement anew for every call when a
    plan for its parameters looks cheaper than one for any (a custom plan): here it
    always does, since it knows the length of each array but not what a JSON holds,
    and planning the join-and-leave statement costs more than running it. The
    generic plan is as good: no choice in these plans turns on the parameters.
    """
    async with connection.cursor() as cursor:
        await cursor.execute(
            "; ".join(["SET plan_cache_mode = force_generic_plan", *PREPARED.preparations()])
        )


def _one_statement_each(drafts: Sequence[Draft], keep: int) -> list[list[Draft]]:
    """The drafts in order, cut where one statement would store over `keep` of a room."""
    runs: list[list[Draft]] = [[]]
    in_room: collections.Counter[UUID] = collections.Counter()
    for draft in drafts:
        if in_room[draft.room_id] == keep:
            runs.append([])
            in_room.clear()
        in_room[draft.room_id] += 1
        runs[-1].append(draft)
    return runs


def _drafts_json(drafts: Sequence[Draft]) -> str:
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


def _stored(drafts: Sequence[Draft], rows: Sequence[tuple[str, datetime, int]]) -> list[Message]:
    """The drafts that `rows` (id as text, sent, number) say were stored, as messages."""
    by_id = {message_id: (sent, number) for message_id, sent, number in rows}
    stored = []
    for draft in drafts:
        row = by_id.get(str(draft.id))
        if row is not None:
            stored.append(draft.stored(*row))
    return stored
