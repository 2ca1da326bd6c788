"""The refusal log: the first refusal of a kind at once, then one line an interval with a count."""

from __future__ import annotations

import logging

import pytest

from sharechat.refusals import RefusalLog


def test_one_line_per_kind_and_interval_with_the_count(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [1000.0]
    monkeypatch.setattr("sharechat.refusals.time.monotonic", lambda: now[0])
    refusals = RefusalLog(interval=60)
    with caplog.at_level(logging.WARNING, logger="sharechat.refusals"):
        for _ in range(5000):
            refusals.refused("ip-rate", "client '127.0.0.2'")
        refusals.refused("too-slow", "member x")
        now[0] += 61
        refusals.refused("ip-rate", "client '127.0.0.3'")
    lines = [record.getMessage() for record in caplog.records]
    assert lines == [
        "refused ip-rate: client '127.0.0.2' (1 refusal of this kind since the last line)",
        "refused too-slow: member x (1 refusal of this kind since the last line)",
        "refused ip-rate: client '127.0.0.3' (5000 refusals of this kind since the last line)",
    ]
