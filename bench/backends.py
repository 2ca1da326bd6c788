"""Starts the server under test as a subprocess: sharechat on each backend, or the bare one."""

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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import psycopg2
from psycopg2 import sql

ADMIN_DSN = os.environ.get("BENCH_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
ROOT = Path(__file__).resolve().parent.parent
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0


@dataclass(frozen=True)
class Backend:
    name: str
    database: bool = False
    redis: bool = False
    bare: bool = False


BACKENDS = {
    b.name: b
    for b in (
        Backend("memory"),
        Backend("postgres", database=True),
        Backend("postgres+redis", database=True, redis=True),
        Backend("bare", bare=True),
    )
}


@dataclass(frozen=True)
class Server:
    process: subprocess.Popen[bytes]
    base_url: str

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def crashed(self) -> bool:
        return self.process.poll() is not None


@contextmanager
def running(backend: Backend, log: IO[bytes]) -> Iterator[Server]:
    """A freshly started server (on a fresh database), stopped with SIGTERM on the way out."""
    with fresh_database(backend.database) as database_url:
        port = free_port()
        proc = subprocess.Popen(
            command(backend, port),
            env=environment(backend, database_url),
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            server = Server(proc, f"http://127.0.0.1:{port}")
            wait_ready(server)
            yield server
        finally:
            stop(proc)


def command(backend: Backend, port: int) -> list[str]:
    where = ["--host", "127.0.0.1", "--port", str(port)]
    if backend.bare:
        return [sys.executable, "-m", "bench.bare_server", *where]
    script = Path(sys.executable).with_name("sharechat")
    return [str(script), "serve", *where, *UNLIMITED]


# One load generator on 127.0.0.1 plays thousands of clients at machine speed: the
# budgets per member, per address and per connection would measure themselves.
UNLIMITED = (
    "--rate-limit", "0",
    "--ip-rate-limit", "0",
    "--ip-connection-limit", "0",
    "--room-create-limit", "0",
    "--frame-budget", "0",
)


def environment(backend: Backend, database_url: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    if database_url:
        env["DATABASE_URL"] = database_url
    if backend.redis:
        env["REDIS_URL"] = REDIS_URL
        env["SHARECHAT_REDIS_PREFIX"] = f"bench-{secrets.token_hex(4)}:"
    return env


@contextmanager
def fresh_database(wanted: bool) -> Iterator[str | None]:
    """A new database `sharechat_bench_<random>`, dropped afterwards."""
    if not wanted:
        yield None
        return
    name = f"sharechat_bench_{secrets.token_hex(4)}"
    admin(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield ADMIN_DSN.rsplit("/", 1)[0] + "/" + name
    finally:
        admin(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def admin(statement: sql.Composed) -> None:
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


def wait_ready(server: Server) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if server.crashed:
            raise RuntimeError(f"server exited with {server.process.returncode} before ready")
        try:
            with urllib.request.urlopen(f"{server.base_url}/api/healthz", timeout=1) as resp:
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
