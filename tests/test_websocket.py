"""The websocket protocol of the contract, rule by rule."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from sharechat import names
from sharechat.websocket import _text_header
from tests.conftest import Chat, StartServer
from tests.helpers import (
    MESSAGE_KEYS,
    NAME_FORMAT,
    SENT_FORMAT,
    WAIT,
    eventually,
    receive_close,
    receive_json,
    receive_until,
)
from tests.raw_websocket import RawWebSocket


def is_type(kind: str, member_id: str | None = None) -> Any:
    return lambda m: m["type"] == kind and member_id in (None, m["memberId"])


async def test_first_frame_is_own_joined(chat: Chat) -> None:
    room = await chat.room()
    _, joined = await chat.join(room)
    assert set(joined) == MESSAGE_KEYS
    assert joined["type"] == "joined"
    assert joined["roomId"] == room
    assert SENT_FORMAT.match(joined["sent"])
    assert NAME_FORMAT.match(joined["memberName"])
    color, noun = joined["memberName"].split()
    assert color in names.COLORS
    assert noun in names.NOUNS
    assert joined in await chat.history(room)


async def test_every_member_gets_a_new_identity(chat: Chat) -> None:
    room = await chat.room()
    first, joined = await chat.join(room)
    await first.close()
    _, again = await chat.join(room)
    assert again["memberId"] != joined["memberId"]


async def test_two_members_see_each_other(chat: Chat) -> None:
    room = await chat.room()
    alice, alice_joined = await chat.join(room)
    bob, bob_joined = await chat.join(room)
    assert await receive_json(alice) == bob_joined

    await alice.send_str("hello bob")
    echo = await receive_json(alice)
    assert echo == await receive_json(bob)
    assert set(echo) == MESSAGE_KEYS
    assert (echo["type"], echo["message"]) == ("chat", "hello bob")
    assert (echo["memberId"], echo["memberName"]) == (
        alice_joined["memberId"],
        alice_joined["memberName"],
    )
    assert echo == (await chat.history(room))[-1]


async def test_three_members_receive_one_order(chat: Chat) -> None:
    room = await chat.room()
    sockets = [(await chat.join(room))[0] for _ in range(3)]
    # Each earlier member first sees the later joins.
    await receive_until(sockets[0], is_type("joined"))
    await receive_until(sockets[0], is_type("joined"))
    await receive_until(sockets[1], is_type("joined"))

    per_member = 20
    await asyncio.gather(
        *(
            ws.send_str(f"{index}:{n}")
            for n in range(per_member)
            for index, ws in enumerate(sockets)
        )
    )
    received = [
        [(await receive_json(ws))["message"] for _ in range(3 * per_member)] for ws in sockets
    ]
    assert received[0] == received[1] == received[2]
    for index in range(3):
        own = [text for text in received[0] if text.startswith(f"{index}:")]
        assert own == [f"{index}:{n}" for n in range(per_member)]
    chats = [m["message"] for m in await chat.history(room) if m["type"] == "chat"]
    assert chats == received[0]


async def test_websocket_to_unknown_room_is_404_before_upgrade(client: TestClient) -> None:
    for room in ("7d0c6a0e-0b7e-4c1e-9a51-0e0b1b9b7a11", "not-a-uuid"):
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await client.ws_connect(f"/api/serve/{room}")
        assert refused.value.status == 404


async def test_empty_and_blank_frames_are_ignored(chat: Chat) -> None:
    room = await chat.room()
    alice, _ = await chat.join(room)
    for blank in ("", " ", "\n", " \t\r\n "):
        await alice.send_str(blank)
    await alice.send_str("real")
    assert (await receive_json(alice))["message"] == "real"
    assert [m["type"] for m in await chat.history(room)] == ["joined", "chat"]


LINE_BREAKS = [
    ("hello\n", "hello"),  # websocat's line mode
    ("hello\r\n", "hello"),
    ("a\n\n", "a\n"),  # only one line break is taken off
    ("a\r\n\r\n", "a\r\n"),
    ("a\n\r\n", "a\n"),
    ("two\nlines\n", "two\nlines"),
    ("  indented\n", "  indented"),
    ("no break", "no break"),
    ("carriage\r", "carriage\r"),  # a lone CR is not a line break
    ("trailing space \n", "trailing space "),
]


async def test_one_trailing_line_break_is_not_part_of_the_message(chat: Chat) -> None:
    room = await chat.room()
    alice, _ = await chat.join(room)
    bob, _ = await chat.join(room)
    await receive_json(alice)  # bob joined
    for frame, _ in LINE_BREAKS:
        await alice.send_str(frame)
    expected = [text for _, text in LINE_BREAKS]
    echoes = [await receive_json(alice) for _ in LINE_BREAKS]
    assert [echo["message"] for echo in echoes] == expected
    assert [await receive_json(bob) for _ in LINE_BREAKS] == echoes
    assert [m for m in await chat.history(room) if m["type"] == "chat"] == echoes


async def test_line_breaks_alone_are_ignored(chat: Chat) -> None:
    room = await chat.room()
    alice, _ = await chat.join(room)
    for blank in ("\n", "\r\n", "\n\n", "\r\n\r\n", " \n", "\t\r\n"):
        await alice.send_str(blank)
    await alice.send_str("after the blanks\n")
    assert (await receive_json(alice))["message"] == "after the blanks"
    assert [m["type"] for m in await chat.history(room)] == ["joined", "chat"]


async def test_the_limit_counts_the_message_without_its_line_break(
    start_server: StartServer,
) -> None:
    chat = Chat(await start_server(max_message_bytes=4))
    room = await chat.room()
    alice, _ = await chat.join(room)
    await alice.send_str("four\r\n")
    assert (await receive_json(alice))["message"] == "four"
    await alice.send_str("five!\n")
    assert (await receive_json(alice))["type"] == "failed"


async def test_oversized_frame_fails_for_the_sender_alone(start_server: StartServer) -> None:
    chat = Chat(await start_server(max_message_bytes=8))
    room = await chat.room()
    alice, alice_joined = await chat.join(room)
    bob, _ = await chat.join(room)
    await receive_json(alice)  # bob joined

    await alice.send_str("é" * 4 + "x")  # 9 bytes in UTF-8, though 5 characters
    failed = await receive_json(alice)
    assert set(failed) == MESSAGE_KEYS
    assert failed["type"] == "failed"
    assert failed["memberId"] == alice_joined["memberId"]
    assert failed["memberName"] == alice_joined["memberName"]
    assert "9 bytes" in failed["message"]
    assert "8" in failed["message"]
    assert SENT_FORMAT.match(failed["sent"])

    await alice.send_str("é" * 4)  # exactly 8 bytes: accepted, and the socket is still open
    assert (await receive_json(alice))["message"] == "é" * 4
    assert (await receive_json(bob))["message"] == "é" * 4  # bob never saw the failure
    assert [m["type"] for m in await chat.history(room)][-1] == "chat"
    assert all(m["type"] != "failed" for m in await chat.history(room))


async def test_binary_frame_fails_for_the_sender_alone(chat: Chat) -> None:
    room = await chat.room()
    alice, _ = await chat.join(room)
    bob, _ = await chat.join(room)
    await receive_json(alice)
    await alice.send_bytes(b"\x00\x01binary")
    failed = await receive_json(alice)
    assert failed["type"] == "failed"
    assert "binary" in failed["message"]
    await alice.send_str("still here")
    assert (await receive_json(bob))["message"] == "still here"
    assert (await receive_json(alice))["message"] == "still here"


async def test_nul_character_fails_cleanly(chat: Chat) -> None:
    room = await chat.room()
    alice, _ = await chat.join(room)
    await alice.send_str("a\x00b")
    assert (await receive_json(alice))["type"] == "failed"
    await alice.send_str("fine")
    assert (await receive_json(alice))["message"] == "fine"


async def test_invalid_utf8_closes_with_1007(chat: Chat) -> None:
    room = await chat.room()
    alice, _ = await chat.join(room)
    server = chat.client.server
    raw = await RawWebSocket.connect(str(server.host), int(server.port or 0), f"/api/serve/{room}")
    opcode, payload = await raw.read_frame()
    mallory = json.loads(payload)
    assert (opcode, mallory["type"]) == (0x1, "joined")
    raw.send_frame(0x1, b"caf\xc3(")  # a broken two-byte sequence
    assert await raw.read_close_code() == 1007
    await raw.close()
    await receive_until(alice, is_type("left", mallory["memberId"]))
    await alice.send_str("the room goes on")
    assert (await receive_json(alice))["message"] == "the room goes on"


async def test_flood_gets_failed_for_the_excess(start_server: StartServer) -> None:
    chat = Chat(await start_server(rate_limit=0.5, rate_burst=3))
    room = await chat.room()
    alice, _ = await chat.join(room)
    bob, _ = await chat.join(room)
    await receive_json(alice)
    for n in range(10):
        await alice.send_str(f"spam {n}")
    frames = [await receive_json(alice) for _ in range(10)]
    kinds = [frame["type"] for frame in frames]
    assert kinds.count("chat") == 3
    assert kinds.count("failed") == 7
    assert all("rate" in f["message"] for f in frames if f["type"] == "failed")
    seen_by_bob = [(await receive_json(bob))["message"] for _ in range(3)]
    assert seen_by_bob == ["spam 0", "spam 1", "spam 2"]
    chats = [m["message"] for m in await chat.history(room) if m["type"] == "chat"]
    assert chats == seen_by_bob


async def test_no_rate_limit_when_zero(start_server: StartServer) -> None:
    chat = Chat(await start_server(rate_limit=0, rate_burst=1))
    room = await chat.room()
    alice, _ = await chat.join(room)
    for n in range(50):
        await alice.send_str(str(n))
    assert [(await receive_json(alice))["type"] for _ in range(50)] == ["chat"] * 50


async def test_close_frame_leaves_the_room(chat: Chat) -> None:
    room = await chat.room()
    alice, _ = await chat.join(room)
    bob, bob_joined = await chat.join(room)
    await receive_json(alice)
    assert bob_joined["memberId"] in [m["id"] for m in await chat.members(room)]
    await bob.close()
    left = await receive_json(alice)
    assert set(left) == MESSAGE_KEYS
    assert (left["type"], left["memberId"]) == ("left", bob_joined["memberId"])
    assert left["memberName"] == bob_joined["memberName"]
    # Listed until its `left` is received, and not after.
    assert bob_joined["memberId"] not in [m["id"] for m in await chat.members(room)]
    assert (await chat.history(room))[-1] == left


async def test_lost_connection_leaves_the_room(chat: Chat) -> None:
    room = await chat.room()
    alice, _ = await chat.join(room)
    server = chat.client.server
    raw = await RawWebSocket.connect(str(server.host), int(server.port or 0), f"/api/serve/{room}")
    _, payload = await raw.read_frame()
    ghost = json.loads(payload)
    await receive_until(alice, is_type("joined", ghost["memberId"]))
    raw.abort()
    await receive_until(alice, is_type("left", ghost["memberId"]))
    assert ghost["memberId"] not in [m["id"] for m in await chat.members(room)]


async def test_member_that_stops_answering_pings_is_dropped(start_server: StartServer) -> None:
    chat = Chat(await start_server(ping_interval=0.2))
    room = await chat.room()
    alice, _ = await chat.join(room)
    # autoping off and never reading: this client will not answer the server's pings.
    _mute, mute_joined = await chat.join(room, autoping=False)
    await receive_until(alice, is_type("joined", mute_joined["memberId"]))
    # Alice answers her pings (her reads run the client's autoping) and stays.
    await receive_until(alice, is_type("left", mute_joined["memberId"]))
    await alice.send_str("still here")
    assert (await receive_json(alice))["message"] == "still here"


async def test_slow_consumer_is_disconnected_with_1008(start_server: StartServer) -> None:
    chat = Chat(await start_server(send_queue=4, max_message_bytes=1 << 16, rate_limit=0))
    room = await chat.room()
    alice, _ = await chat.join(room)
    bob, _ = await chat.join(room)
    sloth, sloth_joined = await chat.join(room)  # never reads from here on
    for ws in (alice, bob):
        await receive_until(ws, is_type("joined", sloth_joined["memberId"]))

    big = "x" * 60_000
    sent = 0
    sloth_left = False
    async with asyncio.timeout(4 * WAIT):
        while not sloth_left:
            await alice.send_str(f"{sent} {big}")
            sent += 1
            for ws in (alice, bob):
                frame = await receive_json(ws)
                if frame["type"] == "left":
                    assert frame["memberId"] == sloth_joined["memberId"]
                    sloth_left = True
                    frame = await receive_json(ws)
                assert frame["type"] == "chat"
                assert frame["message"].startswith(f"{sent - 1} ")
    # The others missed nothing while the sloth was being dropped.
    assert await receive_close(sloth, 4 * WAIT) == 1008
    chats = [m for m in await chat.history(room) if m["type"] == "chat"]
    assert len(chats) == sent


async def test_members_listed_from_joined_to_left(chat: Chat) -> None:
    room = await chat.room()
    assert await chat.members(room) == []
    alice, joined = await chat.join(room)
    assert await chat.members(room) == [{"id": joined["memberId"], "name": joined["memberName"]}]
    await alice.close()

    async def gone() -> bool:
        return await chat.members(room) == []

    await eventually(gone)


async def test_empty_room_expires_with_its_history(start_server: StartServer) -> None:
    chat = Chat(await start_server(room_idle_ttl=0.3))
    room = await chat.room()
    alice, _ = await chat.join(room)
    await alice.send_str("soon forgotten")
    await receive_json(alice)
    await alice.close()

    async def expired() -> bool:
        return (await chat.client.get(f"/api/room/{room}")).status == 404

    await eventually(expired)
    assert (await chat.client.get(f"/api/room/{room}/messages")).status == 404
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await chat.client.ws_connect(f"/api/serve/{room}")
    assert refused.value.status == 404


async def test_room_with_a_member_does_not_expire(start_server: StartServer) -> None:
    chat = Chat(await start_server(room_idle_ttl=0.2))
    room = await chat.room()
    alice, _ = await chat.join(room)
    # Time passing is the behaviour under test: several ttls elapse while alice stays.
    await asyncio.sleep(0.8)
    assert (await chat.client.get(f"/api/room/{room}")).status == 200
    await alice.send_str("still alive")
    assert (await receive_json(alice))["message"] == "still alive"


async def test_server_shutdown_closes_with_1001(start_server: StartServer) -> None:
    client = await start_server()
    chat = Chat(client)
    room = await chat.room()
    alice, _ = await chat.join(room)
    bob, _ = await chat.join(room)
    closing = asyncio.create_task(client.server.close())
    assert await receive_close(alice) == 1001
    assert await receive_close(bob) == 1001
    async with asyncio.timeout(WAIT):
        await closing


@pytest.mark.parametrize("size", [1, 125, 126, 65_535, 65_536, 200_000])
async def test_frames_of_every_length_class_arrive_intact(
    start_server: StartServer, size: int
) -> None:
    """The server writes text frames itself: 7-bit, 16-bit and 64-bit lengths all work."""
    chat = Chat(await start_server(max_message_bytes=250_000, rate_limit=0))
    room = await chat.room()
    alice, _ = await chat.join(room)
    bob, _ = await chat.join(room)
    await receive_json(alice)
    # The JSON around the text is about 250 bytes: frames land near each length class.
    text = "é" * ((size - 250) // 2) + "x" * ((size - 250) % 2) if size > 250 else "x" * size
    await alice.send_str(text)
    for ws in (alice, bob):
        assert (await receive_json(ws))["message"] == text


@pytest.mark.parametrize(
    ("length", "header"),
    [
        (0, b"\x81\x00"),
        (125, b"\x81\x7d"),
        (126, b"\x81\x7e\x00\x7e"),
        (65_535, b"\x81\x7e\xff\xff"),
        (65_536, b"\x81\x7f\x00\x00\x00\x00\x00\x01\x00\x00"),
    ],
)
def test_text_frame_header_follows_rfc_6455(length: int, header: bytes) -> None:
    assert _text_header(b"x" * length) == header


HOSTILE_TEXTS = [
    "'); DROP TABLE messages; --",
    'Robert"); DELETE FROM rooms WHERE ("1"="1',
    "semi;colons;everywhere;",
    "back\\slash \\x00 not a nul, %s %(name)s {0}",
    "emoji 🦊🏳️‍🌈 and \U0001d518 (4-byte UTF-8)",  # MATHEMATICAL FRAKTUR CAPITAL U
    "<script>alert(1)</script>",
]


async def test_hostile_text_is_stored_and_returned_exactly(chat: Chat) -> None:
    room = await chat.room()
    alice, _ = await chat.join(room)
    for text in HOSTILE_TEXTS:
        await alice.send_str(text)
        assert (await receive_json(alice))["message"] == text
    chats = [m["message"] for m in await chat.history(room) if m["type"] == "chat"]
    assert chats == HOSTILE_TEXTS


@pytest.mark.parametrize(
    "path",
    [
        "/api/room/'%3B%20DROP%20TABLE%20rooms%3B--",
        "/api/room/%00",
        "/api/room/00000000-0000-0000-0000-000000000000'--",
        "/api/room/{room}/messages?before=%27%3B%20DROP%20TABLE%20messages%3B--",
        "/api/room/{room}/messages?after=%00",
        "/api/room/{room}/messages?limit=1%3BDROP",
    ],
)
async def test_hostile_ids_get_a_4xx_never_a_500(chat: Chat, path: str) -> None:
    room = await chat.room()
    response = await chat.client.get(path.format(room=room))
    assert response.status in (400, 404)
    assert set(await response.json()) == {"error"}
    assert (await chat.client.get(f"/api/room/{room}")).status == 200
