"""aiohttp's HTTP server with the open internet's budgets: header and keep-alive timeouts.

aiohttp closes an idle keep-alive connection, but sets no deadline for a request's
headers: a client could open thousands of connections and send each a byte now and
then. Here the headers must arrive within `header_timeout` seconds of the
connection opening or, on a kept-alive connection, of the next request's first
byte (between requests the keep-alive timeout applies); a connection that misses
the deadline is closed. Once a whole request head is in, the clock is off: a
websocket or a long answer is never cut by it.

aiohttp's own error answers (a malformed request line or header, headers over the
size limits) are JSON like every other error, and a client's malformed request is
a rate-limited refusal line in the log, never a traceback.
"""

from __future__ import annotations

import asyncio
import logging
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import (
    BadStatusLine,
    HttpProcessingError,
    InvalidHeader,
    InvalidURLError,
    LineTooLong,
)
from aiohttp.web_protocol import RequestHandler

from sharechat.refusals import RefusalLog
from sharechat.web import REFUSALS, error_response

log = logging.getLogger(__name__)


class HttpRunner(web.AppRunner):
    """web.AppRunner whose connections have a header deadline and our keep-alive timeout."""

    def __init__(
        self,
        app: web.Application,
        *,
        header_timeout: float,
        keepalive_timeout: float,
        **kwargs: Any,
    ) -> None:
        super().__init__(app, keepalive_timeout=keepalive_timeout, **kwargs)
        self._header_timeout = header_timeout

    async def _make_server(self) -> web.Server:
        made = await super()._make_server()  # starts the app, as AppRunner does
        return _Server(
            made.request_handler,
            request_factory=made.request_factory,
            handler_cancellation=made.handler_cancellation,
            header_timeout=self._header_timeout,
            # The app's: these refusals are logged and counted with every other.
            refusals=self.app.get(REFUSALS) or RefusalLog(),
            **made._kwargs,  # what AppRunner hands every RequestHandler
        )


class _Server(web.Server):
    """aiohttp's Server, making our kind of connection."""

    def __init__(
        self, *args: Any, header_timeout: float, refusals: RefusalLog, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self._header_timeout = header_timeout
        self._refusals = refusals

    def __call__(self) -> RequestHandler:
        return _Connection(
            self,
            loop=self._loop,
            header_timeout=self._header_timeout,
            refusals=self._refusals,
            **self._kwargs,
        )


class _Connection(RequestHandler):
    """One client connection: a timer handle for the headers, JSON error answers."""

    __slots__ = ("_header_timeout", "_header_timer", "_in_request", "_refusals")

    def __init__(
        self,
        manager: web.Server,
        *,
        header_timeout: float,
        refusals: RefusalLog,
        **kwargs: Any,
    ) -> None:
        super().__init__(manager, **kwargs)
        self._header_timeout = header_timeout
        self._header_timer: asyncio.TimerHandle | None = None
        # From a request head parsed to its answer written (a websocket: to its end).
        self._in_request = False
        self._refusals = refusals

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._start_header_clock()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._messages:  # a whole request head (or a malformed one) is in: on time
            self._in_request = True
            self._stop_header_clock()
        elif data and not self._in_request and self._header_timer is None:
            self._start_header_clock()  # the first bytes of a request on a kept-alive connection

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        answered = await super().finish_response(request, resp, start_time)
        self._in_request = bool(self._messages)  # pipelined requests are in already
        return answered

    def connection_lost(self, exc: BaseException | None) -> None:
        self._stop_header_clock()
        super().connection_lost(exc)

    def _start_header_clock(self) -> None:
        self._header_timer = self._loop.call_later(self._header_timeout, self._headers_late)

    def _stop_header_clock(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if not self._in_request:
            self._refusals.refused(
                "slow-headers",
                f"no request headers within {self._header_timeout:g} s from {self._peer()!r}",
            )
            self.force_close()

    def _peer(self) -> str:
        peer = self.peername
        return str(peer[0] if isinstance(peer, tuple) else peer)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's answer to a request it could not parse, or to a handler that raised
        past the app's json_errors middleware: JSON, closing the connection."""
        if isinstance(exc, ConnectionError) and self._client_left():
            # A client that reset mid-request: no bug, and nobody to answer.
            raise ConnectionError("the client left") from exc
        if isinstance(exc, HttpProcessingError):
            text = _what_was_wrong(exc)
            self._refusals.refused("bad-request", f"{text} from {self._peer()!r}")
        else:
            text = HTTPStatus(status).phrase.lower()
            log.error("%r %r failed", request.method, request.path, exc_info=exc)
        if request.writer.output_size > 0:
            raise ConnectionError("an answer was sent already: the connection is broken")
        response = error_response(status, text)
        response.force_close()
        return response

    def _client_left(self) -> bool:
        return self.transport is None or self.transport.is_closing()


def _what_was_wrong(error: HttpProcessingError) -> str:
    """A fixed text per kind of parse error: aiohttp's own quote the client's bytes."""
    if isinstance(error, LineTooLong):
        return "request line or header too long"
    if isinstance(error, InvalidURLError):
        return "malformed request target"
    if isinstance(error, BadStatusLine):  # BadHttpMethod too
        return "malformed request line"
    if isinstance(error, InvalidHeader):
        return "malformed header"
    return "malformed request"
