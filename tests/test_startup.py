"""Start-up with a backend down: retried with one line an attempt, then ready or exit 1."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest

from tests.helpers import WAIT, eventually, free_port
from tests.pg_support import temporary_database
from tests.redis_support import RedisServer, unique_prefix
from tests.servers import (
    STARTUP,
    Server,
    clean_environ,
    create_room,
    join,
    running,
    serve_command,
)
from tests.test_outages import GatedProxy

pytestmark = pytest.mark.services  # real PostgreSQL/Redis: see conftest --backends

DOWN_FOR = 3.0  # seconds a backend stays unreachable after the server starts


@contextlib.asynccontextmanager
async def unmigrated_database_behind_a_closed_port() -> AsyncIterator[tuple[str, GatedProxy]]:
    """A new database, reachable only through a proxy whose port nobody listens on yet."""
    async with temporary_database(migrated=False) as dsn:
        address = urlsplit(dsn)
        proxy = GatedProxy(address.port or 5432)
        proxy.port = free_port()  # chosen now, listened on when the test says
        netloc = address.netloc.replace(f"{address.hostname}:{address.port}", "")
        try:
            yield address._replace(netloc=f"{netloc}127.0.0.1:{proxy.port}").geturl(), proxy
        finally:
            await proxy.close()


async def after_failed_attempts(log: Path, what: str, since: float) -> None:
    """Return once the server has logged two failed attempts to reach `what` and
    DOWN_FOR seconds have passed since `since`."""
    async with asyncio.timeout(DOWN_FOR + 30):
        while f"{what} not reachable (attempt 2)" not in _text(log):
            await asyncio.sleep(0.05)
    await asyncio.sleep(max(0.0, since + DOWN_FOR - time.monotonic()))


async def _serve_without_postgres(
    tmp_path: Path, log: Path, nobody: int, *flags: str
) -> asyncio.subprocess.Process:
    """`sharechat serve` with DATABASE_URL on a port nothing listens on; output to `log`."""
    with log.open("wb") as sink:
        return await asyncio.create_subprocess_exec(
            *serve_command(free_port(), *flags),
            stdout=sink,
            stderr=asyncio.subprocess.STDOUT,
            env=clean_environ(DATABASE_URL=f"postgresql://postgres@127.0.0.1:{nobody}/x"),
            cwd=tmp_path,
        )


def _text(log: Path) -> str:
    return log.read_text(errors="replace") if log.exists() else ""


def attempt_lines(output: str, what: str) -> list[str]:
    return [line for line in output.splitlines() if f"{what} not reachable (attempt" in line]


@contextlib.asynccontextmanager
async def started_later(start: asyncio.Future[None] | asyncio.Task[None]) -> AsyncIterator[None]:
    try:
        yield
    finally:
        start.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await start


async def test_postgres_unreachable_at_start_then_ready(tmp_path: Path) -> None:
    port = free_port()
    async with unmigrated_database_behind_a_closed_port() as (database_url, proxy):
        started = time.monotonic()

        async def open_when_tried() -> None:
            await after_failed_attempts(tmp_path / "server-0.log", "PostgreSQL", started)
            await proxy.start()

        environ = clean_environ(DATABASE_URL=database_url)
        async with (
            started_later(asyncio.create_task(open_when_tried())),
            running(serve_command(port), port, environ, tmp_path) as server,
            aiohttp.ClientSession() as http,
        ):
            assert time.monotonic() - started >= DOWN_FOR
            output = server.output()
            assert len(attempt_lines(output, "PostgreSQL")) >= 2
            assert "Traceback" not in output
            room = await create_room(http, server)  # migrated meanwhile: the schema is there
            ws, _ = await join(http, server, room)
            await ws.close()


async def test_redis_unreachable_at_start_is_survived(tmp_path: Path, database_url: str) -> None:
    """Redis is not waited for: the instance starts and says 503 until its queue connects,
    then becomes ready by itself."""
    port = free_port()
    redis = RedisServer(tmp_path / "redis")
    environ = clean_environ(
        DATABASE_URL=database_url,
        REDIS_URL=redis.url,
        SHARECHAT_REDIS_PREFIX=unique_prefix("startup"),
    )
    log = tmp_path / "server.log"
    with log.open("wb") as sink:
        process = await asyncio.create_subprocess_exec(
            *serve_command(port), env=environ, cwd=tmp_path,
            stdout=sink, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
    server = Server(serve_command(port), process, f"http://127.0.0.1:{port}", log)
    try:
        async with aiohttp.ClientSession() as http:

            async def unready() -> bool:
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"{server.url}/api/healthz") as response:
                        return response.status == 503
                return False

            await eventually(unready, wait=STARTUP)
            await asyncio.to_thread(redis.start)
            await server.wait_healthy(time.monotonic() + STARTUP)
            room = await create_room(http, server)
            alice, _ = await join(http, server, room)
            await alice.close()
    finally:
        redis.kill()
        if process.returncode is None:
            process.kill()
        await process.wait()


async def test_gives_up_after_the_startup_timeout_with_one_line(tmp_path: Path) -> None:
    """Nothing ever listens: exit 1 once --startup-timeout has passed, the reason in one
    line (and one line an attempt before it), no traceback."""
    nobody = free_port()
    log = tmp_path / "server.log"
    process = await _serve_without_postgres(
        tmp_path, log, nobody, "--startup-timeout", "1.5", "--log-format", "json"
    )
    try:
        async with asyncio.timeout(WAIT * 3):
            assert await process.wait() == 1
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    *attempts, last = lines
    assert attempts
    assert all("PostgreSQL not reachable (attempt" in line["message"] for line in attempts), lines
    assert last["level"] == "ERROR"
    assert last["message"].startswith("cannot start: PostgreSQL unreachable for 1.5 s")
    assert f"127.0.0.1:{nobody}" in last["message"]
    assert "Connection refused" in last["message"]


async def test_migrate_waits_and_gives_up_the_same_way(tmp_path: Path) -> None:
    nobody = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sharechat", "migrate", "--startup-timeout", "1",
        env=clean_environ(DATABASE_URL=f"postgresql://postgres@127.0.0.1:{nobody}/x"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=tmp_path,
    )  # fmt: skip
    async with asyncio.timeout(WAIT * 3):
        output, _ = await process.communicate()
    lines = output.decode().splitlines()
    assert process.returncode == 1, output
    assert len(attempt_lines(output.decode(), "PostgreSQL")) == len(lines) - 1 >= 1
    assert "cannot migrate: PostgreSQL unreachable for 1 s" in lines[-1]


async def test_sigterm_while_waiting_for_a_backend_exits_at_once(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    process = await _serve_without_postgres(tmp_path, log, free_port())
    try:
        async with asyncio.timeout(WAIT * 3):
            while "not reachable (attempt 1)" not in _text(log):
                await asyncio.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(WAIT):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert "Traceback" not in _text(log)
    assert "SIGTERM: shutting down" in _text(log)
