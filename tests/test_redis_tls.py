"""Hosted Redis: rediss:// with a self-signed certificate, as Heroku hands it out.

The server here is a local redis-server speaking only TLS with a certificate of its
own; the URL says nothing about it, as a provider's REDIS_URL does not.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from sharechat.app import create_app
from sharechat.config import Config, ConfigError, from_argv
from tests.conftest import Chat
from tests.helpers import eventually, receive_until
from tests.redis_support import RedisServer, redis_server, unique_prefix

pytestmark = pytest.mark.services  # real PostgreSQL/Redis: see conftest --backends

SETTLE = 10.0  # seconds for the queue's first connection attempts, under load
DATABASE = "postgresql://user:pass@db.example:5432/chat"


@pytest.fixture
def hosted_redis(tmp_path: Path) -> Iterator[RedisServer]:
    with redis_server(tmp_path, tls=True) as server:
        yield server


async def start(aiohttp_client: Any, database_url: str, redis_url: str, **tls: Any) -> Chat:
    config = Config(database_url=database_url, redis_url=redis_url, **tls)
    config = dataclasses.replace(config, redis_prefix=unique_prefix("tls"))
    client: TestClient[Any, Any] = await aiohttp_client(create_app(config))
    return Chat(client)


async def queue_health(chat: Chat) -> tuple[int, str]:
    response = await chat.client.get("/api/healthz")
    return response.status, (await response.json())["queue"]


async def chat_works(chat: Chat) -> None:
    async def healthy() -> bool:
        return await queue_health(chat) == (200, "ok")

    await eventually(healthy, wait=SETTLE)
    room = await chat.room()
    alice, _ = await chat.join(room)
    bob, _ = await chat.join(room)
    await alice.send_str("over TLS")
    said, _ = await receive_until(bob, lambda m: m["type"] == "chat")
    assert said["message"] == "over TLS"


async def test_an_untrusted_certificate_is_named_in_healthz_and_the_log(
    aiohttp_client: Any,
    database_url: str,
    hosted_redis: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="sharechat")
    chat = await start(aiohttp_client, database_url, hosted_redis.hosted_url)

    async def refused() -> bool:
        return "CERTIFICATE_VERIFY_FAILED" in (await queue_health(chat))[1]

    await eventually(refused, wait=SETTLE)
    status, reason = await queue_health(chat)
    assert status == 503
    assert reason == "redis: TLS CERTIFICATE_VERIFY_FAILED: self-signed certificate"
    assert f"redis lost: {reason.removeprefix('redis: ')}" in caplog.text


async def test_trusting_the_servers_certificate_makes_chat_work(
    aiohttp_client: Any, database_url: str, hosted_redis: RedisServer
) -> None:
    certificate = str(hosted_redis.certificate)
    await chat_works(
        await start(
            aiohttp_client, database_url, hosted_redis.hosted_url, redis_ssl_ca_certs=certificate
        )
    )


async def test_skipping_verification_makes_chat_work(
    aiohttp_client: Any, database_url: str, hosted_redis: RedisServer
) -> None:
    await chat_works(
        await start(
            aiohttp_client, database_url, hosted_redis.hosted_url, redis_ssl_cert_reqs="none"
        )
    )


async def test_the_setting_wins_over_the_urls_query(
    aiohttp_client: Any, database_url: str, hosted_redis: RedisServer
) -> None:
    """The URL is the provider's; the operator's setting is what they meant."""
    url = f"{hosted_redis.hosted_url}?ssl_cert_reqs=required"
    await chat_works(await start(aiohttp_client, database_url, url, redis_ssl_cert_reqs="none"))


# -- configuration ------------------------------------------------------------------


def test_redis_tls_url_is_preferred_over_redis_url() -> None:
    environ = {
        "DATABASE_URL": DATABASE,
        "REDIS_URL": "redis://plain.example:6379/0",
        "REDIS_TLS_URL": "rediss://tls.example:6380/0",
    }
    assert from_argv([], environ).redis_url == "rediss://tls.example:6380/0"
    assert from_argv([], {**environ, "REDIS_TLS_URL": ""}).redis_url == environ["REDIS_URL"]
    flagged = from_argv(["--redis-url", "redis://flag.example:1/0"], environ)
    assert flagged.redis_url == "redis://flag.example:1/0"


def test_tls_settings_from_flags_and_environment(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not checked here: redis-py reads it")
    environ = {"DATABASE_URL": DATABASE, "REDIS_URL": "rediss://r.example:6380/0"}
    config = from_argv([], {**environ, "REDIS_SSL_CA_CERTS": str(ca)})
    assert (config.redis_ssl_ca_certs, config.redis_ssl_cert_reqs) == (str(ca), None)
    config = from_argv(["--redis-ssl-cert-reqs", "NONE"], environ)
    assert config.redis_ssl_cert_reqs == "none"
    environ["REDIS_SSL_CERT_REQS"] = "required"
    config = from_argv(["--redis-ssl-ca-certs", str(ca)], environ)
    assert (config.redis_ssl_ca_certs, config.redis_ssl_cert_reqs) == (str(ca), "required")


@pytest.mark.parametrize(
    ("environ", "says"),
    [
        ({"REDIS_SSL_CERT_REQS": "off"}, "invalid REDIS_SSL_CERT_REQS 'off': must be one of"),
        ({"REDIS_SSL_CA_CERTS": "/nowhere/ca.pem"}, "invalid REDIS_SSL_CA_CERTS"),
        (
            {"REDIS_URL": "redis://plain.example:6379/0", "REDIS_SSL_CERT_REQS": "none"},
            "REDIS_SSL_CERT_REQS applies to a rediss:// URL",
        ),
    ],
)
def test_bad_tls_settings_are_one_line(environ: dict[str, str], says: str) -> None:
    base = {"DATABASE_URL": DATABASE, "REDIS_URL": "rediss://r.example:6380/0"}
    with pytest.raises(ConfigError) as refused:
        from_argv([], {**base, **environ})
    assert says in str(refused.value)
    assert "\n" not in str(refused.value)
