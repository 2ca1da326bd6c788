"""--log-format json: every line a process writes is one JSON object, whatever happens."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.helpers import WAIT, free_port, receive_close, receive_json
from tests.redis_support import unique_prefix
from tests.servers import clean_environ, create_room, join, running, serve_command

pytestmark = pytest.mark.services  # real PostgreSQL/Redis: see conftest --backends

SHUTDOWN = 10.0


def json_lines(output: str) -> list[dict[str, Any]]:
    """Every line parsed as JSON; fails naming the first line that is not an object."""
    lines = []
    for line in output.splitlines():
        try:
            parsed = json.loads(line)
        except ValueError:
            pytest.fail(f"not JSON: {line!r}\n{output}")
        assert isinstance(parsed, dict), line
        lines.append(parsed)
    return lines


async def test_json_logs_through_a_chat_refusals_and_a_shutdown(
    tmp_path: Path, database_url: str, redis_prefix: str
) -> None:
    port = free_port()
    command = serve_command(
        port,
        "--log-format", "json",
        "--access-log",
        "--log-level", "DEBUG",
        "--room-create-burst", "2",
        "--room-create-limit", "0.001",
    )  # fmt: skip
    environ = clean_environ(
        DATABASE_URL=database_url,
        REDIS_URL="redis://127.0.0.1:6379/0",
        SHARECHAT_REDIS_PREFIX=unique_prefix("logs"),
    )
    async with running(command, port, environ, tmp_path) as server, aiohttp.ClientSession() as http:
        room = await create_room(http, server)
        alice, alice_joined = await join(http, server, room)
        bob, _ = await join(http, server, room)
        await receive_json(alice)  # bob's joined
        await alice.send_str("hello\nwith a line break")
        assert (await receive_json(bob))["message"] == "hello\nwith a line break"
        await receive_json(alice)

        # Refusals: a budget (the third room within the burst of 2) and a foreign origin.
        await create_room(http, server)
        async with http.post(f"{server.url}/api/room") as response:
            assert response.status == 429
        async with http.get(
            f"{server.url}/api/serve/{room}", headers={"Origin": "https://evil.example"}
        ) as response:
            assert response.status == 403

        server.signal(signal.SIGTERM)
        assert await receive_close(alice, SHUTDOWN) == 1001
        assert await receive_close(bob, SHUTDOWN) == 1001
        assert await server.wait_exit(SHUTDOWN) == 0

    lines = json_lines(server.output())
    for line in lines:
        assert {"time", "level", "logger", "message", "instance"} <= set(line), line
    instance = {line["instance"] for line in lines}
    assert len(instance) == 1, instance

    def logged(logger: str, text: str) -> list[dict[str, Any]]:
        return [entry for entry in lines if entry["logger"] == logger and text in entry["message"]]

    assert logged("sharechat", "serving on http://127.0.0.1")
    assert logged("sharechat.refusals", "refused room-create")
    assert logged("sharechat.refusals", "refused origin")
    assert logged("sharechat", "SIGTERM: shutting down")
    access = [entry for entry in lines if entry["logger"] == "sharechat.access"]
    statuses = {(entry["method"], entry["status"]) for entry in access}
    assert {("POST", 200), ("POST", 429), ("GET", 403), ("GET", 101)} <= statuses
    socket = next(entry for entry in access if entry["status"] == 101)
    assert socket["path"] == f"/api/serve/{room}"
    assert socket["remote"] == "127.0.0.1"
    assert socket["duration"] > 0
    assert alice_joined["memberId"]


async def test_text_logs_stay_text_and_no_access_log_by_default(tmp_path: Path) -> None:
    port = free_port()
    async with (
        running(serve_command(port), port, clean_environ(), tmp_path) as server,
        aiohttp.ClientSession() as http,
    ):
        await create_room(http, server)
        server.signal(signal.SIGTERM)
        assert await server.wait_exit(WAIT) == 0
    output = server.output()
    assert " INFO sharechat serving on http://127.0.0.1" in output
    assert "/api/room" not in output  # no access log
    assert not any(line.startswith("{") for line in output.splitlines())


async def test_behind_a_trusted_proxy_the_access_log_and_urls_name_the_client(
    tmp_path: Path,
) -> None:
    port = free_port()
    command = serve_command(
        port, "--log-format", "json", "--access-log", "--forwarded-allow-ips", "127.0.0.1"
    )
    headers = {
        "X-Forwarded-For": "203.0.113.7",
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "chat.example",
    }
    async with running(command, port, clean_environ(), tmp_path) as server:
        async with aiohttp.ClientSession() as http, http.get(server.url, headers=headers) as got:
            welcome = await got.text()
        server.signal(signal.SIGTERM)
        assert await server.wait_exit(WAIT) == 0
    assert "websocat wss://chat.example/api/serve/<roomId>" in welcome
    assert "curl -X POST https://chat.example/api/room" in welcome
    access = [e for e in json_lines(server.output()) if e["logger"] == "sharechat.access"]
    assert [(e["path"], e["remote"]) for e in access if e["path"] == "/"] == [("/", "203.0.113.7")]
