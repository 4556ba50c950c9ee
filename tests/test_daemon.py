"""The daemon around the cycle: health judged on the monotonic clock."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta

from invoice_watch import ops
from invoice_watch.app import App
from invoice_watch.clock import FakeClock
from invoice_watch.health import health
from tests.world import World


def test_health_of_a_last_cycle_in_the_future_is_unhealthy():
    now = datetime(2026, 11, 15, 12, 0, tzinfo=UTC)
    interval = timedelta(minutes=15)
    ok, why = health(now + timedelta(days=2), 2, 0, interval, now)
    assert not ok and "in the future (in 2d)" in why and "set back" in why
    assert health(now + timedelta(seconds=3), 2, 0, interval, now)[0]  # within tolerance
    assert health(now - timedelta(minutes=5), 2, 0, interval, now)[0]


async def test_status_check_is_unhealthy_when_the_last_cycle_is_in_the_future(world: World):
    """`status --check` (another process: wall times from the state file) after the
    wall clock was set back 2 days."""
    config = world.config()
    async with App(config, clock=FakeClock(datetime.now(UTC) + timedelta(days=2))) as app:
        await app.run_cycle()
    out = io.StringIO()
    assert await ops.status(config, check=True, out=out) == 1
    assert out.getvalue().startswith("unhealthy: the last cycle finished in the future (in 1d")
