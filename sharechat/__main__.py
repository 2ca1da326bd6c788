"""`sharechat serve` and `sharechat migrate`."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any
from uuid import UUID, uuid4

from sharechat import config as settings
from sharechat import logs

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
    if args.command == "migrate":
        logs.configure(config.log_level, config.log_format)
        return _migrate(config)
    instance = uuid4()
    logs.configure(config.log_level, config.log_format, instance)
    return _serve(config, instance)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sharechat", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    settings.add_arguments(commands.add_parser("serve", help="run the chat server"))
    settings.add_arguments(
        commands.add_parser("migrate", help="apply the SQL migrations in sql/ and exit")
    )
    return parser


def _serve(config: settings.Config, instance: UUID) -> int:
    from sharechat.budgets import raise_descriptor_limit

    raise_descriptor_limit()  # before the app sizes its connection budget by it
    _tune_garbage_collector()
    with asyncio.Runner(loop_factory=_fastest_loop()) as runner:
        return runner.run(_run_until_signalled(config, instance))


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


async def _run_until_signalled(config: settings.Config, instance: UUID) -> int:
    """Serve until SIGTERM or SIGINT, then leave cleanly; a second signal exits at once.

    1 when start-up fails: a backend unreachable past --startup-timeout, a migration
    that fails. One line says why; the platform restarts the process.
    """
    from aiohttp import web

    from sharechat.app import SHUTDOWN_GRACE, create_app, drain
    from sharechat.http_server import HttpRunner
    from sharechat.metrics import METRICS, metrics_app
    from sharechat.migrations import MigrationError
    from sharechat.startup import StartupFailed

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
    app = create_app(config, instance)
    access: dict[str, Any] = {"access_log": None}
    if config.access_log:
        access = {
            "access_log": logging.getLogger(logs.ACCESS_LOGGER),
            "access_log_class": logs.AccessLog,
        }
    runner = HttpRunner(
        app,
        header_timeout=config.header_timeout,
        keepalive_timeout=config.keepalive_timeout,
        shutdown_timeout=SHUTDOWN_GRACE + 1,
        **access,
    )
    try:
        if not await _unless_stopped(runner.setup(), stop):
            return 0  # a signal while start-up waited for the backends
    except (StartupFailed, MigrationError) as error:
        log.error("cannot start: %s", error)
        return 1
    runners: list[web.AppRunner] = [runner]
    try:
        await web.TCPSite(runner, config.host, config.port).start()
        for address in runner.addresses:
            log.info("serving on http://%s:%d", *address[:2])
        if config.metrics_port:
            metrics = web.AppRunner(metrics_app(app[METRICS]), access_log=None)
            await metrics.setup()
            runners.insert(0, metrics)
            await web.TCPSite(metrics, config.host, config.metrics_port).start()
            log.info("metrics on http://%s:%d/metrics", config.host, config.metrics_port)
        await stop.wait()
        await drain(runner.app)  # still listening: the probes see the instance draining
    finally:
        for each in runners:
            await each.cleanup()
    return 0


async def _unless_stopped(work: Coroutine[Any, Any, None], stop: asyncio.Event) -> bool:
    """Run `work` to the end, or cancel it when `stop` is set first; True if it ended."""
    task = asyncio.create_task(work)
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait((task, stopped), return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return False
    task.result()
    return True


def _migrate(config: settings.Config) -> int:
    if not config.database_url:
        print("sharechat: migrate needs DATABASE_URL (or --database-url)", file=sys.stderr)
        return 2
    from sharechat.app import POSTGRES_PORT
    from sharechat.migrations import MigrationError, migrate
    from sharechat.startup import StartupDeadline, StartupFailed, listening

    database_url = config.database_url

    async def migrate_when_reachable() -> list[str]:
        startup = StartupDeadline(config.startup_timeout)
        await startup.retry("PostgreSQL", lambda: listening(database_url, POSTGRES_PORT))
        return await startup.retry("PostgreSQL", lambda: migrate(database_url))

    try:
        applied = asyncio.run(migrate_when_reachable())
    except (StartupFailed, MigrationError) as error:
        log.error("cannot migrate: %s", error)
        return 1
    log.info("applied %d migration(s): %s", len(applied), ", ".join(applied) or "none")
    return 0


if __name__ == "__main__":
    sys.exit(main())
