"""The HTTP side: routes, pages, the API's views and probes, and JSON errors.

Views only translate: they read the request, call the controller, and turn its
answers and domain errors into HTTP (json_errors is the only place errors
become answers). A websocket request is checked here, then served by
websocket.py.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from uuid import UUID

from aiohttp import web

from sharechat.budgets import BudgetExceeded, Budgets
from sharechat.config import Config
from sharechat.controller import Controller
from sharechat.domain import (
    BackendUnavailable,
    Member,
    Message,
    MessageNotFound,
    RoomNotFound,
)
from sharechat.health import Health
from sharechat.ports import MAX_PAGE, Page
from sharechat.refusals import RefusalLog
from sharechat.websocket import RoomSocket

log = logging.getLogger(__name__)

CONFIG = web.AppKey("config", Config)
CONTROLLER = web.AppKey("controller", Controller)
BUDGETS = web.AppKey("budgets", Budgets)
REFUSALS = web.AppKey("refusals", RefusalLog)
HEALTH = web.AppKey("health", Health)

STATIC_DIR = Path(__file__).parent / "static"
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
    app.router.add_get("/api/livez", livez)
    app.router.add_get("/api/readyz", readyz)
    app.router.add_get("/api/healthz", readyz)  # for what polls it already
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
    if response.status == 101:
        # A websocket handshake renders nothing, and its headers live as long as the
        # connection: thousands of copies of the policy for no reader.
        return
    _add_security_headers(response, api=request.path.startswith("/api/"))


def _add_security_headers(response: web.StreamResponse, *, api: bool) -> None:
    response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    if not api:
        # Revalidate (ETag) every time, so an upgrade never runs with yesterday's JS.
        response.headers.setdefault("Cache-Control", "no-cache")


# -- the API -----------------------------------------------------------------------


async def livez(request: web.Request) -> web.Response:
    """The process answers: no backend is asked, so an outage never restarts it."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Send traffic here: the backends answer and the instance is not draining."""
    ready, report = await request.app[HEALTH].readiness()
    return web.json_response(report, status=200 if ready else 503)


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


async def serve_room(request: web.Request) -> web.StreamResponse:
    """A room's websocket, served by websocket.py once the request passed its checks:
    404, 403 (origin), 400 (cursor), then budgets (429/503), all before any upgrade."""
    app = request.app
    if app[HEALTH].draining:
        raise web.HTTPServiceUnavailable(reason="server shutting down")
    room_id = _room_id(request)
    _check_origin(request, app[CONFIG].allowed_origins)
    cursor = _cursor(request.query, "after")
    socket = RoomSocket(app[CONFIG], app[CONTROLLER], app[BUDGETS], app[REFUSALS])
    return await socket.serve(request, room_id, cursor)


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
