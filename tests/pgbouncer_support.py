"""A throwaway PgBouncer in transaction mode in front of the tests' PostgreSQL.

Hosted PostgreSQL often sits behind PgBouncer with `pool_mode = transaction`:
each transaction may run on another server connection, so nothing may live in
a session (prepared statements, session advisory locks, SET, LISTEN). The
server here makes that happen at once: few server connections, handed from
client to client.

`pgbouncer_url(dsn)` is the same database through the bouncer: its `*` entry
passes any database name on to the server behind it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import psycopg2

from tests.helpers import free_port
from tests.pg_support import admin_dsn
from tests.processes import ServerProcess

STARTUP = 10.0  # seconds the bouncer may take to answer


class PgBouncer(ServerProcess):
    def __init__(self, directory: Path, server_dsn: str) -> None:
        super().__init__()
        self.directory = directory
        self.port = free_port()
        self._server = urlsplit(server_dsn)

    def url(self, dsn: str) -> str:
        """`dsn`'s database and user, through the bouncer."""
        parts = urlsplit(dsn)
        return parts._replace(netloc=f"{parts.username}@127.0.0.1:{self.port}").geturl()

    def start(self) -> None:
        ini = self.directory / "pgbouncer.ini"
        users = self.directory / "userlist.txt"
        users.write_text(f'"{self._server.username}" ""\n')
        ini.write_text(
            "[databases]\n"
            f"* = host={self._server.hostname} port={self._server.port or 5432}\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir =\n"
            f"auth_type = trust\nauth_file = {users}\n"
            "pool_mode = transaction\n"
            # Fewer server connections than a repository's pool: transactions of
            # different clients share them, as under load in production.
            "default_pool_size = 4\nmax_client_conn = 500\n"
            f"logfile = {self.directory / 'pgbouncer.log'}\n"
        )
        # Debian puts it in /usr/sbin, which a user's PATH may lack.
        command = [shutil.which("pgbouncer") or "/usr/sbin/pgbouncer", str(ini)]
        if os.geteuid() == 0:  # PgBouncer refuses to run as root; -u drops to that user
            shutil.chown(self.directory, "postgres", "postgres")
            command[1:1] = ["-u", "postgres"]
        self.launch(command, self._answers, STARTUP)

    def did_not_start(self) -> str:
        return f"pgbouncer did not start:\n{self.log()}"

    def log(self) -> str:
        path = self.directory / "pgbouncer.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _answers(self) -> bool:
        try:
            psycopg2.connect(self.url(admin_dsn()), connect_timeout=1).close()
        except psycopg2.OperationalError:
            return False
        return True


@contextlib.contextmanager
def pgbouncer() -> Iterator[PgBouncer]:
    """A started PgBouncer in transaction mode in front of admin_dsn()'s server."""
    directory = Path(tempfile.mkdtemp(prefix="sharechat-pgbouncer-"))
    bouncer = PgBouncer(directory, admin_dsn())
    try:
        bouncer.start()
        yield bouncer
    finally:
        bouncer.kill()
        shutil.rmtree(directory, ignore_errors=True)
