"""Configuration: the contract's defaults, every flag and its variable, and bad values."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from typing import Any, NamedTuple

import pytest

from sharechat.config import Config, ConfigError, from_argv
from tests.servers import clean_environ

DATABASE = "postgresql://user:pass@db.example:5432/chat"
REDIS = "redis://:secret@redis.example:6379/0"


class Case(NamedTuple):
    field: str
    flag: str
    env: str
    raw: str  # what a user types
    value: Any  # what the Config holds
    other: str  # another good value, for "flags win over environment"
    requires: dict[str, str] = {}  # noqa: RUF012 -- a NamedTuple default, never mutated


CASES = [
    Case("host", "--host", "HOST", "127.0.0.2", "127.0.0.2", "10.1.2.3"),
    Case("port", "--port", "PORT", "9001", 9001, "9002"),
    Case(
        "allowed_origins",
        "--allowed-origin",
        "SHARECHAT_ALLOWED_ORIGINS",
        "https://chat.example",
        ("https://chat.example",),
        "https://other.example",
    ),
    Case("room_idle_ttl", "--room-idle-ttl", "SHARECHAT_ROOM_IDLE_TTL", "120", 120.0, "60"),
    Case("room_idle_ttl", "--room-idle-ttl", "SHARECHAT_ROOM_IDLE_TTL", "0.5", 0.5, "60"),
    Case(
        "max_message_bytes", "--max-message-bytes", "SHARECHAT_MAX_MESSAGE_BYTES", "100", 100, "7"
    ),
    Case("ping_interval", "--ping-interval", "SHARECHAT_PING_INTERVAL", "5", 5.0, "9"),
    Case("rate_limit", "--rate-limit", "SHARECHAT_RATE_LIMIT", "2.5", 2.5, "1"),
    Case("rate_limit", "--rate-limit", "SHARECHAT_RATE_LIMIT", "0", 0.0, "1"),
    Case("rate_burst", "--rate-burst", "SHARECHAT_RATE_BURST", "7", 7, "3"),
    Case("send_queue", "--send-queue", "SHARECHAT_SEND_QUEUE", "64", 64, "8"),
    Case(
        "send_buffer_bytes", "--send-buffer-bytes", "SHARECHAT_SEND_BUFFER_BYTES", "65536",
        65536, "1000",
    ),
    Case(
        "forwarded_allow_ips", "--forwarded-allow-ips", "FORWARDED_ALLOW_IPS",
        "10.0.0.1, 192.168.0.0/16,::1", ("10.0.0.1/32", "192.168.0.0/16", "::1/128"), "*",
    ),
    Case("forwarded_allow_ips", "--forwarded-allow-ips", "FORWARDED_ALLOW_IPS", "*", ("*",), "::1"),
    Case(
        "ip_connection_limit", "--ip-connection-limit", "SHARECHAT_IP_CONNECTION_LIMIT", "5", 5,
        "0",
    ),
    Case(
        "ip_connection_limit", "--ip-connection-limit", "SHARECHAT_IP_CONNECTION_LIMIT", "0", 0,
        "5",
    ),
    Case("max_connections", "--max-connections", "SHARECHAT_MAX_CONNECTIONS", "50", 50, "0"),
    Case(
        "room_member_limit", "--room-member-limit", "SHARECHAT_ROOM_MEMBER_LIMIT", "0", 0, "20"
    ),
    Case("ip_rate_limit", "--ip-rate-limit", "SHARECHAT_IP_RATE_LIMIT", "2.5", 2.5, "0"),
    Case(
        "room_create_limit", "--room-create-limit", "SHARECHAT_ROOM_CREATE_LIMIT", "0.1", 0.1, "0"
    ),
    Case(
        "room_create_burst", "--room-create-burst", "SHARECHAT_ROOM_CREATE_BURST", "3", 3, "1"
    ),
    Case("frame_budget", "--frame-budget", "SHARECHAT_FRAME_BUDGET", "0", 0.0, "20"),
    Case("frame_burst", "--frame-burst", "SHARECHAT_FRAME_BURST", "30", 30, "1"),
    Case(
        "room_max_messages", "--room-max-messages", "SHARECHAT_ROOM_MAX_MESSAGES", "500", 500,
        "0",
    ),
    Case("header_timeout", "--header-timeout", "SHARECHAT_HEADER_TIMEOUT", "2.5", 2.5, "1"),
    Case(
        "keepalive_timeout", "--keepalive-timeout", "SHARECHAT_KEEPALIVE_TIMEOUT", "30", 30.0,
        "5",
    ),
    Case("log_level", "--log-level", "LOG_LEVEL", "DEBUG", "DEBUG", "ERROR"),
    Case("log_level", "--log-level", "LOG_LEVEL", "warning", "WARNING", "ERROR"),
    Case("database_url", "--database-url", "DATABASE_URL", DATABASE, DATABASE, "postgres://o/x"),
    # Heroku still hands out postgres:// URLs.
    Case(
        "database_url",
        "--database-url",
        "DATABASE_URL",
        "postgres://u:p@h:5433/d",
        "postgres://u:p@h:5433/d",
        DATABASE,
    ),
    Case(
        "redis_url",
        "--redis-url",
        "REDIS_URL",
        REDIS,
        REDIS,
        "redis://other:6379/1",
        {"DATABASE_URL": DATABASE},
    ),
    Case(
        "redis_url",
        "--redis-url",
        "REDIS_URL",
        "rediss://r.example:6380/2",
        "rediss://r.example:6380/2",
        REDIS,
        {"DATABASE_URL": DATABASE},
    ),
    Case("redis_prefix", "--redis-prefix", "SHARECHAT_REDIS_PREFIX", "t42:", "t42:", "x:"),
    Case(
        "redis_ssl_ca_certs", "--redis-ssl-ca-certs", "REDIS_SSL_CA_CERTS", __file__, __file__,
        sys.executable, {"DATABASE_URL": DATABASE, "REDIS_URL": "rediss://r.example:6380/0"},
    ),
    Case(
        "redis_ssl_cert_reqs", "--redis-ssl-cert-reqs", "REDIS_SSL_CERT_REQS", "none", "none",
        "required", {"DATABASE_URL": DATABASE, "REDIS_URL": "rediss://r.example:6380/0"},
    ),
    Case("db_pool_size", "--db-pool-size", "SHARECHAT_DB_POOL_SIZE", "3", 3, "4"),
    Case(
        "db_prepared_statements",
        "--db-prepared-statements",
        "SHARECHAT_DB_PREPARED_STATEMENTS",
        "off",
        False,
        "on",
    ),
    Case("backend_timeout", "--backend-timeout", "SHARECHAT_BACKEND_TIMEOUT", "2.5", 2.5, "1"),
    Case("instance_lease", "--instance-lease", "SHARECHAT_INSTANCE_LEASE", "20", 20.0, "30"),
    Case("log_format", "--log-format", "LOG_FORMAT", "JSON", "json", "text"),
    Case("access_log", "--access-log", "SHARECHAT_ACCESS_LOG", "1", True, "off"),
    Case("access_log", "--access-log", "SHARECHAT_ACCESS_LOG", "on", True, "0"),
    Case(
        "startup_timeout", "--startup-timeout", "SHARECHAT_STARTUP_TIMEOUT", "5", 5.0, "120"
    ),
    Case("no_migrate", "--no-migrate", "SHARECHAT_NO_MIGRATE", "true", True, "false"),
    Case("metrics_port", "--metrics-port", "SHARECHAT_METRICS_PORT", "9090", 9090, "9091"),
    Case(
        "metrics_allow_ips", "--metrics-allow-ips", "SHARECHAT_METRICS_ALLOW_IPS",
        "10.0.0.0/8", ("10.0.0.0/8",), "*",
    ),
]


def case_id(case: Case) -> str:
    return f"{case.env}={case.raw}"


def test_defaults_are_the_contracts() -> None:
    config = from_argv([], {})
    assert config == Config()
    assert config.host == "0.0.0.0"
    assert config.port == 8080
    assert config.allowed_origins == ()  # the server's own origin only
    assert config.room_idle_ttl == 3600
    assert config.max_message_bytes == 4096
    assert config.ping_interval == 30
    assert config.rate_limit == 5
    assert config.rate_burst == 20
    assert config.forwarded_allow_ips == ()  # no proxy is trusted
    assert config.ip_connection_limit == 100
    assert config.max_connections == 10_000
    assert config.room_member_limit == 1_000
    assert config.ip_rate_limit == 10
    assert (config.room_create_limit, config.room_create_burst) == (1, 10)
    assert (config.frame_budget, config.frame_burst) == (50, 100)
    assert config.room_max_messages == 10_000
    assert config.send_buffer_bytes == 1 << 20
    assert (config.header_timeout, config.keepalive_timeout) == (10, 75)
    assert config.database_url is None
    assert config.redis_url is None


def test_unrelated_environment_is_ignored() -> None:
    assert from_argv([], {"USER": "x", "PATH": "/bin", "SHARECHAT_NOPE": "1"}) == Config()


def test_every_setting_has_a_case() -> None:
    """A new setting needs a flag, a variable and a line in CASES."""
    assert {case.field for case in CASES} == {field.name for field in dataclasses.fields(Config)}


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_setting_from_environment(case: Case) -> None:
    config = from_argv([], {**case.requires, case.env: case.raw})
    assert getattr(config, case.field) == case.value
    assert getattr(config, case.field) != getattr(Config(), case.field)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_setting_from_flag(case: Case) -> None:
    config = from_argv([f"{case.flag}={case.raw}"], case.requires)
    assert getattr(config, case.field) == case.value
    config = from_argv([case.flag, case.raw], case.requires)
    assert getattr(config, case.field) == case.value


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_flag_wins_over_environment(case: Case) -> None:
    config = from_argv([case.flag, case.raw], {**case.requires, case.env: case.other})
    assert getattr(config, case.field) == case.value


def test_allowed_origins_from_environment_are_comma_separated() -> None:
    environ = {"SHARECHAT_ALLOWED_ORIGINS": "https://a.example, https://b.example:8443"}
    config = from_argv([], environ)
    assert config.allowed_origins == ("https://a.example", "https://b.example:8443")


def test_allowed_origin_flag_is_repeatable_and_replaces_the_environment() -> None:
    config = from_argv(
        ["--allowed-origin", "https://a.example", "--allowed-origin", "https://b.example"],
        {"SHARECHAT_ALLOWED_ORIGINS": "https://env.example"},
    )
    assert config.allowed_origins == ("https://a.example", "https://b.example")


def test_redis_with_database_gives_both_backends() -> None:
    config = from_argv([], {"DATABASE_URL": DATABASE, "REDIS_URL": REDIS})
    assert (config.database_url, config.redis_url) == (DATABASE, REDIS)


BAD = [
    ([], {"PORT": "abc"}, "PORT"),
    ([], {"PORT": "70000"}, "PORT"),
    ([], {"PORT": "-1"}, "PORT"),
    ([], {"PORT": "80.5"}, "PORT"),
    (["--port", "abc"], {}, "--port"),
    (["--port=70000"], {}, "--port"),
    ([], {"SHARECHAT_ROOM_IDLE_TTL": "0"}, "SHARECHAT_ROOM_IDLE_TTL"),
    ([], {"SHARECHAT_ROOM_IDLE_TTL": "-1"}, "SHARECHAT_ROOM_IDLE_TTL"),
    ([], {"SHARECHAT_ROOM_IDLE_TTL": "nan"}, "SHARECHAT_ROOM_IDLE_TTL"),
    ([], {"SHARECHAT_ROOM_IDLE_TTL": "inf"}, "SHARECHAT_ROOM_IDLE_TTL"),
    ([], {"SHARECHAT_ROOM_IDLE_TTL": "soon"}, "SHARECHAT_ROOM_IDLE_TTL"),
    (["--room-idle-ttl=0"], {}, "--room-idle-ttl"),
    ([], {"SHARECHAT_MAX_MESSAGE_BYTES": "0"}, "SHARECHAT_MAX_MESSAGE_BYTES"),
    ([], {"SHARECHAT_MAX_MESSAGE_BYTES": "-5"}, "SHARECHAT_MAX_MESSAGE_BYTES"),
    ([], {"SHARECHAT_MAX_MESSAGE_BYTES": "1.5"}, "SHARECHAT_MAX_MESSAGE_BYTES"),
    (["--max-message-bytes=0"], {}, "--max-message-bytes"),
    ([], {"SHARECHAT_PING_INTERVAL": "0"}, "SHARECHAT_PING_INTERVAL"),
    ([], {"SHARECHAT_PING_INTERVAL": "inf"}, "SHARECHAT_PING_INTERVAL"),
    ([], {"SHARECHAT_RATE_LIMIT": "-1"}, "SHARECHAT_RATE_LIMIT"),
    ([], {"SHARECHAT_RATE_LIMIT": "nan"}, "SHARECHAT_RATE_LIMIT"),
    ([], {"SHARECHAT_RATE_LIMIT": "fast"}, "SHARECHAT_RATE_LIMIT"),
    (["--rate-limit=-1"], {}, "--rate-limit"),
    ([], {"SHARECHAT_RATE_BURST": "0"}, "SHARECHAT_RATE_BURST"),
    (["--rate-burst=0"], {}, "--rate-burst"),
    ([], {"SHARECHAT_SEND_QUEUE": "0"}, "SHARECHAT_SEND_QUEUE"),
    ([], {"SHARECHAT_SEND_BUFFER_BYTES": "0"}, "SHARECHAT_SEND_BUFFER_BYTES"),
    ([], {"FORWARDED_ALLOW_IPS": "10.0.0.300"}, "FORWARDED_ALLOW_IPS"),
    ([], {"FORWARDED_ALLOW_IPS": "proxy.example"}, "FORWARDED_ALLOW_IPS"),
    (["--forwarded-allow-ips", "10.0.0.0/33"], {}, "--forwarded-allow-ips"),
    ([], {"SHARECHAT_IP_CONNECTION_LIMIT": "-1"}, "SHARECHAT_IP_CONNECTION_LIMIT"),
    ([], {"SHARECHAT_IP_CONNECTION_LIMIT": "1.5"}, "SHARECHAT_IP_CONNECTION_LIMIT"),
    ([], {"SHARECHAT_MAX_CONNECTIONS": "many"}, "SHARECHAT_MAX_CONNECTIONS"),
    ([], {"SHARECHAT_ROOM_MEMBER_LIMIT": "-2"}, "SHARECHAT_ROOM_MEMBER_LIMIT"),
    ([], {"SHARECHAT_IP_RATE_LIMIT": "-1"}, "SHARECHAT_IP_RATE_LIMIT"),
    ([], {"SHARECHAT_ROOM_CREATE_LIMIT": "inf"}, "SHARECHAT_ROOM_CREATE_LIMIT"),
    ([], {"SHARECHAT_ROOM_CREATE_BURST": "0"}, "SHARECHAT_ROOM_CREATE_BURST"),
    ([], {"SHARECHAT_FRAME_BUDGET": "nan"}, "SHARECHAT_FRAME_BUDGET"),
    ([], {"SHARECHAT_FRAME_BURST": "0"}, "SHARECHAT_FRAME_BURST"),
    ([], {"SHARECHAT_ROOM_MAX_MESSAGES": "-10"}, "SHARECHAT_ROOM_MAX_MESSAGES"),
    ([], {"SHARECHAT_HEADER_TIMEOUT": "0"}, "SHARECHAT_HEADER_TIMEOUT"),
    ([], {"SHARECHAT_KEEPALIVE_TIMEOUT": "-1"}, "SHARECHAT_KEEPALIVE_TIMEOUT"),
    ([], {"SHARECHAT_DB_POOL_SIZE": "0"}, "SHARECHAT_DB_POOL_SIZE"),
    ([], {"SHARECHAT_BACKEND_TIMEOUT": "0"}, "SHARECHAT_BACKEND_TIMEOUT"),
    ([], {"SHARECHAT_INSTANCE_LEASE": "-3"}, "SHARECHAT_INSTANCE_LEASE"),
    ([], {"LOG_LEVEL": "loud"}, "LOG_LEVEL"),
    (["--log-level", "loud"], {}, "--log-level"),
    ([], {"DATABASE_URL": "mysql://x"}, "DATABASE_URL"),
    ([], {"DATABASE_URL": "postgresql://"}, "DATABASE_URL"),
    (["--database-url", "mysql://x"], {}, "--database-url"),
    ([], {"DATABASE_URL": DATABASE, "REDIS_URL": "http://x"}, "REDIS_URL"),
    (["--redis-url", "http://x"], {"DATABASE_URL": DATABASE}, "--redis-url"),
    ([], {"LOG_FORMAT": "xml"}, "LOG_FORMAT"),
    (["--access-log=maybe"], {}, "--access-log"),
    ([], {"SHARECHAT_STARTUP_TIMEOUT": "0"}, "SHARECHAT_STARTUP_TIMEOUT"),
    ([], {"SHARECHAT_NO_MIGRATE": "sometimes"}, "SHARECHAT_NO_MIGRATE"),
    ([], {"SHARECHAT_METRICS_PORT": "65536"}, "SHARECHAT_METRICS_PORT"),
    (["--metrics-port", "8080"], {}, "--metrics-port"),  # the main port
    ([], {"SHARECHAT_METRICS_ALLOW_IPS": "prometheus"}, "SHARECHAT_METRICS_ALLOW_IPS"),
]


@pytest.mark.parametrize(("argv", "environ", "name"), BAD, ids=[f"{a} {e}" for a, e, _ in BAD])
def test_bad_value_is_one_line_naming_the_setting(
    argv: list[str], environ: dict[str, str], name: str
) -> None:
    with pytest.raises(ConfigError) as error:
        from_argv(argv, environ)
    message = str(error.value)
    assert name in message
    assert "\n" not in message
    assert "Traceback" not in message


def test_switches_are_on_when_given_alone() -> None:
    config = from_argv(["--access-log", "--no-migrate"], {})
    assert (config.access_log, config.no_migrate) == (True, True)
    config = from_argv(["--access-log=off"], {"SHARECHAT_ACCESS_LOG": "1"})
    assert config.access_log is False


def test_flag_error_names_the_flag_even_with_a_good_variable() -> None:
    with pytest.raises(ConfigError, match="--port"):
        from_argv(["--port", "abc"], {"PORT": "8081"})


def test_bad_variable_is_an_error_even_when_unused() -> None:
    # Nothing is silently ignored: a typo in the environment is reported.
    with pytest.raises(ConfigError, match="PORT"):
        from_argv([], {"PORT": "eighty"})


@pytest.mark.parametrize(
    ("argv", "environ"),
    [
        ([], {"REDIS_URL": REDIS}),
        (["--redis-url", REDIS], {}),
    ],
    ids=["env", "flag"],
)
def test_redis_without_database_is_refused(argv: list[str], environ: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as error:
        from_argv(argv, environ)
    message = str(error.value)
    assert "REDIS_URL" in message
    assert "DATABASE_URL" in message
    assert "\n" not in message


def test_bad_url_error_does_not_echo_the_password() -> None:
    """Start-up errors land in platform logs: a mistyped URL must not leak its secret."""
    with pytest.raises(ConfigError) as error:
        from_argv([], {"DATABASE_URL": "mysql://admin:hunter2-s3cret@db.example/chat"})
    assert "DATABASE_URL" in str(error.value)
    assert "hunter2-s3cret" not in str(error.value)
    with pytest.raises(ConfigError) as error:
        from_argv([], {"DATABASE_URL": DATABASE, "REDIS_URL": "http://:hunter2-s3cret@r:6379"})
    assert "REDIS_URL" in str(error.value)
    assert "hunter2-s3cret" not in str(error.value)


# -- through the real command line -----------------------------------------------------


def run_cli(*argv: str, **environ: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sharechat", *argv],
        env=clean_environ(**environ),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize(
    ("argv", "environ", "name"),
    [
        (["serve", "--port", "abc"], {}, "--port"),
        (["serve"], {"PORT": "abc"}, "PORT"),
        (["serve", "--room-idle-ttl", "0"], {}, "--room-idle-ttl"),
        (["serve"], {"LOG_LEVEL": "loud"}, "LOG_LEVEL"),
        (["serve"], {"DATABASE_URL": "mysql://x"}, "DATABASE_URL"),
        (["serve"], {"REDIS_URL": "redis://localhost:6379/0"}, "DATABASE_URL"),
    ],
    ids=["--port", "PORT", "--room-idle-ttl", "LOG_LEVEL", "DATABASE_URL", "REDIS_URL-alone"],
)
def test_cli_bad_value_exits_2_with_one_line(
    argv: list[str], environ: dict[str, str], name: str
) -> None:
    result = run_cli(*argv, **environ)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert name in lines[0]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_cli_serve_help_lists_every_flag_and_variable() -> None:
    result = run_cli("serve", "--help")
    assert result.returncode == 0, result
    for case in CASES:
        assert case.flag in result.stdout
        assert case.env in result.stdout


def test_star_origin_means_any_origin() -> None:
    assert from_argv([], {"SHARECHAT_ALLOWED_ORIGINS": "*"}).allowed_origins == ("*",)
    assert from_argv(["--allowed-origin", "*"], {}).allowed_origins == ("*",)


def test_origins_are_normalised() -> None:
    config = from_argv(["--allowed-origin", "HTTPS://Chat.Example/"], {})
    assert config.allowed_origins == ("https://chat.example",)
