"""One `client` built from the real factory, on every backend combination."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable, Iterator
from typing import Any
from uuid import uuid4

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from sharechat.app import create_app
from sharechat.config import Config
from tests.cluster_support import RedisCluster, running_cluster
from tests.helpers import receive_json, suite_config
from tests.pg_support import temporary_database
from tests.redis_support import REDIS_URL

BACKENDS = ("memory", "postgres", "postgres+redis", "postgres+redis-cluster")

StartServer = Callable[..., Awaitable[TestClient[Any, Any]]]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--backends",
        default=",".join(BACKENDS),
        help="comma-separated backend combinations to test (default: all; "
        "'memory' needs no PostgreSQL or Redis)",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames:
        chosen = metafunc.config.getoption("--backends").split(",")
        unknown = set(chosen) - set(BACKENDS)
        if unknown:
            raise pytest.UsageError(f"--backends: unknown {sorted(unknown)}; use {BACKENDS}")
        metafunc.parametrize("backend", chosen)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`--backends memory`: leave out the tests of the services themselves (not skipped:
    they are simply not part of that run; CI runs every backend)."""
    if "postgres" in config.getoption("--backends").split(","):
        return
    dropped = [item for item in items if item.get_closest_marker("services")]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if not item.get_closest_marker("services")]


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """One migrated database for the whole run, dropped at the end."""
    with asyncio.Runner() as runner:
        database = temporary_database()
        try:
            url = runner.run(database.__aenter__())
        except Exception as error:  # any driver error: say what to do about it
            pytest.fail(
                f"PostgreSQL is not reachable ({error}): start it, set "
                "SHARECHAT_TEST_DATABASE_URL, or run pytest --backends memory"
            )
        yield url
        runner.run(database.__aexit__(None, None, None))


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """One Redis Cluster for the whole run (it takes seconds to form), killed at the end.
    Tests that break a cluster start their own."""
    with running_cluster(tmp_path_factory.mktemp("redis-cluster")) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def redis_prefix() -> str:
    return f"sharechat-test-{uuid4().hex[:12]}:"


@pytest.fixture
def backend_config(backend: str, request: pytest.FixtureRequest) -> Config:
    config = suite_config()
    if backend == "memory":
        return config
    config = dataclasses.replace(config, database_url=request.getfixturevalue("database_url"))
    if backend == "postgres":
        return config
    prefix = request.getfixturevalue("redis_prefix")
    redis_url = REDIS_URL
    if backend == "postgres+redis-cluster":
        redis_url = request.getfixturevalue("redis_cluster").url
    return dataclasses.replace(config, redis_url=redis_url, redis_prefix=prefix)


@pytest.fixture
def start_server(aiohttp_client: Any, backend_config: Config) -> StartServer:
    """Start a sharechat app on the test's backends, with settings overridden."""

    async def start(**overrides: Any) -> TestClient[Any, Any]:
        config = dataclasses.replace(backend_config, **overrides)
        client: TestClient[Any, Any] = await aiohttp_client(create_app(config))
        return client

    return start


@pytest.fixture
async def client(start_server: StartServer) -> TestClient[Any, Any]:
    return await start_server()


class Chat:
    """A tiny driver for the common steps: make a room, join it."""

    def __init__(self, client: TestClient[Any, Any]) -> None:
        self.client = client

    async def room(self) -> str:
        response = await self.client.post("/api/room")
        assert response.status == 200
        room_id: str = (await response.json())["roomId"]
        return room_id

    async def join(
        self, room_id: str, **kwargs: Any
    ) -> tuple[aiohttp.ClientWebSocketResponse, dict[str, Any]]:
        ws = await self.client.ws_connect(f"/api/serve/{room_id}", **kwargs)
        joined = await receive_json(ws)
        assert joined["type"] == "joined"
        return ws, joined

    async def history(self, room_id: str, query: str = "") -> list[dict[str, Any]]:
        response = await self.client.get(f"/api/room/{room_id}/messages{query}")
        assert response.status == 200, await response.text()
        messages: list[dict[str, Any]] = await response.json()
        return messages

    async def members(self, room_id: str) -> list[dict[str, str]]:
        response = await self.client.get(f"/api/room/{room_id}")
        assert response.status == 200
        members: list[dict[str, str]] = (await response.json())["members"]
        return members


@pytest.fixture
def chat(client: TestClient[Any, Any]) -> Chat:
    return Chat(client)
