"""The ports the controller depends on; adapters live one per technology.

The controller imports nothing from aiohttp, aiopg or redis: it talks to the
repository, the queue and each member's connection through these Protocols.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol
from uuid import UUID

from sharechat.domain import Draft, Member, Message, Room

MAX_PAGE = 1000  # messages in one history answer, at most
MAX_NUMBER = 2**63 - 1  # above the number of any message (PostgreSQL's largest bigint)


@dataclass(frozen=True, slots=True)
class Page:
    """A slice of a room's history: the paging rules of every repository.

    At most one cursor, a message of the room; results oldest first, never more
    than MAX_PAGE. A page selects the messages numbered between `numbers()`,
    then keeps `limit` of them: the newest (no cursor, or `before`), or the
    oldest (`after`, see `forward`).
    """

    before: UUID | None = None
    after: UUID | None = None
    limit: int = MAX_PAGE

    def __post_init__(self) -> None:
        if self.before is not None and self.after is not None:
            raise ValueError("a page has one cursor at most")
        if not 1 <= self.limit <= MAX_PAGE:
            raise ValueError(f"a page holds 1 to {MAX_PAGE} messages")

    @property
    def cursor(self) -> UUID | None:
        return self.after if self.after is not None else self.before

    @property
    def forward(self) -> bool:
        """Paging forward (`after`) keeps the oldest of the selection, else the newest."""
        return self.after is not None

    def numbers(self, cursor_number: int) -> tuple[int, int]:
        """The message numbers the page selects between, both left out, given the
        number of its cursor (any, for a page without one)."""
        if self.after is not None:
            return cursor_number, MAX_NUMBER
        if self.before is not None:
            return 0, cursor_number
        return 0, MAX_NUMBER

    def window(self, start: int, end: int) -> tuple[int, int]:
        """The part of the selection `start`..`end` (positions oldest first, end
        exclusive) that the page answers."""
        if self.forward:
            return start, min(end, start + self.limit)
        return max(start, end - self.limit), end


class Repository(Protocol):
    """Rooms, members and messages.

    Every method may raise BackendUnavailable when the backend does not answer
    in time (then what it was asked to do may or may not have happened); the
    other errors a method raises are named in its docstring, and an adapter
    raises no others. Texts and names handed in are storable: valid Unicode
    without NUL (the controller refuses other text before it gets here).

    A repository is built with `room_max_messages`, the bound on a room's
    history (0: none). Each message stored is numbered one above the room's
    newest (1 for the first), under the room's lock, so numbers follow the
    order of the history and of the commits; whatever stores a message also
    deletes the room's messages numbered `room_max_messages` below it or more:
    once the call returns, the room holds the bound at most. Nothing else ever
    deletes a message of a live room, so a number is never given twice.
    """

    async def ping(self) -> None: ...

    async def create_room(self, room: Room) -> None: ...

    async def get_room(self, room_id: UUID) -> Room:
        """Raises RoomNotFound."""
        ...

    async def list_members(self, room_id: UUID) -> list[Member]:
        """Every member of the room on every instance, in the order they joined;
        raises RoomNotFound."""
        ...

    async def list_messages(self, room_id: UUID, page: Page) -> list[Message]:
        """The page of the room's history (see Page). Raises RoomNotFound, or
        MessageNotFound for a cursor that is not a message the room holds."""
        ...

    async def message_number(self, room_id: UUID, message_id: UUID) -> int:
        """The number of a message of the room (see Message.number).

        Raises RoomNotFound, or MessageNotFound for a message the room does not hold.
        """
        ...

    async def messages_after(self, room_id: UUID, number: int, limit: int) -> list[Message]:
        """The room's messages numbered above `number`, oldest first, at most `limit`;
        none for a room that is gone."""
        ...

    async def newest_numbers(self, room_ids: Sequence[UUID]) -> dict[UUID, int]:
        """The number of each room's newest message; rooms without one are left out."""
        ...

    async def add_member(self, room_id: UUID, member: Member, instance_id: UUID) -> Message:
        """Store the member and its `joined` message together; return the message.

        Raises RoomNotFound; BackendUnavailable and InDoubt as add_message does.
        """
        ...

    async def remove_member(self, room_id: UUID, member: Member) -> Message | None:
        """Delete the member and store its `left` message together; return the message.

        None when the member or its room was gone already (reaped, deleted): there
        is nothing to publish.
        """
        ...

    async def add_message(self, draft: Draft) -> Message:
        """Store a chat message (domain.chat); `sent` is assigned here. Raises
        RoomNotFound; BackendUnavailable when the message is not stored; InDoubt when
        the backend went away while storing it and did not come back to say whether
        it did (then the message may appear in the history later).

        Concurrent calls are stored in call order and answered in that order: the
        controller publishes each answer at once, so the room's live order is the
        order of its history.
        """
        ...

    async def renew_lease(self, instance_id: UUID, lease_seconds: float) -> None:
        """Record that this instance is alive for the next `lease_seconds`."""
        ...

    async def release_lease(self, instance_id: UUID) -> None:
        """Forget this instance: it left cleanly, its members are gone already."""
        ...

    async def reap_expired_instances(self) -> list[Message]:
        """Remove the members of instances whose lease ran out; return their `left` messages.

        Safe to run on every instance at once: each dead member is reaped once. A
        repository that serves one process only reaps nobody: its members live and
        die with that process.
        """
        ...

    async def delete_idle_rooms(self, idle_seconds: float) -> list[UUID]:
        """Delete rooms with no member for `idle_seconds`, with their messages."""
        ...


Deliver = Callable[[UUID, bytes], None]


def no_listener(room_id: UUID, payload: bytes) -> None:
    """The consumer of a queue nobody listens to yet (so nothing is subscribed either)."""


class Queue(Protocol):
    """Fan-out of published messages to every instance that serves the room.

    Each queue object is one instance; a room's payloads reach exactly the instances
    subscribed to it (an in-process queue: only its own subscriptions). Whatever an
    adapter may raise is BackendUnavailable. tests/test_queue_contract.py holds every
    adapter to this.
    """

    async def ping(self) -> None:
        """Raises BackendUnavailable unless the backend answers and subscriptions deliver."""
        ...

    async def publish(self, room_id: UUID, payload: bytes) -> None:
        """Deliver in call order (queued before the first await), to a room with or
        without subscribers.

        Raises BackendUnavailable when the payload may not reach every subscriber;
        after a timeout the backend may still deliver it, late.
        """
        ...

    async def subscribe(self, room_id: UUID) -> None:
        """Return once payloads published to the room from now on will be received,
        once each however often the room was subscribed.

        Raises BackendUnavailable if that cannot be confirmed. When it raises or is
        cancelled, the room is left unsubscribed (unless a later call subscribed it).
        Calls for one room take effect in call order, even when they overlap: the
        room ends subscribed if and only if the last call was subscribe().
        """
        ...

    async def unsubscribe(self, room_id: UUID) -> None:
        """Stop delivering the room's payloads here, now and after any recovery."""
        ...

    def on_recovered(self, recovered: Callable[[], None], /) -> None:
        """Call `recovered()` each time the subscription is back after it was lost (the
        connection failed, or stopped delivering): what was published meanwhile may
        never be delivered. Set once, before the first subscribe."""
        ...

    def on_message(self, deliver: Deliver, /) -> None:
        """Call `deliver(room_id, payload)` for every payload published to a subscribed
        room, in publish order per room; set once, before the first subscribe.

        It is called from the queue's own reading of the backend, so it must not
        block: a slow consumer would hold up every room of the instance.
        """
        ...


class Peer(Protocol):
    """One member's connection."""

    def write_texts(self, texts: Sequence[bytes], /) -> int:
        """Send each UTF-8 text as one message, in order, in one write, without waiting.

        Returns how many bytes the connection holds unsent; unless 0, drain() before
        the next write. Raises ConnectionError once the connection is gone.
        """
        ...

    async def drain(self) -> None:
        """Return once the connection can take more; raise ConnectionError once it is gone."""
        ...

    async def close(self, *, code: int, message: bytes) -> None:
        """Close without waiting for a peer that may be too slow to read."""
        ...
