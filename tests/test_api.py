"""The HTTP API of the contract: answers, their exact shapes, and every error as JSON."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import uuid
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from sharechat import names
from sharechat.app import create_app
from sharechat.config import Config
from tests.conftest import Chat
from tests.helpers import (
    MESSAGE_KEYS,
    NAME_FORMAT,
    SENT_FORMAT,
    WAIT,
    eventually,
    receive_json,
    receive_until,
)

UNKNOWN_ROOM = "7d0c6a0e-0b7e-4c1e-9a51-0e0b1b9b7a11"
BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"


# -- small helpers ---------------------------------------------------------------------


async def request(
    client: TestClient[Any, Any], method: str, path: str, **kwargs: Any
) -> tuple[aiohttp.ClientResponse, bytes]:
    """One request, body read, all under a deadline."""
    async with asyncio.timeout(WAIT):
        response = await client.request(method, path, **kwargs)
        body = await response.read()
    return response, body


async def assert_error(
    client: TestClient[Any, Any], method: str, path: str, status: int, **kwargs: Any
) -> aiohttp.ClientResponse:
    """The contract's error shape: JSON, exactly `{"error": "<non-empty text>"}`."""
    response, body = await request(client, method, path, **kwargs)
    assert response.status == status, (method, path, response.status, body)
    assert_json_content_type(response)
    error = json.loads(body.decode("utf-8"))
    assert isinstance(error, dict), error
    assert set(error) == {"error"}, error
    assert isinstance(error["error"], str), error
    assert error["error"].strip(), error
    return response


def assert_json_content_type(response: aiohttp.ClientResponse) -> None:
    assert response.content_type == "application/json", response.headers
    assert response.charset in (None, "utf-8"), response.headers


async def get_json(client: TestClient[Any, Any], path: str) -> Any:
    response, body = await request(client, "GET", path)
    assert response.status == 200, (path, response.status, body)
    assert_json_content_type(response)
    return json.loads(body.decode("utf-8"))


def websocket_upgrade_headers(**extra: str) -> dict[str, str]:
    """What a browser sends to open a websocket, for looking at a refusal's body."""
    return {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
        "Sec-WebSocket-Version": "13",
        **extra,
    }


async def assert_handshake_refused(
    client: TestClient[Any, Any], path: str, status: int, **kwargs: Any
) -> None:
    async with asyncio.timeout(WAIT):
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await client.ws_connect(path, **kwargs)
    assert refused.value.status == status


def is_uuid4(text: Any) -> bool:
    if not isinstance(text, str):
        return False
    try:
        parsed = uuid.UUID(text)
    except ValueError:
        return False
    return parsed.version == 4 and str(parsed) == text


# -- healthz and rooms -------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/api/readyz", "/api/healthz"])
async def test_readyz_and_its_alias_healthz_report_both_backends(
    client: TestClient[Any, Any], path: str
) -> None:
    assert await get_json(client, path) == {
        "status": "ok",
        "repository": "ok",
        "queue": "ok",
        "draining": False,
    }


async def test_livez_answers_ok(client: TestClient[Any, Any]) -> None:
    assert await get_json(client, "/api/livez") == {"status": "ok"}


async def test_create_room_answers_id_and_name(client: TestClient[Any, Any]) -> None:
    seen: set[str] = set()
    for _ in range(20):
        response, body = await request(client, "POST", "/api/room")
        assert response.status == 200, body
        assert_json_content_type(response)
        room = json.loads(body)
        assert set(room) == {"roomId", "roomName"}
        assert is_uuid4(room["roomId"]), room
        assert room["roomId"] not in seen
        seen.add(room["roomId"])
        assert NAME_FORMAT.match(room["roomName"]), room
        adjective, noun = room["roomName"].split(" ")
        assert adjective in names.ADJECTIVES, room
        assert noun in names.NOUNS, room


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"\x00\xff junk \xfe", "application/octet-stream"),
        (
            b'{"roomId": "' + UNKNOWN_ROOM.encode() + b'", "roomName": "Evil Name"}',
            "application/json",
        ),
        (b"{not json", "application/json"),
        (b"roomName=Evil+Name", "application/x-www-form-urlencoded"),
        (b"x" * (256 * 1024), "text/plain"),
    ],
    ids=["binary", "json", "bad-json", "form", "256KiB"],
)
async def test_create_room_ignores_the_request_body(
    client: TestClient[Any, Any], body: bytes, content_type: str
) -> None:
    response, answer = await request(
        client, "POST", "/api/room", data=body, headers={"Content-Type": content_type}
    )
    assert response.status == 200, answer
    room = json.loads(answer)
    assert set(room) == {"roomId", "roomName"}
    assert is_uuid4(room["roomId"])
    assert room["roomId"] != UNKNOWN_ROOM
    assert room["roomName"] != "Evil Name"
    assert NAME_FORMAT.match(room["roomName"])
    # The room is real: it can be read back.
    fetched = await get_json(client, f"/api/room/{room['roomId']}")
    assert fetched["roomName"] == room["roomName"]


async def test_new_room_has_no_members(client: TestClient[Any, Any]) -> None:
    _, body = await request(client, "POST", "/api/room")
    created = json.loads(body)
    room = await get_json(client, f"/api/room/{created['roomId']}")
    assert room == {"roomId": created["roomId"], "roomName": created["roomName"], "members": []}
    assert await get_json(client, f"/api/room/{created['roomId']}/messages") == []


async def test_members_are_listed_while_connected(chat: Chat) -> None:
    room = await chat.room()
    alice, alice_joined = await chat.join(room)
    bob, bob_joined = await chat.join(room)
    # Listed as soon as its own `joined` has been received: no waiting.
    answer = await get_json(chat.client, f"/api/room/{room}")
    assert set(answer) == {"roomId", "roomName", "members"}
    assert answer["roomId"] == room
    for member in answer["members"]:
        assert set(member) == {"id", "name"}
    expected = {
        (alice_joined["memberId"], alice_joined["memberName"]),
        (bob_joined["memberId"], bob_joined["memberName"]),
    }
    assert {(m["id"], m["name"]) for m in answer["members"]} == expected
    assert len(answer["members"]) == 2

    await alice.close()

    async def only_bob() -> bool:
        return await chat.members(room) == [
            {"id": bob_joined["memberId"], "name": bob_joined["memberName"]}
        ]

    await eventually(only_bob)
    await bob.close()

    async def nobody() -> bool:
        return await chat.members(room) == []

    await eventually(nobody)


# -- 404s ------------------------------------------------------------------------------


@pytest.mark.parametrize("room", [UNKNOWN_ROOM, "not-a-uuid", "12345", UNKNOWN_ROOM.upper() + "0"])
async def test_unknown_room_is_404_everywhere(client: TestClient[Any, Any], room: str) -> None:
    await assert_error(client, "GET", f"/api/room/{room}", 404)
    await assert_error(client, "GET", f"/api/room/{room}/messages", 404)
    await assert_handshake_refused(client, f"/api/serve/{room}", 404)
    # The refusal comes before any upgrade, and is JSON too.
    upgrade = websocket_upgrade_headers()
    await assert_error(client, "GET", f"/api/serve/{room}", 404, headers=upgrade)


async def test_unknown_room_with_paging_is_404(client: TestClient[Any, Any]) -> None:
    other = str(uuid.uuid4())
    for query in ("?limit=5", f"?before={other}", f"?after={other}", f"?after={other}&limit=2"):
        await assert_error(client, "GET", f"/api/room/{UNKNOWN_ROOM}/messages{query}", 404)


@pytest.mark.parametrize(
    "path",
    [
        "/api",
        "/api/",
        "/api/nope",
        "/api/rooms",
        "/api/room/x/y/z",
        "/api/healthz/extra",
        f"/api/room/{UNKNOWN_ROOM}/nope",
        "/api/serve",
    ],
)
async def test_unknown_api_path_is_json_404(client: TestClient[Any, Any], path: str) -> None:
    await assert_error(client, "GET", path, 404)


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("DELETE", "/api/room", "POST"),
        ("GET", "/api/room", "POST"),
        ("POST", "/api/healthz", "GET"),
        ("PUT", "/api/room/{room}", "GET"),
        ("DELETE", "/api/room/{room}", "GET"),
        ("POST", "/api/room/{room}/messages", "GET"),
        ("PATCH", "/api/room/{room}/messages", "GET"),
        ("POST", "/api/serve/{room}", "GET"),
    ],
)
async def test_wrong_method_is_json_405_with_allow(
    chat: Chat, method: str, path: str, allowed: str
) -> None:
    room = await chat.room()
    response = await assert_error(chat.client, method, path.format(room=room), 405)
    allow = {verb.strip() for verb in response.headers.get("Allow", "").split(",")}
    assert allowed in allow, response.headers
    assert method not in allow


async def test_plain_get_of_the_websocket_is_a_json_400(chat: Chat) -> None:
    room = await chat.room()
    await assert_error(chat.client, "GET", f"/api/serve/{room}", 400)
    assert await chat.members(room) == []
    assert await chat.history(room) == []


# -- history -----------------------------------------------------------------------------


async def test_history_is_what_the_room_saw(chat: Chat) -> None:
    room = await chat.room()
    alice, alice_joined = await chat.join(room)
    frames = [alice_joined]
    bob, bob_joined = await chat.join(room)
    frames.append(await receive_json(alice))
    for text in ("one", "two", "three"):
        await alice.send_str(text)
        frames.append(await receive_json(alice))
    # Bob says his line after seeing alice's three, so the room's order is fixed.
    await receive_until(bob, lambda m: m["type"] == "chat" and m["message"] == "three")
    await bob.send_str("four")
    frames.append(await receive_json(alice))
    await bob.close()
    frames.append(await receive_json(alice))

    a, b = alice_joined["memberId"], bob_joined["memberId"]
    expected = [
        ("joined", a, None),
        ("joined", b, None),
        ("chat", a, "one"),
        ("chat", a, "two"),
        ("chat", a, "three"),
        ("chat", b, "four"),
        ("left", b, None),
    ]

    def outline(messages: list[dict[str, Any]]) -> list[tuple[str, str, str | None]]:
        # joined/left texts are the server's to choose; chat texts are the members'.
        return [
            (m["type"], m["memberId"], m["message"] if m["type"] == "chat" else None)
            for m in messages
        ]

    history = await get_json(chat.client, f"/api/room/{room}/messages")
    assert outline(history) == expected
    assert outline(frames) == expected
    names_by_member = {a: alice_joined["memberName"], b: bob_joined["memberName"]}
    for entry in history:
        assert set(entry) == MESSAGE_KEYS, entry
        assert SENT_FORMAT.match(entry["sent"]), entry
        assert entry["roomId"] == room
        assert is_uuid4(entry["id"]), entry
        assert is_uuid4(entry["memberId"]), entry
        assert entry["memberName"] == names_by_member[entry["memberId"]]
        assert isinstance(entry["message"], str), entry
        assert entry["message"], entry
    assert len({entry["id"] for entry in history}) == len(history)
    sent = [entry["sent"] for entry in history]
    assert sent == sorted(sent)
    # The same object wherever it appears: field for field what alice received.
    assert history == frames
    await alice.close()


@pytest.fixture
async def seven(chat: Chat) -> tuple[str, list[dict[str, Any]]]:
    """A room with a known history of 7 messages: a `joined` and six chats."""
    room = await chat.room()
    alice, _ = await chat.join(room)
    for n in range(1, 7):
        await alice.send_str(f"m{n}")
        assert (await receive_json(alice))["message"] == f"m{n}"
    history = await get_json(chat.client, f"/api/room/{room}/messages")
    assert [m["message"] for m in history[1:]] == [f"m{n}" for n in range(1, 7)]
    return room, history


async def page(chat: Chat, room: str, query: str) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = await get_json(
        chat.client, f"/api/room/{room}/messages?{query}"
    )
    return messages


async def test_paging_backward(chat: Chat, seven: tuple[str, list[dict[str, Any]]]) -> None:
    room, history = seven
    ids = [m["id"] for m in history]
    assert await page(chat, room, "limit=3") == history[-3:]
    assert await page(chat, room, "limit=1") == history[-1:]
    assert await page(chat, room, "limit=7") == history
    assert await page(chat, room, "limit=1000") == history
    assert await page(chat, room, f"before={ids[4]}") == history[:4]
    assert await page(chat, room, f"before={ids[5]}&limit=2") == history[3:5]
    assert await page(chat, room, f"before={ids[2]}&limit=10") == history[:2]
    assert await page(chat, room, f"before={ids[0]}") == []
    assert await page(chat, room, f"before={ids[0]}&limit=5") == []


async def test_paging_forward(chat: Chat, seven: tuple[str, list[dict[str, Any]]]) -> None:
    room, history = seven
    ids = [m["id"] for m in history]
    assert await page(chat, room, f"after={ids[2]}") == history[3:]
    assert await page(chat, room, f"after={ids[2]}&limit=2") == history[3:5]
    assert await page(chat, room, f"after={ids[0]}&limit=1") == history[1:2]
    assert await page(chat, room, f"after={ids[4]}&limit=10") == history[5:]
    assert await page(chat, room, f"after={ids[-1]}") == []
    assert await page(chat, room, f"after={ids[-1]}&limit=3") == []


async def test_paging_catches_up_after_a_reconnect(
    chat: Chat, seven: tuple[str, list[dict[str, Any]]]
) -> None:
    room, history = seven
    bob, _ = await chat.join(room)
    await bob.send_str("later")
    await receive_until(bob, lambda m: m["message"] == "later")
    newer = await page(chat, room, f"after={history[-1]['id']}")
    assert [(m["type"], m["message"]) for m in newer][-1] == ("chat", "later")
    assert newer == (await chat.history(room))[len(history) :]
    await bob.close()


@pytest.mark.parametrize(
    "query",
    [
        "limit=0",
        "limit=1001",
        "limit=-1",
        "limit=abc",
        "limit=1.5",
        "limit=",
        "limit=1e3",
        "before=abc",
        "after=abc",
        "before=",
        "after=",
        "before=123",
        "before={random}",
        "after={random}",
        "before={other}",
        "after={other}",
        "before={first}&after={last}",
        "after={first}&before={first}",
        "before={first}&limit=0",
        "after={first}&limit=1001",
    ],
)
async def test_bad_paging_is_400(
    chat: Chat, seven: tuple[str, list[dict[str, Any]]], query: str
) -> None:
    room, history = seven
    other_room = await chat.room()
    other, other_joined = await chat.join(other_room)
    cursors = {
        "random": str(uuid.uuid4()),
        "other": other_joined["id"],  # a real message, of another room
        "first": history[0]["id"],
        "last": history[-1]["id"],
    }
    await assert_error(
        chat.client, "GET", f"/api/room/{room}/messages?{query.format(**cursors)}", 400
    )
    await other.close()


# -- pages -----------------------------------------------------------------------------------


async def test_index_without_html_is_a_text_welcome(client: TestClient[Any, Any]) -> None:
    for headers in ({}, {"Accept": "*/*"}, {"Accept": "text/plain"}):
        response, body = await request(client, "GET", "/", headers=headers)
        assert response.status == 200
        assert response.content_type == "text/plain", response.headers
        text = body.decode("utf-8")
        assert "/api/room" in text
        assert "<html" not in text.lower()
        assert response.headers.get("Content-Security-Policy")


async def test_index_for_a_browser_is_html(client: TestClient[Any, Any]) -> None:
    response, body = await request(client, "GET", "/", headers={"Accept": BROWSER_ACCEPT})
    assert response.status == 200
    assert response.content_type == "text/html", response.headers
    assert b"<html" in body.lower()
    assert response.headers.get("Content-Security-Policy")


async def test_room_page_is_html_with_a_csp(chat: Chat) -> None:
    room = await chat.room()
    for room_id in (room, UNKNOWN_ROOM):
        response, body = await request(
            chat.client, "GET", f"/r/{room_id}", headers={"Accept": BROWSER_ACCEPT}
        )
        assert response.status == 200
        assert response.content_type == "text/html", response.headers
        assert b"<html" in body.lower()
        csp = response.headers.get("Content-Security-Policy", "")
        assert "default-src" in csp, response.headers


async def test_client_files_are_revalidated(client: TestClient[Any, Any]) -> None:
    """An upgrade must never run with a cached copy of the previous JavaScript."""
    for path in ("/", "/static/room.js", "/static/app.css"):
        response, _ = await request(client, "GET", path, headers={"Accept": BROWSER_ACCEPT})
        assert response.status == 200
        assert response.headers.get("Cache-Control") == "no-cache", path


# -- origins -------------------------------------------------------------------------------
# The check does not depend on the backend: these run on the memory backends only.


async def origin_server(aiohttp_client: Any, **settings: Any) -> TestClient[Any, Any]:
    config = Config(host="127.0.0.1", port=0, **settings)
    client: TestClient[Any, Any] = await aiohttp_client(create_app(config))
    return client


async def assert_joins(client: TestClient[Any, Any], headers: dict[str, str]) -> None:
    chat = Chat(client)
    room = await chat.room()
    async with asyncio.timeout(WAIT):
        ws, joined = await chat.join(room, headers=headers)
        assert joined["roomId"] == room
        await ws.close()


async def assert_origin_refused(client: TestClient[Any, Any], headers: dict[str, str]) -> None:
    """403 JSON before the upgrade, and the room never saw the attempt."""
    chat = Chat(client)
    room = await chat.room()
    await assert_handshake_refused(client, f"/api/serve/{room}", 403, headers=headers)
    await assert_error(
        client, "GET", f"/api/serve/{room}", 403, headers=websocket_upgrade_headers(**headers)
    )
    assert await chat.members(room) == []
    assert await chat.history(room) == []


def own_origin(client: TestClient[Any, Any]) -> str:
    return f"http://127.0.0.1:{client.port}"


async def test_own_origin_can_join_by_default(aiohttp_client: Any) -> None:
    client = await origin_server(aiohttp_client)
    await assert_joins(client, {"Origin": own_origin(client)})
    await assert_joins(client, {"Origin": own_origin(client).upper() + "/"})


async def test_own_origin_is_the_one_the_host_header_names(aiohttp_client: Any) -> None:
    client = await origin_server(aiohttp_client)
    # The scheme's default port is the same origin, written or not.
    await assert_joins(client, {"Host": "chat.example", "Origin": "http://chat.example"})
    await assert_joins(client, {"Host": "chat.example:80", "Origin": "http://Chat.Example"})
    await assert_joins(client, {"Host": "chat.example", "Origin": "http://chat.example:80"})
    await assert_origin_refused(client, {"Host": "chat.example", "Origin": "http://evil.example"})


async def test_other_origins_are_403_before_upgrade_by_default(
    aiohttp_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    client = await origin_server(aiohttp_client)
    port = client.port
    foreign = (
        "http://evil.example",
        f"https://127.0.0.1:{port}",  # another scheme is another origin
        f"http://127.0.0.1:{port + 1}",
        f"http://localhost:{port}",
        "null",
    )
    with caplog.at_level(logging.WARNING, logger="sharechat.refusals"):
        for origin in foreign:
            await assert_origin_refused(client, {"Origin": origin})
    # The operator sees one line a minute, the client's text quoted.
    lines = [r.getMessage() for r in caplog.records if r.name == "sharechat.refusals"]
    assert len(lines) == 1, lines
    assert lines[0].startswith("refused origin: websocket from origin 'http://evil.example' ")


async def test_no_origin_header_is_always_allowed(aiohttp_client: Any) -> None:
    # aiohttp sends no Origin unless asked, like websocat and curl.
    await assert_joins(await origin_server(aiohttp_client), {})
    listed = await origin_server(aiohttp_client, allowed_origins=("http://good.example",))
    await assert_joins(listed, {})


async def test_star_allows_any_origin(aiohttp_client: Any) -> None:
    client = await origin_server(aiohttp_client, allowed_origins=("*",))
    await assert_joins(client, {"Origin": "http://anywhere.example"})
    await assert_joins(client, {"Origin": "null"})


async def test_listed_origins_replace_the_default(aiohttp_client: Any) -> None:
    listed = ("http://good.example", "https://other.example:8443")
    client = await origin_server(aiohttp_client, allowed_origins=listed)
    await assert_joins(client, {"Origin": "http://good.example"})
    await assert_joins(client, {"Origin": "HTTP://Good.Example:80/"})
    await assert_joins(client, {"Origin": "https://other.example:8443"})
    await assert_origin_refused(client, {"Origin": "http://evil.example"})
    await assert_origin_refused(client, {"Origin": "https://good.example"})
    await assert_origin_refused(client, {"Origin": own_origin(client)})


async def test_behind_a_trusted_proxy_the_public_origin_is_own(aiohttp_client: Any) -> None:
    proxied = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "public.example"}
    client = await origin_server(aiohttp_client, forwarded_allow_ips=("127.0.0.1/32",))
    await assert_joins(client, {**proxied, "Origin": "https://public.example"})
    await assert_joins(client, {**proxied, "Origin": "https://public.example:443"})
    await assert_origin_refused(client, {**proxied, "Origin": "http://public.example"})
    await assert_origin_refused(client, {**proxied, "Origin": own_origin(client)})


async def test_forwarded_headers_from_an_untrusted_peer_do_not_make_an_origin_own(
    aiohttp_client: Any,
) -> None:
    proxied = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "evil.example"}
    client = await origin_server(aiohttp_client, forwarded_allow_ips=("10.0.0.0/8",))
    await assert_origin_refused(client, {**proxied, "Origin": "https://evil.example"})
    await assert_joins(client, {**proxied, "Origin": own_origin(client)})


async def test_the_websocket_handshake_carries_no_page_headers(chat: Chat) -> None:
    """A 101 renders nothing; its headers live as long as the connection does."""
    room = await chat.room()
    async with asyncio.timeout(WAIT):
        ws = await chat.client.ws_connect(f"/api/serve/{room}")
    try:
        assert ws._response.status == 101
        assert "Content-Security-Policy" not in ws._response.headers
        assert "X-Content-Type-Options" not in ws._response.headers
    finally:
        await ws.close()
