"""The embedded backends: a repository and a queue that live in this process.

They are real backends, not test fakes: `sharechat serve` with no service
configured runs on them.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from uuid import UUID

from sharechat import domain
from sharechat.domain import (
    Draft,
    Member,
    Message,
    MessageNotFound,
    Room,
    RoomNotFound,
    utcnow,
)
from sharechat.ports import Deliver, Page, no_listener


@dataclass
class _RoomState:
    """A room and its history.

    The history is `messages[head:]`, oldest first, and `numbers[head:]` their
    numbers (see Repository). Dropping the oldest only moves `head`; the dead
    prefix is cut off once it is half the lists, so each message is moved once
    at most: O(1) amortised.
    """

    room: Room
    members: dict[UUID, Member] = field(default_factory=dict)
    messages: list[Message] = field(default_factory=list)
    numbers: list[int] = field(default_factory=list)
    head: int = 0
    number_of: dict[UUID, int] = field(default_factory=dict)  # of each message kept
    emptied_at: float | None = field(default_factory=time.monotonic)

    @property
    def size(self) -> int:
        """Messages in the history."""
        return len(self.messages) - self.head

    def next_number(self) -> int:
        return self.numbers[-1] + 1 if self.size else 1

    def append(self, message: Message) -> None:
        """Store the message, numbered next_number(), as the newest."""
        self.number_of[message.id] = message.number
        self.messages.append(message)
        self.numbers.append(message.number)

    def after(self, number: int, limit: int) -> list[Message]:
        start = bisect.bisect_right(self.numbers, number, self.head)
        return self.messages[start : start + limit]

    def number(self, message_id: UUID) -> int:
        try:
            return self.number_of[message_id]
        except KeyError:
            raise MessageNotFound(str(message_id)) from None

    def between(self, low: int, high: int) -> tuple[int, int]:
        """Where the messages numbered between `low` and `high` (both left out) are
        in the history (0: the oldest kept), as start and end (exclusive)."""
        start = bisect.bisect_right(self.numbers, low, self.head)
        return start - self.head, bisect.bisect_left(self.numbers, high, start) - self.head

    def history(self, start: int, end: int) -> list[Message]:
        return self.messages[self.head + start : self.head + end]

    def drop_up_to(self, number: int) -> list[Message]:
        """Drop the messages numbered `number` or below; return them."""
        dropped = []
        while self.head < len(self.messages) and self.numbers[self.head] <= number:
            dropped.append(self.messages[self.head])
            del self.number_of[dropped[-1].id]
            self.head += 1
        if self.head * 2 >= len(self.messages):
            del self.messages[: self.head]
            del self.numbers[: self.head]
            self.head = 0
        return dropped


class MemoryRepository:
    def __init__(self, *, room_max_messages: int = 0) -> None:
        """`room_max_messages`: the history a room keeps, oldest dropped first; 0 = all."""
        self._rooms: dict[UUID, _RoomState] = {}
        self._message_rooms: dict[UUID, UUID] = {}
        self._room_max_messages = room_max_messages

    async def ping(self) -> None:
        return None

    async def create_room(self, room: Room) -> None:
        self._rooms[room.id] = _RoomState(room)

    async def get_room(self, room_id: UUID) -> Room:
        return self._state(room_id).room

    async def list_members(self, room_id: UUID) -> list[Member]:
        return list(self._state(room_id).members.values())

    async def list_messages(self, room_id: UUID, page: Page) -> list[Message]:
        state = self._state(room_id)
        cursor = page.cursor
        numbers = page.numbers(0 if cursor is None else state.number(cursor))
        return state.history(*page.window(*state.between(*numbers)))

    async def add_member(self, room_id: UUID, member: Member, instance_id: UUID) -> Message:
        state = self._state(room_id)
        state.members[member.id] = member
        state.emptied_at = None
        return self._store(state, domain.joined(room_id, member))

    async def remove_member(self, room_id: UUID, member: Member) -> Message | None:
        state = self._rooms.get(room_id)
        if state is None or state.members.pop(member.id, None) is None:
            return None
        if not state.members:
            state.emptied_at = time.monotonic()
        return self._store(state, domain.left(room_id, member))

    async def add_message(self, draft: Draft) -> Message:
        return self._store(self._state(draft.room_id), draft)

    async def message_number(self, room_id: UUID, message_id: UUID) -> int:
        return self._state(room_id).number(message_id)

    async def messages_after(self, room_id: UUID, number: int, limit: int) -> list[Message]:
        state = self._rooms.get(room_id)
        return [] if state is None else state.after(number, limit)

    async def newest_numbers(self, room_ids: Sequence[UUID]) -> dict[UUID, int]:
        newest = {}
        for room_id in room_ids:
            state = self._rooms.get(room_id)
            if state is not None and state.size:
                newest[room_id] = state.numbers[-1]
        return newest

    async def renew_lease(self, instance_id: UUID, lease_seconds: float) -> None:
        return None  # one process: its members live and die with it

    async def release_lease(self, instance_id: UUID) -> None:
        return None

    async def reap_expired_instances(self) -> list[Message]:
        return []

    async def delete_idle_rooms(self, idle_seconds: float) -> list[UUID]:
        deadline = time.monotonic() - idle_seconds
        idle = [
            room_id
            for room_id, state in self._rooms.items()
            if state.emptied_at is not None and state.emptied_at <= deadline
        ]
        for room_id in idle:
            for message_id in self._rooms.pop(room_id).number_of:
                del self._message_rooms[message_id]
        return idle

    def _state(self, room_id: UUID) -> _RoomState:
        try:
            return self._rooms[room_id]
        except KeyError:
            raise RoomNotFound(str(room_id)) from None

    def _store(self, state: _RoomState, draft: domain.Draft) -> Message:
        message = draft.stored(utcnow(), state.next_number())
        self._message_rooms[message.id] = state.room.id
        state.append(message)
        number = message.number
        if self._room_max_messages and number > self._room_max_messages:
            for dropped in state.drop_up_to(number - self._room_max_messages):
                del self._message_rooms[dropped.id]
        return message


class MemoryQueue:
    """Publish hands the payload straight to this process's subscribers."""

    def __init__(self) -> None:
        self._subscribed: set[UUID] = set()
        self._deliver: Deliver = no_listener

    def on_message(self, deliver: Deliver, /) -> None:
        self._deliver = deliver

    def on_recovered(self, recovered: Callable[[], None], /) -> None:
        """Never called: an in-process queue loses nothing."""

    async def ping(self) -> None:
        return None

    async def publish(self, room_id: UUID, payload: bytes) -> None:
        if room_id in self._subscribed:
            self._deliver(room_id, payload)

    async def subscribe(self, room_id: UUID) -> None:
        self._subscribed.add(room_id)

    async def unsubscribe(self, room_id: UUID) -> None:
        self._subscribed.discard(room_id)
