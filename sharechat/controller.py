"""The chat itself, the service layer: rooms, members joining, talking and leaving.

It depends on the ports only (ports.py): the web layer calls it, and it calls
the repository, the live rooms (rooms.py: the registry and the fan-out) and
housekeeping (housekeeping.py: the background chores).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any
from uuid import UUID, uuid4

from sharechat import names
from sharechat.budgets import RateLimiter
from sharechat.config import Config
from sharechat.domain import (
    BackendUnavailable,
    InDoubt,
    Member,
    Message,
    Room,
    chat,
    chat_text,
    failed,
    with_ref,
)
from sharechat.housekeeping import Housekeeping
from sharechat.ports import Page, Peer, Queue, Repository
from sharechat.refusals import RefusalLog
from sharechat.rooms import LiveRooms
from sharechat.session import CLOSE_SERVICE_RESTART, Flusher, Session

log = logging.getLogger(__name__)

REPLAY_PAGE = 1000  # messages fetched at once for a resuming member
# The close reason for a member whose message may or may not have been stored.
IN_DOUBT = "service restart: resume with ?after= to see whether your message was stored"


class Controller:
    def __init__(
        self,
        repository: Repository,
        queue: Queue,
        config: Config,
        instance_id: UUID,
        refusals: RefusalLog,
        *,
        on_failed: Callable[[str], None] = lambda reason: None,
        on_delivered: Callable[[int], None] = lambda count: None,
    ) -> None:
        """For the metrics: `on_failed` hears each failed's text, `on_delivered` its reach."""
        self._repository = repository
        self._config = config
        self.instance_id = instance_id
        self._on_failed = on_failed
        self._rooms = LiveRooms(repository, queue, on_delivered)
        self._housekeeping = Housekeeping(repository, self._rooms, config, instance_id)
        self._flusher = Flusher(config, refusals)
        self._background = _Background()  # messages, leaves, close handshakes

    @property
    def live_rooms(self) -> int:
        """Rooms with members on this instance."""
        return len(self._rooms)

    # -- rooms and history ---------------------------------------------------

    async def create_room(self) -> Room:
        room = Room(id=uuid4(), name=names.room_name())
        await self._repository.create_room(room)
        log.info("room created %s %r", room.id, room.name)
        return room

    async def check_room(self, room_id: UUID) -> None:
        """Raise RoomNotFound for a room that does not exist. A room with members here
        exists (rooms expire only when empty everywhere): a busy room costs no query."""
        if room_id not in self._rooms:
            await self._repository.get_room(room_id)

    async def room_members(self, room_id: UUID) -> tuple[Room, list[Member]]:
        room = await self._repository.get_room(room_id)
        return room, await self._repository.list_members(room_id)

    async def history(self, room_id: UUID, page: Page) -> list[Message]:
        return await self._repository.list_messages(room_id, page)

    async def resume_point(self, room_id: UUID, message_id: UUID) -> int:
        """The number of the message a client resumes after; raises RoomNotFound or
        MessageNotFound (a cursor that is not a message of the room)."""
        return await self._repository.message_number(room_id, message_id)

    # -- members -------------------------------------------------------------

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
        its `joined` was stored, or may have been, its `left` follows).
        """
        member = Member(id=uuid4(), name=names.member_name())
        session = Session(room_id, member, peer, self._config, self._flusher, client_limiter)
        room = self._rooms.enter(session)
        stored: Message | None = None
        try:
            await asyncio.shield(room.subscription)
            stored = await self._repository.add_member(room_id, member, self.instance_id)
            session.expect_joined(stored.number)
            room.order.start(stored.number)
            await self._rooms.publish(stored)
            async with asyncio.timeout(self._config.backend_timeout):
                await session.joined()
                replay = []
                if resume_after is not None:
                    replay = await _replay(self._repository, room_id, resume_after, stored.number)
            session.begin(replay)
        except BaseException as error:
            # A member whose `joined` was stored leaves like any other: the room may
            # have seen it join.
            await self._leave(session, stored is not None or isinstance(error, InDoubt))
            if isinstance(error, TimeoutError):
                raise BackendUnavailable("queue did not deliver the joined message") from error
            raise
        log.debug("member joined %s %r room %s", member.id, member.name, room_id)
        return session

    async def say(self, session: Session, text: str, ref: str | None = None) -> None:
        """One message from a member: check it, then store and publish it.

        `ref`, the client's tag (sharechat.v1), comes back in the echo of the message
        and in any `failed` about it, to the sender alone; a message with a ref always
        gets one of the two, even an empty one.

        Returns once the message is under way, so that a member may have several in
        flight (they share commits with the room's other writes), MAX_IN_FLIGHT at
        most. Order holds without waiting: the repository numbers a room's messages
        in call order, and every instance hands them on in number order (RoomOrder).
        """
        text = chat_text(text)
        if not text:
            if ref is not None:
                self.reject(session, "empty message: nothing to send", ref)
            return
        problem = session.admit(text)
        if problem:
            self.reject(session, problem, ref)
            return
        await session.slot()
        session.sending(self._background.spawn(self._store_and_publish(session, text, ref)))

    async def _store_and_publish(self, session: Session, text: str, ref: str | None) -> None:
        """With a ref, the message keeps its slot until its echo is delivered: the
        refs a member has pending are never more than MAX_IN_FLIGHT."""
        draft = chat(session.room_id, session.member, text)
        if ref is not None:
            # Before the store: once stored, the message may reach the room before the
            # store returns (another instance's next message, its gap repaired).
            session.expect_echo(draft.id, ref)
        try:
            try:
                message = await self._repository.add_message(draft)
            except InDoubt as error:
                # A `failed` could be a lie: the client resumes and sees what was stored.
                log.warning("message of %s left in doubt: %s", session.member.id, error)
                session.forget_echo(draft.id)
                session.close(CLOSE_SERVICE_RESTART, IN_DOUBT)
                return
            except BackendUnavailable as error:
                log.warning("message of %s not stored: %s", session.member.id, error)
                session.forget_echo(draft.id)
                self.reject(session, "not sent: the message could not be stored", ref)
                return
            await self._rooms.publish(message)
        finally:
            if ref is None:
                session.release_slot()

    def reject(self, session: Session, reason: str, ref: str | None = None) -> None:
        """A `failed` message for the sender alone, with the client's ref if it sent one."""
        self._on_failed(reason)
        payload = failed(session.room_id, session.member, reason).to_json()
        session.send(payload if ref is None else with_ref(payload, ref))

    async def leave(self, session: Session) -> None:
        """Remove the member for good and tell the room; once per joined session.

        Runs to the end even if the caller is cancelled (a handler torn down on
        shutdown): a member must never stay listed after its connection is gone.
        """
        await asyncio.shield(self._background.spawn(self._leave(session)))

    async def _leave(self, session: Session, joined: bool = True) -> None:
        try:
            await session.messages_sent()  # they reach the room before its `left` does
            await self._rooms.exit(session)
            if joined:
                await self._housekeeping.record_leave(session.room_id, session.member)
        finally:
            try:
                closing = await session.stop()
                if closing is not None:  # the close handshake: cancelled on the way out
                    self._background.keep(closing)
            finally:
                self._rooms.gone(session)

    # -- the instance's life -----------------------------------------------------

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Housekeeping runs while inside; on the way out, work under way is cancelled."""
        async with self._housekeeping.running():
            try:
                yield
            finally:
                await self._background.cancel()

    async def close_all(self, reason: str, grace: float) -> None:
        """Close every websocket with 1001, and any that joins from now on, and wait
        until each member has left: at most `grace` seconds from the first call."""
        await self._rooms.close_all(reason, grace)


async def _replay(repository: Repository, room_id: UUID, after: int, before: int) -> list[bytes]:
    """The room's messages numbered between `after` and `before`, as JSON."""
    replay: list[bytes] = []
    while True:
        page = await repository.messages_after(room_id, after, REPLAY_PAGE)
        replay.extend(m.to_json() for m in page if m.number < before)
        if len(page) < REPLAY_PAGE or page[-1].number >= before:
            return replay
        after = page[-1].number


class _Background:
    """Tasks that outlive the call that started them, cancelled and awaited at the end."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(work)
        self.keep(task)
        return task

    def keep(self, task: asyncio.Task[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def cancel(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
