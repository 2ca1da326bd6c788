"""Group commit: concurrent joins, leaves and chat messages applied together.

The PostgreSQL repository hands every write to one `GroupCommit`. While a
batch is in flight, new writes queue up and go together in the next one; at
low load a write goes alone, at once (there is no timer). So a burst costs a
few commits (fsyncs) and round trips instead of a few per call, and a room's
messages are numbered in the order the calls were made.

The batching knows nothing of SQL: it is built with the function that applies
a batch (storing.Store, through PostgresRepository) and the one that finds
what a batch stored, for a batch whose commit is in doubt (see GroupCommit._resolve).
"""

from __future__ import annotations

import asyncio
import collections
import enum
import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import cast
from uuid import UUID

from sharechat import domain
from sharechat.domain import BackendUnavailable, Draft, InDoubt, Member, Message, RoomNotFound

log = logging.getLogger(__name__)


class Kind(enum.Enum):
    CHAT = enum.auto()
    JOIN = enum.auto()
    LEAVE = enum.auto()


@dataclass(frozen=True, slots=True)
class Write:
    """One change queued for the writer; `draft` is the message it stores."""

    kind: Kind
    draft: Draft
    instance_id: UUID | None = None  # of a joining member

    @property
    def room_id(self) -> UUID:
        return self.draft.room_id

    @property
    def member_id(self) -> UUID:
        return self.draft.member.id


# Applies a batch inside one transaction; returns the messages stored, leaving out
# the writes to rooms that are gone and the leaves of members gone already. Raises
# BackendUnavailable when the transaction did not commit, InDoubt when it may have.
Apply = Callable[[list[Write]], Awaitable[list[Message]]]
# Which of the drafts are stored, once any transaction that stored them has ended.
Find = Callable[[list[Draft]], Awaitable[list[Message]]]
_Pending = tuple[Write, asyncio.Future[Message | None]]

RESOLVE_WITHIN = 30.0  # seconds to find out what became of a batch in doubt


class GroupCommit:
    """Applies concurrent writes together: one transaction, one commit per batch.

    A task of its own does the writing, so a caller that is cancelled never
    cancels the transaction carrying the writes of others. The queue holds one
    entry per waiting caller, so the callers themselves bound it.
    """

    def __init__(
        self,
        apply: Apply,
        find: Find,
        *,
        max_batch: int,
        room_max_messages: int,
        resolve_within: float = RESOLVE_WITHIN,
    ) -> None:
        self._apply = apply
        self._find = find
        self._resolve_within = resolve_within
        self._max_batch = max_batch
        self._room_max_messages = room_max_messages
        self._queue: collections.deque[_Pending] = collections.deque()
        self._writer: asyncio.Task[None] | None = None
        self._resolutions: set[asyncio.Task[None]] = set()

    async def join(self, room_id: UUID, member: Member, instance_id: UUID) -> Message:
        """Raises RoomNotFound, BackendUnavailable (not stored), InDoubt."""
        stored = await self._enqueue(Write(Kind.JOIN, domain.joined(room_id, member), instance_id))
        return cast(Message, stored)  # a join stores its message, or raises

    async def leave(self, room_id: UUID, member: Member) -> Message | None:
        """None when the member or its room was gone already. Raises BackendUnavailable."""
        return await self._enqueue(Write(Kind.LEAVE, domain.left(room_id, member)))

    async def say(self, draft: Draft) -> Message:
        """Raises RoomNotFound, BackendUnavailable (not stored), InDoubt."""
        return cast(Message, await self._enqueue(Write(Kind.CHAT, draft)))

    async def drain(self) -> None:
        """Wait until every queued write is applied or has failed; writes still in
        doubt fail with InDoubt at once."""
        if self._writer is not None:
            await asyncio.shield(self._writer)
        for resolution in self._resolutions:
            resolution.cancel()
        await asyncio.gather(*self._resolutions, return_exceptions=True)

    def _enqueue(self, write: Write) -> asyncio.Future[Message | None]:
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
            if write.kind is not Kind.CHAT:
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
            stored = await self._apply([w for w, _ in batch])
        except asyncio.CancelledError:
            for _, future in batch:
                future.cancel()
            raise
        except InDoubt as error:
            # Found out aside: the writes queued meanwhile need not wait for it.
            resolution = asyncio.create_task(self._resolve(batch, error))
            self._resolutions.add(resolution)
            resolution.add_done_callback(self._resolutions.discard)
            return
        except Exception as error:
            _fail(batch, error)
            return
        self._settle_all(batch, stored)

    async def _resolve(self, batch: list[_Pending], doubt: InDoubt) -> None:
        """A batch whose transaction may have committed: ask the backend which of its
        messages are stored, again and again until it answers or RESOLVE_WITHIN has
        passed. A transaction commits whole: none found, it did not commit."""
        log.warning("%s writes in doubt, finding out: %s", len(batch), doubt)
        try:
            async with asyncio.timeout(self._resolve_within):
                stored = await self._found([write.draft for write, _ in batch])
        except TimeoutError:
            log.error("%s writes left in doubt: %s", len(batch), doubt)
            for write, future in batch:
                if future.cancelled() and write.kind is Kind.JOIN:
                    self._undo(write)  # removing a member that is not there does nothing
            _fail(batch, doubt)
            return
        except asyncio.CancelledError:  # drain(): the repository is closing
            _fail(batch, doubt)
            raise
        if stored:
            self._settle_all(batch, stored)
        else:
            _fail(batch, BackendUnavailable(*doubt.args))

    async def _found(self, drafts: list[Draft]) -> list[Message]:
        pause = 0.1
        while True:
            try:
                return await self._find(drafts)
            except BackendUnavailable:
                await asyncio.sleep(pause)  # the backend is still away
                pause = min(pause * 2, 1.0)

    def _settle_all(self, batch: list[_Pending], stored: list[Message]) -> None:
        by_id = {message.id: message for message in stored}
        for write, future in batch:
            self._settle(write, future, by_id.get(write.draft.id))

    def _settle(
        self, write: Write, future: asyncio.Future[Message | None], message: Message | None
    ) -> None:
        if future.cancelled():  # the caller gave up while its write was in flight
            if write.kind is Kind.JOIN and message is not None:
                self._undo(write)
        elif message is not None or write.kind is Kind.LEAVE:
            future.set_result(message)
        else:
            future.set_exception(RoomNotFound(str(write.room_id)))

    def _undo(self, join: Write) -> None:
        """A join whose caller gave up once it was stored: nobody will ever remove the
        member, so it leaves at once. Its `joined` and `left` reach the room like any
        message nobody published (see Housekeeping._audit_rooms): a stored message is
        never taken back, so numbers are never reused."""
        member = join.draft.member
        leaving = self._enqueue(Write(Kind.LEAVE, domain.left(join.room_id, member)))
        leaving.add_done_callback(functools.partial(_report_undo, member.id))


def _report_undo(member_id: UUID, leaving: asyncio.Future[Message | None]) -> None:
    error = None if leaving.cancelled() else leaving.exception()
    if error is not None:
        log.error("member %s of a cancelled join stays listed: %s", member_id, error)


def _fail(batch: list[_Pending], error: Exception) -> None:
    for _, future in batch:
        if not future.done():
            future.set_exception(_own_copy(error))


def _own_copy(error: Exception) -> Exception:
    """One exception object raised in many tasks would mix their tracebacks."""
    if not isinstance(error, BackendUnavailable):
        return error
    copy = type(error)(*error.args)
    copy.__cause__ = error.__cause__
    return copy
