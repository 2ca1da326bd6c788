"""Starts the servers under test as subprocesses: sharechat on each backend, the bare
reference, or the original Go server; one instance or several on one database and Redis."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

import psycopg2
from psycopg2 import errors, sql

ADMIN_DSN = os.environ.get("BENCH_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
ROOT = Path(__file__).resolve().parent.parent
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
ORIGINAL_DIR = Path(
    os.environ.get("BENCH_ORIGINAL_DIR", ROOT.parent / "shared" / "peers" / "original-go")
)
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0


class Program(StrEnum):
    SHARECHAT = "sharechat"
    BARE = "bare"  # bench/bare_server.py: what aiohttp itself costs
    ORIGINAL = "original"  # the Go server sharechat's design started from


@dataclass(frozen=True)
class Backend:
    name: str
    program: Program = Program.SHARECHAT
    database: bool = False
    redis: bool = False

    @property
    def reference(self) -> bool:
        """A row to compare sharechat with, not one of sharechat's own."""
        return self.program is not Program.SHARECHAT


BACKENDS = {
    b.name: b
    for b in (
        Backend("original", Program.ORIGINAL, database=True, redis=True),
        Backend("memory"),
        Backend("postgres", database=True),
        Backend("postgres+redis", database=True, redis=True),
        Backend("bare", Program.BARE),
    )
}


@dataclass(frozen=True)
class Setup:
    """How every server of a run is started, whatever its backend."""

    instances: int = 1  # servers on one database and one Redis, for backends with Redis
    redis_url: str = REDIS_URL  # sharechat's REDIS_URL
    server_env: dict[str, str] = field(default_factory=dict)  # more settings for sharechat
    original_dir: Path = ORIGINAL_DIR

    @property
    def cluster(self) -> bool:
        """sharechat's Redis is a Redis Cluster (a redis+cluster:// URL)."""
        return urlsplit(self.redis_url).scheme.endswith("+cluster")


def original_binary(setup: Setup) -> Path | None:
    """The original's executable, if it is there."""
    binary = setup.original_dir / "sharechat"
    return binary if binary.is_file() and os.access(binary, os.X_OK) else None


@dataclass(frozen=True)
class Servers:
    """The instances of one cell, all serving the same rooms."""

    processes: tuple[subprocess.Popen[bytes], ...]
    base_urls: tuple[str, ...]
    # sharechat's stores, whose spending the run measures (the original's are not):
    database_url: str | None = None
    redis_url: str | None = None

    @property
    def pids(self) -> tuple[int, ...]:
        return tuple(p.pid for p in self.processes)

    @property
    def crashed(self) -> bool:
        return any(p.poll() is not None for p in self.processes)


@contextmanager
def running(backend: Backend, setup: Setup, log: IO[bytes]) -> Iterator[Servers]:
    """Fresh servers (on a fresh database), stopped with SIGTERM on the way out.

    Instances start one after the other, so that the first applies the migrations alone.
    """
    instances = setup.instances if backend.redis else 1
    with ExitStack() as stack:
        env = stack.enter_context(backend_environment(backend, setup, log))
        processes: list[subprocess.Popen[bytes]] = []

        @stack.callback
        def stop_all() -> None:
            for proc in processes:
                stop(proc)

        urls = []
        for _ in range(instances):
            port = free_port()
            cwd = setup.original_dir if backend.program is Program.ORIGINAL else ROOT
            proc = subprocess.Popen(
                command(backend, setup, port),
                env={**env, "PORT": str(port)},
                cwd=cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            processes.append(proc)
            urls.append(f"http://127.0.0.1:{port}")
            wait_ready(proc, urls[-1])
        yield Servers(tuple(processes), tuple(urls), env.get("DATABASE_URL"), env.get("REDIS_URL"))


def command(backend: Backend, setup: Setup, port: int) -> list[str]:
    where = ["--host", "127.0.0.1", "--port", str(port)]
    if backend.program is Program.BARE:
        return [sys.executable, "-m", "bench.bare_server", *where]
    if backend.program is Program.ORIGINAL:  # listens on 127.0.0.1:$PORT
        return [str(setup.original_dir / "sharechat"), "--allowed-origin", "*"]
    script = Path(sys.executable).with_name("sharechat")
    return [str(script), "serve", *where, *UNLIMITED]


# One load generator on 127.0.0.1 plays thousands of clients at machine speed: the
# budgets per member, per address and per connection would measure themselves.
# The original has none of these flags.
UNLIMITED = (
    "--rate-limit",
    "0",
    "--ip-rate-limit",
    "0",
    "--ip-connection-limit",
    "0",
    "--room-create-limit",
    "0",
    "--frame-budget",
    "0",
)


@contextmanager
def backend_environment(backend: Backend, setup: Setup, log: IO[bytes]) -> Iterator[dict[str, str]]:
    """The environment of the cell's servers, with the database and Redis it gets to itself."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DATABASE_URL", "REDIS_URL") and not k.startswith("SHARECHAT_")
    }
    if backend.program is Program.ORIGINAL:
        with original_database() as name, own_redis(log) as redis_host:
            yield {**env, **original_environment(name, redis_host)}
        return
    with fresh_database(backend.database) as database_url:
        if database_url:
            env["DATABASE_URL"] = database_url
        if backend.redis:
            env["REDIS_URL"] = setup.redis_url
            env["SHARECHAT_REDIS_PREFIX"] = f"bench-{secrets.token_hex(4)}:"
        if backend.program is Program.SHARECHAT:
            env.update(setup.server_env)
        yield env


# The original's fixed credentials (its README): a role "user" with password "password".
ORIGINAL_ROLE, ORIGINAL_PASSWORD = "user", "password"


def original_environment(database: str, redis_host: str) -> dict[str, str]:
    admin_url = urlsplit(ADMIN_DSN)
    return {
        "POSTGRES_USER": ORIGINAL_ROLE,
        "POSTGRES_PASS": ORIGINAL_PASSWORD,
        "POSTGRES_HOST": admin_url.hostname or "127.0.0.1",
        "POSTGRES_PORT": str(admin_url.port or 5432),
        "POSTGRES_NAME": database,
        "REDIS_HOST": redis_host,
    }


@contextmanager
def original_database() -> Iterator[str]:
    """A new database owned by the original's role (made if missing), dropped afterwards."""
    create_role = sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
        sql.Identifier(ORIGINAL_ROLE), sql.Literal(ORIGINAL_PASSWORD)
    )
    with suppress(errors.DuplicateObject):
        admin(create_role)
    with fresh_database(True, owner=ORIGINAL_ROLE) as url:
        assert url is not None
        yield url.rsplit("/", 1)[1]


@contextmanager
def own_redis(log: IO[bytes]) -> Iterator[str]:
    """A throwaway redis-server on a free port: the original names its channels by room id
    alone, with no prefix, so it gets a Redis that no other run can share."""
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--bind", "127.0.0.1", "--port", str(port),
         "--save", "", "--appendonly", "no"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_redis(proc, port)
        yield f"127.0.0.1:{port}"
    finally:
        stop(proc)


def wait_redis(proc: subprocess.Popen[bytes], port: int) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"redis-server not answering within {READY_TIMEOUT:.0f} s")


@contextmanager
def fresh_database(wanted: bool, owner: str | None = None) -> Iterator[str | None]:
    """A new database `sharechat_bench_<random>`, dropped afterwards."""
    if not wanted:
        yield None
        return
    name = f"sharechat_bench_{secrets.token_hex(4)}"
    create = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
    if owner:
        create += sql.SQL(" OWNER {}").format(sql.Identifier(owner))
    admin(create)
    try:
        yield ADMIN_DSN.rsplit("/", 1)[0] + "/" + name
    finally:
        admin(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def admin(statement: sql.Composable) -> None:
    conn = psycopg2.connect(ADMIN_DSN)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(statement)
    finally:
        conn.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_ready(proc: subprocess.Popen[bytes], base_url: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before ready")
        try:
            with urllib.request.urlopen(f"{base_url}/api/healthz", timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"server not healthy within {READY_TIMEOUT:.0f} s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
