"""The client's address, scheme and host behind proxies: believed only from trusted peers."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp import web

from sharechat.app import create_app
from sharechat.config import Config
from sharechat.proxies import (
    TrustedProxies,
    client_address,
    forwarded_headers,
    forwarded_host,
    forwarded_proto,
)
from tests.helpers import WAIT

NGINX = TrustedProxies(["10.0.0.1/32"])
CLUSTER = TrustedProxies(["10.0.0.0/8", "192.168.0.0/16", "2001:db8:ffff::/48"])
ANYONE = TrustedProxies(["*"])
NOBODY = TrustedProxies([])


# -- the address ---------------------------------------------------------------------------


def test_without_trusted_proxies_the_peer_is_the_client() -> None:
    assert client_address("203.0.113.7", ["198.51.100.1"], NOBODY) == "203.0.113.7"
    assert not NOBODY


def test_an_untrusted_peer_cannot_choose_its_address() -> None:
    assert client_address("203.0.113.7", ["198.51.100.1"], NGINX) == "203.0.113.7"
    assert client_address("203.0.113.7", ["10.0.0.1"], CLUSTER) == "203.0.113.7"


def test_a_trusted_proxy_names_the_client() -> None:
    assert client_address("10.0.0.1", ["198.51.100.1"], NGINX) == "198.51.100.1"


def test_no_header_from_a_trusted_proxy_leaves_the_peer() -> None:
    assert client_address("10.0.0.1", [], NGINX) == "10.0.0.1"
    assert client_address("10.0.0.1", ["", " , "], NGINX) == "10.0.0.1"


def test_spoofed_leftmost_entries_are_not_believed() -> None:
    # The client sent "1.1.1.1, 2.2.2.2"; nginx appended the address it saw.
    header = ["1.1.1.1, 2.2.2.2, 198.51.100.1"]
    assert client_address("10.0.0.1", header, NGINX) == "198.51.100.1"
    # Repeated headers are one list, in order.
    assert client_address("10.0.0.1", ["1.1.1.1", "198.51.100.1"], NGINX) == "198.51.100.1"


def test_the_walk_passes_trusted_proxies_from_the_right() -> None:
    header = ["6.6.6.6, 198.51.100.1, 192.168.1.5, 10.1.2.3"]
    assert client_address("10.0.0.1", header, CLUSTER) == "198.51.100.1"


def test_cidrs_bound_the_trust() -> None:
    header = ["6.6.6.6, 198.51.100.1, 10.0.0.2"]
    # 10.0.0.2 is outside 10.0.0.1/32: it is what the trusted proxy saw.
    assert client_address("10.0.0.1", header, NGINX) == "10.0.0.2"
    assert client_address("10.0.0.1", header, CLUSTER) == "198.51.100.1"


def test_an_all_trusted_chain_is_a_client_of_ours() -> None:
    assert client_address("10.0.0.1", ["192.168.0.9, 10.0.0.2"], CLUSTER) == "192.168.0.9"


def test_ipv6() -> None:
    header = ["2001:db8::dead, 2001:db8:1::7, 2001:db8:ffff::1"]
    assert client_address("2001:db8:ffff::2", header, CLUSTER) == "2001:db8:1::7"
    assert client_address("2001:db8:1::9", header, CLUSTER) == "2001:db8:1::9"
    # Written out in full, with brackets and a port: the same address.
    full = ["[2001:0db8:0001:0000:0000:0000:0000:0007]:4711"]
    assert client_address("10.0.0.1", full, CLUSTER) == "2001:db8:1::7"


def test_ipv4_mapped_addresses_are_ipv4() -> None:
    assert client_address("::ffff:10.0.0.1", ["::ffff:198.51.100.1"], NGINX) == "198.51.100.1"


def test_ports_some_proxies_add_are_dropped() -> None:
    assert client_address("10.0.0.1", ["198.51.100.1:52114"], NGINX) == "198.51.100.1"


def test_star_trusts_every_peer_but_no_entry() -> None:
    """Heroku's and Railway's routers append the address they saw: the rightmost entry."""
    assert client_address("203.0.113.7", ["198.51.100.1"], ANYONE) == "198.51.100.1"
    spoofed = ["10.0.0.2, 1.1.1.1, 198.51.100.1"]
    assert client_address("203.0.113.7", spoofed, ANYONE) == "198.51.100.1"
    assert client_address("203.0.113.7", [], ANYONE) == "203.0.113.7"


@pytest.mark.parametrize("junk", ["unknown", "_hidden", "1.2.3", "[::1", "1.2.3.4:x", "::1]"])
def test_malformed_entries_are_never_the_address_nor_walked_past(junk: str) -> None:
    # Nothing left of a malformed entry is believable: the nearest hop right of it wins.
    header = [f"6.6.6.6, {junk}, 192.168.1.5"]
    assert client_address("10.0.0.1", header, CLUSTER) == "192.168.1.5"
    assert client_address("10.0.0.1", [f"6.6.6.6, {junk}"], CLUSTER) == "10.0.0.1"
    assert client_address("203.0.113.7", [f"6.6.6.6, {junk}"], ANYONE) == "203.0.113.7"


def test_a_peer_that_is_not_an_address_is_trusted_only_by_star() -> None:
    # A unix socket's peer is "".
    assert client_address("", ["198.51.100.1"], CLUSTER) == ""
    assert client_address("", ["198.51.100.1"], ANYONE) == "198.51.100.1"


# -- scheme and host -----------------------------------------------------------------------


def test_proto_is_the_rightmost_http_or_https() -> None:
    assert forwarded_proto(["https"]) == "https"
    assert forwarded_proto(["HTTP"]) == "http"
    assert forwarded_proto(["http, https"]) == "https"
    assert forwarded_proto(["https", "http"]) == "http"
    for bad in ([], [""], ["ftp"], ["https, javascript"], ["wss"]):
        assert forwarded_proto(bad) is None, bad


def test_host_is_the_rightmost_sane_host_and_port() -> None:
    assert forwarded_host(["Public.Example"]) == "public.example"
    assert forwarded_host(["evil.example, public.example:8443"]) == "public.example:8443"
    assert forwarded_host(["[2001:db8::1]:443"]) == "[2001:db8::1]:443"
    assert forwarded_host(["192.0.2.1"]) == "192.0.2.1"
    bad = [
        [], [""], ["public.example:0"], ["public.example:65536"], ["public.example:"],
        ["user@public.example"], ["public.example/path"], ["-public.example"],
        ["public..example"], ["[not:an:address:at:all::g]"], ["a" * 64 + ".example"],
        ["public.example\r\nX-Injected: 1"], ["public.example, bad host"],
    ]
    for values in bad:
        assert forwarded_host(values) is None, values


# -- the middleware, in an app whose handlers show what they see -------------------------------


async def seen(request: web.Request) -> web.Response:
    return web.json_response(
        {"remote": request.remote, "scheme": request.scheme, "host": request.host}
    )


async def seen_over_websocket(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    await ws.send_json({"remote": request.remote, "scheme": request.scheme})
    await ws.close()
    return ws


async def observer(aiohttp_client: Any, allow: tuple[str, ...]) -> Any:
    app = web.Application(middlewares=[forwarded_headers(allow)])
    app.router.add_get("/", seen)
    app.router.add_get("/ws", seen_over_websocket)
    return await aiohttp_client(app)


PROXIED = {
    "X-Forwarded-For": "6.6.6.6, 198.51.100.1",
    "X-Forwarded-Proto": "https",
    "X-Forwarded-Host": "public.example",
}


async def get_seen(client: Any, headers: dict[str, str]) -> dict[str, str]:
    async with asyncio.timeout(WAIT):
        response = await client.get("/", headers=headers)
        assert response.status == 200
        result: dict[str, str] = await response.json()
    return result


async def test_handlers_see_the_client_behind_a_trusted_proxy(aiohttp_client: Any) -> None:
    client = await observer(aiohttp_client, ("127.0.0.1/32",))
    assert await get_seen(client, PROXIED) == {
        "remote": "198.51.100.1", "scheme": "https", "host": "public.example"
    }


async def test_handlers_see_the_peer_when_it_is_not_trusted(aiohttp_client: Any) -> None:
    for allow in ((), ("10.0.0.0/8",)):
        client = await observer(aiohttp_client, allow)
        direct = await get_seen(client, PROXIED)
        assert direct["remote"] == "127.0.0.1"
        assert direct["scheme"] == "http"
        assert direct["host"] == f"127.0.0.1:{client.port}"
        await client.close()


async def test_bad_forwarded_scheme_and_host_are_ignored(aiohttp_client: Any) -> None:
    client = await observer(aiohttp_client, ("*",))
    headers = {"X-Forwarded-Proto": "gopher", "X-Forwarded-Host": "evil.example/x"}
    assert await get_seen(client, headers) == {
        "remote": "127.0.0.1", "scheme": "http", "host": f"127.0.0.1:{client.port}"
    }


async def test_the_websocket_handler_sees_the_client_too(aiohttp_client: Any) -> None:
    client = await observer(aiohttp_client, ("*",))
    async with asyncio.timeout(WAIT):
        ws = await client.ws_connect("/ws", headers=PROXIED)
        assert await ws.receive_json() == {"remote": "198.51.100.1", "scheme": "https"}
        await ws.close()


# -- the real app ---------------------------------------------------------------------------


async def welcome(aiohttp_client: Any, headers: dict[str, str], **settings: Any) -> str:
    client = await aiohttp_client(create_app(Config(host="127.0.0.1", port=0, **settings)))
    async with asyncio.timeout(WAIT):
        response = await client.get("/", headers=headers)
        assert response.status == 200
        assert response.content_type == "text/plain"
        text: str = await response.text()
    return text


async def test_welcome_names_the_public_urls_behind_a_trusted_tls_proxy(
    aiohttp_client: Any,
) -> None:
    text = await welcome(aiohttp_client, PROXIED, forwarded_allow_ips=("127.0.0.1/32",))
    assert "curl -X POST https://public.example/api/room" in text
    assert "websocat wss://public.example/api/serve/<roomId>" in text
    assert "https://public.example/r/<roomId>" in text
    assert "127.0.0.1" not in text


async def test_welcome_ignores_forwarded_headers_from_anyone_else(aiohttp_client: Any) -> None:
    text = await welcome(aiohttp_client, PROXIED)
    assert "public.example" not in text
    assert "https:" not in text
    assert "wss:" not in text
    assert "curl -X POST http://127.0.0.1:" in text
    assert "websocat ws://127.0.0.1:" in text


async def test_welcome_keeps_the_host_header_when_the_proxy_sends_no_forwarded_host(
    aiohttp_client: Any,
) -> None:
    headers = {"Host": "chat.example", "X-Forwarded-Proto": "https"}
    text = await welcome(aiohttp_client, headers, forwarded_allow_ips=("*",))
    assert "curl -X POST https://chat.example/api/room" in text

