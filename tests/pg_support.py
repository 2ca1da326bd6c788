"""PostgreSQL for tests: a fresh database per test, and a whole server to stop and start.

`SHARECHAT_TEST_DATABASE_URL` names the server's admin database (default: the
machine's PostgreSQL); `temporary_database()` creates a uniquely named database
there, migrated, and drops it afterwards. `throwaway_cluster()` runs a server of
its own (initdb + pg_ctl on a free port) for tests that take PostgreSQL away.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from pathlib import Path
from urllib.parse import urlsplit
from uuid import uuid4

import aiopg
from psycopg2 import sql

from sharechat.migrations import migrate
from tests.helpers import free_port

DEFAULT_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/test"
TIMEOUT = 30.0


def admin_dsn() -> str:
    return os.environ.get("SHARECHAT_TEST_DATABASE_URL", DEFAULT_ADMIN_DSN)


def database_dsn(server_dsn: str, database: str) -> str:
    """The same server and credentials, another database."""
    return urlsplit(server_dsn)._replace(path=f"/{database}").geturl()


@asynccontextmanager
async def temporary_database(
    server_dsn: str | None = None, *, migrated: bool = True
) -> AsyncIterator[str]:
    """Yield the DSN of a new, uniquely named database; drop it (WITH FORCE) afterwards."""
    server_dsn = server_dsn or admin_dsn()
    name = f"sharechat_test_{uuid4().hex}"
    await _admin(server_dsn, sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        dsn = database_dsn(server_dsn, name)
        if migrated:
            async with asyncio.timeout(TIMEOUT):
                await migrate(dsn)
        yield dsn
    finally:
        await _admin(
            server_dsn,
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)),
        )


async def _admin(server_dsn: str, statement: sql.Composable) -> None:
    async with (
        asyncio.timeout(TIMEOUT),
        aiopg.connect(server_dsn, enable_hstore=False) as connection,
        connection.cursor() as cursor,
    ):
        await cursor.execute(statement)


class ThrowawayCluster:
    """A PostgreSQL server in a temporary directory, run as the `postgres` user when root."""

    def __init__(self, directory: Path, port: int) -> None:
        self.directory = directory
        self.port = port
        self.data = directory / "data"

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    async def init(self) -> None:
        await _run(
            "initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust",
            "--no-locale", "-E", "UTF8", "--no-sync",
        )  # fmt: skip

    async def start(self) -> None:
        options = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off"
        log = self.directory / "server.log"
        await _run("pg_ctl", "-D", str(self.data), "-l", str(log), "-o", options, "-w", "start")

    async def stop(self, mode: str = "fast") -> None:
        await _run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def is_running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    @contextmanager
    def frozen(self) -> Iterator[None]:
        """SIGSTOP the server and its backends, like a machine that fell off the network."""
        processes = self._processes()
        for pid in processes:
            os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            for pid in processes:
                os.kill(pid, signal.SIGCONT)

    def _processes(self) -> list[int]:
        postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        children = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with suppress(OSError):  # a process that ended while we looked
                # The command name can hold spaces and parentheses: split after the last ')'.
                parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
                if parent == postmaster:
                    children.append(int(stat.parent.name))
        return [postmaster, *children]


@asynccontextmanager
async def throwaway_cluster() -> AsyncIterator[ThrowawayCluster]:
    """A running server of its own on a free port; stopped and deleted afterwards."""
    directory = Path(tempfile.mkdtemp(prefix="sharechat-pg-"))
    try:
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            shutil.chown(directory, "postgres", "postgres")
        cluster = ThrowawayCluster(directory, free_port())
        await cluster.init()
        await cluster.start()
        try:
            yield cluster
        finally:
            if cluster.is_running():
                await cluster.stop("immediate")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _binary(name: str) -> str:
    """PostgreSQL's server tools are rarely on PATH: look where Debian puts them too."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    if not candidates:
        raise FileNotFoundError(f"{name} not found on PATH nor in /usr/lib/postgresql/*/bin")
    return str(candidates[-1])


async def _run(tool: str, *args: str) -> None:
    argv = [_binary(tool), *args]
    if os.geteuid() == 0:
        argv = ["runuser", "-u", "postgres", "--", *argv]
    async with asyncio.timeout(TIMEOUT * 2):
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(
            f"{tool} failed ({process.returncode}): {output.decode(errors='replace')}"
        )
