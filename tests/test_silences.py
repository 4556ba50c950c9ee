"""Silences and quiet hours (issue 18): the pure decisions as tables, DST and windows
across midnight with real zoneinfo, and the whole pipeline against the Atlas simulator
and a loopback webhook, with the ``silence`` commands writing beside a running daemon.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import yaml

from invoice_watch import silence_cmd
from invoice_watch.app import App
from invoice_watch.config import Config, load
from invoice_watch.errors import UsageError
from invoice_watch.notify import alertmanager
from invoice_watch.quiet import QuietWindow, holds, longest, quiet_time, window_end
from invoice_watch.silences import (
    Effect,
    new_silence,
    on_delivery,
    on_lift,
    on_release,
    parse_for,
    parse_until,
)
from invoice_watch.store.records import Silence
from invoice_watch.types import AlertEvent, EventKind, Severity
from tests.fakes_receivers import Answer, FakeAlertmanager, FakeWebhook
from tests.fakes_smtp import StartServer
from tests.world import PROD, World, open_world

T0 = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
BERLIN = ZoneInfo("Europe/Berlin")


def event(kind: EventKind = EventKind.FIRING, **kw: Any) -> AlertEvent:
    data: dict[str, Any] = {
        "kind": kind,
        "key": "failed-charge/org1/inv1",
        "rule": "failed-charge",
        "rule_type": "invoice_status",
        "severity": Severity.WARNING,
        "org_id": "org1",
        "org_name": "Production",
        "billing_url": "https://cloud.mongodb.com/billing",
        "summary": "s",
        "at": T0,
        "invoice_id": "inv1",
        "firing_since": T0,
    }
    data.update(kw)
    return AlertEvent(**data)


def silence(**kw: Any) -> Silence:
    data: dict[str, Any] = {
        "id": "s1",
        "rule": "failed-charge",
        "org_id": None,
        "invoice_id": None,
        "starts_at": T0 - timedelta(hours=1),
        "ends_at": T0 + timedelta(hours=4),
        "comment": "billing dispute",
        "created_at": T0 - timedelta(hours=1),
    }
    data.update(kw)
    return Silence(**data)


H = timedelta(hours=1)
# (what, event, silences, now, firing_silenced, effect)
RELEASE = [
    ("no silence", event(), [], T0, False, Effect.SEND),
    ("rule matches", event(), [silence()], T0, False, Effect.SILENCE),
    ("other rule", event(), [silence(rule="pending-over-budget")], T0, False, Effect.SEND),
    ("org matches", event(), [silence(org_id="org1")], T0, False, Effect.SILENCE),
    ("other org", event(), [silence(org_id="org2")], T0, False, Effect.SEND),
    ("invoice matches", event(), [silence(invoice_id="inv1")], T0, False, Effect.SILENCE),
    ("other invoice", event(), [silence(invoice_id="inv2")], T0, False, Effect.SEND),
    ("not started", event(), [silence(starts_at=T0 + H)], T0, False, Effect.SEND),
    ("ended", event(), [silence(ends_at=T0)], T0, False, Effect.SEND),
    ("reminder", event(EventKind.REMINDER), [silence()], T0, False, Effect.SILENCE),
    ("notice", event(EventKind.NOTICE), [silence()], T0, False, Effect.SILENCE),
    ("resolved, firing sent", event(EventKind.RESOLVED), [silence()], T0, False, Effect.SEND),
    ("resolved, firing silenced", event(EventKind.RESOLVED), [], T0, True, Effect.MUTE),
    (
        "resolved, firing silenced, silence on",
        event(EventKind.RESOLVED),
        [silence()],
        T0,
        True,
        Effect.MUTE,
    ),
]


@pytest.mark.parametrize(
    ("event_", "silences", "now", "firing_silenced", "effect"),
    [row[1:] for row in RELEASE],
    ids=[row[0] for row in RELEASE],
)
def test_on_release(event_, silences, now, firing_silenced, effect):
    assert on_release(event_, silences, now, firing_silenced=firing_silenced) == effect


# (what, event, silences, firing_silenced, firing_waiting, effect): at delivery time
DELIVERY = [
    ("no silence", event(), [], False, False, Effect.SEND),
    ("silenced while it waited", event(), [silence()], False, False, Effect.SILENCE),
    ("reminder", event(EventKind.REMINDER), [silence()], False, False, Effect.SILENCE),
    ("resolved, firing sent", event(EventKind.RESOLVED), [silence()], False, False, Effect.SEND),
    (
        "resolved, firing waits, silenced",
        event(EventKind.RESOLVED),
        [silence()],
        False,
        True,
        Effect.MUTE,
    ),
    ("resolved, firing waits, no silence", event(EventKind.RESOLVED), [], False, True, Effect.SEND),
    (
        "resolved, firing waits, other org silenced",
        event(EventKind.RESOLVED),
        [silence(org_id="org2")],
        False,
        True,
        Effect.SEND,
    ),
    ("resolved, firing silenced", event(EventKind.RESOLVED), [], True, False, Effect.MUTE),
]


@pytest.mark.parametrize(
    ("event_", "silences", "firing_silenced", "firing_waiting", "effect"),
    [row[1:] for row in DELIVERY],
    ids=[row[0] for row in DELIVERY],
)
def test_on_delivery(event_, silences, firing_silenced, firing_waiting, effect):
    got = on_delivery(
        event_, silences, T0, firing_silenced=firing_silenced, firing_waiting=firing_waiting
    )
    assert got == effect


# (what, event, silences, now, still_firing, effect)
LIFT = [
    ("still silenced", event(), [silence()], T0, True, Effect.SILENCE),
    ("ended, still fires", event(), [silence(ends_at=T0)], T0, True, Effect.SEND),
    ("ended, resolved since", event(), [silence(ends_at=T0)], T0, False, Effect.MUTE),
    ("expired by hand", event(), [], T0, True, Effect.SEND),
    (
        "another silence holds",
        event(),
        [silence(ends_at=T0), silence(id="s2")],
        T0,
        True,
        Effect.SILENCE,
    ),
    ("reminder ended", event(EventKind.REMINDER), [], T0, True, Effect.MUTE),
    ("notice ended", event(EventKind.NOTICE), [], T0, False, Effect.MUTE),
]


@pytest.mark.parametrize(
    ("event_", "silences", "now", "still_firing", "effect"),
    [row[1:] for row in LIFT],
    ids=[row[0] for row in LIFT],
)
def test_on_lift(event_, silences, now, still_firing, effect):
    assert on_lift(event_, silences, now, still_firing=still_firing) == effect


@pytest.mark.parametrize(
    ("kw", "error"),
    [
        ({}, "one of --for"),
        ({"duration": H, "until": T0 + H}, "one of --for"),
        ({"until": T0 - H}, "not in the future"),
        ({"duration": timedelta(days=400)}, "at most 366 days"),
        ({"duration": H, "comment": "  "}, "--comment is required"),
        ({"until": datetime(2026, 3, 3, 8, 0)}, "needs a time zone"),
    ],
)
def test_new_silence_refuses_what_makes_no_silence(kw, error):
    args: dict[str, Any] = {"org_id": None, "invoice_id": None, "comment": "why", "now": T0}
    args.update(kw)
    with pytest.raises(ValueError, match=error):
        new_silence("failed-charge", **args)


@pytest.mark.parametrize(
    ("text", "delta"), [("4h", 4 * H), ("2d", timedelta(days=2)), ("1d12h", 36 * H), ("30m", H / 2)]
)
def test_parse_for(text, delta):
    assert parse_for(text) == delta


@pytest.mark.parametrize("text", ["", "4", "-1h", "0h", "4 hours", "1234567h", "\u0663h"])
def test_parse_for_refuses(text):
    with pytest.raises(ValueError, match="--for"):
        parse_for(text)


# -- quiet hours: windows across midnight and DST, with real zoneinfo ----------------

NIGHT = QuietWindow(BERLIN, time(20, 0), time(8, 0), except_=frozenset({Severity.CRITICAL}))
WEEKEND_NIGHTS = QuietWindow(BERLIN, time(20, 0), time(8, 0), days=frozenset({5, 6}))
WEEKEND = QuietWindow(BERLIN, time(0, 0), time(0, 0), days=frozenset({5, 6}))
OFFICE_BREAK = QuietWindow(BERLIN, time(12, 0), time(13, 0))
SPRING_GAP = QuietWindow(BERLIN, time(2, 30), time(6, 0))


def berlin(
    year: int, month: int, day: int, hour: int, minute: int = 0, *, fold: int = 0
) -> datetime:
    local = datetime(year, month, day, hour, minute, tzinfo=BERLIN, fold=fold)
    return local.astimezone(UTC)


# (what, window, now, end or None)
WINDOWS = [
    ("evening, across midnight", NIGHT, berlin(2026, 3, 2, 21, 0), berlin(2026, 3, 3, 8, 0)),
    ("after midnight", NIGHT, berlin(2026, 3, 3, 7, 59), berlin(2026, 3, 3, 8, 0)),
    ("at the end", NIGHT, berlin(2026, 3, 3, 8, 0), None),
    ("at the start", NIGHT, berlin(2026, 3, 2, 20, 0), berlin(2026, 3, 3, 8, 0)),
    ("day time", NIGHT, berlin(2026, 3, 2, 12, 0), None),
    # DST starts 2026-03-29 02:00 CET -> 03:00 CEST: that night is 11 hours long
    ("spring forward", NIGHT, berlin(2026, 3, 28, 23, 0), berlin(2026, 3, 29, 8, 0)),
    # DST ends 2026-10-25 03:00 CEST -> 02:00 CET: that night is 13 hours long
    ("fall back, first 02:30", NIGHT, berlin(2026, 10, 25, 2, 30), berlin(2026, 10, 25, 8, 0)),
    (
        "fall back, second 02:30",
        NIGHT,
        berlin(2026, 10, 25, 2, 30, fold=1),
        berlin(2026, 10, 25, 8, 0),
    ),
    ("a start DST skips", SPRING_GAP, berlin(2026, 3, 29, 3, 15), None),
    ("after a start DST skips", SPRING_GAP, berlin(2026, 3, 29, 3, 45), berlin(2026, 3, 29, 6, 0)),
    ("friday night is not quiet", WEEKEND_NIGHTS, berlin(2026, 3, 6, 21, 0), None),
    ("saturday night", WEEKEND_NIGHTS, berlin(2026, 3, 7, 21, 0), berlin(2026, 3, 8, 8, 0)),
    (
        "sunday morning (saturday's)",
        WEEKEND_NIGHTS,
        berlin(2026, 3, 8, 7, 0),
        berlin(2026, 3, 8, 8, 0),
    ),
    (
        "monday morning (sunday's)",
        WEEKEND_NIGHTS,
        berlin(2026, 3, 9, 7, 0),
        berlin(2026, 3, 9, 8, 0),
    ),
    ("monday night", WEEKEND_NIGHTS, berlin(2026, 3, 9, 21, 0), None),
    (
        "the whole weekend is one quiet time",
        WEEKEND,
        berlin(2026, 3, 7, 10, 0),
        berlin(2026, 3, 9, 0, 0),
    ),
    ("weekend over", WEEKEND, berlin(2026, 3, 9, 0, 0), None),
    ("a window within a day", OFFICE_BREAK, berlin(2026, 3, 2, 12, 30), berlin(2026, 3, 2, 13, 0)),
    ("before a window within a day", OFFICE_BREAK, berlin(2026, 3, 2, 11, 59), None),
]


@pytest.mark.parametrize(
    ("window", "now", "end"), [row[1:] for row in WINDOWS], ids=[row[0] for row in WINDOWS]
)
def test_window_end(window, now, end):
    assert window_end(window, now) == end


def test_dst_nights_are_an_hour_shorter_and_longer():
    spring = window_end(NIGHT, berlin(2026, 3, 28, 20, 0))
    autumn = window_end(NIGHT, berlin(2026, 10, 24, 20, 0))
    assert spring is not None and autumn is not None
    assert spring - berlin(2026, 3, 28, 20, 0) == timedelta(hours=11)
    assert autumn - berlin(2026, 10, 24, 20, 0) == timedelta(hours=13)


# (what, window, start, end, quiet time in it)
QUIET_TIMES = [
    ("none", NIGHT, berlin(2026, 3, 2, 9, 0), berlin(2026, 3, 2, 19, 0), timedelta(0)),
    ("a whole night", NIGHT, berlin(2026, 3, 2, 19, 0), berlin(2026, 3, 3, 9, 0), 12 * H),
    ("from inside", NIGHT, berlin(2026, 3, 3, 7, 0), berlin(2026, 3, 3, 9, 0), H),
    ("to inside", NIGHT, berlin(2026, 3, 2, 19, 0), berlin(2026, 3, 2, 21, 30), 1.5 * H),
    ("two nights", NIGHT, berlin(2026, 3, 2, 12, 0), berlin(2026, 3, 4, 12, 0), 24 * H),
    ("spring forward", NIGHT, berlin(2026, 3, 28, 19, 0), berlin(2026, 3, 29, 9, 0), 11 * H),
    ("fall back", NIGHT, berlin(2026, 10, 24, 19, 0), berlin(2026, 10, 25, 9, 0), 13 * H),
    ("a weekend", WEEKEND, berlin(2026, 3, 6, 20, 0), berlin(2026, 3, 9, 8, 0), 48 * H),
    ("end before start", NIGHT, berlin(2026, 3, 3, 9, 0), berlin(2026, 3, 2, 19, 0), 0 * H),
    ("only 62 days looked at", NIGHT, T0 - timedelta(days=400), T0, 62 * 12 * H),
]


@pytest.mark.parametrize(
    ("window", "start", "end", "quiet"),
    [row[1:] for row in QUIET_TIMES],
    ids=[row[0] for row in QUIET_TIMES],
)
def test_quiet_time(window, start, end, quiet):
    assert quiet_time(window, start, end) == quiet


@pytest.mark.parametrize(
    ("window", "stretch"),
    [(NIGHT, 12 * H), (WEEKEND_NIGHTS, 12 * H), (WEEKEND, 48 * H), (OFFICE_BREAK, H)],
)
def test_longest(window, stretch):
    assert longest(window) == stretch


def test_except_severities_go_at_once():
    night = berlin(2026, 3, 2, 22, 0)
    assert holds(NIGHT, [event(severity=Severity.CRITICAL)], night) is None
    assert holds(NIGHT, [event(severity=Severity.WARNING)], night) == berlin(2026, 3, 3, 8, 0)
    assert holds(NIGHT, [event(severity=Severity.WARNING)], berlin(2026, 3, 2, 12, 0)) is None


# -- end to end: the simulator, the outbox, a loopback webhook --------------------------

RULES: list[dict[str, Any]] = [
    {"name": "failed-charge", "type": "invoice_status", "notify": ["hook"], "severity": "critical"},
    {
        "name": "pending-over-budget",
        "type": "pending_amount",
        "threshold": 5000,
        "notify": ["hook"],
    },
]


@pytest.fixture(params=["sqlite", "postgresql"])
def state(request: pytest.FixtureRequest, tmp_path: Any) -> dict[str, str]:
    """The end-to-end tests' ``state`` section: a file, then a PostgreSQL database (the
    ``silence`` commands write beside the leader there too)."""
    if request.param == "sqlite":
        return {"path": str(tmp_path / "state.db")}
    return {"url": request.getfixturevalue("postgres_url")}


async def leading(app: App) -> App:
    """The App, leading when its state is PostgreSQL's (as `run` makes it first)."""
    if app.leadership is not None:
        assert await app.leadership.step()
    return app


async def advance(world: World, app: App, seconds: float) -> None:
    """Time passes; a leader renews its lease meanwhile (as `run` does every third of
    its TTL; the FakeClock jumps over the renewals)."""
    world.clock.advance(seconds)
    await leading(app)


def config_for(
    world: World,
    fake: FakeWebhook,
    state: dict[str, str] | None = None,
    delivery: dict[str, Any] | None = None,
    **notifier: Any,
) -> Config:
    data = world.config_data(rules=RULES)
    if state is not None:
        data["state"] = state
    if delivery:
        data["delivery"] = delivery
    data["notifiers"]["hook"] = {"type": "webhook", "url": fake.endpoint, **notifier}
    return load(yaml.safe_dump(data), filename="e2e.yaml", env={}, base_dir=world.tmp)


def kinds(fake: FakeWebhook) -> list[tuple[str, str]]:
    return [(e["kind"], e["rule"]) for body in fake.accepted for e in body["events"]]


async def test_e2e_silence_added_beside_the_running_daemon_holds_the_alert_until_it_ends(
    world: World, state: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    async with FakeWebhook() as fake:
        config = config_for(world, fake, state)
        async with App(config, clock=world.clock) as app:
            await leading(app)
            now = world.clock.now()
            # the daemon holds the state file; the command writes beside it
            await silence_cmd.add(
                config,
                rule="failed-charge",
                org=PROD,
                invoice=None,
                duration="4h",
                until=None,
                comment="billing dispute #123",
                now=now,
            )
            await app.run_cycle()
            assert await app.deliverer.drain(60) == 0
            assert ("FIRING", "failed-charge") not in kinds(fake)
            assert ("FIRING", "pending-over-budget") in kinds(fake)
            silenced = await app.store.outbox.messages(("silenced",))
            assert [r.summary.split()[:2] for r in silenced] == [["FIRING", "failed-charge"]]
            assert "silenced by" in (silenced[0].last_error or "")
            (active,) = await app.store.silences.listing(now)
            # expired by the command while the daemon runs: no restart
            await silence_cmd.expire(config, active.id, now=now + timedelta(minutes=5))
            await advance(world, app, 600)
            await app.deliverer.drain(60)
            assert kinds(fake).count(("FIRING", "failed-charge")) == 1
            assert await app.store.outbox.messages(("silenced",)) == []
    out = capsys.readouterr().out
    assert "added" in out and "expired" in out


async def test_e2e_an_alert_resolved_while_silenced_is_never_sent(
    world: World, state: dict[str, str]
) -> None:
    async with FakeWebhook() as fake:
        config = config_for(world, fake, state)
        async with App(config, clock=world.clock) as app:
            await leading(app)
            await silence_cmd.add(
                config,
                rule="failed-charge",
                org=None,
                invoice=None,
                duration=None,
                until=(world.clock.now() + timedelta(hours=2)).isoformat(),
                comment="dispute",
                now=world.clock.now(),
            )
            await app.run_cycle()
            await app.deliverer.drain(60)
            world.sim.set_status(world.sim.scenario.invoice("failed").id, "PAID")
            await advance(world, app, 60)
            await app.run_cycle()
            await app.deliverer.drain(60)
            await advance(world, app, 3 * 3600)  # the silence ends
            await app.deliverer.drain(60)
            muted = await app.store.outbox.messages(("muted",))
    assert [k for k in kinds(fake) if k[1] == "failed-charge"] == []
    assert sorted(r.summary.split()[0] for r in muted) == ["FIRING", "RESOLVED"]


# A Monday, 20:28 in Berlin (CET): inside the 20:00-08:00 windows below, whatever the
# time the tests run at (with the real time, they failed in the morning and the day).
MONDAY_EVENING = datetime(2026, 11, 30, 19, 28, tzinfo=UTC)


@pytest.fixture
async def night(tmp_path: Path, smtp_server: StartServer) -> AsyncIterator[World]:
    """The world, its clock at :data:`MONDAY_EVENING`."""
    async with open_world(tmp_path, smtp_server, MONDAY_EVENING) as world:
        yield world


async def test_e2e_quiet_hours_hold_messages_and_send_one_summary_when_they_end(
    night: World, state: dict[str, str]
) -> None:
    # The clock starts on a Monday, 20:28 in Berlin: inside the window.
    quiet = {"timezone": "Europe/Berlin", "from": "20:00", "to": "08:00", "except": ["critical"]}
    async with FakeWebhook() as fake:
        config = config_for(night, fake, state, quiet_hours=quiet)
        async with App(config, clock=night.clock) as app:
            await leading(app)
            await app.run_cycle()
            await app.deliverer.drain(60)
            at_once = kinds(fake)
            waiting = await app.store.outbox.messages(("pending",))
            assert waiting and all("quiet hours until" in (r.last_error or "") for r in waiting)
            before = len(fake.accepted)
            # the window ends at 08:00 Berlin; the deliverer is woken every max_backoff
            for _ in range(14 * 60):
                await advance(night, app, 60)
                await app.deliverer.deliver_due()
                if len(fake.accepted) > before:
                    break
            end = night.clock.now().astimezone(ZoneInfo("Europe/Berlin"))
            assert await app.store.outbox.messages(("pending",)) == []
    assert ("FIRING", "failed-charge") in at_once  # critical: through at once
    assert all(rule == "failed-charge" for _, rule in at_once)
    assert len(fake.accepted) == before + 1  # what waited: one summary
    assert len(fake.accepted[-1]["events"]) == len(waiting)
    assert (end.hour, end.minute) == (8, 0) or (end.hour, end.minute) == (8, 1)


async def add_silence(world: World, config: Config, hours: int = 4) -> None:
    await silence_cmd.add(
        config,
        rule="failed-charge",
        org=None,
        invoice=None,
        duration=f"{hours}h",
        until=None,
        comment="billing dispute #123",
        now=world.clock.now(),
    )


@pytest.mark.parametrize("group_over", [5, 1], ids=["one by one", "grouped"])
async def test_e2e_a_silence_holds_a_message_that_was_already_waiting_for_its_receiver(
    world: World, state: dict[str, str], group_over: int
) -> None:
    # The receiver is down when the alert fires: its messages wait (retried). An
    # operator adds a silence meanwhile: when the receiver is back, the silenced alert's
    # message is not sent (Alertmanager applies silences at notification time), the
    # others are; it is sent when the silence ends, since the alert still fires.
    async with FakeWebhook() as fake:
        config = config_for(world, fake, state, delivery={"group_over": group_over})
        async with App(config, clock=world.clock) as app:
            await leading(app)
            fake.script(Answer(503))
            await app.run_cycle()
            await app.deliverer.deliver_due()
            assert fake.accepted == [] and len(fake.received) == 1
            waiting = await app.store.outbox.messages(("pending",))
            assert waiting and max(r.attempts for r in waiting) == 1
            await add_silence(world, config)
            await advance(world, app, 3600)  # the receiver is back
            assert await app.deliverer.drain(60) == 0
            assert ("FIRING", "failed-charge") not in kinds(fake)
            assert ("FIRING", "pending-over-budget") in kinds(fake)
            silenced = await app.store.outbox.messages(("silenced",))
            assert [r.summary.split()[:2] for r in silenced] == [["FIRING", "failed-charge"]]
            assert "silenced by" in (silenced[0].last_error or "")
            await advance(world, app, 4 * 3600)  # the silence ends; the alert still fires
            await app.deliverer.drain(60)
            assert await app.store.outbox.messages(("silenced", "pending")) == []
    assert kinds(fake).count(("FIRING", "failed-charge")) == 1
    assert kinds(fake)[-1] == ("FIRING", "failed-charge")


async def test_e2e_an_alert_resolved_while_its_waiting_message_is_silenced_is_never_sent(
    world: World, state: dict[str, str]
) -> None:
    async with FakeWebhook() as fake:
        config = config_for(world, fake, state)
        async with App(config, clock=world.clock) as app:
            await leading(app)
            fake.script(*[Answer(503)] * 3)
            await app.run_cycle()
            await app.deliverer.deliver_due()
            await add_silence(world, config, hours=2)
            world.sim.set_status(world.sim.scenario.invoice("failed").id, "PAID")
            await advance(world, app, 60)
            await app.run_cycle()  # its RESOLVED is released while its FIRING waits
            for _ in range(4):  # the receiver comes back meanwhile
                await advance(world, app, 600)
                await app.deliverer.drain(60)
            await advance(world, app, 3 * 3600)  # the silence ends
            await app.deliverer.drain(60)
            muted = await app.store.outbox.messages(("muted",))
            assert await app.store.outbox.messages(("silenced", "pending")) == []
    assert [k for k in kinds(fake) if k[1] == "failed-charge"] == []
    assert ("FIRING", "pending-over-budget") in kinds(fake)
    assert sorted(r.summary.split()[0] for r in muted) == ["FIRING", "RESOLVED"]


async def test_e2e_a_quiet_window_longer_than_max_age_loses_nothing(
    night: World, state: dict[str, str]
) -> None:
    # Held all night (11.5 h) with max_age 2 h, across a restart: the receiver failing
    # once when the window ends must not make the messages fail (an alert lost by
    # configuration); time held by quiet hours does not count toward max_age.
    quiet = {"timezone": "Europe/Berlin", "from": "20:00", "to": "08:00"}
    delivery = {"max_age": "2h"}
    async with FakeWebhook() as fake:
        config = config_for(night, fake, state, delivery=delivery, quiet_hours=quiet)
        async with App(config, clock=night.clock) as app:
            await leading(app)
            await app.run_cycle()
            await app.deliverer.deliver_due()
            held = await app.store.outbox.messages(("pending",))
            assert held and fake.received == []
            await advance(night, app, 5 * 3600)
            await app.deliverer.deliver_due()
        fake.script(Answer(503))  # the first request after the window fails
        async with App(config, clock=night.clock) as app:  # a restart in the window
            await leading(app)
            for _ in range(8 * 6):
                await advance(night, app, 600)
                await app.deliverer.deliver_due()
            assert await app.store.outbox.messages(("failed",)) == []
            assert await app.store.outbox.messages(("pending",)) == []
    assert len(fake.received) > 1  # the summary failed once, then what it held was sent
    assert sum(len(body["events"]) for body in fake.accepted) == len(held)


async def test_e2e_a_quiet_hours_summary_that_fails_is_retried_as_the_same_summary(
    night: World, state: dict[str, str]
) -> None:
    # The messages held all night go as one summary when the window ends; the receiver
    # refuses it once: it is retried as that one summary (across a restart too), not as
    # the messages it held.
    quiet = {"timezone": "Europe/Berlin", "from": "20:00", "to": "08:00"}
    async with FakeWebhook() as fake:
        config = config_for(night, fake, state, quiet_hours=quiet)
        async with App(config, clock=night.clock) as app:
            await leading(app)
            await app.run_cycle()
            await app.deliverer.deliver_due()
            held = await app.store.outbox.messages(("pending",))
            assert len(held) == 2 and fake.received == []
            fake.script(Answer(503))
            for _ in range(14 * 6):  # until the window ends
                await advance(night, app, 600)
                await app.deliverer.deliver_due()
                if fake.received:
                    break
            assert len(fake.received) == 1 and fake.accepted == []
        async with App(config, clock=night.clock) as app:  # a restart before the retry
            await leading(app)
            for _ in range(6):
                await advance(night, app, 600)
                await app.deliverer.deliver_due()
            assert await app.store.outbox.messages(("pending",)) == []
            sent = await app.store.outbox.messages(("sent",))
    assert len(fake.received) == 2 and len(fake.accepted) == 1
    assert fake.accepted[0]["events"] == fake.received[0].body["events"]
    assert len(fake.accepted[0]["events"]) == 2
    assert sorted(r.state for r in sent) == ["sent"] and "2 alerts" in sent[0].summary


def rules_in(am: FakeAlertmanager) -> dict[str, int]:
    """How often Alertmanager was given each rule's alert."""
    return {alert.labels["rule"]: alert.posts for alert in am.alerts.values()}


async def test_e2e_alertmanager_is_not_given_a_silenced_alert_again_until_it_is_sent(
    world: World, state: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Alertmanager is given what fires again every resend_every (from the alert state):
    # not an alert whose FIRING a silence holds and that was never sent to it; once the
    # silence ends and the alert still fires, it is sent, then given again.
    monkeypatch.setattr(alertmanager, "_now", world.clock.now)
    async with FakeAlertmanager() as am:
        data = world.config_data(rules=RULES)
        data["state"] = state
        data["notifiers"]["hook"] = {"type": "alertmanager", "url": am.url, "resend_every": "1m"}
        config = load(yaml.safe_dump(data), filename="e2e.yaml", env={}, base_dir=world.tmp)
        async with App(config, clock=world.clock) as app:
            await leading(app)
            await add_silence(world, config, hours=2)
            await app.run_cycle()
            await app.deliverer.deliver_due()
            for _ in range(10):  # ten re-posts of what fires
                await advance(world, app, 60)
                await app.deliverer.deliver_due()
                assert list(rules_in(am)) == ["pending-over-budget"]
            assert rules_in(am)["pending-over-budget"] >= 10
            (active,) = await app.store.silences.listing(world.clock.now())
            await silence_cmd.expire(config, active.id, now=world.clock.now())
            await advance(world, app, 60)
            await app.deliverer.deliver_due()  # its FIRING goes out
            assert rules_in(am).get("failed-charge") == 1
            for _ in range(3):  # and it is given again with what fires
                await advance(world, app, 60)
                await app.deliverer.deliver_due()
            assert rules_in(am)["failed-charge"] == 4
    assert am.refused == []


async def test_silence_add_refuses_an_unknown_rule_and_missing_state(world: World) -> None:
    async with FakeWebhook() as fake:
        config = config_for(world, fake)
        args: dict[str, Any] = {
            "org": None,
            "invoice": None,
            "duration": "1h",
            "until": None,
            "comment": "x",
        }
        with pytest.raises(UsageError, match="no such rule"):
            await silence_cmd.add(config, rule="nope", **args)
        from invoice_watch.errors import StateError

        with pytest.raises(StateError, match="no state file"):
            await silence_cmd.add(config, rule="failed-charge", **args)


# -- check-config: quiet hours validated with line numbers ---------------------------

QUIET_CONFIG = """\
atlas:
  auth:
    public_key: pub
    private_key: secret
organizations:
  - id: 5f1e0c0a9b8d7e6f5a4b3c2d
notifiers:
  out:
    type: console
    quiet_hours:
      timezone: {zone}
      from: {start}
      to: "08:00"
      days: {days}
      except: [critical]
rules:
  - name: failed
    type: invoice_status
    notify: [out]
"""


@pytest.mark.parametrize(
    ("zone", "start", "days", "line", "path", "words"),
    [
        ("Mars/Olympus", '"20:00"', "[]", 11, "notifiers.out.quiet_hours.timezone", "time zone"),
        ("Europe/Berlin", "20:00", "[]", 12, "notifiers.out.quiet_hours.from", "in quotes"),
        ("Europe/Berlin", '"25:00"', "[]", 12, "notifiers.out.quiet_hours.from", "24-hour"),
        ("Europe/Berlin", '"20:00"', "[sat, funday]", 14, "notifiers.out.quiet_hours.days", ""),
        ("Europe/Berlin", '"08:00"', "[]", 11, "notifiers.out.quiet_hours", "for ever"),
        (
            "Europe/Berlin",
            '"08:00"',
            "[mon, tue, wed, thu, fri, sat, sun]",
            11,
            "notifiers.out.quiet_hours",
            "for ever",
        ),
    ],
)
def test_check_config_names_the_line_of_a_bad_quiet_hours_key(zone, start, days, line, path, words):
    from invoice_watch.errors import ConfigError

    text = QUIET_CONFIG.format(zone=zone, start=start, days=days)
    with pytest.raises(ConfigError) as info:
        load(text, env={})
    (problem,) = info.value.problems
    assert problem.path.startswith(path), problem
    assert problem.line == line, problem
    assert words in problem.message


def test_quiet_hours_config_loads():
    text = QUIET_CONFIG.format(zone="Europe/Berlin", start='"20:00"', days="[sat, sun]")
    windows = load(text, env={}).quiet_windows()
    assert windows["out"].days == frozenset({5, 6})
    assert windows["out"].except_ == frozenset({Severity.CRITICAL})


def test_quiet_hours_always_on_load_when_every_severity_goes_through():
    text = QUIET_CONFIG.format(
        zone="Europe/Berlin", start='"08:00"', days="[mon, tue, wed, thu, fri, sat, sun]"
    ).replace("except: [critical]", "except: [info, warning, critical]")
    assert load(text, env={}).quiet_windows()["out"].days == frozenset(range(7))


def test_summary_shows_quiet_hours_and_that_they_do_not_count_toward_max_age():
    from invoice_watch.config.summarize import summary

    text = QUIET_CONFIG.format(zone="Europe/Berlin", start='"00:00"', days="[sat, sun]")
    lines = summary(load(text.replace('to: "08:00"', 'to: "00:00"'), env={})).splitlines()
    (line,) = [line for line in lines if line.startswith("  - out:")]
    assert line.endswith(
        "; quiet hours 00:00-00:00 Europe/Berlin on sat, sun, critical at once "
        "(longest 2d, not counted toward max_age)"
    )


@pytest.mark.parametrize(
    ("left", "shown"),
    [(timedelta(seconds=50), "(in 50s)"), (timedelta(hours=26, minutes=3), "(in 1d 2h)")],
)
def test_silence_list_says_when_a_silence_ends_to_the_second_under_a_minute(
    left: timedelta, shown: str
):
    """50 s left read "(in 0h00m)": the ends column says it as every table does."""
    now = datetime(2026, 11, 15, 12, 0, tzinfo=UTC)
    silence = Silence("s1", "failed-charge", None, None, now, now + left, "", now)
    assert shown in silence_cmd.silence_rows([silence], now)


def test_a_bad_until_says_what_to_write_and_is_chained_to_its_cause():
    """errors.py: a conversion chains its cause unless that could show a secret."""
    with pytest.raises(ValueError, match="use an ISO 8601 time with its offset") as raised:
        parse_until("tomorrow")
    assert isinstance(raised.value.__cause__, ValueError)


def test_quiet_hours_times_take_ascii_digits_only():
    """Digits are ASCII everywhere (config/quantities.py): "٠٩:٠٠" (Arabic-Indic) is
    not 09:00."""
    from invoice_watch.config.notifiers import QuietHoursConfig

    ok = QuietHoursConfig.model_validate({"timezone": "UTC", "from": "20:00", "to": "07:00"})
    assert ok.from_.hour == 20
    with pytest.raises(ValueError, match="24-hour time"):
        QuietHoursConfig.model_validate(
            {"timezone": "UTC", "from": "\u0662\u0660:00", "to": "07:00"}
        )
