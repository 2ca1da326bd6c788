"""One room order: RoomOrder hands a room's messages on in number order, whatever the
queue does, with the in-memory repository as the last word on what exists."""

from __future__ import annotations

import asyncio
from uuid import uuid4

from sharechat.budgets import RateLimiter
from sharechat.config import Config
from sharechat.controller import Controller
from sharechat.delivery import RoomOrder, frame, unframe
from sharechat.domain import Member, Message, Room, chat
from sharechat.memory import MemoryQueue, MemoryRepository
from sharechat.refusals import RefusalLog
from tests.helpers import WAIT, Recorder, eventually


class Ordered:
    """A room of the in-memory repository and the order of its messages here."""

    def __init__(self, room_max_messages: int = 0) -> None:
        self.repository = MemoryRepository(room_max_messages=room_max_messages)
        self.room = Room(uuid4(), "Test Room")
        self.member = Member(uuid4(), "Teal Otter")
        self.delivered: list[int] = []
        self.changed = asyncio.Event()
        self.order = RoomOrder(self.room.id, self.repository.messages_after, self.deliver)

    def deliver(self, number: int, payload: bytes) -> None:
        self.delivered.append(number)
        self.changed.set()

    @classmethod
    async def new(cls, room_max_messages: int = 0) -> Ordered:
        ordered = cls(room_max_messages)
        await ordered.repository.create_room(ordered.room)
        return ordered

    async def store(self, count: int) -> list[Message]:
        return [
            await self.repository.add_message(chat(self.room.id, self.member, f"m{n}"))
            for n in range(count)
        ]

    async def until(self, count: int) -> None:
        async with asyncio.timeout(WAIT):
            while len(self.delivered) < count:
                self.changed.clear()
                await self.changed.wait()


def receive(room: Ordered, message: Message) -> None:
    room.order.receive(message.number, message.to_json())


async def test_frames_carry_the_number_before_the_json() -> None:
    assert unframe(frame(42, b'{"id":"x"}')) == (42, b'{"id":"x"}')
    assert unframe(frame(7, b'{"a": "1 2"}')) == (7, b'{"a": "1 2"}')


async def test_in_order_and_early_messages_wait_for_the_ones_before_them() -> None:
    room = await Ordered.new()
    m = await room.store(5)
    room.order.start(m[0].number)
    for index in (0, 2, 1, 4, 3):
        receive(room, m[index])
    assert room.delivered == [x.number for x in m]


async def test_duplicates_and_messages_before_the_start_are_dropped() -> None:
    room = await Ordered.new()
    m = await room.store(4)
    receive(room, m[0])  # before the first member here joined: history to it
    receive(room, m[2])
    room.order.start(m[1].number)
    receive(room, m[1])
    receive(room, m[1])
    receive(room, m[2])
    receive(room, m[3])
    assert room.delivered == [m[1].number, m[2].number, m[3].number]


async def test_a_number_never_published_is_fetched_from_the_repository() -> None:
    room = await Ordered.new()
    m = await room.store(4)
    room.order.start(m[0].number)
    receive(room, m[0])
    receive(room, m[2])  # m[1] was stored, and its instance died before publishing it
    receive(room, m[3])
    assert room.delivered == [m[0].number]
    await room.until(4)
    assert room.delivered == [x.number for x in m]
    receive(room, m[1])  # late after all: delivered once only
    assert len(room.delivered) == 4
    room.order.stop()


async def test_numbers_the_repository_no_longer_holds_are_skipped() -> None:
    """An instance far behind a busy room: what was trimmed away meanwhile is gone."""
    room = await Ordered.new(room_max_messages=3)
    m = await room.store(1)
    room.order.start(m[0].number)
    receive(room, m[0])
    m += await room.store(6)  # 2..7; 2, 3 and 4 trimmed already, and lost by the queue
    receive(room, m[6])
    await room.until(4)
    assert room.delivered == [1, 5, 6, 7]


async def test_catch_up_delivers_what_the_queue_lost() -> None:
    room = await Ordered.new()
    m = await room.store(1500)  # more than one page
    room.order.start(m[0].number)
    for message in m[:10]:
        receive(room, message)
    room.order.catch_up()  # the queue was lost while the other 1490 were published
    await room.until(1500)
    assert room.delivered == [x.number for x in m]
    receive(room, m[-1])
    assert len(room.delivered) == 1500


async def test_a_message_stored_but_never_published_reaches_the_room() -> None:
    """Its instance died between storing and publishing, and nobody says anything
    after it: the audit of live rooms finds it in the repository and delivers it."""
    repository, queue = MemoryRepository(), MemoryQueue()
    config = Config(instance_lease=0.3)  # housekeeping, and so the audit, every 0.1 s
    controller = Controller(repository, queue, config, uuid4(), RefusalLog())
    room = Room(uuid4(), "Test Room")
    await repository.create_room(room)
    peer = Recorder()
    async with controller.running():
        session = await controller.join(room.id, peer, RateLimiter(0, 1))
        ghost = Member(uuid4(), "Red Fox")  # a member of the instance that died
        await repository.add_member(room.id, ghost, uuid4())
        await repository.add_message(chat(room.id, ghost, "my last words"))

        async def heard() -> bool:
            return [f["message"] for f in peer.frames][-1:] == ["my last words"]

        await eventually(heard)
        assert [f["type"] for f in peer.frames] == ["joined", "joined", "chat"]
        await controller.leave(session)
