"""/metrics: who may read it, where, in what format, and what it counts."""

from __future__ import annotations

import asyncio
import json
import re
import signal
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from uuid import uuid4

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from sharechat.app import create_app
from sharechat.config import Config
from sharechat.instrumented import DeliveryClock, measured_queue
from sharechat.metrics import Metrics
from sharechat.redis_queue import open_redis_queue
from tests.conftest import Chat
from tests.helpers import WAIT, eventually, free_port, receive_json, receive_until
from tests.redis_support import StallingProxy, redis_server, unique_prefix
from tests.servers import clean_environ, running, serve_command

ROOT = Path(__file__).resolve().parent.parent
UUID_LIKE = re.compile(r"[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}", re.I)


def samples(text: str) -> list[Sample]:
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def value(text: str, name: str, **labels: str) -> float:
    """The value of one sample (0 when the series does not exist yet)."""
    found = [s.value for s in samples(text) if s.name == name and s.labels == labels]
    assert len(found) <= 1, (name, labels, found)
    return found[0] if found else 0.0


def assert_bounded(found: Iterable[Sample]) -> None:
    """No label value that grows with use: no ids, no addresses, no free text."""
    for sample in found:
        for label, text in sample.labels.items():
            assert not UUID_LIKE.search(text), (sample.name, label, text)
            assert not re.search(r"\d+\.\d+\.\d+\.\d+", text), (sample.name, label, text)
            assert len(text) <= 32, (sample.name, label, text)


async def scrape(client: TestClient[Any, Any]) -> str:
    response = await client.get("/metrics")
    assert response.status == 200, await response.text()
    assert response.content_type == "text/plain"
    return await response.text()


async def test_metrics_parse_and_follow_the_conventions(aiohttp_client: Any) -> None:
    client = await aiohttp_client(create_app(Config(host="127.0.0.1", port=0)))
    text = await scrape(client)
    families = list(text_string_to_metric_families(text))
    ours = [f for f in families if f.name.startswith("sharechat_")]
    assert {f.name for f in ours} >= {
        "sharechat_websockets_open",
        "sharechat_rooms_live",
        "sharechat_members_joined",
        "sharechat_messages_delivered",
        "sharechat_refusals",
        "sharechat_repository_seconds",
        "sharechat_event_loop_lag_seconds",
    }
    for family in families:
        assert family.name.startswith(("sharechat_", "process_")), family.name
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples)
        if family.type == "histogram" and family.name.startswith("sharechat_"):
            assert family.name.endswith(("_seconds", "_size")), family.name
    assert_bounded(samples(text))


async def test_event_loop_lag_is_measured(aiohttp_client: Any) -> None:
    client = await aiohttp_client(create_app(Config(host="127.0.0.1", port=0)))

    async def measured() -> bool:
        return value(await scrape(client), "sharechat_event_loop_lag_seconds_count") >= 2

    await eventually(measured, wait=WAIT)


async def test_each_app_counts_for_itself(aiohttp_client: Any) -> None:
    """A registry per app: two apps in one process (as in these tests) never mix counts."""
    busy = await aiohttp_client(create_app(Config(host="127.0.0.1", port=0)))
    idle = await aiohttp_client(create_app(Config(host="127.0.0.1", port=0)))
    room = (await (await busy.post("/api/room")).json())["roomId"]
    response = await busy.get(f"/api/serve/{room}", headers={"Origin": "https://x.example"})
    assert response.status == 403
    refused = "sharechat_refusals_total"
    assert value(await scrape(busy), refused, kind="origin") == 1
    assert value(await scrape(idle), refused, kind="origin") == 0


async def test_only_allowed_addresses_may_read_the_main_ports_metrics(aiohttp_client: Any) -> None:
    config = Config(host="127.0.0.1", port=0, metrics_allow_ips=())
    nobody = await aiohttp_client(create_app(config))
    response = await nobody.get("/metrics")
    assert response.status == 404
    assert (await response.json()) == {"error": "not found"}


async def test_behind_a_trusted_proxy_the_client_is_checked_not_the_proxy(
    aiohttp_client: Any,
) -> None:
    config = Config(
        host="127.0.0.1",
        port=0,
        forwarded_allow_ips=("127.0.0.1/32",),
        metrics_allow_ips=("10.0.0.0/8",),
    )
    client = await aiohttp_client(create_app(config))
    outside = await client.get("/metrics", headers={"X-Forwarded-For": "203.0.113.9"})
    assert outside.status == 404
    inside = await client.get("/metrics", headers={"X-Forwarded-For": "10.1.2.3"})
    assert inside.status == 200
    # The proxy itself (127.0.0.1) is not in the allow-list: it only forwards.
    assert (await client.get("/metrics")).status == 404


async def test_metrics_port_serves_metrics_there_and_not_on_the_main_port(tmp_path: Path) -> None:
    port, metrics_port = free_port(), free_port()
    command = serve_command(port, "--metrics-port", str(metrics_port))
    async with (
        running(command, port, clean_environ(), tmp_path) as server,
        aiohttp.ClientSession() as http,
    ):
        async with http.get(f"{server.url}/metrics") as response:
            assert response.status == 404
        # A request aiohttp cannot parse is refused by the HTTP server, and counted too.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"NOT A REQUEST\r\n\r\n")
        async with asyncio.timeout(WAIT):
            assert b" 400 " in (await reader.read()).split(b"\r\n")[0]
        writer.close()
        async with http.get(f"http://127.0.0.1:{metrics_port}/metrics") as response:
            assert response.status == 200
            text = await response.text()
        assert value(text, "sharechat_websockets_open") == 0
        assert value(text, "sharechat_refusals_total", kind="bad-request") == 1
        server.signal(signal.SIGTERM)
        assert await server.wait_exit(WAIT * 2) == 0, server.output()


async def test_the_dashboard_is_built_on_these_metrics(aiohttp_client: Any) -> None:
    """Every metric docs/grafana-dashboard.json queries is one /metrics exposes."""
    client = await aiohttp_client(create_app(Config(host="127.0.0.1", port=0)))
    exposed = {family.name for family in text_string_to_metric_families(await scrape(client))}
    dashboard = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    expressions = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    queried = {
        re.sub(r"_(total|bucket|count|sum)$", "", name)
        for expr in expressions
        for name in re.findall(r"\b(?:sharechat|process)_[a-z_]+", expr)
    }
    assert queried <= exposed, queried - exposed
    ours = {name for name in exposed if name.startswith("sharechat_")}
    assert ours <= queried, f"not on the dashboard: {ours - queried}"


MESSAGES = 7
RECOVERY = 15.0  # seconds for a queue to notice an outage and come back (backoff included)


async def test_a_chat_moves_the_counters_by_exactly_its_own_amounts(
    client: TestClient[Any, Any], chat: Chat, backend: str
) -> None:
    room = await chat.room()
    before = await scrape(client)
    alice, _ = await chat.join(room)
    bob, _ = await chat.join(room)
    await receive_json(alice)  # bob's joined
    during = await scrape(client)
    assert value(during, "sharechat_websockets_open") == 2
    assert value(during, "sharechat_rooms_live") == 1
    for number in range(MESSAGES):
        await alice.send_str(f"message {number}")
        for ws in (alice, bob):
            assert (await receive_json(ws))["message"] == f"message {number}"
    await alice.close()
    await receive_until(bob, lambda m: m["type"] == "left")
    await bob.close()

    async def all_left() -> bool:
        return value(await scrape(client), "sharechat_members_left_total") == 2 + value(
            before, "sharechat_members_left_total"
        )

    await eventually(all_left)
    after = await scrape(client)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("sharechat_members_joined_total") == 2
    assert moved("sharechat_members_left_total") == 2
    assert moved("sharechat_messages_stored_total") == MESSAGES
    # Two joined, the chat, two left: each published once.
    assert moved("sharechat_messages_published_total") == 2 + MESSAGES + 2
    # alice: both joined and every message; bob: his joined, every message, alice's left.
    assert moved("sharechat_messages_delivered_total") == (2 + MESSAGES) + (1 + MESSAGES + 1)
    assert value(after, "sharechat_websockets_open") == 0
    assert value(after, "sharechat_rooms_live") == 0
    assert moved("sharechat_repository_seconds_count", operation="add_message") == MESSAGES
    assert moved("sharechat_repository_seconds_count", operation="add_member") == 2
    assert moved("sharechat_queue_publish_seconds_count") == 2 + MESSAGES + 2
    # Every message stored here came back through the queue while a member was here
    # (bob's own left comes after the room is gone from this instance).
    assert moved("sharechat_delivery_seconds_count") >= 2 + MESSAGES
    assert moved("sharechat_delivery_seconds_sum") > 0
    # PostgreSQL commits the joins, the messages and the leaves in batches: their sizes
    # add up to the writes (the in-memory repository has no group commit).
    writes = moved("sharechat_commit_batch_size_sum")
    assert writes == (0 if backend == "memory" else 2 + MESSAGES + 2)
    assert moved("sharechat_commit_batch_size_count") <= writes
    assert_bounded(samples(after))


@pytest.mark.services
async def test_queue_recoveries_are_counted(
    aiohttp_client: Any, database_url: str, tmp_path: Path
) -> None:
    with redis_server(tmp_path) as redis:
        config = Config(
            host="127.0.0.1",
            port=0,
            database_url=database_url,
            redis_url=redis.url,
            redis_prefix=unique_prefix("metrics"),
        )
        client = await aiohttp_client(create_app(config))
        chat = Chat(client)
        ws, _ = await chat.join(await chat.room())  # a live room: a subscription to lose
        assert value(await scrape(client), "sharechat_queue_reconnects_total") == 0

        redis.kill()
        redis.start()

        async def recovered() -> bool:
            return value(await scrape(client), "sharechat_queue_reconnects_total") == 1

        await eventually(recovered, wait=RECOVERY)
        await ws.close()


async def test_each_failed_is_counted_under_its_reason(start_server: Any) -> None:
    # A burst of 4 texts: hi, the long one, the NUL one, ok (malformed and empty frames
    # never reach the rate limit); the fifth is over it.
    client = await start_server(max_message_bytes=10, rate_limit=0.001, rate_burst=4)
    chat = Chat(client)
    room = await chat.room()
    ws, _ = await chat.join(room, protocols=("sharechat.v1",))
    sends = [
        ('{"text": "hi"}', None),  # stored
        ('{"text": "far too long for ten bytes"}', "too-long"),
        ('{"text": "a\\u0000b"}', "nul"),
        ("not json", "malformed"),
        ('{"text": "", "ref": "1"}', "empty"),
        ('{"text": "ok"}', None),  # stored
        ('{"text": "over"}', "member-rate"),
    ]
    for frame, _ in sends:
        await ws.send_str(frame)
    await ws.send_bytes(b"binary")
    reasons = [reason for _, reason in sends if reason] + ["binary"]
    answers = [await receive_json(ws) for _ in range(len(sends) + 1)]
    assert [a["type"] for a in answers].count("failed") == len(reasons), answers
    text = await scrape(client)
    for reason in reasons:
        assert value(text, "sharechat_failed_total", reason=reason) == 1, reason
    assert value(text, "sharechat_failed_total", reason="other") == 0
    await ws.close()


@pytest.mark.services
async def test_a_stalled_subscription_counts_a_canary_miss_and_a_reconnect(
    tmp_path: Path,
) -> None:
    """Redis's own canary, quickened: a pub/sub connection gone silent is one miss, then
    one recovery (the queue as the app wraps it)."""
    metrics = Metrics()
    with redis_server(tmp_path) as redis:
        proxy = StallingProxy(redis.port)
        await proxy.start()
        try:
            async with open_redis_queue(
                proxy.url,
                prefix=unique_prefix("canary"),
                instance_id=uuid4(),
                canary_interval=0.1,
                on_canary_missed=metrics.queue_canary_misses.inc,
            ) as inner:
                queue = measured_queue(inner, metrics, DeliveryClock(metrics))
                queue.on_message(lambda room, payload: None)
                queue.on_recovered(lambda: None)
                async with asyncio.timeout(WAIT):
                    await queue.subscribe(uuid4())
                assert proxy.stall_subscribers() == 1

                def counted(name: str) -> float:
                    return value(generate_latest(metrics.registry).decode(), name)

                async def recovered() -> bool:
                    return counted("sharechat_queue_reconnects_total") == 1

                await eventually(recovered, wait=RECOVERY)
                assert counted("sharechat_queue_canary_misses_total") == 1
        finally:
            await proxy.close()
