"""A bare-bones websocket client for what a well-behaved library will not send."""

from __future__ import annotations

import asyncio
import contextlib
import struct

from bench.frames import CLOSE, masked, read_frame, read_upgrade, upgrade_request
from tests.helpers import WAIT


class RawWebSocket:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, host: str, port: int, path: str) -> RawWebSocket:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(upgrade_request(f"{host}:{port}", path))
        async with asyncio.timeout(WAIT):
            await read_upgrade(reader)
        return cls(reader, writer)

    def send_frame(self, opcode: int, payload: bytes) -> None:
        self.writer.write(masked(opcode, payload))

    async def read_frame(self) -> tuple[int, bytes]:
        async with asyncio.timeout(WAIT):
            return await read_frame(self.reader)

    async def read_close_code(self) -> int:
        """Skip data frames until the close frame; return its code."""
        while True:
            opcode, payload = await self.read_frame()
            if opcode == CLOSE:
                code: int = struct.unpack("!H", payload[:2])[0]
                return code

    def abort(self) -> None:
        """Vanish without a close frame, like a lost network."""
        transport = self.writer.transport
        transport.abort()  # type: ignore[attr-defined]

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()
