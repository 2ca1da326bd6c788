"""Real `sharechat serve` processes for the tests that need whole instances."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import aiohttp

from tests.helpers import free_port

START_WAIT = 30.0


class ServerProcess:
    def __init__(self, args: list[str], env: Mapping[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._args = [sys.executable, "-m", "sharechat", "serve", "--host", "127.0.0.1"]
        self._args += ["--port", str(self.port), *args]
        self._env = {**os.environ, **env}
        self._log = tempfile.TemporaryFile(mode="w+")  # a file, so the child never blocks
        self.process: subprocess.Popen[str] | None = None

    async def start(self, session: aiohttp.ClientSession) -> None:
        self.process = subprocess.Popen(
            self._args, env=self._env, stdout=self._log, stderr=subprocess.STDOUT, text=True
        )
        try:
            async with asyncio.timeout(START_WAIT):
                while not await self._healthy(session):
                    assert self.process.poll() is None, f"server exited:\n{self.log()}"
                    await asyncio.sleep(0.05)
        except TimeoutError:
            raise AssertionError(f"server did not become healthy:\n{self.log()}") from None

    async def _healthy(self, session: aiohttp.ClientSession) -> bool:
        try:
            async with session.get(f"{self.url}/api/healthz") as response:
                return response.status == 200
        except aiohttp.ClientError:
            return False

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    async def wait(self, within: float) -> int:
        assert self.process is not None
        return await asyncio.to_thread(self.process.wait, within)

    def log(self) -> str:
        self._log.seek(0)
        return self._log.read()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
        self._log.close()


@asynccontextmanager
async def running_servers(
    count: int, env: Mapping[str, str], *args: str
) -> AsyncIterator[list[ServerProcess]]:
    """`count` instances sharing `env` (DATABASE_URL, REDIS_URL, ...); killed at the end."""
    servers = [ServerProcess(list(args), env) for _ in range(count)]
    try:
        async with aiohttp.ClientSession() as session:
            await asyncio.gather(*(server.start(session) for server in servers))
        yield servers
    finally:
        for server in servers:
            server.stop()


async def get_json(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url) as response:
        assert response.status == 200, f"{url}: {response.status} {await response.text()}"
        return await response.json()
