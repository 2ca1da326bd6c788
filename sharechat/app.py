"""The composition root: picks the adapters from the configuration and wires the app."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from uuid import UUID, uuid4

from aiohttp import web
from aiohttp.typedefs import Middleware

from sharechat import metrics as monitoring
from sharechat import proxies
from sharechat import web as routes
from sharechat.budgets import Budgets
from sharechat.config import Config
from sharechat.controller import Controller
from sharechat.health import Health
from sharechat.instrumented import DeliveryClock, measured_queue, measured_repository
from sharechat.memory import MemoryQueue, MemoryRepository
from sharechat.ports import Queue, Repository
from sharechat.refusals import RefusalLog
from sharechat.startup import StartupDeadline, listening

log = logging.getLogger(__name__)

POSTGRES_PORT = 5432
SHUTDOWN_GRACE = 5.0  # seconds members get to leave cleanly on shutdown


def create_app(config: Config, instance_id: UUID | None = None) -> web.Application:
    middlewares: list[Middleware] = [routes.json_errors]
    if config.forwarded_allow_ips:
        # First: every other middleware and every handler sees the client's address,
        # scheme and host. Without trusted proxies there is nothing to read.
        middlewares.insert(0, proxies.forwarded_headers(config.forwarded_allow_ips))
    app = web.Application(middlewares=middlewares)
    app[routes.CONFIG] = config
    metrics = app[monitoring.METRICS] = monitoring.Metrics()
    # One per app: one line a minute per kind, whoever refuses, and every one counted.
    refusals = RefusalLog(count=metrics.refused)
    app[routes.REFUSALS] = refusals
    budgets = app[routes.BUDGETS] = Budgets(config, refusals)
    metrics.websockets_open.set_function(lambda: budgets.open_connections)
    instance = instance_id or uuid4()

    async def chat(app: web.Application) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(metrics.watching_event_loop())
            startup = StartupDeadline(config.startup_timeout)
            repository = await stack.enter_async_context(
                open_repository(config, startup, on_batch=metrics.commit_batch_size.observe)
            )
            queue = await stack.enter_async_context(
                open_queue(config, instance, on_canary_missed=metrics.queue_canary_misses.inc)
            )
            clock = DeliveryClock(metrics)
            repository = measured_repository(repository, metrics, clock)
            queue = measured_queue(queue, metrics, clock)
            controller = Controller(
                repository, queue, config, instance, refusals,
                on_failed=metrics.failed_message,
                on_delivered=metrics.messages_delivered.inc,
            )  # fmt: skip
            metrics.rooms_live.set_function(lambda: controller.live_rooms)
            await stack.enter_async_context(controller.running())
            app[routes.CONTROLLER] = controller
            app[routes.HEALTH] = Health(repository, queue)
            log.info("instance %s ready: %s", instance, describe_backends(config))
            yield

    app.cleanup_ctx.append(chat)
    app.on_shutdown.append(drain)
    routes.setup_routes(app)
    monitoring.add_route(app, config.metrics_port, config.metrics_allow_ips)
    return app


async def drain(app: web.Application) -> None:
    """Leave the traffic, from SIGTERM on: readyz answers 503 at once and no member
    joins; every websocket is closed with 1001 and each member's `left` recorded.

    `sharechat serve` runs it while the server still answers HTTP, so that the
    probes see the drain; the app's shutdown runs it again, which costs nothing
    then and covers runners that do not drain first.
    """
    app[routes.HEALTH].draining = True
    await app[routes.CONTROLLER].close_all("server shutting down", SHUTDOWN_GRACE)


def describe_backends(config: Config) -> str:
    repository = "PostgreSQL" if config.database_url else "in-memory repository"
    queue = "in-process queue"
    if config.redis_url:
        queue = "Redis Cluster" if config.redis_cluster else "Redis"
        if config.redis_url.startswith("rediss"):
            queue += " over TLS"
    return f"{repository}, {queue}"


@contextlib.asynccontextmanager
async def open_repository(
    config: Config, startup: StartupDeadline, on_batch: Callable[[int], None] | None = None
) -> AsyncIterator[Repository]:
    """The repository; PostgreSQL migrated (unless --no-migrate) and answering, waited for
    up to the start-up deadline. `on_batch`: told each group commit's size."""
    database_url = config.database_url
    if not database_url:
        yield MemoryRepository(room_max_messages=config.room_max_messages)
        return
    # Imported here so that the embedded mode never needs aiopg.
    from sharechat.migrations import migrate
    from sharechat.postgres import open_postgres_repository

    await startup.retry("PostgreSQL", lambda: listening(database_url, POSTGRES_PORT))
    if not config.no_migrate:
        applied = await startup.retry("PostgreSQL", lambda: migrate(database_url))
        if applied:
            log.info("migrations applied: %s", ", ".join(applied))

    def pool() -> contextlib.AbstractAsyncContextManager[Repository]:
        return open_postgres_repository(
            database_url,
            pool_max=config.db_pool_size,
            timeout=config.backend_timeout,
            room_max_messages=config.room_max_messages,
            prepared_statements=config.db_prepared_statements,
            on_batch=on_batch,
        )

    async with contextlib.AsyncExitStack() as stack:
        yield await startup.retry("PostgreSQL", lambda: stack.enter_async_context(pool()))


@contextlib.asynccontextmanager
async def open_queue(
    config: Config, instance_id: UUID, on_canary_missed: Callable[[], None] | None = None
) -> AsyncIterator[Queue]:
    """The queue. Not waited for: the Redis queue connects (and reconnects) by itself,
    and until it does readiness answers 503 with the reason. `on_canary_missed`: told
    each time Redis's subscription is found stalled."""
    if not config.redis_url:
        yield MemoryQueue()
        return
    from sharechat.redis_cluster_queue import open_redis_cluster_queue
    from sharechat.redis_queue import open_redis_queue

    # One module per backend, picked by the URL's scheme (as broadcaster does).
    if config.redis_cluster:
        # Its shards' canaries are not counted (yet): sharechat_queue_canary_misses_total
        # stays 0 on a cluster; its recoveries are counted like any queue's.
        async with open_redis_cluster_queue(
            config.redis_url,
            prefix=config.redis_prefix,
            instance_id=instance_id,
            ssl_ca_certs=config.redis_ssl_ca_certs,
            ssl_cert_reqs=config.redis_ssl_cert_reqs,
        ) as cluster_queue:
            yield cluster_queue
        return
    async with open_redis_queue(
        config.redis_url,
        prefix=config.redis_prefix,
        instance_id=instance_id,
        ssl_ca_certs=config.redis_ssl_ca_certs,
        ssl_cert_reqs=config.redis_ssl_cert_reqs,
        on_canary_missed=on_canary_missed,
    ) as queue:
        yield queue
