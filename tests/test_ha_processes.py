"""Replicas as real processes (``python -m invoice_watch run``) on one PostgreSQL state
(tests/failoverloop.py): SIGKILLed leaders replaced by their standby with nothing
missed (the full run is ``python -m tests.failoverloop --kills 25``), a paused leader
fenced off, the database restarted under a running leader.

These run in real time (each starts Python processes), hence ``slow``.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.failoverloop import NOT_LEADER, failover_loop, pause_loop, restart_database
from tests.postgres import PostgresServer

pytestmark = pytest.mark.slow


async def test_ha_failover_sigkill_the_leader_loses_nothing(tmp_path: Path, postgres_url: str):
    seed = random.randrange(2**32)
    outcome = await failover_loop(tmp_path, postgres_url, kills=4, seed=seed)
    assert outcome.problems == [], f"seed {seed}: python -m tests.failoverloop --seed {seed}"
    assert outcome.kills == 4 and len(outcome.takeovers) == 4
    assert 0 <= outcome.duplicates <= outcome.kills
    # lease TTL 3s + a standby retry (1 s), the new leader polls at once; slack for a
    # loaded machine (the measured figures: README, High availability)
    assert max(outcome.takeovers) < 8, outcome.takeovers


async def test_ha_a_paused_leader_writes_and_sends_nothing_before_it_steps_down(
    tmp_path: Path, postgres_url: str
):
    outcome = await pause_loop(tmp_path, postgres_url)
    assert outcome.problems == []
    # after SIGCONT: it stepped down, and neither delivered nor recorded a cycle
    assert any(m.startswith(NOT_LEADER) for m in outcome.after_cont), outcome.after_cont
    assert not [m for m in outcome.after_cont if m.startswith("cycle:") or "delivered" in m]
    assert len(outcome.delivered) == len(outcome.expected)  # the change: once, by b


async def test_ha_the_database_restarted_under_a_running_leader_loses_nothing(
    tmp_path: Path, postgres_server: PostgresServer, postgres_url: str
):
    assert await restart_database(tmp_path, postgres_server, postgres_url) == []
