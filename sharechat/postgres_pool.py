"""The aiopg pool as the PostgreSQL repository uses it: every call bounded by a
timeout, every driver error turned into BackendUnavailable (or InDoubt, when a
statement may have been applied), one log line when PostgreSQL goes away and
one when it is back, and the group commit's writer keeping its connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiopg
import psycopg2

from sharechat.domain import BackendUnavailable, InDoubt

log = logging.getLogger(__name__)

# What aiopg and psycopg2 raise when the server is away, slow or confused; callers
# see BackendUnavailable instead. Pool timeouts are TimeoutError. RuntimeError: on
# uvloop, a connection the server refused leaves a closed poll handle on its file
# descriptor, and the next connection given that descriptor fails in add_reader
# (aio-libs/aiopg#909). Caught only around the pool and the statements (Connections.cursor,
# postgres.open_postgres_repository), never around code of ours that could have a bug.
DRIVER_ERRORS = (psycopg2.Error, OSError, TimeoutError, RuntimeError)


class Connections:
    """The aiopg pool: each call bounded by `timeout`, every driver error turned into
    BackendUnavailable or InDoubt, one log line when PostgreSQL goes away and one when
    it is back."""

    def __init__(self, pool: aiopg.Pool, timeout: float) -> None:
        self.pool = pool
        self.timeout = timeout
        self._available = True
        self._kept: _Lease | None = None  # the writer's (see cursor)
        # A pool of one connection is everybody's: the writer keeps none of it.
        self._may_keep = (pool.maxsize or 0) > 1

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[aiopg.Cursor]:
        async with self.cursor() as cursor, cursor.begin():
            yield cursor

    @contextlib.asynccontextmanager
    async def cursor(
        self, within: float | None = None, *, kept: bool = False
    ) -> AsyncIterator[aiopg.Cursor]:
        """A cursor on a connection of the pool, given back when the block ends; with
        `kept`, for the group commit's one writer task, the connection and its cursor
        stay out of the pool between calls (no pool round trip a batch) until one
        fails or give_back() is called.

        Raises BackendUnavailable when the statements run on the cursor were not
        applied, InDoubt when they may have been: the connection broke or timed out
        after one was sent, and PostgreSQL may have committed it before that."""
        kept = kept and self._may_keep
        sent = False
        try:
            async with asyncio.timeout(within or self.timeout):
                lease = await (self._keep() if kept else self._lease())
                try:
                    sent = True
                    yield lease.cursor
                except (*DRIVER_ERRORS, asyncio.CancelledError):
                    # Its state is unknown now: closed, the pool drops it for a new one.
                    lease.connection.close()
                    raise
                finally:
                    if not kept or lease.connection.closed:
                        await self._give_back(lease)
        except DRIVER_ERRORS as error:
            self._lost(error)
            # An error PostgreSQL sent (it has a code) ended the transaction: rolled back.
            answered = isinstance(error, psycopg2.Error) and error.pgcode is not None
            unavailable = InDoubt if sent and not answered else BackendUnavailable
            raise unavailable(f"PostgreSQL: {reason(error)}") from error
        except asyncio.CancelledError:
            if _cancelled():
                raise
            # aiopg turns a statement the server cancelled (statement_timeout,
            # pg_cancel_backend) into CancelledError, though nobody cancelled us.
            raise BackendUnavailable("PostgreSQL: the statement was cancelled") from None
        self._back()

    async def give_back(self) -> None:
        """Return the kept connection to the pool (before the pool closes)."""
        if self._kept is not None:
            await self._give_back(self._kept)

    async def _keep(self) -> _Lease:
        kept = self._kept
        if kept is not None and kept.connection.closed:
            # The server closed it while it was idle (aiopg reads every connection all
            # the time): a new one, as the pool would hand out, not a statement in doubt.
            await self._give_back(kept)
            kept = None
        if kept is None:
            kept = self._kept = await self._lease()
        return kept

    async def _lease(self) -> _Lease:
        connection = await self.pool.acquire()
        try:
            return _Lease(connection, await connection.cursor())
        except BaseException:
            await self.pool.release(connection)
            raise

    async def _give_back(self, lease: _Lease) -> None:
        if self._kept is lease:
            self._kept = None
        lease.cursor.close()
        await self.pool.release(lease.connection)

    def _lost(self, error: BaseException) -> None:
        if self._available:
            log.warning("PostgreSQL unavailable: %s", reason(error))
        self._available = False

    def _back(self) -> None:
        if not self._available:
            log.info("PostgreSQL available again")
        self._available = True


@dataclass(frozen=True, slots=True)
class _Lease:
    """A connection taken from the pool, and a cursor on it."""

    connection: aiopg.Connection
    cursor: aiopg.Cursor


def _cancelled() -> bool:
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


def reason(error: BaseException) -> str:
    if isinstance(error, TimeoutError):
        return "timed out"
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
