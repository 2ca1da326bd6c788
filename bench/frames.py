"""Websocket frames by hand (RFC 6455, section 5): the churning clients speak them,
and so does the test suite's raw client, for what a well-behaved library will not send."""

from __future__ import annotations

import asyncio
import base64
import os
import struct

TEXT, CLOSE = 0x1, 0x8


def upgrade_request(netloc: str, path: str) -> bytes:
    """The HTTP request that opens a websocket (section 4.1), with a fresh key."""
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {path} HTTP/1.1\r\nHost: {netloc}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n\r\n"
    ).encode()


async def read_upgrade(reader: asyncio.StreamReader) -> None:
    """Read the server's answer to the upgrade; raises ValueError unless it is 101."""
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101 "):
        raise ValueError(head.split(b"\r\n", 1)[0].decode(errors="replace"))


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """The opcode and payload of one frame from a server (never masked, section 5.1)."""
    first, second = await reader.readexactly(2)
    if second & 0x80:
        raise ValueError("a server frame is masked")
    length = second & 0x7F
    if length == 126:
        (length,) = struct.unpack("!H", await reader.readexactly(2))
    elif length == 127:
        (length,) = struct.unpack("!Q", await reader.readexactly(8))
    return first & 0x0F, await reader.readexactly(length)


def masked(opcode: int, payload: bytes) -> bytes:
    """A final client frame, masked as every client frame must be."""
    mask = os.urandom(4)
    body = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
    elif length < 1 << 16:
        header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length)
    return header + mask + body
