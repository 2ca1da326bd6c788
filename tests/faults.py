"""Fault injection for delivery tests: a TCP proxy to break, a cluster wired through
proxies, and a `Scenario` that keeps rooms busy across a fault and then checks what
every socket received against the history.

The cluster (fault_cluster()): two `sharechat serve` instances; one PostgreSQL (a
throwaway database on the machine's server) behind one TcpProxy; a redis-server of
the test's own behind one TcpProxy per instance, so one instance's Redis link can
break while the other's holds.

A Scenario plays the clients: members on every instance in a few rooms, each
sending steadily, each a `Chain` (one logical socket: when the server closes it,
or its instance dies, it reconnects with `?after=<last message it saw>` as a
real client does, and the segments count as one socket that stayed open). Every
frame and every send is logged with its time; finish() stops the traffic, waits
(deadlines, never fixed sleeps) for the answers and for an end marker per room,
reads the history, and check() lists every violation of the contract (the
README's "What the server does" 3, 5, 6, 9 and "Resuming") by kind, the first
few of each, with a summary of the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import random
import socket
import struct
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from uuid import uuid4

import aiohttp

from tests.helpers import WAIT
from tests.pg_support import temporary_database
from tests.redis_support import RedisServer
from tests.servers import MANY_CLIENTS_FROM_ONE_ADDRESS, Server, create_room, running_servers_each

FAULT = 3.0  # seconds each fault lasts: the length of the outage is the behaviour under test
RECOVERY = 10.0  # seconds of traffic after a fault; chat must flow again within them
RATE = 10.0  # chat messages a second per member, steady
ANSWER_WAIT = 10.0  # seconds the finish waits for outstanding answers, then for the end markers
RECONNECT_WAIT = 20.0  # seconds a chain keeps trying to reconnect before it gives up
BACKOFF_MIN, BACKOFF_MAX = 0.05, 1.0  # a reconnecting client's pause, doubling
FIRST_FEW = 5  # violations of each kind shown in a failure message
# Short enough for the tests, longer than a fault: a 3 s outage must not make an instance
# look dead (its lease unrenewed) to the other.
INSTANCE_FLAGS = ("--instance-lease", "6", "--backend-timeout", "2")


def now() -> float:
    return asyncio.get_running_loop().time()


async def until(check: Callable[[], bool], wait: float) -> bool:
    """Poll `check` until it holds (True) or `wait` seconds pass (False)."""
    deadline = now() + wait
    while not check():
        if now() >= deadline:
            return False
        await asyncio.sleep(0.02)
    return True


# -- the proxy -----------------------------------------------------------------------

CHUNK = 65536  # bytes a pump holds at most: frozen bytes wait in the kernel beyond that


class _Link:
    """One proxied connection: the client's socket, the upstream one, a pump each way."""

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.pumps: list[asyncio.Task[None]] = []

    def close(self) -> None:
        for writer in (self.client, self.upstream):
            if writer is not None and not writer.is_closing():
                writer.close()

    def reset(self) -> None:
        """Abort both sockets with a RST, as a dropped route or a killed peer does."""
        for writer in (self.client, self.upstream):
            if writer is None:
                continue
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        for pump in self.pumps:
            pump.cancel()


class TcpProxy:
    """A TCP proxy on 127.0.0.1 to one upstream port, which a test breaks on purpose.

    - cut(): resets every open connection (both sides see ECONNRESET);
    - refuse() / listen(): stops / starts listening, so new connections are refused;
      outage() does both for a `with` block;
    - freeze() / thaw(): holds every byte both ways, connections open (new ones are
      accepted and held as well), then lets them through in order; frozen() for a block.

    Buffers are bounded: a pump holds at most one CHUNK, the rest stays in the kernel
    and then with the sender, as with a real stalled route.
    """

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self._upstream = (upstream_host, upstream_port)
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self.port = 0
        self.accepted = 0  # connections accepted so far
        self.cuts = 0  # connections reset by cut()

    async def __aenter__(self) -> TcpProxy:
        await self.listen()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def open_connections(self) -> int:
        return len(self._links)

    async def listen(self) -> None:
        """Accept connections (again, on the same port)."""
        if self._server is None:
            self._server = await asyncio.start_server(
                self._accept, "127.0.0.1", self.port, reuse_address=True
            )
            self.port = self._server.sockets[0].getsockname()[1]

    def refuse(self) -> None:
        """Stop listening: new connections are refused (ECONNREFUSED); open ones stay."""
        if self._server is not None:
            # Not wait_closed(): on 3.11 it waits for the open connections too.
            self._server.close()
            self._server = None

    def cut(self) -> int:
        """Reset every open connection; return how many there were."""
        links = list(self._links)
        for link in links:
            link.reset()
        self.cuts += len(links)
        return len(links)

    @contextlib.asynccontextmanager
    async def outage(self) -> AsyncIterator[int]:
        """Unreachable inside the block: open connections reset, new ones refused.
        Yields how many connections were cut."""
        self.refuse()
        try:
            yield self.cut()
        finally:
            await self.listen()

    def freeze(self) -> None:
        self._flowing.clear()

    def thaw(self) -> None:
        self._flowing.set()

    @contextlib.contextmanager
    def frozen(self) -> Iterator[int]:
        """Every byte held inside the block, both ways; yields the connections held."""
        self.freeze()
        try:
            yield len(self._links)
        finally:
            self.thaw()

    async def close(self) -> None:
        self.refuse()
        self.thaw()
        for link in list(self._links):
            link.reset()
        # Not cancelled: asyncio logs a connection handler that ends cancelled as an error.
        if self._handlers:
            await asyncio.wait(list(self._handlers), timeout=WAIT)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        link = _Link(writer)
        self._links.add(link)
        try:
            try:
                async with asyncio.timeout(WAIT):
                    up_reader, link.upstream = await asyncio.open_connection(*self._upstream)
            except (OSError, TimeoutError):
                link.reset()  # upstream down: the client sees its connection reset
                return
            link.pumps = [
                asyncio.create_task(self._pump(reader, link.upstream, link)),
                asyncio.create_task(self._pump(up_reader, writer, link)),
            ]
            await asyncio.gather(*link.pumps, return_exceptions=True)
        finally:
            self._links.discard(link)
            link.close()
            self._handlers.discard(task)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: _Link
    ) -> None:
        try:
            while True:
                await self._flowing.wait()  # frozen: read nothing more
                data = await reader.read(CHUNK)
                if not data:
                    break
                await self._flowing.wait()  # frozen: hold what was read
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            link.close()  # either side gone: the whole connection goes


# -- the cluster -----------------------------------------------------------------------


def with_port(dsn: str, port: int) -> str:
    """The same DSN, pointed at 127.0.0.1:`port` (a proxy)."""
    parts = urlsplit(dsn)
    user = parts.netloc.rpartition("@")[0]
    netloc = f"{user}@127.0.0.1:{port}" if user else f"127.0.0.1:{port}"
    return parts._replace(netloc=netloc).geturl()


@dataclass
class FaultCluster:
    servers: list[Server]
    redis: RedisServer
    redis_proxies: list[TcpProxy]  # one per instance, in the order of `servers`
    postgres_proxy: TcpProxy


@contextlib.asynccontextmanager
async def fault_cluster(
    workdir: Path, instances: int = 2, *flags: str, env: Mapping[str, str] | None = None
) -> AsyncIterator[FaultCluster]:
    """`instances` sharechat processes on one PostgreSQL database behind one proxy, and a
    redis-server of their own behind one proxy per instance; everything torn down after."""
    redis = RedisServer(workdir / "redis")
    await asyncio.to_thread(redis.start)
    try:
        async with (
            temporary_database(migrated=False) as database_url,
            TcpProxy(urlsplit(database_url).port or 5432) as postgres_proxy,
            contextlib.AsyncExitStack() as stack,
        ):
            redis_proxies = [
                await stack.enter_async_context(TcpProxy(redis.port)) for _ in range(instances)
            ]
            common = {
                "DATABASE_URL": with_port(database_url, postgres_proxy.port),
                "SHARECHAT_REDIS_PREFIX": f"sharechat-faults-{uuid4().hex[:12]}:",
                "SHARECHAT_RATE_LIMIT": "0",
                **MANY_CLIENTS_FROM_ONE_ADDRESS,
                **(env or {}),
            }
            envs = [
                {**common, "REDIS_URL": f"redis://127.0.0.1:{proxy.port}/0"}
                for proxy in redis_proxies
            ]
            async with running_servers_each(envs, *INSTANCE_FLAGS, *flags) as servers:
                yield FaultCluster(servers, redis, redis_proxies, postgres_proxy)
    finally:
        await asyncio.to_thread(redis.kill)


# -- what the clients saw -------------------------------------------------------------


@dataclass(eq=False)
class Frame:
    at: float
    body: dict[str, Any]


@dataclass(eq=False)
class Segment:
    """One websocket of a Chain, from its upgrade to its close."""

    number: int
    cursor: str | None  # the ?after= it was opened with
    opened_at: float
    ws: aiohttp.ClientWebSocketResponse
    frames: list[Frame] = field(default_factory=list)
    sent: list[Sent] = field(default_factory=list)
    failed: int = 0  # `failed` frames received
    closed_at: float | None = None
    close_code: int | None = None
    closed_by_test: bool = False
    member_id: str | None = None  # from its first `joined`, or from an echo after a resume
    member_name: str | None = None


@dataclass(eq=False)
class Sent:
    text: str
    at: float
    segment: Segment
    echo: Frame | None = None  # the chat frame with this text, on any segment of the chain


class Chain:
    """One member as a reconnecting client sees it: a logical socket made of segments.

    When its websocket closes for any reason but the test's, it reconnects to the same
    instance with `?after=<the last message it received>` (retrying, with backoff,
    while the instance is down), and the segments count as one socket.
    """

    def __init__(
        self,
        scenario: Scenario,
        name: str,
        room: str,
        server: int,
        after: str | None = None,
    ) -> None:
        self.scenario = scenario
        self.name = name
        self.room = room
        self.server = server  # an index into the cluster's servers
        self.after = after  # a resumer's first cursor; None: a new member
        self.segments: list[Segment] = []
        self.counts: Counter[str] = Counter()  # message id -> times received
        self.arrivals: dict[str, float] = {}  # message id -> first arrival
        self.texts: dict[str, str] = {}  # chat text -> message id, as received
        self.sent: dict[str, Sent] = {}  # text -> the send
        self.last_id: str | None = after  # the cursor to resume from
        self.start_id: str | None = None  # a new member's own first `joined`
        self.gave_up = False
        self.joined = asyncio.Event()  # its first frame arrived
        self._numbers = itertools.count()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    def __str__(self) -> str:
        return self.name

    @property
    def current(self) -> Segment | None:
        """The open segment, if any."""
        if self.segments and self.segments[-1].closed_at is None:
            return self.segments[-1]
        return None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"chain {self.name}")

    async def stop(self) -> None:
        self._stopping = True
        segment = self.current
        if segment is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await segment.ws.close()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if segment is not None and not segment.ws.closed:
            await segment.ws.close()

    async def send(self, text: str | None = None) -> Sent | None:
        """Send a chat message (unique text) on the open segment; None if there is none."""
        segment = self.current
        if segment is None:
            return None
        text = text or f"{self.name}.{next(self._numbers)}"
        sent = Sent(text, now(), segment)
        self.sent[text] = sent  # before sending: the echo may come while send_str waits
        segment.sent.append(sent)
        try:
            await segment.ws.send_str(text)
        except (ConnectionError, RuntimeError):  # closing: it was never sent
            del self.sent[text]
            segment.sent.remove(sent)
            return None
        self.scenario.sends += 1
        return sent

    async def _run(self) -> None:
        cursor = self.after
        failing_since: float | None = None
        delay = BACKOFF_MIN
        while not self._stopping:
            ws = await self._connect(cursor)
            if ws is None:
                cursor = self.last_id  # None after a refused resume
                if self.gave_up:
                    return
                failing_since = failing_since or now()
                if now() - failing_since > RECONNECT_WAIT:
                    self.scenario.violation(
                        "could not reconnect", f"{self}: for {RECONNECT_WAIT:.0f} s"
                    )
                    self.gave_up = True
                    return
            else:
                failing_since = None
                received = await self._read(ws, cursor)
                if self._stopping:
                    return
                cursor = self.last_id
                if received:
                    delay = BACKOFF_MIN
            await asyncio.sleep(random.uniform(delay / 2, delay))  # a client's backoff
            delay = min(delay * 2, BACKOFF_MAX)

    async def _connect(self, cursor: str | None) -> aiohttp.ClientWebSocketResponse | None:
        server = self.scenario.cluster.servers[self.server]
        url = f"{server.url}/api/serve/{self.room}"
        if cursor is not None:
            url += f"?after={cursor}"
        try:
            async with asyncio.timeout(WAIT):
                return await self.scenario.http.ws_connect(url)
        except aiohttp.WSServerHandshakeError as error:
            if error.status == 400 and cursor is not None:
                self.scenario.violation(
                    "resume refused", f"{self}: ?after={cursor} answered 400 ({error.message})"
                )
                self.last_id = None  # carries on as a new member; the gap check counts the loss
            elif error.status == 404:
                self.scenario.violation("resume refused", f"{self}: room gone (404)")
                self.gave_up = True
        except (aiohttp.ClientError, OSError, TimeoutError):
            pass  # the instance is down or refusing for now
        return None

    async def _read(self, ws: aiohttp.ClientWebSocketResponse, cursor: str | None) -> bool:
        """Log every frame until the socket closes; True if any arrived."""
        segment = Segment(len(self.segments), cursor, now(), ws)
        self.segments.append(segment)
        try:
            async for message in ws:
                if message.type is not aiohttp.WSMsgType.TEXT:
                    if message.type is not aiohttp.WSMsgType.ERROR:
                        self.scenario.violation("harness", f"{self}: a {message.type.name} frame")
                    break
                try:
                    body = json.loads(message.data)
                except ValueError:
                    self.scenario.violation("harness", f"{self}: not JSON: {message.data[:80]!r}")
                    continue
                self._received(segment, body)
        finally:
            segment.closed_at = now()
            segment.close_code = ws.close_code
            segment.closed_by_test = self._stopping
            if not self._stopping:
                self.scenario.server_closes.append((self.name, segment.number, ws.close_code))
        return bool(segment.frames)

    def _received(self, segment: Segment, body: dict[str, Any]) -> None:
        if not self.scenario.recording:
            return
        at = now()
        first_of_chain = not self.joined.is_set()
        segment.frames.append(Frame(at, body))
        if body.get("type") == "failed":
            segment.failed += 1
            return
        message_id = body["id"]
        if first_of_chain and self.after is None:
            if body.get("type") != "joined":
                self.scenario.violation(
                    "harness", f"{self}: its first frame is not its joined: {describe(body)}"
                )
            self.start_id = message_id
        if segment.cursor is None and len(segment.frames) == 1 and body.get("type") == "joined":
            segment.member_id = body["memberId"]  # a new member's first frame: its own
            segment.member_name = body["memberName"]
        self.counts[message_id] += 1
        self.arrivals.setdefault(message_id, at)
        self.last_id = message_id
        if body.get("type") == "chat":
            self.texts.setdefault(body["message"], message_id)
            sent = self.sent.get(body["message"])
            if sent is not None and sent.echo is None:
                sent.echo = Frame(at, body)
                if sent.segment.member_id is None:
                    sent.segment.member_id = body["memberId"]
                    sent.segment.member_name = body["memberName"]
        self.joined.set()


def describe(message: Mapping[str, Any]) -> str:
    text = str(message.get("message", ""))[:40]
    name, message_id = message.get("memberName"), message.get("id")
    return f"{message.get('type')} {text!r} by {name} ({message_id})"


# -- the scenario ----------------------------------------------------------------------


class Violations:
    def __init__(self) -> None:
        self.kinds: dict[str, list[str]] = {}

    def add(self, kind: str, detail: str) -> None:
        self.kinds.setdefault(kind, []).append(detail)

    def __bool__(self) -> bool:
        return bool(self.kinds)

    def render(self) -> str:
        lines = []
        for kind, details in self.kinds.items():
            lines.append(f"{kind}: {len(details)}")
            lines += [f"    {detail}" for detail in details[:FIRST_FEW]]
            if len(details) > FIRST_FEW:
                lines.append(f"    ... and {len(details) - FIRST_FEW} more")
        return "\n".join(lines)


@dataclass
class Report:
    name: str
    violations: Violations
    summary: str

    def check(self) -> None:
        assert not self.violations, (
            f"{self.name}: the contract is broken\n{self.violations.render()}\n\n{self.summary}"
        )


class Scenario:
    """Members of `rooms` rooms, `per_instance` of them on each instance in each room.

    start() joins them (one at a time, each seen by all before the next), then tests drive
    the traffic: start_senders(), burst(), resume(); finish() returns the Report.
    """

    def __init__(
        self,
        cluster: FaultCluster,
        http: aiohttp.ClientSession,
        name: str,
        *,
        rooms: int = 2,
        per_instance: int = 2,
    ) -> None:
        self.cluster = cluster
        self.http = http
        self.name = name
        self.room_count = rooms
        self.per_instance = per_instance
        self.rooms: list[str] = []
        self.chains: list[Chain] = []
        self.started_at = 0.0
        self.fault_started: float | None = None
        self.fault_ended: float | None = None
        self.ended_at: float | None = None  # when the history was read
        # Off once the history is read: what arrives after (the `left` of each socket
        # closed before another) cannot be checked against it.
        self.recording = True
        self.sends = 0
        self.server_closes: list[tuple[str, int, int | None]] = []
        self.markers: dict[str, str] = {}  # room -> the id of its end marker
        self._violations = Violations()
        self._stop_senders = asyncio.Event()
        self._senders: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Scenario:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop every sender and close every socket (finish() does it too)."""
        self._stop_senders.set()
        await asyncio.gather(*self._senders, return_exceptions=True)
        for chain in self.chains:
            await chain.stop()

    def violation(self, kind: str, detail: str) -> None:
        self._violations.add(kind, detail)

    def since_start(self, at: float | None) -> str:
        return "-" if at is None else f"{at - self.started_at:.1f}s"

    # -- setting up -------------------------------------------------------------------

    async def start(self) -> None:
        self.started_at = now()
        for number in range(self.room_count):
            room = await create_room(self.http, self.cluster.servers[0])
            self.rooms.append(room)
            for member in range(self.per_instance):
                for server in range(len(self.cluster.servers)):
                    await self._join(Chain(self, f"r{number}.i{server}.m{member}", room, server))

    async def _join(self, chain: Chain) -> None:
        """Start `chain`; return once every member of its room has seen its joined."""
        others = [other for other in self.chains if other.room == chain.room]
        self.chains.append(chain)
        chain.start()
        async with asyncio.timeout(WAIT):
            await chain.joined.wait()
        joined = chain.start_id
        assert joined is not None, f"{chain}: no joined"
        assert await until(lambda: all(joined in other.counts for other in others), WAIT), (
            f"{chain} joined, not seen by all of {[str(other) for other in others]}"
        )

    def resume(self, room: str, server: int, after: str) -> Chain:
        """A client that connects with ?after=`after` now (it does not send)."""
        number = sum(1 for chain in self.chains if chain.after is not None)
        chain = Chain(self, f"resumer{number}.i{server}", room, server, after)
        self.chains.append(chain)
        chain.start()
        return chain

    # -- traffic ----------------------------------------------------------------------

    def start_senders(self, rate: float = RATE) -> None:
        """Every member sends `rate` messages a second until finish(), while connected."""
        for chain in self.chains:
            if chain.after is None:
                self._senders.append(asyncio.create_task(self._steadily(chain, rate)))

    async def _steadily(self, chain: Chain, rate: float) -> None:
        interval = 1 / rate
        due = now() + random.uniform(0, interval)
        while not self._stop_senders.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, due - now())):  # pacing, not a wait
                    await self._stop_senders.wait()
                    return
            await chain.send()
            due = max(due + interval, now() - interval)  # after a pause: no catching up

    async def burst(self, count: int, stop: asyncio.Event | None = None) -> None:
        """Every member sends up to `count` messages back to back, all at once, until
        `stop` is set: as fast as the sockets take them, hundreds in flight."""

        async def one(chain: Chain) -> None:
            for _ in range(count):
                if stop is not None and stop.is_set():
                    return
                await chain.send()
                await asyncio.sleep(0)  # the readers keep up

        await asyncio.gather(*(one(chain) for chain in self.chains if chain.after is None))

    def acked(self, chain: Chain) -> int:
        return sum(1 for sent in chain.sent.values() if sent.echo is not None)

    async def warm_up(self, echoes: int = 10) -> None:
        """Return once every member's messages are being echoed."""
        senders = [chain for chain in self.chains if chain.after is None]
        assert await until(lambda: all(self.acked(c) >= echoes for c in senders), WAIT), (
            f"no traffic before the fault: {[(str(c), self.acked(c)) for c in senders]}"
        )

    @contextlib.asynccontextmanager
    async def fault(self) -> AsyncIterator[None]:
        """Marks the fault's start and end (the block does the harm)."""
        self.fault_started = now()
        try:
            yield
        finally:
            self.fault_ended = now()

    async def recover(self) -> None:
        """Traffic goes on for RECOVERY seconds after the fault: the window under test."""
        assert self.fault_ended is not None
        await asyncio.sleep(max(0.0, self.fault_ended + RECOVERY - now()))

    # -- the end ---------------------------------------------------------------------------

    def alive(self, room: str | None = None) -> list[Chain]:
        return [
            chain
            for chain in self.chains
            if chain.current is not None and (room is None or chain.room == room)
        ]

    def _answered(self) -> bool:
        """Every open socket has had an answer (echo or failed) to each of its sends."""
        for chain in self.alive():
            segment = chain.current
            assert segment is not None
            if sum(1 for sent in segment.sent if sent.echo is None) > segment.failed:
                return False
        return True

    async def _end_marker(self, room: str, deadline: float) -> None:
        """A last message, retried until one is stored; wait until every open socket of
        the room has it. It bounds the gap check: all before it must have arrived."""
        attempt = 0
        while now() < deadline:
            senders = [chain for chain in self.alive(room) if chain.after is None]
            if not senders:
                await asyncio.sleep(0.1)  # all reconnecting: wait for one
                continue
            sent = await senders[0].send(f"end of {room} #{attempt}")
            attempt += 1
            if sent is None:
                await asyncio.sleep(0.1)  # it is closing: wait for the next socket
                continue
            marker = await self._answer(sent, min(WAIT, deadline - now()))
            if marker is not None:
                self.markers[room] = marker
                everyone = functools.partial(self._everyone_has, room, marker)
                await until(everyone, max(0.0, deadline - now()))
                return
        self.violation("chat not flowing", f"room {room}: no end marker stored by the end")

    def _everyone_has(self, room: str, message_id: str) -> bool:
        return all(message_id in chain.counts for chain in self.alive(room))

    @staticmethod
    async def _answer(sent: Sent, wait: float) -> str | None:
        """The id of its echo, or None once a `failed` came (or nothing did)."""
        segment, failed = sent.segment, sent.segment.failed
        await until(lambda: sent.echo is not None or segment.failed > failed, wait)
        return None if sent.echo is None else str(sent.echo.body["id"])

    async def finish(self) -> Report:
        """Stop the traffic, wait for answers and end markers, read the history, check."""
        self._stop_senders.set()
        await asyncio.gather(*self._senders)
        stopped = now()
        await until(self._answered, ANSWER_WAIT)
        deadline = now() + ANSWER_WAIT
        for room in self.rooms:
            await self._end_marker(room, deadline)
        self.ended_at = now()
        histories = {room: await self._history(room) for room in self.rooms}
        self.recording = False
        alive = set(self.alive())
        await self.close()
        self._check(histories, alive)
        return Report(self.name, self._violations, self._summary(histories, alive, stopped))

    async def _history(self, room: str) -> list[dict[str, Any]]:
        """The room's whole history: the first member's joined, then forward pages."""
        first = next(chain for chain in self.chains if chain.room == room)
        anchor = first.start_id
        assert anchor is not None
        pages: list[dict[str, Any]] = []
        cursor = anchor
        while True:
            page = await self._get(room, f"?after={cursor}")
            pages += page
            if len(page) < 1000:
                break
            cursor = page[-1]["id"]
        if not pages:
            return await self._get(room, "")
        head = await self._get(room, f"?before={pages[0]['id']}&limit=1")
        if [message["id"] for message in head] != [anchor]:
            self.violation("harness", f"room {room}: history does not start at its first joined")
        return head + pages

    async def _get(self, room: str, query: str) -> list[dict[str, Any]]:
        """A history page from the first live instance, retried for a while."""
        deadline = now() + 2 * WAIT
        while True:
            for server in self.cluster.servers:
                if server.process.returncode is not None:
                    continue
                url = f"{server.url}/api/room/{room}/messages{query}"
                with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                    async with asyncio.timeout(WAIT), self.http.get(url) as response:
                        if response.status == 200:
                            page: list[dict[str, Any]] = await response.json()
                            return page
                        error = f"{response.status} {await response.text()}"
                        assert response.status >= 500, f"{url}: {error}"
            assert now() < deadline, f"history of room {room} unreadable"
            await asyncio.sleep(0.1)

    # -- the invariants ------------------------------------------------------------------

    def _check(self, histories: dict[str, list[dict[str, Any]]], alive: set[Chain]) -> None:
        for room, history in histories.items():
            index = {message["id"]: number for number, message in enumerate(history)}
            marker = self.markers.get(room)
            end = index.get(marker, len(history) - 1) if marker else len(history) - 1
            chains = [chain for chain in self.chains if chain.room == room]
            for chain in chains:
                self._check_chain(chain, history, index, end, chain in alive)
            self._check_lefts(chains, history, index, alive)
            self._check_flowing(room, chains, index, alive)

    def _check_chain(
        self,
        chain: Chain,
        history: list[dict[str, Any]],
        index: dict[str, int],
        end: int,
        alive: bool,
    ) -> None:
        def at(number: int) -> str:
            return f"#{number} {describe(history[number])}"

        frames = [
            frame
            for segment in chain.segments
            for frame in segment.frames
            if frame.body.get("type") != "failed"
        ]
        # Delivered, so in the history, field for field.
        for frame in frames:
            number = index.get(frame.body["id"])
            if number is None:
                self.violation("delivered but not in history", f"{chain}: {describe(frame.body)}")
            elif frame.body != history[number]:
                self.violation(
                    "delivered unlike its history entry",
                    f"{chain}: {frame.body} != {history[number]}",
                )
        # Each exactly once.
        for message_id, times in chain.counts.items():
            if times > 1:
                number = index.get(message_id)
                what = at(number) if number is not None else message_id
                self.violation("duplicates on a socket", f"{chain}: {times}x {what}")
        # In the history's order, and nothing from before its start.
        if chain.after is not None:
            start = index.get(chain.after, -2) + 1
        else:
            start = index.get(chain.start_id or "", -1)
        if start < 0:
            self.violation("harness", f"{chain}: its start is not in the history")
        previous = -1
        seen: set[str] = set()
        for frame in frames:
            message_id = frame.body["id"]
            number = index.get(message_id)
            if number is None or message_id in seen:
                continue
            seen.add(message_id)
            if 0 <= number < start:
                self.violation(
                    "older than its start",
                    f"{chain}: {at(number)} (its start is #{start})",
                )
            if number < previous:
                self.violation(
                    "out of history order", f"{chain}: {at(number)} after {at(previous)}"
                )
            previous = max(previous, number)
        # No gap: every message from its start to the end marker, if it stayed open.
        if not alive:
            if not chain.gave_up:
                self.violation("socket not open at the end", f"{chain}: reconnecting")
        elif start >= 0:
            missing = [n for n in range(start, end + 1) if history[n]["id"] not in chain.counts]
            if missing:
                first = ", ".join(at(n) for n in missing[:3])
                self.violation(
                    "missing from a socket that stayed open",
                    f"{chain}: {len(missing)} of #{start}..#{end}, first {first}",
                )
        # Acknowledged means stored; its own messages in the order sent.
        for segment in chain.segments:
            echoed = [sent for sent in segment.sent if sent.echo is not None]
            for sent in echoed:
                assert sent.echo is not None
                if sent.echo.body["id"] not in index:
                    self.violation("acknowledged but not in history", f"{chain}: {sent.text!r}")
            ids = [sent.echo.body["id"] for sent in echoed if sent.echo is not None]
            numbers = [index[message_id] for message_id in ids if message_id in index]
            for before, after in itertools.pairwise(numbers):
                if after < before:
                    self.violation(
                        "own messages out of send order",
                        f"{chain}: {at(after)} stored before #{before}, sent earlier",
                    )
                    break
            self._check_answers(chain, segment)

    def _check_answers(self, chain: Chain, segment: Segment) -> None:
        """Every send gets its echo or a `failed` while its socket is open.

        Plain framing: a `failed` names no message, so the sends without an echo must be
        as many as the `failed` frames; a socket closed by the server may lose answers.
        """
        unanswered = [sent for sent in segment.sent if sent.echo is None]
        open_to_the_end = segment.closed_at is None or segment.closed_by_test
        where = f"{chain} segment {segment.number}"
        if len(unanswered) > segment.failed and open_to_the_end:
            texts = ", ".join(repr(sent.text) for sent in unanswered[:3])
            self.violation(
                "sends without an answer",
                f"{where}: {len(unanswered)} without echo, {segment.failed} failed; "
                f"e.g. {texts} (sent at {self.since_start(unanswered[0].at)})",
            )
        elif len(unanswered) < segment.failed:
            self.violation(
                "more failed than unanswered sends",
                f"{where}: {segment.failed} failed for {len(unanswered)} sends without echo",
            )

    def _check_lefts(
        self,
        chains: list[Chain],
        history: list[dict[str, Any]],
        index: dict[str, int],
        alive: set[Chain],
    ) -> None:
        """No `left` while the member's socket is open: none stored or delivered for a
        member connected at the end, and nothing stored after its `left` reached it."""
        segments = {
            segment.member_id: (chain, segment)
            for chain in chains
            for segment in chain.segments
            if segment.member_id is not None
        }
        lefts = {message["id"]: message for message in history if message["type"] == "left"}
        for chain in chains:
            for segment in chain.segments:
                for frame in segment.frames:
                    if frame.body.get("type") == "left":
                        lefts.setdefault(frame.body["id"], frame.body)
        for left in lefts.values():
            if left["memberId"] not in segments:
                continue
            chain, segment = segments[left["memberId"]]
            number = index.get(left["id"])
            where = "#" + str(number) if number is not None else "(not in history)"
            if chain in alive and segment is chain.segments[-1]:
                self.violation(
                    "left for a member still connected",
                    f"{chain}: {where} {describe(left)}, connected at the end",
                )
                continue
            later = [
                index[frame.body["id"]]
                for frame in segment.frames
                if number is not None and index.get(frame.body.get("id", ""), -1) > number
            ]
            if later:
                self.violation(
                    "left for a member still connected",
                    f"{chain} segment {segment.number}: {where} {describe(left)}, "
                    f"then it received #{later[0]}",
                )

    def _check_flowing(
        self, room: str, chains: list[Chain], index: dict[str, int], alive: set[Chain]
    ) -> None:
        """Some message sent after the fault reached every open socket within RECOVERY."""
        if self.fault_ended is None:
            return
        receivers = [chain for chain in chains if chain in alive]
        best: float | None = None
        for chain in chains:
            for sent in chain.sent.values():
                if sent.at < self.fault_ended or sent.echo is None:
                    continue
                message_id = sent.echo.body["id"]
                if message_id not in index:
                    continue
                arrivals = [receiver.arrivals.get(message_id) for receiver in receivers]
                if all(arrival is not None for arrival in arrivals):
                    reached = max(arrival for arrival in arrivals if arrival is not None)
                    best = reached if best is None else min(best, reached)
        if best is None:
            self.violation(
                "chat not flowing", f"room {room}: no message sent after the fault reached all"
            )
        elif best - self.fault_ended > RECOVERY:
            self.violation(
                "chat not flowing",
                f"room {room}: first message to reach all took {best - self.fault_ended:.1f} s",
            )

    def _summary(
        self, histories: dict[str, list[dict[str, Any]]], alive: set[Chain], stopped: float
    ) -> str:
        echoed = sum(self.acked(chain) for chain in self.chains)
        failed = sum(segment.failed for chain in self.chains for segment in chain.segments)
        reconnects = sum(len(chain.segments) - 1 for chain in self.chains)
        closes = Counter(code for _, _, code in self.server_closes)
        fault = "no fault"
        if self.fault_started is not None:
            began, ended = self.since_start(self.fault_started), self.since_start(self.fault_ended)
            fault = f"fault {began}..{ended}"
        lines = [
            f"timeline: {fault}, senders stopped {self.since_start(stopped)},"
            f" history read {self.since_start(self.ended_at)}",
            f"sent {self.sends}, echoed {echoed}, failed {failed}; "
            f"sockets {len(self.chains)}, open at the end {len(alive)}, reconnects {reconnects}, "
            f"closed by the server (code: count) {dict(closes)}",
        ]
        for room, history in histories.items():
            kinds = Counter(message["type"] for message in history)
            lines.append(f"room {room}: history {len(history)} {dict(kinds)}")
        for chain in self.chains:
            members = ", ".join(
                f"{segment.member_name} ({segment.member_id}, closed {segment.close_code})"
                if segment.closed_at is not None and not segment.closed_by_test
                else f"{segment.member_name} ({segment.member_id})"
                for segment in chain.segments
            )
            lines.append(f"  {chain}: {members}")
        return "\n".join(lines)


async def run_fault(
    cluster: FaultCluster,
    http: aiohttp.ClientSession,
    name: str,
    fault: Callable[[], Awaitable[None]],
) -> Report:
    """The fault matrix's one scenario: 2 rooms, 2 members per instance per room, each
    sending RATE messages a second; `fault` runs once they chat; RECOVERY seconds of
    traffic after it; then the report."""
    async with Scenario(cluster, http, name) as scenario:
        await scenario.start()
        scenario.start_senders()
        await scenario.warm_up()
        async with scenario.fault():
            await fault()
        await scenario.recover()
        return await scenario.finish()
