"""Logging set-up: plain text for a terminal, or one JSON object a line for a log pipeline.

JSON lines carry `time` (ISO 8601, UTC), `level`, `logger` and `message`, the
instance's id as `instance` when one is serving, and whatever a record was given
as `extra` (the access log's `method`, `path`, `status`, ...), so that operators
filter on fields rather than parse messages. A traceback stays inside its line,
as `exc_info`.
"""

from __future__ import annotations

import logging
import sys
from uuid import UUID

from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, StreamResponse
from pythonjsonlogger.orjson import OrjsonFormatter

from sharechat.proxies import CLIENT

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
ACCESS_LOGGER = "sharechat.access"


def configure(level: str, log_format: str, instance: UUID | None = None) -> None:
    """Send every record to stderr, in `log_format` (text or json)."""
    handler = logging.StreamHandler(sys.stderr)
    text = logging.Formatter(TEXT_FORMAT)
    handler.setFormatter(_json(instance) if log_format == "json" else text)
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)  # a library's warning is a line in the same format


def _json(instance: UUID | None) -> logging.Formatter:
    return OrjsonFormatter(
        "%(levelname)s %(name)s %(message)s",
        rename_fields={"levelname": "level", "name": "logger"},
        timestamp="time",
        static_fields={"instance": str(instance)} if instance else None,
    )


class AccessLog(AbstractAccessLogger):
    """One line a request (a websocket: when it closes), with its parts as fields."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        # Behind a trusted proxy, the client it names (proxies.forwarded_headers).
        remote = request.get(CLIENT, request.remote)
        self.logger.info(
            "%s %s %r %d %.3fs",
            remote,
            request.method,
            request.path_qs,
            response.status,
            time,
            extra={
                "remote": remote,
                "method": request.method,
                "path": request.path_qs,
                "status": response.status,
                "duration": round(time, 6),
            },
        )
