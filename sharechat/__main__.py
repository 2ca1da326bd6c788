"""`sharechat serve` and `sharechat migrate`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence

from sharechat import config as settings

log = logging.getLogger("sharechat")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        config = settings.load(args, os.environ)
    except settings.ConfigError as error:
        print(f"sharechat: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    if args.command == "migrate":
        return _migrate(config)
    return _serve(config)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sharechat", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    settings.add_arguments(commands.add_parser("serve", help="run the chat server"))
    settings.add_arguments(
        commands.add_parser("migrate", help="apply the SQL migrations in sql/ and exit")
    )
    return parser


def _serve(config: settings.Config) -> int:
    from aiohttp import web

    from sharechat.app import create_app

    web.run_app(
        create_app(config),
        host=config.host,
        port=config.port,
        print=None,
        access_log=None,
        shutdown_timeout=8.0,
    )
    return 0


def _migrate(config: settings.Config) -> int:
    if not config.database_url:
        print("sharechat: migrate needs DATABASE_URL (or --database-url)", file=sys.stderr)
        return 2
    from sharechat.migrations import migrate

    applied = asyncio.run(migrate(config.database_url))
    log.info("applied %d migration(s): %s", len(applied), ", ".join(applied) or "none")
    return 0


if __name__ == "__main__":
    sys.exit(main())
