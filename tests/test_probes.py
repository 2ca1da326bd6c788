"""The probes of a real process: livez while it answers, readyz 503 from SIGTERM on."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import aiohttp
import aiopg
import pytest
import yaml

from tests.helpers import WAIT, free_port, receive_close
from tests.servers import Server, clean_environ, create_room, join, running, serve_command
from tests.test_deploy import ROOT, dockerfile

SHUTDOWN = 10.0  # the contract: exits within 10 s of SIGTERM


async def probe(http: aiohttp.ClientSession, server: Server, name: str) -> tuple[int, Any]:
    async with asyncio.timeout(WAIT), http.get(f"{server.url}/api/{name}") as response:
        return response.status, await response.json()


@pytest.mark.services
async def test_readyz_answers_503_during_the_drain_while_livez_answers_200(
    database_url: str, tmp_path: Path
) -> None:
    """SIGTERM with a member connected: the drain lasts until the member's `left` is
    recorded, which the test holds up by locking the room in PostgreSQL. Meanwhile
    the process still answers, live but not ready, and refuses new members; once the
    lock goes, the `left` is stored and the process exits."""
    port = free_port()
    environ = clean_environ(DATABASE_URL=database_url)
    async with (
        running(serve_command(port), port, environ, tmp_path) as server,
        aiohttp.ClientSession() as http,
        aiohttp.ClientSession() as probes,  # new connections: the listener is still open
        aiopg.connect(database_url) as database,
        database.cursor() as cursor,
    ):
        room = await create_room(http, server)
        member, joined = await join(http, server, room)
        assert (await probe(probes, server, "readyz"))[0] == 200
        await cursor.execute("BEGIN")
        await cursor.execute("SELECT id FROM rooms WHERE id = %s FOR UPDATE", (room,))

        server.signal(signal.SIGTERM)
        assert await receive_close(member) == 1001
        status, body = await probe(probes, server, "readyz")
        assert (status, body["status"], body["draining"]) == (503, "unavailable", True)
        assert (body["repository"], body["queue"]) == ("ok", "ok")
        assert await probe(probes, server, "healthz") == (status, body)
        assert await probe(probes, server, "livez") == (200, {"status": "ok"})
        async with asyncio.timeout(WAIT), probes.get(f"{server.url}/api/serve/{room}") as refused:
            assert refused.status == 503
            assert await refused.json() == {"error": "server shutting down"}
        assert server.process.returncode is None

        await cursor.execute("ROLLBACK")  # the member's `left` goes in: the drain ends
        assert await server.wait_exit(SHUTDOWN) == 0, server.output()
        await cursor.execute(
            "SELECT type::text FROM messages WHERE room_id = %s AND member_id = %s ORDER BY number",
            (room, joined["memberId"]),
        )
        assert [row[0] for row in await cursor.fetchall()] == ["joined", "left"]
    assert "Traceback" not in server.output()


def test_the_image_checks_livez_and_compose_checks_readyz() -> None:
    """Docker restarts what fails its HEALTHCHECK: a backend outage must not restart
    the server, so the image asks livez; compose marks an instance unhealthy when it
    cannot take traffic, so it asks readyz."""
    checks = [arguments for keyword, arguments in dockerfile() if keyword == "HEALTHCHECK"]
    assert len(checks) == 1
    assert "/api/livez" in checks[0]
    compose: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    test = compose["services"]["sharechat"]["healthcheck"]["test"]
    assert "/api/readyz" in json.dumps(test)
