"""`sharechat serve` and `sharechat migrate`."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence

from sharechat import config as settings

log = logging.getLogger("sharechat")


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if not arguments or (arguments[0].startswith("-") and arguments[0] not in ("-h", "--help")):
        arguments.insert(0, "serve")  # bare `sharechat` serves
    args = _parser().parse_args(arguments)
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
    from sharechat.budgets import raise_descriptor_limit

    raise_descriptor_limit()  # before the app sizes its connection budget by it
    _tune_garbage_collector()
    with asyncio.Runner(loop_factory=_fastest_loop()) as runner:
        runner.run(_run_until_signalled(config))
    return 0


def _tune_garbage_collector() -> None:
    """Collect cycles less often, and never look at what start-up made again.

    A busy server allocates a task, futures and messages per chat message; at the
    default threshold (700) the collector runs hundreds of times a second and
    now and then walks the whole heap, holding every room up for milliseconds
    (the README's Architecture section gives the measurement). Little garbage
    here is cyclic, so memory stays flat.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)


def _fastest_loop() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where it exists (it is a dependency off Windows), else asyncio's own."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


async def _run_until_signalled(config: settings.Config) -> None:
    """Serve until SIGTERM or SIGINT, then leave cleanly; a second signal exits at once."""
    from aiohttp import web

    from sharechat.app import SHUTDOWN_GRACE, create_app, drain
    from sharechat.http_server import HttpRunner

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("second %s: exiting now", signal.Signals(signum).name)
            os._exit(1)
        log.info("%s: shutting down", signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    runner = HttpRunner(
        create_app(config),
        header_timeout=config.header_timeout,
        keepalive_timeout=config.keepalive_timeout,
        access_log=None,
        shutdown_timeout=SHUTDOWN_GRACE + 1,
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, config.host, config.port).start()
        for address in runner.addresses:
            log.info("serving on http://%s:%d", *address[:2])
        await stop.wait()
        await drain(runner.app)  # still listening: the probes see the instance draining
    finally:
        await runner.cleanup()


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
