"""The benchmark's own logic: how seats are dealt and scheduled, how targets are judged,
which backends a multi-instance run takes, and the churning client against a server."""

from __future__ import annotations

from collections import defaultdict
from itertools import pairwise
from typing import Any

import pytest

from bench.churn import Endpoint
from bench.costs import Counters, Spent, lsn_bytes
from bench.driver import instances_per_room, make_plans, make_seats
from bench.results import Result, add_costs
from bench.run import parse_args
from bench.scenarios import SCENARIOS
from bench.spread import spread
from bench.targets import Status, judge
from sharechat.app import create_app
from tests.conftest import Chat
from tests.helpers import receive_json, suite_config

MANY_ROOMS = next(s for s in SCENARIOS if s.name == "many-rooms")
OPEN_LOOP = next(s for s in SCENARIOS if s.name == "open-loop-5000")
CHURN = next(s for s in SCENARIOS if s.name == "churn")


@pytest.mark.parametrize("instances", [2, 3])
def test_every_room_spans_the_instances(instances: int) -> None:
    rooms: defaultdict[int, set[int]] = defaultdict(set)
    for seat in make_seats(MANY_ROOMS, instances):
        rooms[seat.room].add(seat.instance)
    assert len(rooms) == MANY_ROOMS.rooms
    assert all(len(spanned) == min(MANY_ROOMS.members, instances) for spanned in rooms.values())


def test_churning_clients_are_dealt_over_the_instances() -> None:
    plans = make_plans(CHURN, ("http://a", "http://b"), ("room",), processes=2)
    churners = [instance for plan in plans for instance in plan.churners]
    assert len(churners) == CHURN.members
    assert churners.count(0) == churners.count(1) == CHURN.members // 2


def test_open_loop_offers_the_rate_spread_evenly_over_the_period() -> None:
    seats = list(make_seats(OPEN_LOOP))
    period = seats[0].period_ns
    assert all(seat.period_ns == period and seat.inflight == 0 for seat in seats)
    assert len(seats) * 1e9 / period == pytest.approx(OPEN_LOOP.rate)
    phases = sorted(seat.phase_ns for seat in seats)
    gaps = {b - a for a, b in pairwise(phases)}
    assert max(gaps) - min(gaps) <= 1
    assert phases[-1] < period


def row(scenario: str, backend: str, **figures: object) -> Result:
    return Result(scenario, backend, **figures)  # type: ignore[arg-type]


def verdict(rows: list[Result], target: str) -> tuple[Status, str]:
    found = [v for v in judge(rows) if v.target == target]
    assert len(found) == 1, found
    return found[0].status, found[0].detail


def test_a_ratio_target_is_judged_against_the_original_of_the_same_run() -> None:
    target = "acked/s ≥ 1.5x original"
    original = row("latency", "original", acked_per_s=1000.0)
    assert verdict([original, row("latency", "postgres+redis", acked_per_s=1500.0)], target) == (
        Status.MET,
        "1,500 vs 1,000: 1.50x",
    )
    slow = row("latency", "postgres+redis", acked_per_s=1400.0)
    assert verdict([original, slow], target)[0] is Status.MISSED
    assert verdict([slow], target) == (Status.UNJUDGED, "no original row in this run")
    crashed = row("latency", "original", acked_per_s=1000.0, crashed=True)
    assert verdict([crashed, slow], target)[0] is Status.UNJUDGED


def test_a_ratio_is_taken_between_rows_of_the_same_instance_count() -> None:
    target = "acked/s ≥ 20x original"
    rows = [
        row("throughput", "original", acked_per_s=100.0, instances=1),
        row("throughput", "original", acked_per_s=1000.0, instances=2),
        row("throughput", "postgres+redis", acked_per_s=3000.0, instances=2),
    ]
    assert verdict(rows, target) == (Status.MISSED, "3,000 vs 1,000: 3.00x")


def test_an_absolute_target_reads_the_later_of_ack_and_delivery_p99() -> None:
    target = "p99 ms (ack and delivery) ≤ 5"
    met = row("open-loop-2000", "postgres+redis", p99_ms=4.0, ack_p99_ms=4.5)
    assert verdict([met], target) == (Status.MET, "4.50")
    late_echo = row("open-loop-2000", "postgres+redis", p99_ms=4.0, ack_p99_ms=6.0)
    assert verdict([late_echo], target)[0] is Status.MISSED
    crashed = row("open-loop-2000", "postgres+redis", p99_ms=1.0, crashed=True)
    assert verdict([crashed], target) == (Status.MISSED, "crashed")


def test_delivery_checks_judge_sharechat_rows_and_leave_the_references_out() -> None:
    target = "0 lost, duplicated, reordered, cross-room, stale"
    references = [row("churn", "original", stale=3), row("churn", "bare", lost=1)]
    clean = [row("churn", "memory"), row("churn", "postgres+redis")]
    assert verdict(references + clean, target) == (Status.MET, "")
    dirty = [row("churn", "memory"), row("churn", "postgres+redis", lost=2, stale=1)]
    assert verdict(references + dirty, target) == (
        Status.MISSED,
        "postgres+redis: 2 lost, 1 stale",
    )


def test_several_instances_take_the_backends_that_share_through_redis() -> None:
    assert parse_args(["--instances", "2"]).backends == ["original", "postgres+redis"]
    assert parse_args([]).backends == ["original", "memory", "postgres", "postgres+redis", "bare"]
    with pytest.raises(SystemExit):
        parse_args(["--instances", "2", "--backends", "memory"])


def test_the_cluster_takes_sharechat_with_redis_alone_and_names_its_rows() -> None:
    assert parse_args(["--redis-cluster"]).backends == ["postgres+redis"]
    for others in ("original", "postgres"):
        with pytest.raises(SystemExit):
            parse_args(["--redis-cluster", "--backends", others])
    assert row("big-room", "postgres+redis", instances=2, cluster=True).label == (
        "postgres+redis cluster x2"
    )


@pytest.mark.parametrize(("instances", "spanned"), [(1, 1.0), (2, 2.0), (3, 2.0)])
def test_redis_delivers_each_publish_to_every_instance_a_room_spans(
    instances: int, spanned: float
) -> None:
    urls = tuple(f"http://{i}" for i in range(instances))
    plans = make_plans(MANY_ROOMS, urls, ("room",) * MANY_ROOMS.rooms, processes=2)
    assert instances_per_room(plans) == spanned  # 2 members a room


def test_the_stores_spending_is_the_difference_of_two_readings() -> None:
    assert lsn_bytes("1/0") - lsn_bytes("0/FFFFFF00") == 256  # pg_wal_lsn_diff
    before = Counters({"a:1": 1.5, "b:2": 2.0}, commits=100, wal_lsn="0/1000")
    after = Counters({"a:1": 1.75, "b:2": 2.5, "c:3": 9.0}, commits=130, wal_lsn="0/5000")
    assert after - before == Spent({"a:1": 250.0, "b:2": 500.0}, commits=30, wal_bytes=0x4000)
    assert Counters() - Counters() == Spent()


def test_the_stores_spending_is_given_per_message_and_per_1000_redis_deliveries() -> None:
    result = row("many-rooms", "postgres+redis")
    add_costs(result, Spent({"a:1": 30.0, "b:2": 10.0}, 50, 400_000), 1000, 2000)
    assert result.redis_ms_per_1k_deliveries == 20.0  # 40 ms over 2,000 deliveries
    assert (result.pg_commits_per_message, result.wal_bytes_per_message) == (0.05, 400.0)
    memory = row("many-rooms", "memory")
    add_costs(memory, Spent(), 1000, 1000)
    assert memory.redis_ms_per_1k_deliveries is memory.pg_commits_per_message is None


def test_spread_gives_the_median_and_range_and_counts_runs_that_met_a_target() -> None:
    runs = [
        [
            row("latency", "original", acked_per_s=1000.0),
            row("latency", "postgres+redis", acked_per_s=acked),
        ]
        for acked in (1600.0, 1400.0, 2000.0)
    ]
    text = spread(runs)
    assert "| latency | postgres+redis | 3 | 1,600 (1,400-2,000) |" in text
    assert "latency: postgres+redis: acked/s ≥ 1.5x original: met in 2 of 3 runs" in text


def test_spread_leaves_out_the_figures_of_a_cell_that_crashed_or_failed() -> None:
    runs = [
        [row("throughput", "original", acked_per_s=430.0)],
        [row("throughput", "original", acked_per_s=0.0, error="ServerDisconnectedError")],
        [row("throughput", "original", acked_per_s=12.0, crashed=True)],
        [row("throughput", "original", acked_per_s=572.0)],
    ]
    assert "| throughput | original | 2 of 4 | 501 (430-572) |" in spread(runs)


async def test_a_churning_client_joins_gets_its_joined_and_leaves(aiohttp_client: Any) -> None:
    """The hand-made websocket client of the churn scenario is a member like any other."""
    chat = Chat(await aiohttp_client(create_app(suite_config())))
    room_id = await chat.room()
    watcher, watcher_joined = await chat.join(room_id)
    endpoint = Endpoint(str(chat.client.make_url(f"/api/serve/{room_id}")).replace("http", "ws", 1))
    for _ in range(3):
        assert await endpoint.join_and_leave() > 0
        joined, left = await receive_json(watcher), await receive_json(watcher)
        assert (joined["type"], left["type"]) == ("joined", "left")
        assert joined["memberId"] == left["memberId"]
    assert [m["id"] for m in await chat.members(room_id)] == [watcher_joined["memberId"]]
    await watcher.close()


async def test_a_churning_client_takes_a_refused_upgrade_for_an_error(aiohttp_client: Any) -> None:
    client = await aiohttp_client(create_app(suite_config()))
    gone = "00000000-0000-4000-8000-000000000000"
    endpoint = Endpoint(str(client.make_url(f"/api/serve/{gone}")).replace("http", "ws", 1))
    with pytest.raises(ValueError, match="404"):
        await endpoint.join_and_leave()
