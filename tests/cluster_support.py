"""A throwaway Redis Cluster for tests: three masters with one replica each, on 127.0.0.1.

Started by the tests themselves (like the throwaway servers of tests/redis_support.py),
one per module or session as it takes a few seconds; every process is killed at the end.
kill_master() fakes a dead machine and returns once its replica has taken its slots over.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from redis import Redis
from redis.crc import key_slot
from redis.exceptions import RedisError

from tests.helpers import free_port
from tests.processes import ServerProcess

MASTERS = 3
REPLICAS_PER_MASTER = 1
# Milliseconds before a silent node counts as failing. Short, so that a failover fits in a
# test; not so short that a loaded 2-core machine sees failures that are not there.
NODE_TIMEOUT_MS = 2000
STARTUP = 30.0  # seconds the whole cluster may take to form
FAILOVER = 30.0  # seconds a replica may take to be promoted


class _Node(ServerProcess):
    def __init__(self, directory: Path) -> None:
        super().__init__()
        self.port = free_port()
        # Not port + 10000, Redis's default for the cluster bus: that may be taken or past 65535.
        self.bus_port = free_port()
        self.directory = directory / str(self.port)

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        command = ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port)]
        command += ["--dir", str(self.directory), "--save", "", "--appendonly", "no"]
        command += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
        command += ["--cluster-port", str(self.bus_port)]
        command += ["--cluster-node-timeout", str(NODE_TIMEOUT_MS)]
        # One failed shard must not stop the others: the README recommends the same.
        command += ["--cluster-require-full-coverage", "no"]
        # A replica that never synced cannot take over: sync at once, not after 5 seconds.
        command += ["--repl-diskless-sync-delay", "0"]
        log = self.directory / "redis.log"
        command += ["--logfile", str(log)]
        self.spawn(command)  # RedisCluster waits for all its nodes at once

    def client(self) -> Redis:
        return Redis(
            host="127.0.0.1", port=self.port, socket_timeout=2.0, socket_connect_timeout=2.0
        )

    def answers(self) -> bool:
        try:
            with self.client() as client:
                return bool(client.ping())
        except (RedisError, OSError):
            return False


class RedisCluster:
    """The processes of one cluster. Use running_cluster() rather than building one."""

    def __init__(self, directory: Path) -> None:
        self._nodes = [_Node(directory) for _ in range(MASTERS * (1 + REPLICAS_PER_MASTER))]

    @property
    def url(self) -> str:
        """The setting that picks the cluster queue, with one node to discover the rest from."""
        return f"redis+cluster://127.0.0.1:{self._nodes[0].port}"

    @property
    def seed_ports(self) -> list[int]:
        return [node.port for node in self._nodes]

    def start(self) -> None:
        for node in self._nodes:
            node.start()
        deadline = time.monotonic() + STARTUP
        _wait(lambda: all(node.answers() for node in self._nodes), deadline, "nodes to start")
        command = ["redis-cli", "--cluster", "create"]
        command += [f"127.0.0.1:{node.port}" for node in self._nodes]
        command += ["--cluster-replicas", str(REPLICAS_PER_MASTER), "--cluster-yes"]
        subprocess.run(command, check=True, capture_output=True, timeout=STARTUP)
        _wait(self._formed, deadline, "cluster_state:ok on every node")

    def stop(self) -> None:
        for node in self._nodes:
            node.kill()

    def restart(self) -> None:
        """Start every node again (stop() first), on the same ports with the same
        cluster configuration; return once the cluster is formed again."""
        for node in self._nodes:
            node.start()
        _wait(self._formed, time.monotonic() + STARTUP, "the cluster to form again")

    def master_port(self, channel: bytes | str) -> int:
        """The port of the master that owns the channel's slot now."""
        return self._owner(key_slot(channel.encode() if isinstance(channel, str) else channel))

    def master_ports(self) -> list[int]:
        return sorted({self._owner(slot) for slot in (0, 8000, 16383)} | set(self._masters()))

    def kill_master(self, port: int) -> int:
        """Kill the master on `port`; return the port of the replica that took over its slots."""
        node = self._node_at(port)
        slot = self._a_slot_of(port)
        node.kill()
        deadline = time.monotonic() + FAILOVER
        _wait(lambda: self._owner(slot) != port, deadline, f"a replica of {port} to take over")
        return self._owner(slot)

    def move_slot(self, slot: int, to_port: int) -> None:
        """Migrate one (keyless) slot to the master on `to_port`, as resharding does."""
        source, target = self._node_at(self._owner(slot)), self._node_at(to_port)
        with source.client() as source_client, target.client() as target_client:
            source_id = source_client.execute_command("CLUSTER", "MYID").decode()
            target_id = target_client.execute_command("CLUSTER", "MYID").decode()
            target_client.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
            source_client.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
            # Pub/sub channels are no keys: there is nothing to MIGRATE.
            target_client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
            source_client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        deadline = time.monotonic() + STARTUP
        _wait(lambda: self._everyone_says(slot, to_port), deadline, f"slot {slot} to move")

    def _everyone_says(self, slot: int, port: int) -> bool:
        for node in self._live():
            with node.client() as client:
                for start, end, master, *_ in client.execute_command("CLUSTER", "SLOTS"):
                    if start <= slot <= end and int(master[1]) != port:
                        return False
        return True

    def _node_at(self, port: int) -> _Node:
        return next(node for node in self._nodes if node.port == port)

    def _formed(self) -> bool:
        try:
            for node in self._nodes:
                with node.client() as client:
                    info = client.execute_command("CLUSTER", "INFO").decode()
                    if "cluster_state:ok" not in info:
                        return False
                    if len(client.execute_command("CLUSTER", "SLOTS")) != MASTERS:
                        return False
        except (RedisError, OSError):
            return False
        # Every replica has synced with its master: a failover will have someone to promote.
        return len(self._masters()) == MASTERS and self._replicas_synced()

    def _live(self) -> list[_Node]:
        return [node for node in self._nodes if node.process is not None]

    def _nodes_lines(self) -> list[list[str]]:
        for node in self._live():
            with contextlib.suppress(RedisError, OSError), node.client() as client:
                text = client.execute_command("CLUSTER", "NODES").decode()
                return [line.split() for line in text.splitlines() if line.strip()]
        raise RuntimeError("no live node of the cluster answers")

    def _masters(self) -> list[int]:
        return [
            _port(fields[1])
            for fields in self._nodes_lines()
            if "master" in fields[2] and "fail" not in fields[2] and len(fields) > 8
        ]

    def _replicas_synced(self) -> bool:
        synced = 0
        for node in self._live():
            with node.client() as client:
                info = client.info("replication")
            synced += info.get("master_link_status") == "up"
        return synced == MASTERS * REPLICAS_PER_MASTER

    def _owner(self, slot: int) -> int:
        """The port that a live node's CLUSTER SLOTS gives for the slot."""
        for node in self._live():
            with contextlib.suppress(RedisError, OSError), node.client() as client:
                for start, end, master, *_ in client.execute_command("CLUSTER", "SLOTS"):
                    if start <= slot <= end:
                        return int(master[1])
        raise RuntimeError(f"no live node knows the owner of slot {slot}")

    def _a_slot_of(self, port: int) -> int:
        for node in self._live():
            with contextlib.suppress(RedisError, OSError), node.client() as client:
                for start, _, master, *_ in client.execute_command("CLUSTER", "SLOTS"):
                    if int(master[1]) == port:
                        return int(start)
        raise RuntimeError(f"{port} owns no slot")


def _port(address: str) -> int:
    """The port of a CLUSTER NODES address, e.g. 127.0.0.1:7000@17000."""
    return int(address.split("@")[0].rsplit(":", 1)[1])


def _wait(done: Callable[[], bool], deadline: float, what: str) -> None:
    while not done():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


@contextlib.contextmanager
def running_cluster(directory: Path) -> Iterator[RedisCluster]:
    """A formed cluster, every node killed on exit (data dirs under `directory`)."""
    cluster = RedisCluster(directory)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
