"""One `client` built from the real factory, on every backend combination."""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from sharechat.app import create_app
from sharechat.config import Config
from tests.helpers import receive_json

BACKENDS = ["memory"]

StartServer = Callable[..., Awaitable[TestClient[Any, Any]]]


@pytest.fixture(params=BACKENDS)
def backend_config(request: pytest.FixtureRequest) -> Config:
    return Config(host="127.0.0.1", port=0)


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
