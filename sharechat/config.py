"""The frozen Config: read once at start-up from flags and environment (the
catalogue of settings is settings.py), with the checks across settings."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from sharechat.settings import SETTINGS, SWITCHES


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every setting as a flag; values stay strings until `load` checks them."""
    defaults = Config()
    for setting in SETTINGS:
        default = getattr(defaults, setting.field)
        help_text = f"{setting.help} (env {setting.env}; default {default!r})"
        if setting.field == "allowed_origins":
            parser.add_argument(setting.flag, dest=setting.field, action="append", help=help_text)
        elif setting.field in SWITCHES:
            parser.add_argument(
                setting.flag, dest=setting.field, nargs="?", const="on", help=help_text
            )
        else:
            parser.add_argument(setting.flag, dest=setting.field, help=help_text)


def load(args: argparse.Namespace, environ: Mapping[str, str]) -> Config:
    """Flags win over environment, environment over defaults."""
    values: dict[str, Any] = {}
    for setting in SETTINGS:
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


