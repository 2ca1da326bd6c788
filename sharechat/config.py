"""Settings from flags and environment, checked once at start-up."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit


class ConfigError(Exception):
    """A bad setting; the message is one line naming it."""


@dataclass(frozen=True, slots=True)
class Config:
    host: str = "0.0.0.0"
    port: int = 8080
    allowed_origins: tuple[str, ...] = ()  # empty: the server's own origin; ("*",): any
    room_idle_ttl: float = 3600.0
    max_message_bytes: int = 4096
    ping_interval: float = 30.0
    rate_limit: float = 5.0  # chat messages a second per member; 0 = no limit
    rate_burst: int = 20
    send_queue: int = 1024  # frames waiting for one member before it is dropped as too slow
    send_buffer_bytes: int = 1 << 20  # bytes waiting for one member, likewise
    # Budgets per client address and per instance; 0 = off.
    forwarded_allow_ips: tuple[str, ...] = ()  # proxies whose X-Forwarded-* we believe; "*": any
    ip_connection_limit: int = 100  # websockets open at once per address
    max_connections: int = 10_000  # websockets per instance (also capped by the fd limit)
    room_member_limit: int = 1_000  # members of one room on this instance
    ip_rate_limit: float = 10.0  # chat messages and joins a second per address (burst rate_burst)
    room_create_limit: float = 1.0  # rooms created a second per address
    room_create_burst: int = 10
    frame_budget: float = 50.0  # frames a second per connection, every kind counted
    frame_burst: int = 100
    room_max_messages: int = 10_000  # history kept per room, oldest dropped first
    header_timeout: float = 10.0  # seconds for a request's headers to arrive
    keepalive_timeout: float = 75.0  # seconds an idle keep-alive connection stays open
    log_level: str = "INFO"
    database_url: str | None = None
    redis_url: str | None = None
    redis_prefix: str = "sharechat:"
    # For rediss:// only; None: as the URL says (verified against the system's CAs by default).
    redis_ssl_ca_certs: str | None = None
    redis_ssl_cert_reqs: str | None = None  # none | optional | required
    db_pool_size: int = 10
    db_prepared_statements: bool = True  # off behind PgBouncer in transaction mode
    backend_timeout: float = 5.0
    instance_lease: float = 6.0  # a dead instance's members are reaped within this + lease/3
    log_format: str = "text"  # text | json (one object a line)
    access_log: bool = False
    startup_timeout: float = 60.0  # seconds to keep retrying an unreachable PostgreSQL at start
    no_migrate: bool = False  # migrations run elsewhere (`sharechat migrate`, a release phase)
    metrics_port: int = 0  # 0: /metrics on the main port, for metrics_allow_ips only
    metrics_allow_ips: tuple[str, ...] = ("127.0.0.1/32", "::1/128")

    @property
    def redis_cluster(self) -> bool:
        """A redis+cluster:// (or rediss+cluster://) URL picks the Redis Cluster queue: one
        setting says both where the queue is and what it is, as broadcaster's URLs do."""
        return self.redis_url is not None and urlsplit(self.redis_url).scheme.endswith("+cluster")


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
class _Setting:
    field: str
    flag: str
    env: str
    parse: Callable[[str], Any]
    help: str
    preferred_env: str | None = None  # read before `env` when set and not empty


_SETTINGS = (
    _Setting("host", "--host", "HOST", _text, "address to listen on"),
    _Setting("port", "--port", "PORT", _port, "port to listen on"),
    _Setting(
        "allowed_origins", "--allowed-origin", "SHARECHAT_ALLOWED_ORIGINS", _origins,
        "origin allowed to open a websocket (repeatable; default: the server's own; *: any)",
    ),
    _Setting(
        "room_idle_ttl", "--room-idle-ttl", "SHARECHAT_ROOM_IDLE_TTL", _positive_seconds,
        "seconds a room may stay empty before it is deleted",
    ),
    _Setting(
        "max_message_bytes", "--max-message-bytes", "SHARECHAT_MAX_MESSAGE_BYTES",
        _positive_int, "largest chat message, in UTF-8 bytes",
    ),
    _Setting(
        "ping_interval", "--ping-interval", "SHARECHAT_PING_INTERVAL", _positive_seconds,
        "seconds between websocket pings",
    ),
    _Setting(
        "rate_limit", "--rate-limit", "SHARECHAT_RATE_LIMIT", _rate,
        "chat messages a second per member, sustained (0 = no limit)",
    ),
    _Setting(
        "rate_burst", "--rate-burst", "SHARECHAT_RATE_BURST", _positive_int,
        "chat messages a member may send at once",
    ),
    _Setting(
        "send_queue", "--send-queue", "SHARECHAT_SEND_QUEUE", _positive_int,
        "frames queued for one member before it is disconnected as too slow",
    ),
    _Setting(
        "send_buffer_bytes", "--send-buffer-bytes", "SHARECHAT_SEND_BUFFER_BYTES",
        _positive_int, "bytes queued for one member before it is disconnected as too slow",
    ),
    _Setting(
        "forwarded_allow_ips", "--forwarded-allow-ips", "FORWARDED_ALLOW_IPS", _networks,
        "proxies (addresses or CIDRs, comma-separated; * = any) trusted for X-Forwarded-*",
    ),
    _Setting(
        "ip_connection_limit", "--ip-connection-limit", "SHARECHAT_IP_CONNECTION_LIMIT", _count,
        "websockets open at once per client address (0 = no limit)",
    ),
    _Setting(
        "max_connections", "--max-connections", "SHARECHAT_MAX_CONNECTIONS", _count,
        "websockets per instance, at most what the file descriptor limit allows (0 = that)",
    ),
    _Setting(
        "room_member_limit", "--room-member-limit", "SHARECHAT_ROOM_MEMBER_LIMIT", _count,
        "members of one room on this instance (0 = no limit)",
    ),
    _Setting(
        "ip_rate_limit", "--ip-rate-limit", "SHARECHAT_IP_RATE_LIMIT", _rate,
        "chat messages and joins a second per client address, sustained (0 = no limit)",
    ),
    _Setting(
        "room_create_limit", "--room-create-limit", "SHARECHAT_ROOM_CREATE_LIMIT", _rate,
        "rooms created a second per client address, sustained (0 = no limit)",
    ),
    _Setting(
        "room_create_burst", "--room-create-burst", "SHARECHAT_ROOM_CREATE_BURST",
        _positive_int, "rooms a client address may create at once",
    ),
    _Setting(
        "frame_budget", "--frame-budget", "SHARECHAT_FRAME_BUDGET", _rate,
        "websocket frames a second per connection, every kind, sustained (0 = no limit)",
    ),
    _Setting(
        "frame_burst", "--frame-burst", "SHARECHAT_FRAME_BURST", _positive_int,
        "websocket frames a connection may send at once",
    ),
    _Setting(
        "room_max_messages", "--room-max-messages", "SHARECHAT_ROOM_MAX_MESSAGES", _count,
        "messages kept per room, the oldest dropped first (0 = no limit)",
    ),
    _Setting(
        "header_timeout", "--header-timeout", "SHARECHAT_HEADER_TIMEOUT", _positive_seconds,
        "seconds a client has to send a request's headers",
    ),
    _Setting(
        "keepalive_timeout", "--keepalive-timeout", "SHARECHAT_KEEPALIVE_TIMEOUT",
        _positive_seconds, "seconds an idle keep-alive connection stays open",
    ),
    _Setting("log_level", "--log-level", "LOG_LEVEL", _log_level, "logging level"),
    _Setting(
        "database_url", "--database-url", "DATABASE_URL", _url("postgresql", "postgres"),
        "PostgreSQL URL (default: in-memory repository)",
    ),
    _Setting(
        "redis_url", "--redis-url", "REDIS_URL",
        _url("redis", "rediss", "redis+cluster", "rediss+cluster"),
        "Redis URL, redis+cluster://one-node:port for a Redis Cluster "
        "(default: in-process queue; needs a database)", "REDIS_TLS_URL",
    ),
    _Setting(
        "redis_prefix", "--redis-prefix", "SHARECHAT_REDIS_PREFIX", _text,
        "prefix of the Redis channels",
    ),
    _Setting(
        "redis_ssl_ca_certs", "--redis-ssl-ca-certs", "REDIS_SSL_CA_CERTS", _readable_file,
        "CA certificate (PEM file) that a rediss:// server's certificate must chain to",
    ),
    _Setting(
        "redis_ssl_cert_reqs", "--redis-ssl-cert-reqs", "REDIS_SSL_CERT_REQS", _cert_reqs,
        "verify a rediss:// server's certificate: none, optional or required",
    ),
    _Setting(
        "db_pool_size", "--db-pool-size", "SHARECHAT_DB_POOL_SIZE", _positive_int,
        "PostgreSQL connections per instance",
    ),
    _Setting(
        "db_prepared_statements", "--db-prepared-statements", "SHARECHAT_DB_PREPARED_STATEMENTS",
        _boolean, "prepare the hot statements on each PostgreSQL connection (off behind "
        "PgBouncer in transaction mode)",
    ),
    _Setting(
        "backend_timeout", "--backend-timeout", "SHARECHAT_BACKEND_TIMEOUT", _positive_seconds,
        "seconds to wait for PostgreSQL or Redis before giving up",
    ),
    _Setting(
        "instance_lease", "--instance-lease", "SHARECHAT_INSTANCE_LEASE", _positive_seconds,
        "seconds after which a silent instance's members are removed",
    ),
    _Setting(
        "log_format", "--log-format", "LOG_FORMAT", _log_format,
        "text, or json: one JSON object a line",
    ),
    _Setting(
        "access_log", "--access-log", "SHARECHAT_ACCESS_LOG", _switch,
        "log every HTTP request and websocket, in the log format",
    ),
    _Setting(
        "startup_timeout", "--startup-timeout", "SHARECHAT_STARTUP_TIMEOUT", _positive_seconds,
        "seconds to keep retrying PostgreSQL at start-up before exiting 1",
    ),
    _Setting(
        "no_migrate", "--no-migrate", "SHARECHAT_NO_MIGRATE", _switch,
        "do not apply migrations at start-up (run `sharechat migrate` in a release phase)",
    ),
    _Setting(
        "metrics_port", "--metrics-port", "SHARECHAT_METRICS_PORT", _port,
        "serve /metrics on this port only, to anyone reaching it (0: on the main port)",
    ),
    _Setting(
        "metrics_allow_ips", "--metrics-allow-ips", "SHARECHAT_METRICS_ALLOW_IPS", _networks,
        "addresses or CIDRs (comma-separated; * = any) that may read /metrics on the main port",
    ),
)

_SWITCHES = frozenset({"access_log", "no_migrate"})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every setting as a flag; values stay strings until `load` checks them."""
    defaults = Config()
    for setting in _SETTINGS:
        default = getattr(defaults, setting.field)
        help_text = f"{setting.help} (env {setting.env}; default {default!r})"
        if setting.field == "allowed_origins":
            parser.add_argument(setting.flag, dest=setting.field, action="append", help=help_text)
        elif setting.field in _SWITCHES:
            parser.add_argument(
                setting.flag, dest=setting.field, nargs="?", const="on", help=help_text
            )
        else:
            parser.add_argument(setting.flag, dest=setting.field, help=help_text)


def load(args: argparse.Namespace, environ: Mapping[str, str]) -> Config:
    """Flags win over environment, environment over defaults."""
    values: dict[str, Any] = {}
    for setting in _SETTINGS:
        raw = getattr(args, setting.field, None)
        if isinstance(raw, list):
            raw = ",".join(raw)
        source = setting.flag
        if raw is None and setting.preferred_env and environ.get(setting.preferred_env):
            raw, source = environ[setting.preferred_env], setting.preferred_env
        if raw is None:
            raw, source = environ.get(setting.env), setting.env
        if raw is None:
            continue
        try:
            values[setting.field] = setting.parse(raw)
        except ValueError as error:
            raise ConfigError(f"invalid {source} {_redact(raw)!r}: {_reason(error)}") from None
    config = Config(**values)
    if config.redis_url and not config.database_url:
        raise ConfigError(
            "REDIS_URL is set but DATABASE_URL is not: several instances need a shared "
            "database, set DATABASE_URL too (or unset REDIS_URL for one instance)"
        )
    if config.metrics_port and config.metrics_port == config.port:
        raise ConfigError(
            f"--metrics-port {config.metrics_port} is the main port: pick another one, "
            "or 0 to serve /metrics on the main port"
        )
    _check_redis_tls(config)
    return config


def _check_redis_tls(config: Config) -> None:
    """A TLS setting beside a plain URL means TLS was expected and is not on."""
    if urlsplit(config.redis_url or "").scheme in ("rediss", "rediss+cluster"):
        return
    for name, value in (
        ("REDIS_SSL_CA_CERTS", config.redis_ssl_ca_certs),
        ("REDIS_SSL_CERT_REQS", config.redis_ssl_cert_reqs),
    ):
        if value is not None:
            raise ConfigError(
                f"{name} applies to a rediss:// URL, and the Redis URL is not one "
                "(set REDIS_TLS_URL or a rediss:// REDIS_URL)"
            )


def from_argv(argv: Sequence[str], environ: Mapping[str, str]) -> Config:
    """A Config from `serve`-style arguments; handy for tests and tools."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return load(parser.parse_args(list(argv)), environ)


def _redact(text: str) -> str:
    """Start-up errors end up in platform logs: never echo a URL's password."""
    parts = urlsplit(text)
    if parts.password is None:
        return text
    userinfo, _, host = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return parts._replace(netloc=f"{user}:***@{host}").geturl()


def _reason(error: ValueError) -> str:
    text = str(error)
    if text.startswith(("invalid literal", "could not convert")):
        return "not a number"
    return text


