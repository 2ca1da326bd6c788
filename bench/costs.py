"""What PostgreSQL and Redis spent in the measured window: Redis CPU (`INFO cpu`, every
Redis or every master of a cluster), the cell database's commits
(`pg_stat_database.xact_commit`) and the WAL written (`pg_current_wal_lsn()`)."""

from __future__ import annotations

from contextlib import ExitStack, suppress
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import psycopg2
from redis import Redis, RedisCluster
from redis.exceptions import RedisError

from bench.backends import ADMIN_DSN


@dataclass(frozen=True)
class Counters:
    """One reading; None (or no CPU) where the cell has no such store or it did not answer."""

    redis_cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds per Redis node
    commits: int | None = None
    wal_lsn: str | None = None

    def __sub__(self, before: Counters) -> Spent:
        return Spent(
            redis_cpu_ms={
                node: (seconds - before.redis_cpu[node]) * 1000
                for node, seconds in self.redis_cpu.items()
                if node in before.redis_cpu
            },
            commits=None
            if self.commits is None or before.commits is None
            else self.commits - before.commits,
            wal_bytes=None
            if self.wal_lsn is None or before.wal_lsn is None
            else lsn_bytes(self.wal_lsn) - lsn_bytes(before.wal_lsn),
        )


@dataclass(frozen=True)
class Spent:
    """The difference of two readings."""

    redis_cpu_ms: dict[str, float] = field(default_factory=dict)  # per Redis node
    commits: int | None = None
    wal_bytes: int | None = None


def lsn_bytes(lsn: str) -> int:
    """A WAL position `X/Y` (two hex halves) as a byte offset, as pg_wal_lsn_diff counts."""
    high, low = lsn.split("/")
    return (int(high, 16) << 32) + int(low, 16)


class Probe:
    """Reads the counters of one cell's stores; connections are opened up front, so that
    a reading at the window's edge costs one round trip each."""

    def __init__(self, database_url: str | None, redis_url: str | None) -> None:
        self._stack = ExitStack()
        self.database = database_url.rsplit("/", 1)[1] if database_url else None
        self._pg = None
        if self.database:
            # The admin database, not the cell's: these reads must not count as its commits.
            self._pg = psycopg2.connect(ADMIN_DSN)
            self._pg.autocommit = True
            self._stack.callback(self._pg.close)
        self._redis = redis_nodes(redis_url, self._stack) if redis_url else {}

    def read(self) -> Counters:
        return Counters(self._redis_cpu(), *self._postgres())

    def close(self) -> None:
        self._stack.close()

    def _redis_cpu(self) -> dict[str, float]:
        seconds = {}
        for name, client in self._redis.items():
            with suppress(RedisError, OSError):  # a node that died: its row says why
                info = client.info("cpu")
                seconds[name] = float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
        return seconds

    def _postgres(self) -> tuple[int | None, str | None]:
        if self._pg is None:
            return None, None
        with self._pg.cursor() as cur:
            cur.execute(
                "SELECT xact_commit, pg_current_wal_lsn()::text"
                " FROM pg_stat_database WHERE datname = %s",
                (self.database,),
            )
            commits, lsn = cur.fetchone()
        return int(commits), str(lsn)


def redis_nodes(url: str, stack: ExitStack) -> dict[str, Redis]:
    """A client per Redis whose CPU the cell spends: the one Redis, or every master of the
    cluster that a `redis+cluster://` URL names one node of."""
    scheme = urlsplit(url).scheme
    if not scheme.endswith("+cluster"):
        client = stack.enter_context(Redis.from_url(url))
        where = client.connection_pool.connection_kwargs
        return {f"{where.get('host')}:{where.get('port')}": client}
    cluster = stack.enter_context(RedisCluster.from_url(url.replace("+cluster://", "://", 1)))
    return {node.name: cluster.get_redis_connection(node) for node in cluster.get_primaries()}
