"""Real `sharechat serve` processes, for the tests that need whole instances or signals.

Each process logs to a file (so it never blocks on a full pipe), must answer
/api/healthz before a deadline, and is always killed and reaped; its log is in
the failure message of a bad start and printed at the end (pytest shows it when
the test fails).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from sharechat.config import Config
from tests.helpers import WAIT, free_port, receive_json

VENV_BIN = Path(sys.executable).parent
STARTUP = 30.0  # seconds a fresh process may take to answer /api/healthz (migrations included)
CONFIG_VARIABLES = {"HOST", "PORT", "LOG_LEVEL", "DATABASE_URL", "REDIS_URL", "FORWARDED_ALLOW_IPS"}
# For tests in which one address (127.0.0.1) plays many clients at machine speed: the
# budgets per address and per connection are off. tests/test_budgets.py tests them.
MANY_CLIENTS_FROM_ONE_ADDRESS = {
    "SHARECHAT_IP_CONNECTION_LIMIT": "0",
    "SHARECHAT_IP_RATE_LIMIT": "0",
    "SHARECHAT_ROOM_CREATE_LIMIT": "0",
    "SHARECHAT_FRAME_BUDGET": "0",
}


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


def serve_command(port: int, *flags: str, how: str = "python-m") -> list[str]:
    """`sharechat serve` on 127.0.0.1:`port`, as `python -m` or as the console script."""
    args = ["serve", "--host", "127.0.0.1", "--port", str(port), *flags]
    if how == "console-script":
        script = VENV_BIN / "sharechat"
        assert script.is_file(), f"{script} missing: is the package installed?"
        return [str(script), *args]
    return [sys.executable, "-m", "sharechat", *args]


@dataclass
class Server:
    command: Sequence[str]
    process: asyncio.subprocess.Process
    url: str  # http://127.0.0.1:<port>
    log: Path
    # What restart() runs the command with again; _running() fills them in.
    environ: Mapping[str, str] | None = None
    workdir: Path | None = None

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    async def wait_exit(self, within: float) -> int | None:
        """The exit code, or None if the process still runs after `within` seconds."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                return await self.process.wait()
        return None

    async def restart(self, within: float = STARTUP) -> None:
        """Run the command again once its process has ended (kill it first), on the same
        port, with the same environment and directory, appending to the same log; return
        once it answers /api/healthz."""
        assert self.process.returncode is not None, "still running: kill it first"
        assert self.environ is not None, "not started by _running()"
        assert self.workdir is not None, "not started by _running()"
        with self.log.open("ab") as sink:
            sink.write(b"--- restarted ---\n")
        self.process = await _spawn(self.command, self.environ, self.workdir, self.log)
        await self.wait_healthy(time.monotonic() + within)

    async def wait_healthy(self, deadline: float) -> None:
        """Poll /api/healthz until it says ok; fail if the process exits or `deadline` passes."""
        async with aiohttp.ClientSession() as http:
            while True:
                assert self.process.returncode is None, f"exited early:\n{self.output()}"
                with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                    async with (
                        asyncio.timeout(1.0),
                        http.get(f"{self.url}/api/healthz") as response,
                    ):
                        body = await response.json()
                    if response.status == 200 and body["status"] == "ok":
                        return
                assert time.monotonic() < deadline, f"not healthy in time:\n{self.output()}"
                await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def running(
    command: Sequence[str], port: int, environ: Mapping[str, str], workdir: Path
) -> AsyncIterator[Server]:
    """Run `command` (a server on `port`) in `workdir` with exactly `environ`, until healthy."""
    async with _running([(command, port)], environ, workdir) as (server,):
        yield server


@contextlib.asynccontextmanager
async def running_servers(
    count: int, env: Mapping[str, str], *flags: str
) -> AsyncIterator[list[Server]]:
    """`count` instances of `sharechat serve *flags`, all with `env` (DATABASE_URL, ...)."""
    with tempfile.TemporaryDirectory(prefix="sharechat-serve-") as workdir:
        ports = [free_port() for _ in range(count)]
        launches = [(serve_command(port, *flags), port) for port in ports]
        async with _running(launches, clean_environ(**env), Path(workdir)) as servers:
            yield servers


@contextlib.asynccontextmanager
async def running_servers_each(
    envs: Sequence[Mapping[str, str]], *flags: str
) -> AsyncIterator[list[Server]]:
    """One instance of `sharechat serve *flags` per entry of `envs`, each with its own
    environment (say, a proxy of its own in front of Redis)."""
    with tempfile.TemporaryDirectory(prefix="sharechat-serve-") as workdir:
        ports = [free_port() for _ in envs]
        launches = [(serve_command(port, *flags), port) for port in ports]
        environs = [clean_environ(**env) for env in envs]
        async with _running(launches, environs[0], Path(workdir), environs) as servers:
            yield servers


async def _spawn(
    command: Sequence[str], environ: Mapping[str, str], workdir: Path, log: Path
) -> asyncio.subprocess.Process:
    """Start `command`, its output appended to `log` (so it never blocks on a full pipe)."""
    with log.open("ab") as sink:
        return await asyncio.create_subprocess_exec(
            *command,
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=dict(environ),
            cwd=workdir,
        )


@contextlib.asynccontextmanager
async def _running(
    launches: Sequence[tuple[Sequence[str], int]],
    environ: Mapping[str, str],
    workdir: Path,
    environs: Sequence[Mapping[str, str]] | None = None,
) -> AsyncIterator[list[Server]]:
    """Start every process at once, wait until all are healthy; always kill and reap them.

    `environs`, if given, holds one environment per launch instead of `environ` for all.
    """
    servers: list[Server] = []
    try:
        for number, (command, port) in enumerate(launches):
            log = workdir / f"server-{number}.log"
            log.write_bytes(b"")
            own = environs[number] if environs is not None else environ
            process = await _spawn(command, own, workdir, log)
            url = f"http://127.0.0.1:{port}"
            servers.append(Server(command, process, url, log, own, workdir))
        deadline = time.monotonic() + STARTUP  # they start in parallel: one deadline for all
        for server in servers:
            await server.wait_healthy(deadline)
        yield servers
    finally:
        for server in servers:
            if server.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):  # it ended just now
                    server.process.kill()
        for server in servers:
            async with asyncio.timeout(WAIT):
                await server.process.wait()
            # Shown by pytest only when the test fails.
            command = shlex.join(server.command)
            print(f"--- {command} (exit {server.process.returncode}) ---\n{server.output()}")


async def create_room(http: aiohttp.ClientSession, server: Server) -> str:
    async with asyncio.timeout(WAIT), http.post(f"{server.url}/api/room") as response:
        assert response.status == 200, await response.text()
        room_id: str = (await response.json())["roomId"]
    return room_id


async def join(
    http: aiohttp.ClientSession, server: Server, room: str
) -> tuple[aiohttp.ClientWebSocketResponse, dict[str, Any]]:
    """What websocat does: a plain websocket, no subprotocol, no Origin."""
    async with asyncio.timeout(WAIT):
        ws = await http.ws_connect(f"{server.url}/api/serve/{room}")
    joined = await receive_json(ws)
    assert joined["type"] == "joined", joined
    return ws, joined


async def get_json(http: aiohttp.ClientSession, url: str) -> Any:
    async with asyncio.timeout(WAIT), http.get(url) as response:
        assert response.status == 200, f"{url}: {response.status} {await response.text()}"
        return await response.json()
