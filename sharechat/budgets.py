"""Budgets per client address and per instance: what one anonymous client may take.

Nobody logs in, so the client address is the only handle on "one client". Every
budget here is counted per instance, refuses with a BudgetExceeded that the web
layer turns into 429 (the client's own budget) or 503 (the instance is full),
and logs through a RefusalLog. Each is off when its setting is 0.

IPv6 clients are counted per /64: one subscriber line gets a whole /64, and
counting single addresses would give it 2**64 budgets.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import resource
import time
from collections.abc import Iterator
from typing import Any
from uuid import UUID

from sharechat.config import Config
from sharechat.domain import SharechatError
from sharechat.refusals import RefusalLog

log = logging.getLogger(__name__)

# File descriptors kept for what is not a websocket: the listening socket, the
# PostgreSQL pool, Redis, HTTP requests, the static files being served.
RESERVED_DESCRIPTORS = 200
# Full buckets are forgotten (a new one starts full as well) once this many
# addresses are tracked, so a scan of many addresses cannot grow memory for good.
PRUNE_AT = 10_000


class BudgetExceeded(SharechatError):
    """A refusal: `per_client` for the client's own budget (429), else the instance's (503)."""

    def __init__(self, kind: str, reason: str, *, per_client: bool, retry_after: float = 1.0):
        super().__init__(reason)
        self.kind = kind
        self.reason = reason
        self.per_client = per_client
        self.retry_after = retry_after


class RateLimiter:
    """A token bucket: `burst` at once, `rate` a second sustained; rate 0 = no limit."""

    __slots__ = ("_burst", "_rate", "_tokens", "_updated")

    def __init__(self, rate: float, burst: int) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._updated = time.monotonic()

    def allow(self) -> bool:
        if not self._rate:
            return True
        now = time.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._updated) * self._rate)
        self._updated = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    def full(self) -> bool:
        """True when the bucket has refilled: forgetting it would change nothing."""
        elapsed = time.monotonic() - self._updated
        return not self._rate or self._tokens + elapsed * self._rate >= self._burst

    def wait(self) -> float:
        """Seconds until the next token."""
        return 0.0 if not self._rate else max(0.0, (1 - self._tokens) / self._rate)


def client_key(address: str | None) -> str:
    """What a budget counts: the address, or its /64 for IPv6."""
    if not address:
        return "unknown"
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return address  # a unix socket path, say: one key like any other
    if isinstance(parsed, ipaddress.IPv6Address):
        if parsed.ipv4_mapped is not None:
            return str(parsed.ipv4_mapped)
        return str(ipaddress.IPv6Network((parsed, 64), strict=False))
    return str(parsed)


class _Buckets:
    """One token bucket per client, kept until it has refilled (reconnecting or
    leaving never refills a budget early)."""

    def __init__(self, rate: float, burst: int) -> None:
        self._rate = rate
        self._burst = burst
        self._buckets: dict[str, RateLimiter] = {}

    def of(self, key: str) -> RateLimiter:
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= PRUNE_AT:
                self._buckets = {k: b for k, b in self._buckets.items() if not b.full()}
            bucket = self._buckets[key] = RateLimiter(self._rate, self._burst)
        return bucket


class Budgets:
    """The budgets of one instance: connections, joins and messages, rooms created."""

    def __init__(self, config: Config, refusals: RefusalLog) -> None:
        self._refusals = refusals
        self._per_address = config.ip_connection_limit
        self._per_instance = connection_ceiling(config.max_connections)
        self._per_room = config.room_member_limit
        self._open: dict[str, int] = {}  # client -> websockets open
        self._open_total = 0
        self._in_room: dict[UUID, int] = {}  # room -> websockets open here
        self._speech = _Buckets(config.ip_rate_limit, config.rate_burst)
        self._rooms = _Buckets(config.room_create_limit, config.room_create_burst)

    @property
    def open_connections(self) -> int:
        """Websockets open on this instance."""
        return self._open_total

    def create_room(self, address: str | None) -> None:
        """Spend one room creation of the client; raises BudgetExceeded."""
        key = client_key(address)
        bucket = self._rooms.of(key)
        if not bucket.allow():
            self._refuse("room-create", key, "too many rooms created, try again later",
                         per_client=True, retry_after=bucket.wait())

    @contextlib.contextmanager
    def connection(self, address: str | None, room_id: UUID) -> Iterator[RateLimiter]:
        """Hold one websocket of the client in the room while inside; yields the client's
        budget for chat messages, of which the join itself spends one.

        Raises BudgetExceeded before counting anything when a budget is spent.
        """
        key = client_key(address)
        speech = self._speech.of(key)
        self._admit(key, room_id)
        if not speech.allow():
            self._refuse("ip-rate", key, "too many joins and messages, slow down",
                         per_client=True, retry_after=speech.wait())
        self._open[key] = self._open.get(key, 0) + 1
        self._in_room[room_id] = self._in_room.get(room_id, 0) + 1
        self._open_total += 1
        try:
            yield speech
        finally:
            self._open_total -= 1
            _decrement(self._open, key)
            _decrement(self._in_room, room_id)

    def _admit(self, key: str, room_id: UUID) -> None:
        if self._per_address and self._open.get(key, 0) >= self._per_address:
            self._refuse("ip-connections", key, "too many connections from your address",
                         per_client=True, retry_after=5.0)
        if self._per_instance and self._open_total >= self._per_instance:
            self._refuse("connections", key, "server is full, try again later",
                         per_client=False, retry_after=5.0)
        if self._per_room and self._in_room.get(room_id, 0) >= self._per_room:
            self._refuse("room-members", key, "room is full on this server, try again later",
                         per_client=False, retry_after=5.0)

    def _refuse(
        self, kind: str, key: str, reason: str, *, per_client: bool, retry_after: float
    ) -> None:
        self._refusals.refused(kind, f"client {key!r}")
        raise BudgetExceeded(kind, reason, per_client=per_client, retry_after=retry_after)


def _decrement(counts: dict[Any, int], key: Any) -> None:
    left = counts[key] - 1
    if left:
        counts[key] = left
    else:
        del counts[key]


def raise_descriptor_limit() -> None:
    """Raise the soft limit on open files to the hard one: every websocket is a file."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def connection_ceiling(configured: int) -> int:
    """`configured` websockets, but never more than the open-file limit leaves room for."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return configured
    allowed = max(1, soft - RESERVED_DESCRIPTORS)
    if configured and configured <= allowed:
        return configured
    log.warning(
        "max connections %s lowered to %d: the open-file limit is %d",
        configured or "unlimited", allowed, soft,
    )
    return allowed
