"""A throwaway Redis Cluster for one run (`--redis-cluster`): three masters, no replicas,
on free ports of 127.0.0.1 in a temporary folder; every node stopped on the way out,
errors and Ctrl-C included."""

from __future__ import annotations

import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import IO

from redis import Redis
from redis.exceptions import RedisError

from bench.backends import READY_TIMEOUT, free_port, stop, wait_redis

MASTERS = 3


@contextmanager
def redis_cluster(log: IO[bytes]) -> Iterator[str]:
    """A formed cluster; its `redis+cluster://` URL names the first node."""
    with (
        tempfile.TemporaryDirectory(prefix="sharechat-bench-cluster-") as folder,
        ExitStack() as stack,
    ):
        ports = [free_port() for _ in range(MASTERS)]
        for port in ports:
            node = start_node(port, Path(folder), log)
            stack.callback(stop, node)
            wait_redis(node, port)
        subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *(f"127.0.0.1:{p}" for p in ports),
                "--cluster-yes",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            check=True,
            timeout=READY_TIMEOUT,
        )
        wait_formed(ports)
        yield f"redis+cluster://127.0.0.1:{ports[0]}"


def start_node(port: int, folder: Path, log: IO[bytes]) -> subprocess.Popen[bytes]:
    # The bus on a free port of its own: the default, port + 10000, may be taken.
    return subprocess.Popen(
        ["redis-server", "--bind", "127.0.0.1", "--port", str(port),
         "--cluster-port", str(free_port()), "--cluster-enabled", "yes",
         "--cluster-config-file", str(folder / f"nodes-{port}.conf"), "--dir", str(folder),
         "--save", "", "--appendonly", "no", "--cluster-require-full-coverage", "no"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip


def wait_formed(ports: list[int]) -> None:
    """Until every node says cluster_state:ok and knows every master's slots."""
    deadline = time.monotonic() + READY_TIMEOUT
    while not all(formed(port) for port in ports):
        if time.monotonic() > deadline:
            raise TimeoutError(f"Redis Cluster not formed within {READY_TIMEOUT:.0f} s")
        time.sleep(0.1)


def formed(port: int) -> bool:
    try:
        with Redis(host="127.0.0.1", port=port, socket_timeout=2) as node:
            info = node.execute_command("CLUSTER", "INFO").decode()
            return (
                "cluster_state:ok" in info
                and len(node.execute_command("CLUSTER", "SLOTS")) == MASTERS
            )
    except (RedisError, OSError):
        return False
