"""The real server as a process: started as users and platforms start it, stopped by signal."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sharechat.config import Config
from tests.helpers import MESSAGE_KEYS, WAIT, free_port, receive_close, receive_json

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
STARTUP = 30.0  # seconds a fresh process may take to answer /api/healthz (migrations included)
SHUTDOWN = 10.0  # the contract: exits within 10 s of SIGTERM
CONFIG_VARIABLES = {"HOST", "PORT", "LOG_LEVEL", "DATABASE_URL", "REDIS_URL"}


def clean_environ(**extra: str) -> dict[str, str]:
    """This process's environment without any sharechat setting, plus `extra`."""
    environ = {
        name: value
        for name, value in os.environ.items()
        if name not in CONFIG_VARIABLES and not name.startswith("SHARECHAT_")
    }
    environ.update(extra)
    return environ


def backend_environ(config: Config) -> dict[str, str]:
    """The test's backends, handed over the way a platform hands them over."""
    environ = {}
    if config.database_url:
        environ["DATABASE_URL"] = config.database_url
    if config.redis_url:
        environ["REDIS_URL"] = config.redis_url
        environ["SHARECHAT_REDIS_PREFIX"] = config.redis_prefix
    return environ


@dataclass
class Server:
    process: asyncio.subprocess.Process
    base: str  # http://127.0.0.1:<port>
    log: Path

    @property
    def ws_base(self) -> str:
        return self.base.replace("http://", "ws://", 1)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.asynccontextmanager
async def running(
    command: Sequence[str], port: int, environ: dict[str, str], workdir: Path
) -> AsyncIterator[Server]:
    """Start the process, wait until it is healthy; always kill and reap it."""
    log = workdir / "server.log"
    with log.open("wb") as sink:
        process = await asyncio.create_subprocess_exec(
            *command,
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=environ,
            cwd=workdir,
        )
    server = Server(process, f"http://127.0.0.1:{port}", log)
    try:
        await wait_healthy(server)
        yield server
    finally:
        if process.returncode is None:
            process.kill()
        async with asyncio.timeout(WAIT):
            await process.wait()
        # Shown by pytest only when the test fails.
        print(f"--- {shlex.join(command)} (exit {process.returncode}) ---\n{server.output()}")


async def wait_healthy(server: Server) -> None:
    deadline = time.monotonic() + STARTUP
    async with aiohttp.ClientSession() as http:
        while True:
            assert server.process.returncode is None, f"exited early:\n{server.output()}"
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                async with asyncio.timeout(1.0):
                    response = await http.get(f"{server.base}/api/healthz")
                    body = await response.json()
                if response.status == 200 and body["status"] == "ok":
                    return
            assert time.monotonic() < deadline, f"not healthy in time:\n{server.output()}"
            await asyncio.sleep(0.1)


async def wait_exit(process: asyncio.subprocess.Process, wait: float) -> int | None:
    """The exit code, or None if the process still runs after `wait` seconds."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(wait):
            return await process.wait()
    return None


async def create_room(http: aiohttp.ClientSession, server: Server) -> str:
    async with asyncio.timeout(WAIT):
        response = await http.post(f"{server.base}/api/room")
        assert response.status == 200, await response.text()
        room_id: str = (await response.json())["roomId"]
    return room_id


async def join(
    http: aiohttp.ClientSession, server: Server, room: str
) -> tuple[aiohttp.ClientWebSocketResponse, dict[str, Any]]:
    """What websocat does: a plain websocket, no subprotocol, no Origin."""
    async with asyncio.timeout(WAIT):
        ws = await http.ws_connect(f"{server.ws_base}/api/serve/{room}")
    joined = await receive_json(ws)
    assert joined["type"] == "joined", joined
    return ws, joined


def serve_command(how: str, port: int) -> list[str]:
    flags = ["serve", "--host", "127.0.0.1", "--port", str(port)]
    if how == "console-script":
        script = VENV_BIN / "sharechat"
        assert script.is_file(), f"{script} missing: is the package installed?"
        return [str(script), *flags]
    return [sys.executable, "-m", "sharechat", *flags]


@pytest.mark.parametrize("how", ["console-script", "python-m"])
async def test_real_server_chats(how: str, backend_config: Config, tmp_path: Path) -> None:
    port = free_port()
    environ = clean_environ(**backend_environ(backend_config))
    async with (
        running(serve_command(how, port), port, environ, tmp_path) as server,
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

        async with asyncio.timeout(WAIT):
            response = await http.get(f"{server.base}/api/room/{room}/messages")
            history = json.loads(await response.read())
        assert history[-2:] == [echo, reply]

        await alice.close()
        await bob.close()


async def test_sigterm_closes_members_with_1001_and_exits_0(
    backend_config: Config, tmp_path: Path
) -> None:
    port = free_port()
    environ = clean_environ(**backend_environ(backend_config))
    async with (
        running(serve_command("console-script", port), port, environ, tmp_path) as server,
        aiohttp.ClientSession() as http,
    ):
        room = await create_room(http, server)
        alice, _ = await join(http, server, room)
        bob, _ = await join(http, server, room)
        await receive_json(alice)  # bob's joined

        server.process.send_signal(signal.SIGTERM)
        codes = await asyncio.gather(receive_close(alice, SHUTDOWN), receive_close(bob, SHUTDOWN))
        assert codes == [1001, 1001], server.output()
        assert await wait_exit(server.process, SHUTDOWN) == 0, server.output()
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
    assert set(processes) == {"web"}
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
        server.process.send_signal(signal.SIGTERM)
        assert await wait_exit(server.process, SHUTDOWN) == 0, server.output()
