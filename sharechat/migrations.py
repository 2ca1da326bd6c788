"""Apply the SQL files of `sql/` in order, each exactly once, safely from many instances."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import aiopg
import psycopg2
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.schema import CreateTable

from sharechat.domain import BackendUnavailable

log = logging.getLogger(__name__)

# Any fixed number will do, as long as every instance uses the same one; advisory
# locks are per database, so other databases on the server do not collide with it.
_LOCK_KEY = 0x5368_6172_6563_6861  # "Sharecha"

# Long enough to wait for another instance's migration, short enough to give up on a dead host.
_TIMEOUT = 60.0

_dialect = postgresql.psycopg2.dialect()  # type: ignore[no-untyped-call]

_schema_migrations = sa.Table(
    "schema_migrations",
    sa.MetaData(),
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("applied", sa.DateTime(timezone=True), nullable=False),
)


def _sql(statement: sa.ClauseElement) -> str:
    return str(statement.compile(dialect=_dialect))


_CREATE_TABLE = _sql(CreateTable(_schema_migrations, if_not_exists=True))
# Held until the transaction ends: nothing outlives a transaction, so a pooler in
# transaction mode (PgBouncer) may run each one on another server connection.
_LOCK = _sql(sa.select(sa.func.pg_advisory_xact_lock(sa.bindparam("key", type_=sa.BigInteger))))
_APPLIED = _sql(sa.select(_schema_migrations.c.name))
_IS_APPLIED = _sql(
    sa.select(_schema_migrations.c.name).where(_schema_migrations.c.name == sa.bindparam("name"))
)
_RECORD = _sql(
    sa.insert(_schema_migrations).values(name=sa.bindparam("name"), applied=sa.func.now())
)


class MigrationError(Exception):
    """A SQL file failed; nothing of that file was applied."""


def default_sql_dir() -> Path:
    """`sql/` beside the package in a checkout, else where an installed wheel put it."""
    checkout = Path(__file__).resolve().parent.parent / "sql"
    if checkout.is_dir():
        return checkout
    return Path(sys.prefix) / "share" / "sharechat" / "sql"


async def migrate(dsn: str, sql_dir: Path | None = None) -> list[str]:
    """Apply the files not applied yet, in name order; return the names applied now.

    Each file runs in its own transaction and is recorded in `schema_migrations`
    in that same transaction, under a transaction-level advisory lock: of
    instances that start together, one applies the file and the others, once
    the lock is theirs, find it recorded.
    """
    files = _read_files(sql_dir or default_sql_dir())
    try:
        async with (
            aiopg.connect(dsn, timeout=_TIMEOUT, enable_hstore=False) as conn,
            conn.cursor() as cursor,
        ):
            return await _apply_missing(cursor, files)
    # RuntimeError: on uvloop a refused connection can leave a stale poll handle behind,
    # and the next connect raises it (see postgres._DRIVER_ERRORS).
    except (
        psycopg2.OperationalError, psycopg2.InterfaceError, OSError, TimeoutError, RuntimeError
    ) as error:
        raise BackendUnavailable(f"cannot migrate the database: {_reason(error)}") from error


def _read_files(sql_dir: Path) -> list[tuple[str, str]]:
    """(name, SQL) of every file, in the order to apply them; they are small."""
    files = [(path.name, path.read_text(encoding="utf-8")) for path in sql_dir.glob("*.sql")]
    if not files:
        raise MigrationError(f"no SQL files in {sql_dir}")
    return sorted(files)


async def _apply_missing(cursor: aiopg.Cursor, files: list[tuple[str, str]]) -> list[str]:
    async with cursor.begin():
        await cursor.execute(_LOCK, {"key": _LOCK_KEY})
        await cursor.execute(_CREATE_TABLE, {})
        await cursor.execute(_APPLIED, {})
        applied = {name for (name,) in await cursor.fetchall()}
    done = [name for name, sql in files if name not in applied and await _apply(cursor, name, sql)]
    if not done:
        log.info("database schema up to date (%s files)", len(files))
    return done


async def _apply(cursor: aiopg.Cursor, name: str, sql: str) -> bool:
    """Apply the file unless another instance did meanwhile; True if it was applied here."""
    try:
        async with cursor.begin():
            await cursor.execute(_LOCK, {"key": _LOCK_KEY})
            await cursor.execute(_IS_APPLIED, {"name": name})
            if await cursor.fetchone() is not None:
                return False
            # No parameters: the file's text goes to the server untouched, `%` included.
            await cursor.execute(sql)
            await cursor.execute(_RECORD, {"name": name})
    except (psycopg2.OperationalError, psycopg2.InterfaceError):
        raise
    except psycopg2.Error as error:
        raise MigrationError(f"{name}: {_reason(error)}") from error
    log.info("applied migration %s", name)
    return True


def _reason(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
