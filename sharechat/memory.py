"""The embedded backends: a repository and a queue that live in this process.

They are real backends, not test fakes: `sharechat serve` with no service
configured runs on them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from uuid import UUID, uuid4

from sharechat.domain import (
    Member,
    Message,
    MessageNotFound,
    MessageType,
    Room,
    RoomNotFound,
    utcnow,
)
from sharechat.ports import Deliver, Page, no_listener


@dataclass
class _RoomState:
    room: Room
    members: dict[UUID, Member] = field(default_factory=dict)
    messages: list[Message] = field(default_factory=list)
    positions: dict[UUID, int] = field(default_factory=dict)  # message id -> index
    emptied_at: float | None = field(default_factory=time.monotonic)

    def append(self, message: Message) -> Message:
        self.positions[message.id] = len(self.messages)
        self.messages.append(message)
        return message

    def position(self, message_id: UUID) -> int:
        try:
            return self.positions[message_id]
        except KeyError:
            raise MessageNotFound(str(message_id)) from None


class MemoryRepository:
    def __init__(self) -> None:
        self._rooms: dict[UUID, _RoomState] = {}
        self._message_rooms: dict[UUID, UUID] = {}

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
        if page.after is not None:
            start, end = state.position(page.after) + 1, len(state.messages)
        else:
            start = 0
            end = len(state.messages) if page.before is None else state.position(page.before)
        start, end = page.window(start, end)
        return state.messages[start:end]

    async def add_member(self, room_id: UUID, member: Member, instance_id: UUID) -> Message:
        state = self._state(room_id)
        state.members[member.id] = member
        state.emptied_at = None
        return self._store(state, member, MessageType.JOINED, f"{member.name} joined")

    async def remove_member(self, room_id: UUID, member: Member) -> Message | None:
        state = self._rooms.get(room_id)
        if state is None or state.members.pop(member.id, None) is None:
            return None
        if not state.members:
            state.emptied_at = time.monotonic()
        return self._store(state, member, MessageType.LEFT, f"{member.name} left")

    async def add_message(self, room_id: UUID, member: Member, text: str) -> Message:
        return self._store(self._state(room_id), member, MessageType.CHAT, text)

    async def delete_message(self, message_id: UUID) -> None:
        room_id = self._message_rooms.pop(message_id, None)
        state = self._rooms.get(room_id) if room_id else None
        if state is None or message_id not in state.positions:
            return
        state.messages.pop(state.positions.pop(message_id))
        state.positions = {message.id: index for index, message in enumerate(state.messages)}

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
            for message in self._rooms.pop(room_id).messages:
                self._message_rooms.pop(message.id, None)
        return idle

    def _state(self, room_id: UUID) -> _RoomState:
        try:
            return self._rooms[room_id]
        except KeyError:
            raise RoomNotFound(str(room_id)) from None

    def _store(self, state: _RoomState, member: Member, kind: MessageType, text: str) -> Message:
        message = Message(
            id=uuid4(),
            room_id=state.room.id,
            member_id=member.id,
            member_name=member.name,
            type=kind,
            message=text,
            sent=utcnow(),
        )
        self._message_rooms[message.id] = state.room.id
        return state.append(message)


class MemoryQueue:
    """Publish hands the payload straight to this process's subscribers."""

    def __init__(self) -> None:
        self._subscribed: set[UUID] = set()
        self._deliver: Deliver = no_listener

    def on_message(self, deliver: Deliver, /) -> None:
        self._deliver = deliver

    async def ping(self) -> None:
        return None

    async def publish(self, room_id: UUID, payload: bytes) -> None:
        if room_id in self._subscribed:
            self._deliver(room_id, payload)

    async def subscribe(self, room_id: UUID) -> None:
        self._subscribed.add(room_id)

    async def unsubscribe(self, room_id: UUID) -> None:
        self._subscribed.discard(room_id)

