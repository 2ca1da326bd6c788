"""The group commit's handling of a batch in doubt, with the backend played by two
functions: the one that applies a batch, and the one that finds what a batch stored.
(tests/test_postgres.py breaks a real PostgreSQL connection in mid-store.)"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from uuid import uuid4

import pytest

from sharechat import domain
from sharechat.domain import BackendUnavailable, Draft, InDoubt, Message
from sharechat.group_commit import GroupCommit, Write
from tests.helpers import WAIT, new_member

RESOLVE_WITHIN = 0.5  # seconds: the deadline of a doubt, short for the test


class Backend:
    """Stores what it is given, or breaks in mid-commit; answers finds when `back`."""

    def __init__(self) -> None:
        self.history: list[Message] = []
        self.break_next_commit: bool | None = None  # None: commit; else in doubt, committed or not
        self.back = asyncio.Event()
        self.back.set()
        self.finds = 0
        self.applied: list[list[Write]] = []

    async def apply(self, writes: list[Write]) -> list[Message]:
        self.applied.append(writes)
        stored = [self._stored(write.draft) for write in writes]
        committed, self.break_next_commit = self.break_next_commit, None
        if committed is None:
            self.history += stored
            return stored
        if committed:
            self.history += stored
        self.back.clear()
        raise InDoubt("test: the connection broke in mid-commit")

    async def find(self, drafts: list[Draft]) -> list[Message]:
        self.finds += 1
        if not self.back.is_set():
            raise BackendUnavailable("test: still away")
        ids = {draft.id for draft in drafts}
        return [message for message in self.history if message.id in ids]

    def _stored(self, draft: Draft) -> Message:
        return draft.stored(domain.utcnow(), len(self.history) + 1)


@pytest.fixture
def store() -> Backend:
    return Backend()


@pytest.fixture
async def group(store: Backend) -> AsyncIterator[GroupCommit]:
    group = GroupCommit(
        store.apply, store.find, max_batch=100, room_max_messages=0, resolve_within=RESOLVE_WITHIN
    )
    yield group
    async with asyncio.timeout(WAIT):
        await group.drain()


ROOM = uuid4()


def draft(text: str) -> Draft:
    return domain.chat(ROOM, new_member(), text)


async def answered_when_back(store: Backend, sending: asyncio.Task[Message]) -> None:
    """The call waits while the backend is away (it was asked at least twice)."""
    while store.finds < 2:
        await asyncio.sleep(0.01)
    assert not sending.done()
    store.back.set()


async def test_a_store_in_doubt_that_committed_is_answered_with_its_message(
    store: Backend, group: GroupCommit
) -> None:
    async with asyncio.timeout(WAIT):
        store.break_next_commit = True
        said = draft("did it?")
        sending = asyncio.create_task(group.say(said))
        await answered_when_back(store, sending)
        message = await sending
    assert (message.id, message.message, message.number) == (said.id, "did it?", 1)


async def test_a_store_in_doubt_that_did_not_commit_fails_as_not_stored(
    store: Backend, group: GroupCommit
) -> None:
    async with asyncio.timeout(WAIT):
        store.break_next_commit = False
        sending = asyncio.create_task(group.say(draft("lost?")))
        await answered_when_back(store, sending)
        with pytest.raises(BackendUnavailable) as raised:
            await sending
    assert type(raised.value) is BackendUnavailable  # not InDoubt: it is known
    assert store.history == []


async def test_a_store_still_in_doubt_after_the_deadline_raises_in_doubt(
    store: Backend, group: GroupCommit
) -> None:
    async with asyncio.timeout(WAIT):
        store.break_next_commit = True
        with pytest.raises(InDoubt):
            await group.say(draft("anyone?"))
    assert store.finds > 2  # asked again and again until the deadline


async def test_writes_queued_meanwhile_do_not_wait_for_the_doubt(
    store: Backend, group: GroupCommit
) -> None:
    async with asyncio.timeout(WAIT):
        store.break_next_commit = True
        doubtful = asyncio.create_task(group.say(draft("first")))
        while not store.applied:
            await asyncio.sleep(0)
        second = await group.say(draft("second"))  # the backend lets it through
        assert not doubtful.done()
        store.back.set()
        first = await doubtful
    assert (first.number, second.number) == (1, 2)


async def test_a_cancelled_join_found_stored_leaves_at_once(
    store: Backend, group: GroupCommit
) -> None:
    async with asyncio.timeout(WAIT):
        member = new_member()
        store.break_next_commit = True
        joining = asyncio.create_task(group.join(ROOM, member, uuid4()))
        while not store.applied:
            await asyncio.sleep(0)
        joining.cancel()
        store.back.set()
        while len(store.history) < 2:
            await asyncio.sleep(0.01)
    assert [(m.type, m.member_id) for m in store.history] == [
        (domain.MessageType.JOINED, member.id),
        (domain.MessageType.LEFT, member.id),
    ]


async def test_drain_ends_a_doubt_at_once(store: Backend, group: GroupCommit) -> None:
    async with asyncio.timeout(WAIT):
        store.break_next_commit = True
        sending = asyncio.create_task(group.say(draft("closing")))
        while not store.finds:
            await asyncio.sleep(0.01)
        await group.drain()
        with pytest.raises(InDoubt):
            await sending
