"""The `sharechat.v1` framing: JSON frames in, and refs on the sender's own answers."""

from __future__ import annotations

import asyncio
import json
from typing import Any
from uuid import UUID, uuid4

import aiohttp
import pytest

from sharechat.budgets import RateLimiter
from sharechat.config import Config
from sharechat.controller import Controller
from sharechat.domain import (
    BackendUnavailable,
    Member,
    Room,
    chat,
    failed,
    utcnow,
    wire_id,
    with_ref,
)
from sharechat.memory import MemoryQueue
from sharechat.refusals import RefusalLog
from sharechat.session import MAX_IN_FLIGHT, Session
from tests.conftest import Chat, StartServer
from tests.helpers import MESSAGE_KEYS, WAIT, Recorder, eventually, receive_json
from tests.test_controller import FlakyRepository

V1 = "sharechat.v1"


async def join_v1(chat: Chat, room: str) -> tuple[aiohttp.ClientWebSocketResponse, dict[str, Any]]:
    ws, joined = await chat.join(room, protocols=(V1,))
    assert ws.protocol == V1
    return ws, joined


async def send(ws: aiohttp.ClientWebSocketResponse, frame: Any) -> None:
    await ws.send_str(json.dumps(frame))


async def receive_raw(ws: aiohttp.ClientWebSocketResponse) -> str:
    async with asyncio.timeout(WAIT):
        frame = await ws.receive()
    assert frame.type is aiohttp.WSMsgType.TEXT, frame
    text: str = frame.data
    return text


async def chats(chat: Chat, room: str) -> list[dict[str, Any]]:
    return [m for m in await chat.history(room) if m["type"] == "chat"]


def test_the_wire_form_starts_with_the_id_and_takes_a_ref_at_its_end() -> None:
    """What the echo splice relies on: to_json() writes the id first and ends with `}`."""
    member = Member(id=uuid4(), name="Teal Otter")
    message = chat(uuid4(), member, "}é\"").stored(utcnow(), 1)
    for payload in (message.to_json(), failed(uuid4(), member, "why").to_json()):
        assert wire_id(payload) == str(json.loads(payload)["id"]).encode()
        tagged = with_ref(payload, 'a "ref" é')
        assert json.loads(tagged) == {**json.loads(payload), "ref": 'a "ref" é'}
    assert wire_id(message.to_json()) == str(message.id).encode()


async def test_the_handshake_answers_the_subprotocol(chat: Chat) -> None:
    room = await chat.room()
    v1, _ = await join_v1(chat, room)
    assert v1.protocol == V1
    # Offered among others, it is still the one chosen.
    both = await chat.client.ws_connect(f"/api/serve/{room}", protocols=("chat.v9", V1))
    assert both.protocol == V1
    plain, _ = await chat.join(room)
    assert plain.protocol is None
    # Only unknown protocols: no answer, and the plain framing.
    other, _ = await chat.join(room, protocols=("chat.v9",))
    assert other.protocol is None
    await other.send_str('{"text": "literal"}')
    echo, _ = await receive_until_chat(other)
    assert echo["message"] == '{"text": "literal"}'


async def receive_until_chat(
    ws: aiohttp.ClientWebSocketResponse,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    skipped: list[dict[str, Any]] = []
    async with asyncio.timeout(WAIT):
        while True:
            frame = await receive_json(ws)
            if frame["type"] in ("chat", "failed"):
                return frame, skipped
            skipped.append(frame)


async def test_echo_is_the_history_entry_plus_the_ref(chat: Chat) -> None:
    room = await chat.room()
    alice, alice_joined = await join_v1(chat, room)
    bob, _ = await join_v1(chat, room)
    carol, _ = await chat.join(room)  # plain framing
    await receive_json(alice)
    await receive_json(alice)
    await receive_json(bob)

    await send(alice, {"text": "hello", "ref": "r-1"})
    raw_echo = await receive_raw(alice)
    raw_bob, raw_carol = await receive_raw(bob), await receive_raw(carol)
    # The room's shared bytes, with the ref spliced in for the sender alone.
    assert raw_bob == raw_carol
    assert raw_echo == raw_bob[:-1] + ',"ref":"r-1"}'
    echo, entry = json.loads(raw_echo), json.loads(raw_bob)
    assert set(entry) == MESSAGE_KEYS
    assert echo == {**entry, "ref": "r-1"}
    assert (entry["type"], entry["message"]) == ("chat", "hello")
    assert entry["memberId"] == alice_joined["memberId"]
    assert (await chats(chat, room)) == [entry]


async def test_a_message_without_ref_is_echoed_as_stored(chat: Chat) -> None:
    room = await chat.room()
    alice, _ = await join_v1(chat, room)
    await send(alice, {"text": "untagged"})
    echo = await receive_json(alice)
    assert set(echo) == MESSAGE_KEYS
    assert echo == (await chats(chat, room))[0]


@pytest.mark.parametrize(
    "ref", ["", "7", "x" * 64, "é" * 64, 'quote " and back\\slash', "🦊" * 16, "</script>"]
)
async def test_any_ref_up_to_64_characters_comes_back_as_sent(chat: Chat, ref: str) -> None:
    room = await chat.room()
    alice, _ = await join_v1(chat, room)
    await send(alice, {"text": "tagged", "ref": ref})
    echo = await receive_json(alice)
    assert echo["ref"] == ref
    assert echo["message"] == "tagged"


async def test_one_trailing_line_break_of_the_text_is_not_part_of_it(chat: Chat) -> None:
    room = await chat.room()
    alice, _ = await join_v1(chat, room)
    cases = [("hello\n", "hello"), ("hello\r\n", "hello"), ("a\n\n", "a\n"), ("a\r\n\r\n", "a\r\n")]
    for n, (text, _) in enumerate(cases):
        await send(alice, {"text": text, "ref": str(n)})
    # What websocat sends: the JSON line with its own line break.
    await alice.send_str('{"text": "typed", "ref": "line"}\n')
    echoes = [await receive_json(alice) for _ in range(len(cases) + 1)]
    assert [(e["ref"], e["message"]) for e in echoes] == [
        *((str(n), stored) for n, (_, stored) in enumerate(cases)),
        ("line", "typed"),
    ]
    assert [m["message"] for m in await chats(chat, room)] == [e["message"] for e in echoes]


async def test_blank_frames_and_untagged_blank_texts_are_ignored(chat: Chat) -> None:
    room = await chat.room()
    alice, _ = await join_v1(chat, room)
    for blank in ("", " ", "\n", "\r\n", " \t\n"):  # an empty line typed in websocat
        await alice.send_str(blank)
    for text in ("", "   ", "\n", "\r\n"):
        await send(alice, {"text": text})
    await send(alice, {"text": "real", "ref": "r"})
    echo = await receive_json(alice)
    assert (echo["message"], echo["ref"]) == ("real", "r")
    assert [m["type"] for m in await chat.history(room)] == ["joined", "chat"]


FAILING_FRAMES = [
    # (frame as sent, the ref the `failed` carries, what its message says)
    (json.dumps({"text": "x" * 33, "ref": "big"}), "big", "too long"),
    (json.dumps({"text": "a\x00b", "ref": "nul"}), "nul", "NUL"),
    (json.dumps({"text": " \n", "ref": "blank"}), "blank", "empty message"),
    ('{"text": "hi", "ref": "a"', None, "not JSON"),
    ("plain words", None, "not JSON"),
    ('["hi"]', None, "not a JSON object"),
    ('"hi"', None, "not a JSON object"),
    ("null", None, "not a JSON object"),
    (json.dumps({"ref": "no-text"}), "no-text", "text is missing"),
    (json.dumps({"text": 5, "ref": "number"}), "number", "text must be a string"),
    (json.dumps({"text": None, "ref": "null"}), "null", "text must be a string"),
    (json.dumps({"text": ["hi"], "ref": "list"}), "list", "text must be a string"),
    (json.dumps({"text": "hi", "ref": "x" * 65}), None, "ref must be a string"),
    (json.dumps({"text": "hi", "ref": 7}), None, "ref must be a string"),
    (json.dumps({"text": "hi", "ref": None}), None, "ref must be a string"),
    (json.dumps({"text": "hi", "ref": {"id": 1}}), None, "ref must be a string"),
    (json.dumps({"text": "hi", "ref": "k", "to": "bob"}), "k", 'unknown key "to"'),
    (json.dumps({"text": "hi", "Ref": "k"}), None, 'unknown key "Ref"'),
]


@pytest.mark.parametrize(("frame", "ref", "reason"), FAILING_FRAMES)
async def test_a_bad_frame_fails_with_its_ref_when_readable(
    start_server: StartServer, frame: str, ref: str | None, reason: str
) -> None:
    # The frame ceiling, 4 x 32 bytes, counts the JSON around the text too.
    chat = Chat(await start_server(max_message_bytes=32))
    room = await chat.room()
    alice, alice_joined = await join_v1(chat, room)
    bob, _ = await join_v1(chat, room)
    await receive_json(alice)  # bob joined

    await alice.send_str(frame)
    failed = await receive_json(alice)
    assert failed["type"] == "failed"
    assert reason in failed["message"]
    assert (failed["memberId"], failed["memberName"]) == (
        alice_joined["memberId"],
        alice_joined["memberName"],
    )
    if ref is None:
        assert set(failed) == MESSAGE_KEYS
    else:
        assert set(failed) == MESSAGE_KEYS | {"ref"}
        assert failed["ref"] == ref
        assert list(failed)[-1] == "ref"

    # The connection stays open, and nobody else saw anything.
    await send(alice, {"text": "fine", "ref": "after"})
    assert (await receive_json(alice))["ref"] == "after"
    assert (await receive_json(bob))["message"] == "fine"
    assert [m["message"] for m in await chats(chat, room)] == ["fine"]


async def test_a_binary_frame_fails_without_ref(chat: Chat) -> None:
    room = await chat.room()
    alice, _ = await join_v1(chat, room)
    await alice.send_bytes(json.dumps({"text": "hi", "ref": "bin"}).encode())
    failed = await receive_json(alice)
    assert set(failed) == MESSAGE_KEYS
    assert failed["type"] == "failed"
    assert "binary" in failed["message"]


async def test_a_burst_with_failures_answers_each_ref_once(start_server: StartServer) -> None:
    chat = Chat(await start_server(max_message_bytes=24, rate_limit=0))
    room = await chat.room()
    alice, _ = await join_v1(chat, room)
    bob, _ = await join_v1(chat, room)
    await receive_json(alice)

    expected: dict[str, str] = {}  # ref -> what it gets: "chat" or "failed"
    frames = []
    for n in range(24):
        ref = f"m{n}"
        if n % 3 == 1:
            frames.append({"text": f"{n} is far too long for the limit", "ref": ref})
            expected[ref] = "failed"
        elif n % 7 == 5:
            frames.append({"message": f"{n} has no text", "ref": ref})
            expected[ref] = "failed"
        else:
            frames.append({"text": f"{n} fits", "ref": ref})
            expected[ref] = "chat"
    for frame in frames:
        await send(alice, frame)

    answers = [await receive_json(alice) for _ in frames]
    assert sorted(answer["ref"] for answer in answers) == sorted(expected)  # each once
    assert {answer["ref"]: answer["type"] for answer in answers} == expected
    echoes = [answer for answer in answers if answer["type"] == "chat"]
    sent_ok = [f for f in frames if expected[f["ref"]] == "chat"]
    assert [(e["ref"], e["message"]) for e in echoes] == [(f["ref"], f["text"]) for f in sent_ok]
    for answer in answers:
        if answer["type"] == "failed":
            wanted = "too long" if int(answer["ref"][1:]) % 3 == 1 else 'unknown key "message"'
            assert wanted in answer["message"]

    # The others, and the history, see the stored ones in order, without refs.
    seen_by_bob = [await receive_json(bob) for _ in echoes]
    assert all("ref" not in frame for frame in seen_by_bob)
    assert seen_by_bob == [{k: v for k, v in e.items() if k != "ref"} for e in echoes]
    assert await chats(chat, room) == seen_by_bob


async def test_a_rate_limited_burst_fails_the_excess_by_ref(start_server: StartServer) -> None:
    chat = Chat(await start_server(rate_limit=0.5, rate_burst=5))
    room = await chat.room()
    alice, _ = await join_v1(chat, room)
    texts = {f"r{n}": f"burst {n}" for n in range(24)}
    for ref, text in texts.items():
        await send(alice, {"text": text, "ref": ref})
    answers = [await receive_json(alice) for _ in texts]
    assert sorted(answer["ref"] for answer in answers) == sorted(texts)
    echoes = [answer for answer in answers if answer["type"] == "chat"]
    failures = [answer for answer in answers if answer["type"] == "failed"]
    assert len(echoes) >= 5
    assert len(failures) >= 12  # 24 frames at once, 5 at once allowed, then 1 every 2 s
    assert all("rate limited" in failed["message"] for failed in failures)
    assert all(texts[echo["ref"]] == echo["message"] for echo in echoes)
    order = list(texts)
    assert [e["ref"] for e in echoes] == sorted((e["ref"] for e in echoes), key=order.index)
    assert [m["message"] for m in await chats(chat, room)] == [e["message"] for e in echoes]


async def test_plain_framing_is_unchanged(chat: Chat) -> None:
    room = await chat.room()
    alice, _ = await chat.join(room)
    v1_bob, _ = await join_v1(chat, room)
    await receive_json(alice)
    text = '{"text": "hi", "ref": "1"}'
    await alice.send_str(text)
    echo = await receive_json(alice)
    assert set(echo) == MESSAGE_KEYS
    assert echo["message"] == text
    assert await receive_json(v1_bob) == echo


# -- the controller's own failures, on the embedded backends -----------------------------


class HoldingQueue(MemoryQueue):
    """Publishes chat messages but holds their delivery (a slow subscription), or fails."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.holding = False
        self.held: list[tuple[UUID, bytes]] = []
        self.deliver_to: Any = None

    def on_message(self, deliver: Any, /) -> None:
        super().on_message(deliver)
        self.deliver_to = deliver

    async def publish(self, room_id: UUID, payload: bytes) -> None:
        if b'"type":"chat"' in payload:
            if self.down:
                raise BackendUnavailable("test: queue down")
            if self.holding:
                self.held.append((room_id, payload))
                return
        await super().publish(room_id, payload)

    def release(self, count: int) -> None:
        for room_id, payload in self.held[:count]:
            self.deliver_to(room_id, payload)
        del self.held[:count]


class Setup:
    def __init__(self) -> None:
        self.repository = FlakyRepository()
        self.queue = HoldingQueue()
        config = Config(rate_limit=0)
        self.controller = Controller(self.repository, self.queue, config, uuid4(), RefusalLog())
        self.peer = Recorder()

    async def member(self) -> Session:
        room = Room(id=uuid4(), name="Test Room")
        await self.repository.create_room(room)
        session = await self.controller.join(room.id, self.peer, RateLimiter(0, 1))
        await eventually(self.delivered(1))
        return session

    async def member_with_every_echo_held(self) -> Session:
        """A member with MAX_IN_FLIGHT messages published whose echoes the queue holds."""
        session = await self.member()
        self.queue.holding = True
        for n in range(MAX_IN_FLIGHT):
            await self.controller.say(session, f"held {n}", f"h{n}")
        await self.settled(session)
        return session

    def delivered(self, count: int) -> Any:
        async def check() -> bool:
            return len(self.peer.frames) >= count

        return check

    async def settled(self, session: Session) -> None:
        async with asyncio.timeout(WAIT):
            await session.messages_sent()


async def test_not_stored_fails_and_not_published_is_delivered_here_with_the_ref() -> None:
    """Stored is never taken back: a message the queue refused reaches the sender (and
    this instance's members) at once, echo and ref included; other instances fetch it."""
    setup = Setup()
    session = await setup.member()
    setup.repository.down = True
    await setup.controller.say(session, "lost", "not-stored")
    await setup.settled(session)
    setup.repository.down = False
    setup.queue.down = True
    await setup.controller.say(session, "kept", "not-published")
    await setup.settled(session)
    await eventually(setup.delivered(3))
    answers = setup.peer.frames[1:]
    assert [(f["type"], f["ref"]) for f in answers] == [
        ("failed", "not-stored"),
        ("chat", "not-published"),
    ]
    assert "could not be stored" in answers[0]["message"]
    assert answers[1]["message"] == "kept"
    # Neither kept one of the member's in-flight slots.
    setup.queue.down = False
    for n in range(MAX_IN_FLIGHT + 1):
        await setup.controller.say(session, f"then {n}", f"t{n}")
    await eventually(setup.delivered(3 + MAX_IN_FLIGHT + 1))
    assert [f.get("ref") for f in setup.peer.frames[3:]] == [
        f"t{n}" for n in range(MAX_IN_FLIGHT + 1)
    ]


async def test_pending_refs_are_bounded_by_the_in_flight_messages() -> None:
    setup = Setup()
    session = await setup.member_with_every_echo_held()
    assert len(setup.queue.held) == MAX_IN_FLIGHT  # all published, no echo yet
    # Each waits for its echo in an in-flight slot: the next message waits for one.
    assert session.slots_full
    blocked = asyncio.create_task(setup.controller.say(session, "next", "n"))
    setup.queue.release(1)
    async with asyncio.timeout(WAIT):
        await blocked
    setup.queue.holding = False
    setup.queue.release(len(setup.queue.held))
    await setup.settled(session)
    await eventually(setup.delivered(1 + MAX_IN_FLIGHT + 1))
    refs = [f.get("ref") for f in setup.peer.frames[1:]]
    assert refs == [*(f"h{n}" for n in range(MAX_IN_FLIGHT)), "n"]


async def test_echoes_the_queue_lost_come_from_the_repository_with_their_refs() -> None:
    """The queue drops all but the last of a member's messages: the gap before the last
    is filled from the repository, so every echo comes, in order, with its ref, and
    every in-flight slot is free again."""
    setup = Setup()
    session = await setup.member_with_every_echo_held()
    assert session.slots_full
    del setup.queue.held[: MAX_IN_FLIGHT - 1]
    setup.queue.release(1)  # the last one's echo: the others' are lost
    await eventually(setup.delivered(1 + MAX_IN_FLIGHT))
    assert [f["ref"] for f in setup.peer.frames[1:]] == [f"h{n}" for n in range(MAX_IN_FLIGHT)]
    assert not session.slots_full
