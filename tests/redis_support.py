"""Redis for tests: the shared server, unique channel prefixes, throwaway servers to kill,
and a proxy that silences pub/sub connections without closing them.

A plain module (not a conftest) so that any test can import what it needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from uuid import uuid4

from tests.helpers import free_port
from tests.processes import ServerProcess

# The shared server; other test runs use it at the same time, hence unique_prefix().
REDIS_URL = os.environ.get("SHARECHAT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def unique_prefix(tag: str = "test") -> str:
    """A channel prefix no other test (or test run) shares."""
    return f"sharechat-{tag}-{uuid4().hex}:"


class RedisServer(ServerProcess):
    """A throwaway redis-server: kill() it to fake an outage, start() it again on the same port.

    With `tls`, it only speaks TLS, with a self-signed certificate that `url` trusts.
    """

    def __init__(
        self,
        directory: Path,
        port: int | None = None,
        password: str | None = None,
        tls: bool = False,
    ) -> None:
        super().__init__()
        self.directory = directory
        self.port = port or free_port()
        self.password = password
        self.tls = tls

    @property
    def url(self) -> str:
        if self.tls:
            return f"{self.hosted_url}?ssl_ca_certs={self.certificate}"
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def hosted_url(self) -> str:
        """The URL a hosted Redis hands out: rediss://, and nothing about the certificate."""
        auth = f":{self.password}@" if self.password else ""
        return f"rediss://{auth}127.0.0.1:{self.port}/0"

    @property
    def certificate(self) -> Path:
        """The self-signed certificate of a TLS server (its own CA)."""
        return self.directory / "cert.pem"

    @property
    def _key(self) -> Path:
        return self.directory / "key.pem"

    def start(self, timeout: float = 10.0) -> None:
        """Start the server and return once it answers PING."""
        self.directory.mkdir(parents=True, exist_ok=True)
        command = ["redis-server", "--bind", "127.0.0.1", "--dir", str(self.directory)]
        command += ["--save", "", "--appendonly", "no"]
        if self.password:
            command += ["--requirepass", self.password]
        if self.tls:
            self._make_certificate()
            command += ["--port", "0", "--tls-port", str(self.port), "--tls-auth-clients", "no"]
            command += ["--tls-cert-file", str(self.certificate), "--tls-key-file", str(self._key)]
        else:
            command += ["--port", str(self.port)]
        self.launch(command, self._answers_ping, timeout)

    def did_not_start(self) -> str:
        return f"redis-server did not start on port {self.port}"

    def freeze(self) -> None:
        """SIGSTOP: connections stay open but nothing answers, as with a hung server."""
        self.signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self.signal(signal.SIGCONT)

    def _answers_ping(self) -> bool:
        try:
            with contextlib.ExitStack() as stack:
                conn = stack.enter_context(socket.create_connection(("127.0.0.1", self.port), 1))
                if self.tls:
                    context = ssl.create_default_context(cafile=self.certificate)
                    tls = context.wrap_socket(conn, server_hostname="127.0.0.1")
                    conn = stack.enter_context(tls)
                # Without the password the server still answers, with -NOAUTH: it is up.
                conn.sendall(b"PING\r\n")
                return conn.recv(64).startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False

    def _make_certificate(self) -> None:
        if self.certificate.exists():
            return  # a restart keeps the certificate clients already trust
        command = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
        command += ["-keyout", str(self._key), "-out", str(self.certificate)]
        command += ["-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1"]
        subprocess.run(command, check=True, capture_output=True)


@contextlib.contextmanager
def redis_server(
    directory: Path, password: str | None = None, tls: bool = False
) -> Iterator[RedisServer]:
    """A started throwaway server, killed on exit (its data dir is `directory`)."""
    server = RedisServer(directory, password=password, tls=tls)
    server.start()
    try:
        yield server
    finally:
        server.kill()


@dataclass(eq=False)
class _Pipe:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    pumps: list[asyncio.Task[None]] = field(default_factory=list)
    subscriber: bool = False


class StallingProxy:
    """A TCP proxy to a Redis server that can make pub/sub connections go silent.

    stall_subscribers() stops forwarding, both ways, on every connection that has sent
    SUBSCRIBE, but leaves its sockets open: the client sees neither data nor an error,
    as with a half-open connection or a proxy that lost its subscriptions. Connections
    opened later are forwarded normally.
    """

    def __init__(self, upstream_port: int) -> None:
        self._upstream_port = upstream_port
        self._pipes: list[_Pipe] = []
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def stall_subscribers(self) -> int:
        """Silence every pub/sub connection open now; return how many there were."""
        stalled = [pipe for pipe in self._pipes if pipe.subscriber and pipe.pumps]
        for pipe in stalled:
            for pump in pipe.pumps:
                pump.cancel()
            pipe.pumps.clear()
        return len(stalled)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for pipe in self._pipes:
            for pump in pipe.pumps:
                pump.cancel()
            await asyncio.gather(*pipe.pumps, return_exceptions=True)
            for writer in (pipe.client, pipe.upstream):
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._upstream_port)
        except OSError:
            writer.close()
            return
        pipe = _Pipe(client=writer, upstream=up_writer)
        pipe.pumps = [
            asyncio.create_task(self._pump(reader, up_writer, pipe)),
            asyncio.create_task(self._pump(up_reader, writer, None)),
        ]
        self._pipes.append(pipe)

    @staticmethod
    async def _pump(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, sender: _Pipe | None
    ) -> None:
        try:
            while data := await reader.read(65536):
                if sender is not None and b"SUBSCRIBE" in data:
                    sender.subscriber = True
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        # Not in a finally: a stalled pump is cancelled and must leave the socket open.
        writer.close()
