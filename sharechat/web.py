"""HTTP and websocket handlers: the only place domain errors become HTTP answers."""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any
from uuid import UUID

from aiohttp import WSCloseCode, WSMsgType, web
from aiohttp.abc import AbstractStreamWriter

from sharechat.config import Config
from sharechat.controller import Controller
from sharechat.domain import BackendUnavailable, Member, Message, MessageNotFound, RoomNotFound
from sharechat.ports import MAX_PAGE, Page

log = logging.getLogger(__name__)

CONFIG = web.AppKey("config", Config)
CONTROLLER = web.AppKey("controller", Controller)

STATIC_DIR = Path(__file__).parent / "static"
# Frames up to this size are read and answered with `failed`; larger ones close with 1009.
FRAME_CEILING = 1 << 20
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
    app.router.add_static("/static/", STATIC_DIR)
    app.router.add_get("/api/healthz", healthz)
    app.router.add_post("/api/room", create_room)
    app.router.add_get("/api/room/{room_id}", get_room)
    app.router.add_get("/api/room/{room_id}/messages", get_messages)
    app.router.add_get("/api/serve/{room_id}", serve_room)
    app.on_response_prepare.append(_security_headers)


# -- pages -----------------------------------------------------------------------


async def index(request: web.Request) -> web.StreamResponse:
    if "text/html" in request.headers.get("Accept", ""):
        return web.FileResponse(STATIC_DIR / "index.html")
    base = f"{request.scheme}://{request.host}"
    ws = base.replace("http", "ws", 1)
    return web.Response(text=WELCOME.format(base=base, ws=ws))


async def room_page(request: web.Request) -> web.StreamResponse:
    # Always the page: it asks the API whether the room exists and says so itself.
    return web.FileResponse(STATIC_DIR / "room.html")


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    if not request.path.startswith("/api/"):
        # Revalidate (ETag) every time, so an upgrade never runs with yesterday's JS.
        response.headers.setdefault("Cache-Control", "no-cache")


# -- the API -----------------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    report = await request.app[CONTROLLER].health()
    return web.json_response(report, status=200 if report["status"] == "ok" else 503)


async def create_room(request: web.Request) -> web.Response:
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
    outage: BackendUnavailable | None = None
    try:
        await controller.check_room(room_id)  # 404 before any upgrade
    except BackendUnavailable as error:
        outage = error  # refused after the upgrade: a browser sees a close code, not a status
    ws = web.WebSocketResponse(
        heartbeat=config.ping_interval,
        max_msg_size=max(FRAME_CEILING, 4 * config.max_message_bytes),
    )
    peer = WebSocketPeer(ws, request, await ws.prepare(request))
    try:
        if outage:
            raise outage
        session = await controller.join(room_id, peer)
    except (RoomNotFound, BackendUnavailable) as error:
        log.warning("join refused in room %s: %r", room_id, error)
        await ws.close(code=WSCloseCode.INTERNAL_ERROR, message=_refusal(error))
        return ws
    try:
        async for frame in ws:
            if frame.type is WSMsgType.TEXT:
                await controller.say(session, frame.data)
            elif frame.type is WSMsgType.BINARY:
                controller.reject(session, "binary frames are not supported: send text")
    finally:
        await controller.leave(session)
    return ws


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

    def write_texts(self, texts: Sequence[bytes], /) -> bool:
        transport = self._request.transport
        if self._ws.closed or transport is None or transport.is_closing():
            raise ConnectionResetError("websocket closed")
        transport.writelines([part for text in texts for part in (_text_header(text), text)])
        # Whatever the socket did not take waits in the transport: the peer is behind.
        return not transport.get_write_buffer_size()

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
    origin = request.headers.get("Origin")
    # Browsers always send Origin on websockets; websocat and curl do not.
    if "*" in allowed or not allowed:  # the own-origin default is not enforced yet
        return
    if origin is not None and origin.rstrip("/").lower() not in allowed:
        raise web.HTTPForbidden(reason=f"origin {origin} is not allowed")


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
    except BackendUnavailable as error:
        log.warning("%s %s: backend unavailable: %s", request.method, request.path, error)
        return _error(503, "service unavailable, try again")
    except web.HTTPException as error:
        if error.status < 400:
            raise
        return _error(error.status, _http_reason(error), error.headers.get("Allow"))
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return _error(500, "internal error")


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


def _json_response(body: bytes, status: int = 200) -> web.Response:
    """UTF-8 JSON that is encoded already."""
    return web.Response(
        status=status, body=body, content_type="application/json", charset="utf-8"
    )
