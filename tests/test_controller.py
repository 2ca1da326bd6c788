"""The controller on the embedded backends, with no HTTP: fast tests of the chat itself.

The repository and the queue are the real in-memory adapters (the ones `sharechat
serve` runs on with no service configured), not mocks; a member's connection is a
Peer that records what it was sent.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any
from uuid import UUID, uuid4

import pytest

from sharechat.budgets import RateLimiter
from sharechat.config import Config
from sharechat.controller import Controller
from sharechat.domain import BackendUnavailable, Draft, InDoubt, Member, Message, RoomNotFound
from sharechat.memory import MemoryQueue, MemoryRepository
from sharechat.ports import Page
from sharechat.refusals import RefusalLog
from sharechat.session import MAX_IN_FLIGHT, Session
from tests.helpers import WAIT, Recorder, eventually


class Peer(Recorder):
    """A member's connection: what it was sent, and the close code it got, if any."""

    def __init__(self) -> None:
        super().__init__()
        self.closed: int | None = None

    async def close(self, *, code: int, message: bytes) -> None:
        self.closed = code

    def said(self) -> list[tuple[str, str]]:
        return [(frame["type"], frame["message"]) for frame in self.frames]


class FlakyRepository(MemoryRepository):
    """The embedded repository, with writes that fail while `down`."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.in_doubt = False  # storing, and the connection breaks before the answer

    async def add_message(self, draft: Draft) -> Message:
        if self.down:
            raise BackendUnavailable("test: repository down")
        if self.in_doubt:
            await super().add_message(draft)
            raise InDoubt("test: the connection broke")
        return await super().add_message(draft)

    async def remove_member(self, room_id: UUID, member: Member) -> Message | None:
        if self.down:
            raise BackendUnavailable("test: repository down")
        return await super().remove_member(room_id, member)


class Chat:
    def __init__(self, config: Config) -> None:
        self.repository = FlakyRepository()
        self.controller = Controller(
            self.repository, MemoryQueue(), config, uuid4(), RefusalLog()
        )

    async def room(self) -> UUID:
        return (await self.controller.create_room()).id

    async def join(self, room_id: UUID) -> tuple[Session, Peer]:
        peer = Peer()
        async with asyncio.timeout(WAIT):
            session = await self.controller.join(room_id, peer, RateLimiter(0, 1))
        return session, peer

    async def say(self, session: Session, text: str) -> None:
        async with asyncio.timeout(WAIT):
            await self.controller.say(session, text)
            await session.messages_sent()

    async def history(self, room_id: UUID) -> list[tuple[str, str]]:
        messages = await self.repository.list_messages(room_id, Page())
        return [(m.type.value, m.message) for m in messages]


@contextlib.asynccontextmanager
async def running_chat(**settings: Any) -> AsyncIterator[Chat]:
    chat = Chat(Config(**settings))
    async with chat.controller.running():
        yield chat


async def test_join_say_and_leave_reach_every_member_and_the_history() -> None:
    async with running_chat() as chat:
        room = await chat.room()
        alice, alice_peer = await chat.join(room)
        bob, bob_peer = await chat.join(room)
        await chat.say(alice, "hello\n")
        await chat.controller.leave(bob)
        await until(lambda: len(alice_peer.frames) == 4)

        alice_name, bob_name = alice.member.name, bob.member.name
        assert alice_peer.said() == [
            ("joined", f"{alice_name} joined"),
            ("joined", f"{bob_name} joined"),
            ("chat", "hello"),
            ("left", f"{bob_name} left"),
        ]
        assert bob_peer.said() == alice_peer.said()[1:3]
        assert await chat.history(room) == alice_peer.said()
        members = (await chat.controller.room_members(room))[1]
        assert members == [alice.member]
        await chat.controller.leave(alice)


async def test_every_member_gets_the_room_in_the_history_order() -> None:
    async with running_chat(rate_limit=0) as chat:
        room = await chat.room()
        alice, alice_peer = await chat.join(room)
        bob, bob_peer = await chat.join(room)
        for n in range(30):  # several in flight at once: stored and handed on in order
            await chat.controller.say(alice if n % 2 else bob, f"message {n}")
        await alice.messages_sent()
        await bob.messages_sent()
        await until(lambda: len(bob_peer.frames) == 31)

        history = await chat.history(room)
        assert [m for _, m in history if m.startswith("message")] == [
            f"message {n}" for n in range(30)
        ]
        assert alice_peer.said() == history
        assert bob_peer.said() == history[1:]


async def test_a_message_not_stored_fails_for_the_sender_alone() -> None:
    async with running_chat() as chat:
        room = await chat.room()
        alice, alice_peer = await chat.join(room)
        _, bob_peer = await chat.join(room)
        chat.repository.down = True
        await chat.say(alice, "lost")
        chat.repository.down = False
        await until(lambda: len(alice_peer.frames) == 3)

        assert alice_peer.said()[-1] == ("failed", "not sent: the message could not be stored")
        assert alice_peer.frames[-1]["memberId"] == str(alice.member.id)
        assert [kind for kind, _ in bob_peer.said()] == ["joined"]
        assert [kind for kind, _ in await chat.history(room)] == ["joined", "joined"]


async def test_messages_not_stored_free_their_slots_and_keep_their_refs() -> None:
    async with running_chat(rate_limit=0) as chat:
        room = await chat.room()
        alice, alice_peer = await chat.join(room)
        chat.repository.down = True
        async with asyncio.timeout(WAIT):  # a slot kept would stop the ninth message
            for n in range(MAX_IN_FLIGHT + 2):
                await chat.controller.say(alice, f"lost {n}", ref=f"r{n}")
            await alice.messages_sent()
        await until(lambda: len(alice_peer.frames) == MAX_IN_FLIGHT + 3)

        assert [(f["type"], f["ref"]) for f in alice_peer.frames[1:]] == [
            ("failed", f"r{n}") for n in range(MAX_IN_FLIGHT + 2)
        ]


async def test_a_message_in_doubt_closes_the_sender_with_1012_instead_of_failing() -> None:
    """The sender cannot be told `failed` (the message may be in the history) or
    echoed (it may not): it resumes with ?after= and sees what the room holds."""
    async with running_chat() as chat:
        room = await chat.room()
        alice, alice_peer = await chat.join(room)
        chat.repository.in_doubt = True
        await chat.say(alice, "did it?")
        await until(lambda: alice_peer.closed is not None)

        assert alice_peer.closed == 1012
        assert [kind for kind, _ in alice_peer.said()] == ["joined"]  # no `failed`
        assert (await chat.history(room))[-1] == ("chat", "did it?")


@pytest.mark.parametrize(
    ("text", "why"),
    [("a\x00b", "NUL"), ("lone \udc80", "surrogate"), ("x" * 5000, "too long")],
)
async def test_text_a_history_cannot_hold_fails_before_any_repository(text: str, why: str) -> None:
    async with running_chat() as chat:
        room = await chat.room()
        alice, peer = await chat.join(room)
        await chat.say(alice, text)
        await until(lambda: len(peer.frames) == 2)
        kind, reason = peer.said()[-1]
        assert kind == "failed"
        assert why in reason
        assert [kind for kind, _ in await chat.history(room)] == ["joined"]


async def test_housekeeping_deletes_a_room_left_empty_and_keeps_a_busy_one() -> None:
    async with running_chat(room_idle_ttl=0.2) as chat:
        empty, busy = await chat.room(), await chat.room()
        alice, _ = await chat.join(busy)
        bob, _ = await chat.join(empty)
        await chat.controller.leave(bob)

        async def expired() -> bool:
            with contextlib.suppress(RoomNotFound):
                await chat.controller.check_room(empty)
                return False
            return True

        await eventually(expired)
        await chat.controller.check_room(busy)  # a member is still there
        await chat.controller.leave(alice)


async def test_a_leave_the_repository_did_not_take_is_recorded_by_housekeeping() -> None:
    async with running_chat(instance_lease=0.3) as chat:
        room = await chat.room()
        alice, alice_peer = await chat.join(room)
        bob, _ = await chat.join(room)
        chat.repository.down = True
        await chat.controller.leave(bob)  # gone from here at once, listed until recorded
        assert bob.member in (await chat.controller.room_members(room))[1]
        chat.repository.down = False

        await until(lambda: alice_peer.said()[-1][0] == "left")
        assert (await chat.controller.room_members(room))[1] == [alice.member]
        await chat.controller.leave(alice)


async def test_close_all_closes_members_with_1001_even_one_joining_meanwhile() -> None:
    async with running_chat() as chat:
        room = await chat.room()
        alice, alice_peer = await chat.join(room)
        closing = asyncio.create_task(chat.controller.close_all("server shutting down", WAIT))
        await until(lambda: alice_peer.closed == 1001)
        late, late_peer = await chat.join(room)
        await until(lambda: late_peer.closed == 1001)
        assert not closing.done()  # each member leaves when its connection ends
        await chat.controller.leave(alice)
        await chat.controller.leave(late)
        async with asyncio.timeout(WAIT):
            await closing
        assert [kind for kind, _ in await chat.history(room)][-2:] == ["left", "left"]


async def until(condition: Callable[[], bool]) -> None:
    """Wait until `condition()` holds: outboxes are written at the end of a loop turn."""

    async def check() -> bool:
        return condition()

    await eventually(check)


