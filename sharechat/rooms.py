"""The rooms live on this instance: who is in each, and the fan-out to them.

A room is here while it has members on this instance; its queue channel is
subscribed for exactly that long. Publishing a stored message and handing
what the queue delivers to the room's members both go through here, in the
room's order (delivery.RoomOrder).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from uuid import UUID

from sharechat.delivery import RoomOrder, frame, unframe
from sharechat.domain import BackendUnavailable, Message
from sharechat.ports import Queue, Repository
from sharechat.session import CLOSE_GOING_AWAY, Session

log = logging.getLogger(__name__)


class LiveRoom:
    """A room with members on this instance: its subscription, its members here, and
    the order in which its messages are handed to them."""

    def __init__(
        self,
        room_id: UUID,
        subscription: asyncio.Task[None],
        repository: Repository,
        delivered: Callable[[int], None],
    ):
        self.subscription = subscription
        self.sessions: dict[UUID, Session] = {}
        self.order = RoomOrder(room_id, repository.messages_after, self._hand_out)
        self._delivered = delivered

    def _hand_out(self, number: int, payload: bytes) -> None:
        for session in self.sessions.values():
            session.deliver(number, payload)  # the same bytes for all of them
        self._delivered(len(self.sessions))  # counted once per message, not per member

    def close(self, reason: str) -> None:
        for session in self.sessions.values():
            session.close(CLOSE_GOING_AWAY, reason)


class LiveRooms:
    """The registry of live rooms and of the members here, and the way in and out of
    the queue."""

    def __init__(
        self,
        repository: Repository,
        queue: Queue,
        delivered: Callable[[int], None] = lambda count: None,
    ) -> None:
        """`delivered` is told how many members each message was handed to (the metrics)."""
        self._repository = repository
        self._queue = queue
        self._delivered = delivered
        self._rooms: dict[UUID, LiveRoom] = {}
        self._sessions: set[Session] = set()  # from joining until gone for good
        self._all_left = asyncio.Event()
        self._all_left.set()
        self._going_away: str | None = None  # why every member is being closed
        self._leave_by: float | None = None  # when close_all stops waiting
        queue.on_message(self._dispatch)
        queue.on_recovered(self._catch_up)

    def __len__(self) -> int:
        return len(self._rooms)

    def __contains__(self, room_id: UUID) -> bool:
        return room_id in self._rooms

    def get(self, room_id: UUID) -> LiveRoom | None:
        return self._rooms.get(room_id)

    def items(self) -> list[tuple[UUID, LiveRoom]]:
        """A snapshot: rooms come and go while a caller awaits."""
        return list(self._rooms.items())

    def enter(self, session: Session) -> LiveRoom:
        """The member's room, subscribed (or being subscribed) for it."""
        self._sessions.add(session)
        self._all_left.clear()
        if self._going_away is not None:  # it joins and leaves like any other
            session.close(CLOSE_GOING_AWAY, self._going_away)
        room = self._rooms.get(session.room_id)
        if room is None:
            subscription = asyncio.create_task(self._queue.subscribe(session.room_id))
            room = LiveRoom(session.room_id, subscription, self._repository, self._delivered)
            self._rooms[session.room_id] = room
        room.sessions[session.member.id] = session
        return room

    async def exit(self, session: Session) -> None:
        """No more deliveries to this member; the last one out unsubscribes the room."""
        room = self._rooms.get(session.room_id)
        if room is None or room.sessions.pop(session.member.id, None) is None:
            return
        if not room.sessions:
            del self._rooms[session.room_id]
            room.order.stop()
            try:
                await room.subscription  # it may have failed; then there is nothing to undo
                await self._queue.unsubscribe(session.room_id)
            except BackendUnavailable as error:
                log.warning("unsubscribe of room %s failed: %s", session.room_id, error)

    def gone(self, session: Session) -> None:
        """The member has left for good (after exit(), or after a join that failed)."""
        self._sessions.discard(session)
        if not self._sessions:
            self._all_left.set()

    async def close_all(self, reason: str, grace: float) -> None:
        """Close every member's websocket with 1001, and any that joins from now on,
        and wait until each has gone: at most `grace` seconds from the first call."""
        if self._leave_by is None:
            self._leave_by = asyncio.get_running_loop().time() + grace
        self._going_away = reason
        for session in list(self._sessions):
            session.close(CLOSE_GOING_AWAY, reason)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(self._leave_by):
                await self._all_left.wait()

    async def publish(self, message: Message) -> None:
        """Send a stored message to every instance serving its room.

        A stored message is never taken back: if the queue fails or times out, it
        reaches this instance's members at once, and the other instances' from the
        repository, when they find its number missing (a later message, the queue
        coming back, or the audit of live rooms). So history never holds a message
        the room does not see, and the room never sees one the history does not hold.
        """
        framed = frame(message.number, message.to_json())
        try:
            await self._queue.publish(message.room_id, framed)
        except BackendUnavailable as error:
            log.warning("message %s not published, delivered here: %s", message.id, error)
            self._dispatch(message.room_id, framed)

    def _dispatch(self, room_id: UUID, framed: bytes) -> None:
        """What the queue received for a room: to its members here in the room's order."""
        room = self._rooms.get(room_id)
        if room is not None:
            room.order.receive(*unframe(framed))

    def _catch_up(self) -> None:
        """The queue was lost and is back: what it did not deliver, the repository does."""
        log.info("catching up %d rooms from the repository", len(self._rooms))
        for room in self._rooms.values():
            room.order.catch_up()
