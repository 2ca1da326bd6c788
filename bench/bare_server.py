"""A bare aiohttp broadcast server with sharechat's protocol shape and no persistence.

It is the reference column of the benchmark: what aiohttp on uvloop itself costs,
with a per-member outbox and writer task so that a slow member never stalls the room.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime

import uvloop
from aiohttp import WSMsgType, web

OUTBOX_BOUND = 1024


@dataclass(eq=False)
class Member:
    id: str
    name: str
    ws: web.WebSocketResponse
    # Unbounded on purpose: broadcast() bounds it and still needs room for the close sentinel.
    outbox: asyncio.Queue[str | None] = field(default_factory=asyncio.Queue)


ROOMS = web.AppKey("rooms", dict[str, dict[str, Member]])


def frame(room_id: str, member: Member, kind: str, text: str) -> str:
    return json.dumps(
        {
            "id": str(uuid.uuid4()),
            "roomId": room_id,
            "memberId": member.id,
            "memberName": member.name,
            "type": kind,
            "message": text,
            "sent": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        }
    )


def broadcast(room: dict[str, Member], data: str) -> None:
    for peer in list(room.values()):
        if peer.outbox.qsize() < OUTBOX_BOUND:
            peer.outbox.put_nowait(data)
        else:  # too slow: its writer closes it, and it leaves the room now
            del room[peer.id]
            peer.outbox.put_nowait(None)


async def writer(member: Member) -> None:
    while (data := await member.outbox.get()) is not None:
        await member.ws.send_str(data)
    await member.ws.close(code=1008)


async def create_room(request: web.Request) -> web.Response:
    room_id = str(uuid.uuid4())
    request.app[ROOMS][room_id] = {}
    return web.json_response({"roomId": room_id, "roomName": "Bare Room"})


async def get_room(request: web.Request) -> web.Response:
    room = request.app[ROOMS].get(request.match_info["room_id"])
    if room is None:
        raise web.HTTPNotFound()
    members = [{"id": m.id, "name": m.name} for m in room.values()]
    return web.json_response({"roomId": request.match_info["room_id"], "members": members})


async def healthz(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "repository": "ok", "queue": "ok"})


async def serve(request: web.Request) -> web.WebSocketResponse:
    room_id = request.match_info["room_id"]
    room: dict[str, Member] | None = request.app[ROOMS].get(room_id)
    if room is None:
        raise web.HTTPNotFound()
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    member = Member(str(uuid.uuid4()), "Bare Member", ws)
    room[member.id] = member
    task = asyncio.create_task(writer(member))
    broadcast(room, frame(room_id, member, "joined", ""))
    try:
        async for msg in ws:
            if msg.type == WSMsgType.TEXT and msg.data.strip():
                broadcast(room, frame(room_id, member, "chat", msg.data))
    finally:
        room.pop(member.id, None)
        task.cancel()
        broadcast(room, frame(room_id, member, "left", ""))
    return ws


def create_app() -> web.Application:
    app = web.Application()
    app[ROOMS] = {}
    app.router.add_post("/api/room", create_room)
    app.router.add_get("/api/healthz", healthz)
    app.router.add_get("/api/room/{room_id}", get_room)
    app.router.add_get("/api/serve/{room_id}", serve)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()
    # The event loop sharechat serves on, so that the difference is sharechat's own.
    loop = uvloop.new_event_loop()
    web.run_app(create_app(), host=args.host, port=args.port, print=None, loop=loop)


if __name__ == "__main__":
    main()
