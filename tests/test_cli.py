"""The real server as a process: started as users and platforms start it, stopped by signal."""

from __future__ import annotations

import asyncio
import os
import re
import signal
from pathlib import Path

import aiohttp
import pytest

from sharechat.config import Config
from tests.helpers import MESSAGE_KEYS, WAIT, free_port, receive_close, receive_json
from tests.pg_support import temporary_database
from tests.servers import (
    VENV_BIN,
    backend_environ,
    clean_environ,
    create_room,
    get_json,
    join,
    running,
    serve_command,
)

ROOT = Path(__file__).resolve().parent.parent
SHUTDOWN = 10.0  # the contract: exits within 10 s of SIGTERM


@pytest.mark.parametrize("how", ["console-script", "python-m"])
async def test_real_server_chats(how: str, backend_config: Config, tmp_path: Path) -> None:
    port = free_port()
    environ = clean_environ(**backend_environ(backend_config))
    async with (
        running(serve_command(port, how=how), port, environ, tmp_path) as server,
        aiohttp.ClientSession() as http,
    ):
        room = await create_room(http, server)
        alice, alice_joined = await join(http, server, room)
        bob, bob_joined = await join(http, server, room)
        assert await receive_json(alice) == bob_joined

        await alice.send_str("hello from websocat")
        echo = await receive_json(alice)
        assert echo == await receive_json(bob)
        assert set(echo) == MESSAGE_KEYS
        assert (echo["type"], echo["message"]) == ("chat", "hello from websocat")
        assert echo["memberId"] == alice_joined["memberId"]

        await bob.send_str("hi alice\n")  # websocat sends the line as typed
        reply = await receive_json(bob)
        assert reply == await receive_json(alice)
        assert reply["memberId"] == bob_joined["memberId"]
        assert reply["message"].strip() == "hi alice"

        history = await get_json(http, f"{server.url}/api/room/{room}/messages")
        assert history[-2:] == [echo, reply]

        await alice.close()
        await bob.close()


async def test_sigterm_closes_members_with_1001_and_exits_0(
    backend_config: Config, tmp_path: Path
) -> None:
    port = free_port()
    environ = clean_environ(**backend_environ(backend_config))
    async with (
        running(serve_command(port, how="console-script"), port, environ, tmp_path) as server,
        aiohttp.ClientSession() as http,
    ):
        room = await create_room(http, server)
        alice, _ = await join(http, server, room)
        bob, _ = await join(http, server, room)
        await receive_json(alice)  # bob's joined

        server.signal(signal.SIGTERM)
        codes = await asyncio.gather(receive_close(alice, SHUTDOWN), receive_close(bob, SHUTDOWN))
        assert codes == [1001, 1001], server.output()
        assert await server.wait_exit(SHUTDOWN) == 0, server.output()
        assert "Traceback" not in server.output()


async def test_bare_sharechat_serves(backend_config: Config, tmp_path: Path) -> None:
    """`sharechat` with no subcommand is `sharechat serve`: the laptop case of the contract."""
    port = free_port()
    environ = clean_environ(PORT=str(port), HOST="127.0.0.1", **backend_environ(backend_config))
    command = [str(VENV_BIN / "sharechat")]
    async with running(command, port, environ, tmp_path) as server, aiohttp.ClientSession() as http:
        room = await create_room(http, server)
        ws, joined = await join(http, server, room)
        assert joined["roomId"] == room
        await ws.close()
        assert f"serving on http://127.0.0.1:{port}" in server.output()


async def test_procfile_runs_on_the_platforms_port(backend_config: Config, tmp_path: Path) -> None:
    procfile = (ROOT / "Procfile").read_text()
    processes = dict(line.split(":", 1) for line in procfile.splitlines() if line.strip())
    assert set(processes) == {"release", "web"}
    port = free_port()
    # The platform: a shell, PATH with the installed scripts, PORT set, no flags of ours.
    environ = clean_environ(
        PORT=str(port),
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        **backend_environ(backend_config),
    )
    command = ["/bin/sh", "-c", f"exec {processes['web'].strip()}"]
    async with running(command, port, environ, tmp_path) as server, aiohttp.ClientSession() as http:
        room = await create_room(http, server)
        ws, joined = await join(http, server, room)
        assert joined["roomId"] == room
        await ws.close()
        server.signal(signal.SIGTERM)
        assert await server.wait_exit(SHUTDOWN) == 0, server.output()


@pytest.mark.services
async def test_release_phase_migrates_and_web_need_not(tmp_path: Path) -> None:
    """The Procfile's release command migrates a new database; a web process with
    SHARECHAT_NO_MIGRATE=1 then serves on it without touching the schema."""
    procfile = (ROOT / "Procfile").read_text()
    processes = dict(line.split(":", 1) for line in procfile.splitlines() if line.strip())
    path = f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    async with temporary_database(migrated=False) as database_url:
        release = await asyncio.create_subprocess_exec(
            "/bin/sh", "-c", f"exec {processes['release']}",
            env=clean_environ(PATH=path, DATABASE_URL=database_url),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        async with asyncio.timeout(WAIT * 3):
            output, _ = await release.communicate()
        assert release.returncode == 0, output.decode()
        assert re.search(rb"applied [1-9][0-9]* migration", output), output.decode()

        port = free_port()
        environ = clean_environ(
            PORT=str(port), PATH=path, DATABASE_URL=database_url, SHARECHAT_NO_MIGRATE="1"
        )
        command = ["/bin/sh", "-c", f"exec {processes['web']}"]
        async with (
            running(command, port, environ, tmp_path) as server,
            aiohttp.ClientSession() as http,
        ):
            room = await create_room(http, server)
            ws, _ = await join(http, server, room)
            await ws.close()
            assert "migration" not in server.output()
            assert "schema" not in server.output()
