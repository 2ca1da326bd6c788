"""Serving a room's websocket: the member's frames in, the room's messages out.

The web layer (web.py) checks the request and hands it over here; from the
upgrade on, each frame the client sends is read, counted against the frame
budget, decoded (plain text, or the sharechat.v1 JSON framing) and given to
the controller, and WebSocketPeer writes what the member's session sends out.
"""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from uuid import UUID

import orjson
from aiohttp import WSCloseCode, WSMsgType, web
from aiohttp.abc import AbstractStreamWriter

from sharechat.budgets import Budgets, RateLimiter
from sharechat.config import Config
from sharechat.controller import Controller
from sharechat.domain import BackendUnavailable, RoomNotFound, chat_text
from sharechat.refusals import RefusalLog
from sharechat.session import Session

log = logging.getLogger(__name__)

# A frame over this many times --max-message-bytes closes the connection with 1009,
# refused from its header before any of it is buffered; smaller ones get `failed`.
FRAME_CEILING_FACTOR = 4
CLOSE_HANDSHAKE_TIMEOUT = 2.0
# The framing a client may ask for at the upgrade (Sec-WebSocket-Protocol): each frame
# is a JSON object {"text": "<message>", "ref": "<tag>"}; without it, a frame is the text.
PROTOCOL_V1 = "sharechat.v1"
V1_KEYS = frozenset(("text", "ref"))
MAX_REF_CHARS = 64
V1_SHAPE = '{"text": "<message>", "ref": "<optional tag>"}'


@dataclass(frozen=True, slots=True)
class RoomSocket:
    """What serving a member's websocket takes: the settings, the chat, the budgets."""

    config: Config
    controller: Controller
    budgets: Budgets
    refusals: RefusalLog

    async def serve(
        self, request: web.Request, room_id: UUID, cursor: UUID | None
    ) -> web.StreamResponse:
        """Upgrade, join, read frames until the connection ends, leave.

        Refusals before the upgrade are HTTP answers (raised); after it, close codes.
        """
        config, controller = self.config, self.controller
        # Budgets before any query: a client over them costs the backends nothing.
        with self.budgets.connection(request.remote, room_id) as client_limiter:
            outage: BackendUnavailable | None = None
            resume_after: int | None = None
            try:
                await controller.check_room(room_id)  # 404 before any upgrade
                if cursor is not None:  # 400 for a cursor that is not a message of the room
                    resume_after = await controller.resume_point(room_id, cursor)
            except BackendUnavailable as error:
                outage = error  # refused after the upgrade: a browser sees a close code
            ws = web.WebSocketResponse(
                heartbeat=config.ping_interval,
                # Pings count against the frame budget, so they come to us, not to aiohttp.
                autoping=False,
                # No permessage-deflate: a small compressed frame could inflate to the size
                # limit before any budget sees it, and chat text compresses little.
                compress=False,
                max_msg_size=FRAME_CEILING_FACTOR * config.max_message_bytes + 1,
                # A client that does not answer our close frame (a flooder, a sloth) is
                # cut off after this long rather than aiohttp's 10 s.
                timeout=CLOSE_HANDSHAKE_TIMEOUT,
                protocols=(PROTOCOL_V1,),
            )
            peer = WebSocketPeer(ws, request, await ws.prepare(request))
            try:
                if outage:
                    raise outage
                session = await controller.join(room_id, peer, client_limiter, resume_after)
            except (RoomNotFound, BackendUnavailable) as error:
                log.warning("join refused in room %s: %s", room_id, error)
                await ws.close(code=WSCloseCode.INTERNAL_ERROR, message=_refusal(error))
                return ws
            try:
                await self._read_frames(ws, session)
            finally:
                await controller.leave(session)
        return ws

    async def _read_frames(self, ws: web.WebSocketResponse, session: Session) -> None:
        """Every frame the member sends, of every kind, spends one of its frame budget."""
        controller = self.controller
        frames = RateLimiter(self.config.frame_budget, self.config.frame_burst)
        v1 = ws.ws_protocol == PROTOCOL_V1
        async for frame in ws:
            if not frames.allow():
                self.refusals.refused("frames", f"member {session.member.id}")
                await ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"too many frames")
                return
            if frame.type is WSMsgType.TEXT:
                if not v1:
                    await controller.say(session, frame.data)
                elif chat_text(frame.data):  # an empty line from websocat is ignored
                    await _say_v1(controller, session, frame.data)
            elif frame.type is WSMsgType.BINARY:
                controller.reject(session, "binary frames are not supported: send text")
            elif frame.type is WSMsgType.PING:
                await ws.pong(frame.data)


async def _say_v1(controller: Controller, session: Session, data: str) -> None:
    try:
        text, ref = decode_v1(data)
    except MalformedFrame as error:
        controller.reject(session, f"malformed frame: {error.reason}", error.ref)
        return
    await controller.say(session, text, ref)


class MalformedFrame(Exception):
    def __init__(self, reason: str, ref: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.ref = ref  # when it could be read: the `failed` carries it


def decode_v1(data: str) -> tuple[str, str | None]:
    """The text and the ref of a sharechat.v1 frame; raises MalformedFrame.

    Strict, so that a client learns of its mistake rather than having it ignored:
    a JSON object with a string `text`, an optional `ref` (a string of at most
    MAX_REF_CHARS characters), and no other key. A ref that breaks its rule is
    not read, so that the server never sends back more than MAX_REF_CHARS of it.
    """
    try:
        frame = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise MalformedFrame(f"not JSON; send {V1_SHAPE}") from None
    if not isinstance(frame, dict):
        raise MalformedFrame(f"not a JSON object; send {V1_SHAPE}")
    ref = frame.get("ref")
    if "ref" in frame and (not isinstance(ref, str) or len(ref) > MAX_REF_CHARS):
        raise MalformedFrame(f"ref must be a string of at most {MAX_REF_CHARS} characters")
    unknown = next((key for key in frame if key not in V1_KEYS), None)
    if unknown is not None:
        name = json.dumps(unknown[:MAX_REF_CHARS], ensure_ascii=False)
        raise MalformedFrame(f"unknown key {name}; send {V1_SHAPE}", ref)
    if "text" not in frame:
        raise MalformedFrame(f"text is missing; send {V1_SHAPE}", ref)
    text = frame["text"]
    if not isinstance(text, str):
        raise MalformedFrame("text must be a string", ref)
    return text, ref


class WebSocketPeer:
    """A member's websocket, written many text frames per system call.

    aiohttp writes one frame per call, and a busy room then spends most of its
    time in write(2). Frames from the server are not masked, so a text frame is
    a two-to-ten byte header and the UTF-8 text: we write them to the transport
    ourselves, and leave pings, pongs and close frames to aiohttp.
    """

    def __init__(
        self, ws: web.WebSocketResponse, request: web.Request, writer: AbstractStreamWriter
    ) -> None:
        self._ws = ws
        self._request = request
        self._writer = writer

    def write_texts(self, texts: Sequence[bytes], /) -> int:
        transport = self._request.transport
        if self._ws.closed or transport is None or transport.is_closing():
            raise ConnectionResetError("websocket closed")
        transport.writelines([part for text in texts for part in (_text_header(text), text)])
        # Whatever the socket did not take waits in the transport: the peer is behind.
        return transport.get_write_buffer_size()

    async def drain(self) -> None:
        if self._ws.closed:
            raise ConnectionResetError("websocket closed")
        await self._writer.drain()  # waits only while the transport is over its high-water mark

    async def close(self, *, code: int, message: bytes) -> None:
        await self._ws.close(code=code, message=message, drain=False)


def _text_header(text: bytes) -> bytes:
    """FIN + text opcode, then the payload length (RFC 6455, section 5.2)."""
    length = len(text)
    if length < 126:
        return bytes((0x81, length))
    if length < 1 << 16:
        return struct.pack("!BBH", 0x81, 126, length)
    return struct.pack("!BBQ", 0x81, 127, length)


def _refusal(error: Exception) -> bytes:
    if isinstance(error, RoomNotFound):
        return b"room no longer exists"
    return b"service unavailable, try again"
