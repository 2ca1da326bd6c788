"""sharechat behind PgBouncer in transaction mode: no state may outlive a transaction.

tests/test_repository_contract.py runs the repository's contract through the
same bouncer; here: migrations from several instances at once, and a chat
through a real app with many members joining at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from sharechat.app import create_app
from sharechat.config import Config, ConfigError, from_argv
from sharechat.migrations import default_sql_dir, migrate
from tests.conftest import Chat
from tests.helpers import receive_until, suite_config
from tests.pg_support import temporary_database
from tests.pgbouncer_support import PgBouncer, pgbouncer

pytestmark = pytest.mark.services  # real PostgreSQL: see conftest --backends

WAIT = 30.0  # the deadline of a whole test body
JOINERS = 8  # at once: more than the bouncer's server connections


@pytest.fixture(scope="module")
def bouncer() -> Iterator[PgBouncer]:
    with pgbouncer() as started:
        yield started


@pytest.fixture
async def unmigrated_dsn() -> AsyncIterator[str]:
    async with temporary_database(migrated=False) as dsn:
        yield dsn


async def test_instances_starting_together_migrate_each_file_once(
    bouncer: PgBouncer, unmigrated_dsn: str
) -> None:
    expected = sorted(path.name for path in default_sql_dir().glob("*.sql"))
    async with asyncio.timeout(WAIT):
        applied = await asyncio.gather(*(migrate(bouncer.url(unmigrated_dsn)) for _ in range(6)))
        assert sorted(name for names in applied for name in names) == expected
        # Nothing left locked behind: the next start finds the schema up to date at once.
        assert await migrate(bouncer.url(unmigrated_dsn)) == []


async def test_a_chat_with_many_joining_at_once(
    bouncer: PgBouncer, unmigrated_dsn: str, aiohttp_client: Any
) -> None:
    config = suite_config(database_url=bouncer.url(unmigrated_dsn), db_prepared_statements=False)
    async with asyncio.timeout(WAIT):
        chat = Chat(await aiohttp_client(create_app(config)))
        room = await chat.room()
        joins = await asyncio.gather(*(chat.join(room) for _ in range(JOINERS)))
        (alice, alice_joined), (bob, _) = joins[:2]
        mine = alice_joined["memberId"]

        await alice.send_str("hello bob")
        heard = await receive_until(bob, lambda m: m["type"] == "chat")
        assert heard[0]["message"] == "hello bob"
        await bob.send_str("hi alice")
        answer = await receive_until(alice, lambda m: m["type"] == "chat" and m["memberId"] != mine)
        assert answer[0]["message"] == "hi alice"

        history = await chat.history(room)
        assert sum(m["type"] == "joined" for m in history) == JOINERS
        assert [m["message"] for m in history if m["type"] == "chat"] == ["hello bob", "hi alice"]
        assert len(await chat.members(room)) == JOINERS
        for ws, _ in joins:
            await ws.close()


def test_prepared_statements_are_on_unless_turned_off() -> None:
    assert Config().db_prepared_statements
    assert not from_argv(["--db-prepared-statements", "off"], {}).db_prepared_statements
    environ = {"SHARECHAT_DB_PREPARED_STATEMENTS": "false"}
    assert not from_argv([], environ).db_prepared_statements
    assert from_argv(["--db-prepared-statements", "on"], environ).db_prepared_statements
    with pytest.raises(ConfigError, match=r"SHARECHAT_DB_PREPARED_STATEMENTS.*on or off"):
        from_argv([], {"SHARECHAT_DB_PREPARED_STATEMENTS": "sometimes"})
