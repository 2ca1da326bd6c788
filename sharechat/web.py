"""HTTP and websocket handlers: the only place domain errors become HTTP answers."""

from __future__ import annotations

import functools
import json
import logging
import math
import struct
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any
from uuid import UUID

import orjson
from aiohttp import WSCloseCode, WSMsgType, web
from aiohttp.abc import AbstractStreamWriter

from sharechat.budgets import BudgetExceeded, Budgets, RateLimiter
from sharechat.config import Config
from sharechat.controller import Controller
from sharechat.domain import (
    BackendUnavailable,
    Member,
    Message,
    MessageNotFound,
    RoomNotFound,
    chat_text,
)
from sharechat.ports import MAX_PAGE, Page
from sharechat.refusals import RefusalLog
from sharechat.session import Session

log = logging.getLogger(__name__)

CONFIG = web.AppKey("config", Config)
CONTROLLER = web.AppKey("controller", Controller)
BUDGETS = web.AppKey("budgets", Budgets)
REFUSALS = web.AppKey("refusals", RefusalLog)

STATIC_DIR = Path(__file__).parent / "static"
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
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
WELCOME = """sharechat: anonymous chat rooms.

  curl -X POST {base}/api/room                      create a room
  websocat {ws}/api/serve/<roomId>                  chat in it: type a line, press enter
  {base}/r/<roomId>                                 or open the room in a browser
"""


def setup_routes(app: web.Application) -> None:
    app.router.add_get("/", index)
    app.router.add_get("/r/{room_id}", room_page)
    app.router.add_get("/static/{name}", static_file)
    app.router.add_get("/api/healthz", healthz)
    app.router.add_post("/api/room", create_room)
    app.router.add_get("/api/room/{room_id}", get_room)
    app.router.add_get("/api/room/{room_id}/messages", get_messages)
    app.router.add_get("/api/serve/{room_id}", serve_room)
    app.on_response_prepare.append(_security_headers)


# -- pages -----------------------------------------------------------------------


async def index(request: web.Request) -> web.StreamResponse:
    """The landing page, or for curl the server's URLs as the client reaches them
    (behind a trusted TLS proxy: https:// and wss:// on the public host)."""
    if "text/html" in request.headers.get("Accept", ""):
        return web.FileResponse(STATIC_DIR / "index.html")
    base = f"{request.scheme}://{request.host}"
    ws = base.replace("http", "ws", 1)
    return web.Response(text=WELCOME.format(base=base, ws=ws))


async def room_page(request: web.Request) -> web.StreamResponse:
    # Always the page: it asks the API whether the room exists and says so itself.
    return web.FileResponse(STATIC_DIR / "room.html")


async def static_file(request: web.Request) -> web.StreamResponse:
    """A file of the web client; anything else is a JSON 404. (aiohttp's static route
    answers a missing file itself, past the middleware, with an empty 404.)"""
    path = _static_files().get(request.match_info["name"])
    if path is None:
        raise web.HTTPNotFound()
    return web.FileResponse(path)


@functools.cache
def _static_files() -> dict[str, Path]:
    return {path.name: path for path in STATIC_DIR.iterdir() if path.is_file()}


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    _add_security_headers(response, api=request.path.startswith("/api/"))


def _add_security_headers(response: web.StreamResponse, *, api: bool) -> None:
    response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    if not api:
        # Revalidate (ETag) every time, so an upgrade never runs with yesterday's JS.
        response.headers.setdefault("Cache-Control", "no-cache")


# -- the API -----------------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    report = await request.app[CONTROLLER].health()
    return web.json_response(report, status=200 if report["status"] == "ok" else 503)


async def create_room(request: web.Request) -> web.Response:
    request.app[BUDGETS].create_room(request.remote)
    room = await request.app[CONTROLLER].create_room()
    return web.json_response({"roomId": str(room.id), "roomName": room.name})


async def get_room(request: web.Request) -> web.Response:
    room, members = await request.app[CONTROLLER].room_members(_room_id(request))
    body = {"roomId": str(room.id), "roomName": room.name, "members": _members(members)}
    return web.json_response(body)


async def get_messages(request: web.Request) -> web.Response:
    room_id = _room_id(request)
    page = _page(request.query)
    messages = await request.app[CONTROLLER].history(room_id, page)
    return _json_response(_message_array(messages))


def _members(members: list[Member]) -> list[dict[str, str]]:
    return [member.to_dict() for member in members]


def _message_array(messages: list[Message]) -> bytes:
    # The same bytes per message as the websocket frames carry.
    return b"[" + b",".join(message.to_json() for message in messages) + b"]"


def _room_id(request: web.Request) -> UUID:
    try:
        return UUID(request.match_info["room_id"])
    except ValueError:
        raise RoomNotFound(request.match_info["room_id"]) from None


def _page(query: Any) -> Page:
    before, after = _cursor(query, "before"), _cursor(query, "after")
    if before and after:
        raise web.HTTPBadRequest(reason="use either before or after, not both")
    return Page(before=before, after=after, limit=_limit(query))


def _cursor(query: Any, name: str) -> UUID | None:
    value = query.get(name)
    if value is None:
        return None
    try:
        return UUID(value)
    except ValueError:
        raise web.HTTPBadRequest(reason=f"{name} must be a message id") from None


def _limit(query: Any) -> int:
    value = query.get("limit")
    if value is None:
        return MAX_PAGE
    if not value.isascii() or not value.isdigit() or not 1 <= int(value) <= MAX_PAGE:
        raise web.HTTPBadRequest(reason=f"limit must be a whole number from 1 to {MAX_PAGE}")
    return int(value)


# -- the websocket -------------------------------------------------------------------


async def serve_room(request: web.Request) -> web.StreamResponse:
    config, controller = request.app[CONFIG], request.app[CONTROLLER]
    room_id = _room_id(request)
    _check_origin(request, config.allowed_origins)
    cursor = _cursor(request.query, "after")  # 400 before any upgrade
    # Budgets before any query: a client over them costs the backends nothing.
    with request.app[BUDGETS].connection(request.remote, room_id) as client_limiter:
        outage: BackendUnavailable | None = None
        resume_after: int | None = None
        try:
            await controller.check_room(room_id)  # 404 before any upgrade
            if cursor is not None:  # 400 for a cursor that is not a message of the room
                resume_after = await controller.resume_point(room_id, cursor)
        except BackendUnavailable as error:
            outage = error  # refused after the upgrade: a browser sees a close code, not a status
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
            await _read_frames(ws, session, request.app)
        finally:
            await controller.leave(session)
    return ws


async def _read_frames(ws: web.WebSocketResponse, session: Session, app: web.Application) -> None:
    """Every frame the member sends, of every kind, spends one of its frame budget."""
    config, controller = app[CONFIG], app[CONTROLLER]
    frames = RateLimiter(config.frame_budget, config.frame_burst)
    v1 = ws.ws_protocol == PROTOCOL_V1
    async for frame in ws:
        if not frames.allow():
            app[REFUSALS].refused("frames", f"member {session.member.id}")
            await ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"too many frames")
            return
        if frame.type is WSMsgType.TEXT:
            if not v1:
                await controller.say(session, frame.data)
            elif chat_text(frame.data):  # an empty line from websocat is ignored, as in plain
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


def _check_origin(request: web.Request, allowed: tuple[str, ...]) -> None:
    """Only pages of allowed origins may open sockets from their visitors' browsers.

    By default that is the server's own origin as this request names it (behind a
    trusted proxy, the public one). Browsers always send Origin on websockets;
    websocat and curl do not, and are not browsers a website could borrow.
    """
    origin = request.headers.get("Origin")
    if origin is None or "*" in allowed:
        return
    if allowed:
        ok = _origin(origin) in {_origin(item) for item in allowed}
    else:
        ok = _origin(origin) == _origin(f"{request.scheme}://{request.host}")
    if not ok:
        request.app[REFUSALS].refused("origin", f"websocket from origin {origin[:200]!r}")
        raise web.HTTPForbidden(reason="this origin may not open websockets here")


def _origin(text: str) -> str:
    """`scheme://host[:port]` as compared: lowercased, no trailing slash, no default port."""
    origin = text.strip().rstrip("/").lower()
    for scheme, port in (("http://", ":80"), ("https://", ":443")):
        if origin.startswith(scheme) and origin.endswith(port):
            return origin.removesuffix(port)
    return origin


def _refusal(error: Exception) -> bytes:
    if isinstance(error, RoomNotFound):
        return b"room no longer exists"
    return b"service unavailable, try again"


# -- errors ---------------------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error is JSON `{"error": ...}`: never a stack trace, never HTML."""
    try:
        return await handler(request)
    except RoomNotFound:
        return _error(404, "room not found")
    except MessageNotFound:
        return _error(400, "cursor is not a message of this room")
    except BudgetExceeded as error:
        response = _error(429 if error.per_client else 503, error.reason)
        response.headers["Retry-After"] = str(max(1, math.ceil(error.retry_after)))
        return response
    except BackendUnavailable as error:
        # %r: a path can hold encoded line breaks, which must not forge log lines.
        log.warning("%r %r: backend unavailable: %s", request.method, request.path, error)
        return _error(503, "service unavailable, try again")
    except web.HTTPException as error:
        if error.status < 400:
            raise
        return _error(error.status, _http_reason(error), error.headers.get("Allow"))
    except Exception as error:
        if isinstance(error, ConnectionError) and _client_left(request):
            raise  # no bug and nobody to answer: the server drops the connection quietly
        log.exception("%r %r failed", request.method, request.path)
        return _error(500, "internal error")


def _client_left(request: web.Request) -> bool:
    """The client reset the connection (mid-request, or while we answered its pings)."""
    transport = request.transport
    return transport is None or transport.is_closing()


def _http_reason(error: web.HTTPException) -> str:
    if isinstance(error, web.HTTPMethodNotAllowed):
        return f"method {error.method} not allowed"
    if error.status == 404:
        return "not found"
    return error.reason


def _error(status: int, text: str, allow: str | None = None) -> web.Response:
    response = _json_response(json.dumps({"error": text}).encode(), status)
    if allow:
        response.headers["Allow"] = allow
    return response


def error_response(status: int, text: str) -> web.Response:
    """A JSON error for an answer made outside the app, by aiohttp itself (a request it
    could not parse): with the security headers, which on_response_prepare adds only
    to requests that reached the router."""
    response = _error(status, text)
    _add_security_headers(response, api=True)
    return response


def _json_response(body: bytes, status: int = 200) -> web.Response:
    """UTF-8 JSON that is encoded already."""
    return web.Response(
        status=status, body=body, content_type="application/json", charset="utf-8"
    )
