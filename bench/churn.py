"""Churning clients: join, wait for the own `joined` frame, leave, again, until the window ends."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import orjson

from bench.plan import Tally, Window

JOIN_TIMEOUT = 10.0
ERROR_PAUSE = 0.01  # do not spin on a server that refuses connections


async def churn(session: aiohttp.ClientSession, url: str, window: Window, tally: Tally) -> None:
    while (start := time.monotonic_ns()) < window.end:
        try:
            joined = await join_and_leave(session, url)
        except (aiohttp.ClientError, ConnectionError, TimeoutError, ValueError):
            joined = 0
        if not joined:
            tally.errors += 1
            await asyncio.sleep(ERROR_PAUSE)
        elif start in window:
            tally.joins += 1
            tally.join_us.append((joined - start) // 1000)


async def join_and_leave(session: aiohttp.ClientSession, url: str) -> int:
    """Monotonic time at which the own `joined` frame arrived, 0 if another frame came first."""
    async with session.ws_connect(url) as ws:
        msg = await ws.receive(timeout=JOIN_TIMEOUT)
        arrived = time.monotonic_ns()
        if msg.type is not aiohttp.WSMsgType.TEXT or orjson.loads(msg.data)["type"] != "joined":
            return 0
    return arrived
