"""Every setting of `sharechat serve`: its field of Config, flag, environment variable,
help text, and the parser that checks its value (raising ValueError with the reason).

config.py reads them, flags over environment over defaults, into a Config.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError("must be at least 1")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError("must be between 0 and 65535")
    return value


def _positive_seconds(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise ValueError("must be a positive number of seconds")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError("must be a whole number, 0 or more")
    return value


def _rate(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise ValueError("must be a number, 0 or more")
    return value


def _log_level(text: str) -> str:
    level = text.upper()
    if level not in logging.getLevelNamesMapping():
        raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
    return level


def _log_format(text: str) -> str:
    value = text.lower()
    if value not in ("text", "json"):
        raise ValueError("must be text or json")
    return value


def _switch(text: str) -> bool:
    """A flag given alone is on; a value says which (the environment's 1/0, true/false)."""
    value = text.lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("must be on or off (1/0, true/false)")


def _origins(text: str) -> tuple[str, ...]:
    """Origins compare case-insensitively, without a trailing slash; `*` means any."""
    origins = tuple(o.strip().rstrip("/").lower() for o in text.split(",") if o.strip())
    return ("*",) if "*" in origins else origins


def _networks(text: str) -> tuple[str, ...]:
    """Addresses or CIDRs, comma-separated, each normalised (`10.0.0.0/8`); `*` means any."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if "*" in items:
        return ("*",)
    networks = []
    for item in items:
        try:
            networks.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError:
            raise ValueError(f"{item!r} is not an address or a CIDR") from None
    return tuple(networks)


def _url(*schemes: str) -> Callable[[str], str | None]:
    def parse(text: str) -> str | None:
        if not text:
            return None
        parts = urlsplit(text)
        if parts.scheme not in schemes or not parts.hostname:
            raise ValueError(f"must be a {' or '.join(s + '://' for s in schemes)} URL")
        return text

    return parse


def _boolean(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be on or off (true/false, yes/no, 1/0)")


def _text(text: str) -> str:
    return text


def _readable_file(text: str) -> str:
    if not os.access(text, os.R_OK) or not os.path.isfile(text):
        raise ValueError("no such readable file")
    return text


def _cert_reqs(text: str) -> str:
    """redis-py's and Heroku's `ssl_cert_reqs` values."""
    value = text.lower()
    if value not in ("none", "optional", "required"):
        raise ValueError("must be one of none, optional, required")
    return value


@dataclass(frozen=True)
class Setting:
    field: str
    flag: str
    env: str
    parse: Callable[[str], Any]
    help: str
    preferred_env: str | None = None  # read before `env` when set and not empty


SETTINGS = (
    Setting("host", "--host", "HOST", _text, "address to listen on"),
    Setting("port", "--port", "PORT", _port, "port to listen on"),
    Setting(
        "allowed_origins", "--allowed-origin", "SHARECHAT_ALLOWED_ORIGINS", _origins,
        "origin allowed to open a websocket (repeatable; default: the server's own; *: any)",
    ),
    Setting(
        "room_idle_ttl", "--room-idle-ttl", "SHARECHAT_ROOM_IDLE_TTL", _positive_seconds,
        "seconds a room may stay empty before it is deleted",
    ),
    Setting(
        "max_message_bytes", "--max-message-bytes", "SHARECHAT_MAX_MESSAGE_BYTES",
        _positive_int, "largest chat message, in UTF-8 bytes",
    ),
    Setting(
        "ping_interval", "--ping-interval", "SHARECHAT_PING_INTERVAL", _positive_seconds,
        "seconds between websocket pings",
    ),
    Setting(
        "rate_limit", "--rate-limit", "SHARECHAT_RATE_LIMIT", _rate,
        "chat messages a second per member, sustained (0 = no limit)",
    ),
    Setting(
        "rate_burst", "--rate-burst", "SHARECHAT_RATE_BURST", _positive_int,
        "chat messages a member may send at once",
    ),
    Setting(
        "send_queue", "--send-queue", "SHARECHAT_SEND_QUEUE", _positive_int,
        "frames queued for one member before it is disconnected as too slow",
    ),
    Setting(
        "send_buffer_bytes", "--send-buffer-bytes", "SHARECHAT_SEND_BUFFER_BYTES",
        _positive_int, "bytes queued for one member before it is disconnected as too slow",
    ),
    Setting(
        "forwarded_allow_ips", "--forwarded-allow-ips", "FORWARDED_ALLOW_IPS", _networks,
        "proxies (addresses or CIDRs, comma-separated; * = any) trusted for X-Forwarded-*",
    ),
    Setting(
        "ip_connection_limit", "--ip-connection-limit", "SHARECHAT_IP_CONNECTION_LIMIT", _count,
        "websockets open at once per client address (0 = no limit)",
    ),
    Setting(
        "max_connections", "--max-connections", "SHARECHAT_MAX_CONNECTIONS", _count,
        "websockets per instance, at most what the file descriptor limit allows (0 = that)",
    ),
    Setting(
        "room_member_limit", "--room-member-limit", "SHARECHAT_ROOM_MEMBER_LIMIT", _count,
        "members of one room on this instance (0 = no limit)",
    ),
    Setting(
        "ip_rate_limit", "--ip-rate-limit", "SHARECHAT_IP_RATE_LIMIT", _rate,
        "chat messages and joins a second per client address, sustained (0 = no limit)",
    ),
    Setting(
        "room_create_limit", "--room-create-limit", "SHARECHAT_ROOM_CREATE_LIMIT", _rate,
        "rooms created a second per client address, sustained (0 = no limit)",
    ),
    Setting(
        "room_create_burst", "--room-create-burst", "SHARECHAT_ROOM_CREATE_BURST",
        _positive_int, "rooms a client address may create at once",
    ),
    Setting(
        "frame_budget", "--frame-budget", "SHARECHAT_FRAME_BUDGET", _rate,
        "websocket frames a second per connection, every kind, sustained (0 = no limit)",
    ),
    Setting(
        "frame_burst", "--frame-burst", "SHARECHAT_FRAME_BURST", _positive_int,
        "websocket frames a connection may send at once",
    ),
    Setting(
        "room_max_messages", "--room-max-messages", "SHARECHAT_ROOM_MAX_MESSAGES", _count,
        "messages kept per room, the oldest dropped first (0 = no limit)",
    ),
    Setting(
        "header_timeout", "--header-timeout", "SHARECHAT_HEADER_TIMEOUT", _positive_seconds,
        "seconds a client has to send a request's headers",
    ),
    Setting(
        "keepalive_timeout", "--keepalive-timeout", "SHARECHAT_KEEPALIVE_TIMEOUT",
        _positive_seconds, "seconds an idle keep-alive connection stays open",
    ),
    Setting("log_level", "--log-level", "LOG_LEVEL", _log_level, "logging level"),
    Setting(
        "database_url", "--database-url", "DATABASE_URL", _url("postgresql", "postgres"),
        "PostgreSQL URL (default: in-memory repository)",
    ),
    Setting(
        "redis_url", "--redis-url", "REDIS_URL",
        _url("redis", "rediss", "redis+cluster", "rediss+cluster"),
        "Redis URL, redis+cluster://one-node:port for a Redis Cluster "
        "(default: in-process queue; needs a database)", "REDIS_TLS_URL",
    ),
    Setting(
        "redis_prefix", "--redis-prefix", "SHARECHAT_REDIS_PREFIX", _text,
        "prefix of the Redis channels",
    ),
    Setting(
        "redis_ssl_ca_certs", "--redis-ssl-ca-certs", "REDIS_SSL_CA_CERTS", _readable_file,
        "CA certificate (PEM file) that a rediss:// server's certificate must chain to",
    ),
    Setting(
        "redis_ssl_cert_reqs", "--redis-ssl-cert-reqs", "REDIS_SSL_CERT_REQS", _cert_reqs,
        "verify a rediss:// server's certificate: none, optional or required",
    ),
    Setting(
        "db_pool_size", "--db-pool-size", "SHARECHAT_DB_POOL_SIZE", _positive_int,
        "PostgreSQL connections per instance",
    ),
    Setting(
        "db_prepared_statements", "--db-prepared-statements", "SHARECHAT_DB_PREPARED_STATEMENTS",
        _boolean, "prepare the hot statements on each PostgreSQL connection (off behind "
        "PgBouncer in transaction mode)",
    ),
    Setting(
        "backend_timeout", "--backend-timeout", "SHARECHAT_BACKEND_TIMEOUT", _positive_seconds,
        "seconds to wait for PostgreSQL or Redis before giving up",
    ),
    Setting(
        "instance_lease", "--instance-lease", "SHARECHAT_INSTANCE_LEASE", _positive_seconds,
        "seconds after which a silent instance's members are removed",
    ),
    Setting(
        "log_format", "--log-format", "LOG_FORMAT", _log_format,
        "text, or json: one JSON object a line",
    ),
    Setting(
        "access_log", "--access-log", "SHARECHAT_ACCESS_LOG", _switch,
        "log every HTTP request and websocket, in the log format",
    ),
    Setting(
        "startup_timeout", "--startup-timeout", "SHARECHAT_STARTUP_TIMEOUT", _positive_seconds,
        "seconds to keep retrying PostgreSQL at start-up before exiting 1",
    ),
    Setting(
        "no_migrate", "--no-migrate", "SHARECHAT_NO_MIGRATE", _switch,
        "do not apply migrations at start-up (run `sharechat migrate` in a release phase)",
    ),
    Setting(
        "metrics_port", "--metrics-port", "SHARECHAT_METRICS_PORT", _port,
        "serve /metrics on this port only, to anyone reaching it (0: on the main port)",
    ),
    Setting(
        "metrics_allow_ips", "--metrics-allow-ips", "SHARECHAT_METRICS_ALLOW_IPS", _networks,
        "addresses or CIDRs (comma-separated; * = any) that may read /metrics on the main port",
    ),
)

SWITCHES = frozenset({"access_log", "no_migrate"})
