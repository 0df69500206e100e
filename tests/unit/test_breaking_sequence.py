"""The per-device ``seq`` must never start over: receivers deduplicate by (device, seq).

Found by wiping and damaging the state directory: a missing or unparsable ``seq`` file made
the daemon (and a router whose file was damaged) count from 1 again, and the collector, which
stores ``(device, seq)`` once, dropped the new results as duplicates of old ones.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from agent.daemon import open_sequence
from agent.fleet.router import _seeded_counter


@pytest.mark.parametrize("opener", [open_sequence, _seeded_counter], ids=["daemon", "router"])
@pytest.mark.parametrize("content", [None, "", "xx\n", "12ab", "-5"],
                         ids=["missing", "empty", "garbage", "partial", "negative"])
def test_a_counter_without_a_usable_file_starts_above_any_earlier_life(
    tmp_path: Path, opener: object, content: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "seq"
    used = [1, 2, 3, 4, 5]  # an earlier life of the device (the old start at 1)
    if content is not None:
        path.write_text(content)
    before_us = time.time_ns() // 1000
    with caplog.at_level(logging.ERROR):
        counter = opener(path)  # type: ignore[operator]
    first = counter.next()
    assert first > before_us > max(used)
    assert counter.next() == first + 1
    if content and content.strip():
        assert "not a number" in caplog.text  # the reason is logged


def test_an_existing_counter_continues_from_its_file(tmp_path: Path) -> None:
    path = tmp_path / "seq"
    path.write_text("1000")
    assert open_sequence(path).next() == 1001
    path.write_text("1000")
    assert _seeded_counter(path).next() == 1001
