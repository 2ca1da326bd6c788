"""The chat itself: rooms with local members, fan-out, and the room lifecycle.

It depends on the ports only. A room is in the registry while it has members
on this instance; its queue channel is subscribed for exactly that long.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Coroutine
from typing import Any
from uuid import UUID, uuid4

from sharechat import names
from sharechat.budgets import RateLimiter
from sharechat.config import Config
from sharechat.delivery import RoomOrder, frame, unframe
from sharechat.domain import (
    BackendUnavailable,
    Member,
    Message,
    Room,
    chat_text,
    failed_message,
    with_ref,
)
from sharechat.ports import Page, Peer, Queue, Repository
from sharechat.refusals import RefusalLog
from sharechat.session import CLOSE_GOING_AWAY, Flusher, Session

log = logging.getLogger(__name__)


class LiveRoom:
    """A room with members on this instance: its subscription, its members here, and
    the order in which its messages are handed to them."""

    def __init__(self, room_id: UUID, subscription: asyncio.Task[None], repository: Repository):
        self.subscription = subscription
        self.sessions: dict[UUID, Session] = {}
        self.order = RoomOrder(room_id, repository.messages_after, self._hand_out)

    def _hand_out(self, number: int, payload: bytes) -> None:
        for session in self.sessions.values():
            session.deliver(number, payload)  # the same bytes for all of them


class Controller:
    def __init__(
        self,
        repository: Repository,
        queue: Queue,
        config: Config,
        instance_id: UUID,
        refusals: RefusalLog,
    ) -> None:
        self._repository = repository
        self._queue = queue
        self._config = config
        self.instance_id = instance_id
        self._rooms: dict[UUID, LiveRoom] = {}
        self._sessions: set[Session] = set()
        self._all_left = asyncio.Event()
        self._all_left.set()
        self._unrecorded_leaves: list[tuple[UUID, Member]] = []
        self._postponed = False  # the last round of housekeeping failed
        self._audited: dict[UUID, int] = {}  # live room -> its newest message at the last audit
        self._background: set[asyncio.Task[Any]] = set()  # leaves and close handshakes
        self._stopping = asyncio.Event()
        self._refusals = refusals
        self._flusher = Flusher(config, self._refusals)
        queue.on_message(self._dispatch)
        queue.on_recovered(self._catch_up)

    # -- rooms and history ---------------------------------------------------

    async def create_room(self) -> Room:
        room = Room(id=uuid4(), name=names.room_name())
        await self._repository.create_room(room)
        log.info("room created %s %r", room.id, room.name)
        return room

    async def check_room(self, room_id: UUID) -> None:
        """Raise RoomNotFound for a room that does not exist.

        A room with members on this instance exists (rooms expire only when empty
        everywhere), so a join into a busy room costs no query.
        """
        if room_id not in self._rooms:
            await self._repository.get_room(room_id)

    async def room_members(self, room_id: UUID) -> tuple[Room, list[Member]]:
        room = await self._repository.get_room(room_id)
        return room, await self._repository.list_members(room_id)

    async def history(self, room_id: UUID, page: Page) -> list[Message]:
        return await self._repository.list_messages(room_id, page)

    # -- members -------------------------------------------------------------

    async def resume_point(self, room_id: UUID, message_id: UUID) -> int:
        """The number of the message a client resumes after; raises RoomNotFound or
        MessageNotFound (a cursor that is not a message of the room)."""
        return await self._repository.message_number(room_id, message_id)

    async def join(
        self,
        room_id: UUID,
        peer: Peer,
        client_limiter: RateLimiter,
        resume_after: int | None = None,
    ) -> Session:
        """Store the member and its `joined`, publish it, and wait until it is delivered.

        `client_limiter` is the budget of chat messages that the member shares with
        every other connection of its client. With `resume_after` (a message number,
        see resume_point), the member first gets every message of the history after
        that one, then its own `joined`, then the room live: no gap, no repeat.
        Raises RoomNotFound or BackendUnavailable; then the member is gone again (if
        its `joined` was stored, its `left` follows).
        """
        member = Member(id=uuid4(), name=names.member_name())
        session = Session(room_id, member, peer, self._config, self._flusher, client_limiter)
        room = self._enter(session)
        stored: Message | None = None
        try:
            await asyncio.shield(room.subscription)
            stored = await self._repository.add_member(room_id, member, self.instance_id)
            session.expect_joined(stored.number)
            room.order.start(stored.number)
            await self._publish(stored)
            async with asyncio.timeout(self._config.backend_timeout):
                await session.joined()
                replay = []
                if resume_after is not None:
                    replay = await self._history_between(room_id, resume_after, stored.number)
            session.begin(replay)
        except BaseException as error:
            await self._undo_join(session, stored)
            if isinstance(error, TimeoutError):
                raise BackendUnavailable("queue did not deliver the joined message") from error
            raise
        log.debug("member joined %s %r room %s", member.id, member.name, room_id)
        return session

    async def _history_between(self, room_id: UUID, after: int, before: int) -> list[bytes]:
        """The room's messages numbered between `after` and `before`, as JSON."""
        replay: list[bytes] = []
        while True:
            page = await self._repository.messages_after(room_id, after, REPLAY_PAGE)
            replay.extend(m.to_json() for m in page if m.number < before)
            if len(page) < REPLAY_PAGE or page[-1].number >= before:
                return replay
            after = page[-1].number

    async def say(self, session: Session, text: str, ref: str | None = None) -> None:
        """One message from a member: check it, then store and publish it.

        `ref`, the client's tag (sharechat.v1), comes back in the echo of the message
        and in any `failed` about it, to the sender alone; a message with a ref always
        gets one of the two, even an empty one.

        Returns once the message is under way, so that a member may have several
        in flight (they share commits with the room's other writes); it waits while
        MAX_IN_FLIGHT of this member's messages are. Order is kept without waiting:
        the repository numbers a room's messages in call order, and every instance
        hands them on in number order (delivery.RoomOrder). So the room sees messages
        in the order of the history, and a member its own in the order it sent them.
        """
        text = chat_text(text)
        if not text:
            if ref is not None:
                self.reject(session, "empty message: nothing to send", ref)
            return
        problem = self._problem_with(session, text)
        if problem:
            self.reject(session, problem, ref)
            return
        await session.in_flight.acquire()
        session.last_message = self._spawn(self._store_and_publish(session, text, ref))

    async def _store_and_publish(self, session: Session, text: str, ref: str | None) -> None:
        """With a ref, the message stays in flight until its echo is delivered: the
        refs a member has pending are never more than MAX_IN_FLIGHT."""
        echo_holds_slot = False
        try:
            try:
                message = await self._repository.add_message(session.room_id, session.member, text)
            except BackendUnavailable as error:
                log.warning("message of %s not stored: %s", session.member.id, error)
                self.reject(session, "not sent: the message could not be stored", ref)
                return
            if ref is not None:
                # Before the publish: the echo may be delivered before publish() returns.
                session.expect_echo(message.id, ref)
                echo_holds_slot = True
            await self._publish(message)
        finally:
            if not echo_holds_slot:
                session.in_flight.release()

    def reject(self, session: Session, reason: str, ref: str | None = None) -> None:
        """A `failed` message for the sender alone, with the client's ref if it sent one."""
        payload = failed_message(session.room_id, session.member, reason).to_json()
        session.send(payload if ref is None else with_ref(payload, ref))

    async def leave(self, session: Session) -> None:
        """Remove the member for good and tell the room; once per joined session.

        Runs to the end even if the caller is cancelled (a handler torn down on
        shutdown): a member must never stay listed after its connection is gone.
        """
        await asyncio.shield(self._spawn(self._leave(session)))

    async def _leave(self, session: Session) -> None:
        try:
            if session.last_message is not None:
                # Its messages reach the room before its `left` does.
                await asyncio.wait([session.last_message])
            await self._exit_room(session)
            await self._record_leave(session.room_id, session.member)
        finally:
            await self._drop(session)

    async def _publish(self, message: Message) -> None:
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

    async def _record_leave(self, room_id: UUID, member: Member) -> None:
        try:
            await self._remove_and_announce(room_id, member)
        except BackendUnavailable as error:
            log.warning("leave of %s not recorded yet: %s", member.id, error)
            self._unrecorded_leaves.append((room_id, member))

    async def _remove_and_announce(self, room_id: UUID, member: Member) -> None:
        """Raises BackendUnavailable when the removal is not recorded."""
        left = await self._repository.remove_member(room_id, member)
        log.debug("member left %s room %s", member.id, room_id)
        if left is not None:
            await self._publish(left)

    def _problem_with(self, session: Session, text: str) -> str | None:
        if not session.limiter.allow():
            self._refusals.refused("member-rate", f"member {session.member.id}")
            return "rate limited: slow down"
        if not session.client_limiter.allow():
            self._refusals.refused("ip-rate", f"member {session.member.id}")
            return "rate limited: too many messages from your address, slow down"
        limit = self._config.max_message_bytes
        if len(text) > limit or (len(text) * 4 > limit and len(text.encode()) > limit):
            size = len(text.encode())
            return f"message too long: {size} bytes, the limit is {limit}"
        if "\x00" in text:
            return "message contains a NUL character"
        return None

    # -- the local registry ----------------------------------------------------

    def _enter(self, session: Session) -> LiveRoom:
        room = self._rooms.get(session.room_id)
        if room is None:
            subscription = asyncio.create_task(self._queue.subscribe(session.room_id))
            room = LiveRoom(session.room_id, subscription, self._repository)
            self._rooms[session.room_id] = room
        room.sessions[session.member.id] = session
        self._sessions.add(session)
        self._all_left.clear()
        return room

    async def _exit_room(self, session: Session) -> None:
        """No more deliveries to this member; the last one out unsubscribes the room."""
        room = self._rooms.get(session.room_id)
        if room is None or room.sessions.pop(session.member.id, None) is None:
            return
        if not room.sessions:
            del self._rooms[session.room_id]
            room.order.stop()
            await self._unsubscribe(session.room_id, room)

    async def _drop(self, session: Session) -> None:
        try:
            closing = await session.stop()
            if closing is not None:
                self._background.add(closing)
                closing.add_done_callback(self._background.discard)
        finally:
            self._sessions.discard(session)
            if not self._sessions:
                self._all_left.set()

    def _spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _unsubscribe(self, room_id: UUID, room: LiveRoom) -> None:
        try:
            await room.subscription  # it may have failed; then there is nothing to undo
            await self._queue.unsubscribe(room_id)
        except BackendUnavailable as error:
            log.warning("unsubscribe of room %s failed: %s", room_id, error)

    async def _undo_join(self, session: Session, stored: Message | None) -> None:
        """A join that did not complete: a member whose `joined` was stored leaves like
        any other (its `left` follows), as the room may have seen it join."""
        try:
            await self._exit_room(session)
            if stored is not None:
                await self._record_leave(session.room_id, session.member)
        finally:
            await self._drop(session)

    # -- background work -------------------------------------------------------

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Housekeeping runs while inside; on the way out members leave."""
        # The lease first: a member of an instance without one counts as dead.
        await self._renew_lease()
        housekeeping = asyncio.create_task(self._housekeeping(), name="housekeeping")
        try:
            yield
        finally:
            # Housekeeping finishes its chore rather than being cut mid-transaction.
            self._stopping.set()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._config.backend_timeout):
                    await asyncio.wait([housekeeping])
            tasks = [housekeeping, *self._background]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            with contextlib.suppress(BackendUnavailable):
                await self._repository.release_lease(self.instance_id)

    async def close_all(self, reason: str, grace: float) -> None:
        """Close every websocket with 1001 and wait until each member has left."""
        for session in list(self._sessions):
            session.close(CLOSE_GOING_AWAY, reason)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await self._all_left.wait()

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

    async def _housekeeping(self) -> None:
        config = self._config
        interval = max(0.05, min(config.instance_lease / 3, config.room_idle_ttl / 4, 5.0))
        while not self._stopping.is_set():
            chores = (
                self._renew_lease,
                self._record_leaves,
                self._reap,
                self._expire_rooms,
                self._audit_rooms,
            )
            done = True
            for chore in chores:
                done = await self._attempt(chore()) and done
                _raise_if_cancelled()
            if done and self._postponed:
                log.info("housekeeping back to normal")
            self._postponed = not done
            # After a failure, soon again: the lease must be renewed as soon as the
            # repository answers, before another instance may judge this one dead.
            wait = interval if done else min(interval, HOUSEKEEPING_RETRY)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._stopping.wait()

    async def _attempt(self, chore: Awaitable[None]) -> bool:
        """Run one chore; False if it failed (logged once until housekeeping recovers)."""
        try:
            await chore
        except BackendUnavailable as error:
            if not self._postponed:
                log.warning("housekeeping postponed: %s", error)
            return False
        except Exception:
            # Housekeeping runs for the life of the process: one bad turn must not end it.
            if not self._postponed:
                log.exception("housekeeping chore failed; trying again soon")
            return False
        return True

    async def _renew_lease(self) -> None:
        await self._repository.renew_lease(self.instance_id, self._config.instance_lease)

    async def _record_leaves(self) -> None:
        while self._unrecorded_leaves:
            await self._remove_and_announce(*self._unrecorded_leaves[0])
            self._unrecorded_leaves.pop(0)

    async def _reap(self) -> None:
        for left in await self._repository.reap_expired_instances():
            log.info("member reaped %s room %s", left.member_id, left.room_id)
            await self._publish(left)

    async def _audit_rooms(self) -> None:
        """Catch up each live room whose newest message at the last audit has not been
        delivered here since: stored but never published (its instance died between
        the two, or lost its queue connection), and no later message showed the gap.
        """
        audited, self._audited = self._audited, {}
        live = [room_id for room_id, room in self._rooms.items() if room.order.delivered]
        if not live:
            return
        newest = await self._repository.newest_numbers(live)
        for room_id, number in newest.items():
            room = self._rooms.get(room_id)
            if room is None or room.order.delivered is None:
                continue
            if room.order.delivered < audited.get(room_id, 0):
                log.warning("room %s: catching up on messages never delivered here", room_id)
                room.order.catch_up()
            self._audited[room_id] = number

    async def _expire_rooms(self) -> None:
        for room_id in await self._repository.delete_idle_rooms(self._config.room_idle_ttl):
            log.info("room expired %s", room_id)
            room = self._rooms.get(room_id)
            for session in room.sessions.values() if room else ():
                session.close(CLOSE_GOING_AWAY, "room expired")

    # -- health --------------------------------------------------------------------

    async def health(self) -> dict[str, str]:
        repository, queue = await asyncio.gather(
            _check(self._repository.ping()), _check(self._queue.ping())
        )
        ok = repository == "ok" and queue == "ok"
        return {"status": "ok" if ok else "unavailable", "repository": repository, "queue": queue}


HEALTH_CHECK_SECONDS = 2.0
HOUSEKEEPING_RETRY = 0.25  # seconds between rounds while a chore fails
REPLAY_PAGE = 1000  # messages fetched at once for a resuming member


def _raise_if_cancelled() -> None:
    """Re-raise a cancellation that an adapter swallowed.

    On Python 3.11, asyncio.wait_for with a timeout returns the result when the
    awaited work completes in the same loop iteration as a cancel, dropping the
    CancelledError. Our adapters avoid it (asyncio.timeout instead), but a loop
    that runs for the process's life must not depend on every driver doing so.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def _check(probe: Awaitable[None]) -> str:
    try:
        async with asyncio.timeout(HEALTH_CHECK_SECONDS):
            await probe
    except TimeoutError:
        return "timed out"
    except BackendUnavailable as error:
        return str(error) or "unavailable"
    return "ok"
