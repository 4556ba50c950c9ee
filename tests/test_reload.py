"""A configuration reload (SIGHUP): every setting is applied or the reload is refused
naming it (issue 14 §2), the file is parsed off the event loop and one reload runs at a
time (issue 12 §3)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from pathlib import Path

import aiohttp
import pytest
import yaml

from invoice_watch.app import App
from invoice_watch.config import Config, LogConfig, load_file
from invoice_watch.reload import APPLY, MAX_STUCK_RELOADS, RELOAD_SECONDS, Apply, changes, keys
from tests.manual_clock import ManualClock
from tests.world import World


def test_every_config_key_says_how_a_reload_applies_it():
    """Walks the pydantic models: a key added to the config models without a line in
    invoice_watch/reload.py's APPLY (or a line left for a key that is gone) fails."""
    model_keys = set(keys())
    assert not model_keys - APPLY.keys(), (
        "classify these keys in invoice_watch/reload.py APPLY (how a reload applies them, "
        f"or Apply.RESTART): {sorted(model_keys - APPLY.keys())}"
    )
    assert not APPLY.keys() - model_keys, f"not config keys: {sorted(APPLY.keys() - model_keys)}"


def test_keys_are_written_as_in_the_file_through_every_union_member():
    model_keys = keys()
    for key in (
        "atlas.auth.public_key",  # digest
        "atlas.auth.client_secret",  # service account
        "notifiers.*.webhook_url",  # slack
        "notifiers.*.from",  # email, by its YAML name
        "rules.*.threshold",  # pending_amount, by its YAML name
        "rules.*.after",  # poll_failure
        "organizations.*.id",
        "http.listen",
    ):
        assert key in model_keys


def test_changes_name_each_changed_setting_and_how_it_applies(world: World):
    old = world.config()
    data = world.config_data(http={"listen": "127.0.0.1:9464"}, poll={"interval": "1h"})
    data["notifiers"]["mail"]["to"] = ["someone@example.com"]
    data["rules"][1]["threshold"] = 6000
    data["state"] = {"path": str(world.tmp / "other.db")}
    from tests.conftest import make_config

    new = make_config(world.tmp, data)
    assert changes(old, old) == {}
    assert changes(old, new) == {
        "http.listen": Apply.HTTP,
        "http.max_connections": Apply.HTTP,  # the section appeared: its defaults too
        "http.idle_timeout": Apply.HTTP,
        "notifiers.mail.to": Apply.NOTIFIERS,
        "poll.interval": Apply.SCHEDULE,
        "rules.1.threshold": Apply.RULES,
        "state.path": Apply.RESTART,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def healthz(port: int) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/healthz") as resp,
    ):
        return resp.status


async def test_reload_moves_the_http_endpoint_or_is_refused_naming_http_listen(
    world: World, caplog: pytest.LogCaptureFixture
):
    first, second = free_port(), free_port()
    clock = ManualClock(world.clock.now())
    config = world.config(http={"listen": f"127.0.0.1:{first}"})
    stop = asyncio.Event()
    async with App(config, clock=clock) as app:
        daemon = asyncio.create_task(app.serve(stop))
        try:
            async with asyncio.timeout(10):
                await app.cycles.done.wait()
            assert await healthz(first) == 200
            moved = world.config(http={"listen": f"127.0.0.1:{second}"})
            assert await app.reload(moved)
            assert app.daemon.endpoint.port == second and await healthz(second) == 200
            with pytest.raises(aiohttp.ClientConnectionError):
                await healthz(first)
            with socket.socket() as busy:  # a port another program holds
                busy.bind(("127.0.0.1", 0))
                busy.listen()
                taken = busy.getsockname()[1]
                refused = world.config(
                    http={"listen": f"127.0.0.1:{taken}"}, poll={"interval": "1h"}
                )
                assert not await app.reload(refused)
            assert app.config is moved  # nothing of the refused file was taken
            assert app.daemon.endpoint.port == second and await healthz(second) == 200
            # The same address with other limits: stopped, then listening again.
            again = world.config(http={"listen": f"127.0.0.1:{second}", "max_connections": 2})
            assert await app.reload(again)
            assert await healthz(second) == 200
            assert await app.reload(world.config())  # no `http:` any more
            with pytest.raises(aiohttp.ClientConnectionError):
                await healthz(second)
        finally:
            stop.set()
            await asyncio.wait_for(daemon, 10)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [
        f"config reload refused: http.listen: cannot listen on 127.0.0.1:{taken}: the port is "
        "already in use by another program (9100, for example, is node_exporter's); choose a "
        "free port in http.listen, or stop that program; keeping the running configuration"
    ]


async def test_reload_applies_what_changed_and_only_that(world: World):
    applied: list[LogConfig] = []
    config = world.config()
    async with App(config, clock=world.clock, configure_logging=applied.append) as app:
        client, notifiers = app.client, app.notifiers
        only = [{"name": "only", "type": "invoice_status", "notify": ["mail"]}]
        assert await app.reload(world.config(rules=only))
        assert app.client is client and app.notifiers is notifiers and applied == []
        data = world.config_data(rules=only)
        data["atlas"]["timeout"] = "5s"
        data["log"] = {"level": "debug", "format": "json"}
        data["delivery"] = {"max_age": "2h"}
        from tests.conftest import make_config

        assert await app.reload(make_config(world.tmp, data))
        assert app.client is not client and app.client._config.timeout.total_seconds() == 5
        assert app.notifiers is notifiers  # unchanged
        assert applied == [LogConfig(level="debug", format="json")]
        assert app.deliverer.limits.max_age.total_seconds() == 7200


async def test_a_reload_parses_off_the_event_loop_and_a_storm_makes_one_more(world: World):
    """A config file that takes long to parse (huge, or hostile) does not freeze the
    daemon, and 100 SIGHUPs meanwhile make one more reload, not 100."""
    path = world.write_config()
    started, release = threading.Event(), threading.Event()
    parses: list[str] = []

    def slow_load(source: Path) -> Config:
        parses.append(threading.current_thread().name)
        started.set()
        release.wait(10)
        return load_file(source)

    clock = ManualClock(world.clock.now())  # no time passes: the read is not abandoned
    async with App(load_file(path), clock=clock, load_config=slow_load) as app:
        began = time.monotonic()
        first = app.request_reload()
        assert await asyncio.to_thread(started.wait, 10)
        assert time.monotonic() - began < 5  # the loop ran while the file was parsed
        assert all(app.request_reload() is first for _ in range(100))
        release.set()
        await asyncio.wait_for(first, 10)
    assert parses == ["config-reload", "config-reload"]


async def test_reload_that_needs_a_restart_is_refused_naming_the_setting(
    world: World, caplog: pytest.LogCaptureFixture
):
    config = world.config()
    moved = world.config_data(poll={"interval": "1h"})
    moved["state"] = {"path": str(world.tmp / "elsewhere.db")}
    from tests.conftest import make_config

    async with App(config, clock=world.clock) as app:
        assert not await app.reload(make_config(world.tmp, moved))
        assert app.config is config  # not even poll.interval was taken
    assert (
        "config reload refused: state.path changed, which takes a restart; keeping the "
        "running configuration"
    ) in caplog.messages


# -- a read that never ends, or a file that is no regular file (issue 12 §A12-12) --------


async def test_a_reload_whose_read_never_ends_is_abandoned_and_the_next_one_applies(
    world: World, caplog: pytest.LogCaptureFixture
):
    """The attack's SIGHUP with a FIFO as a secret file, then two with a fixed config:
    the first read never ended (blocked in open()) and every later reload queued
    behind it until a restart. Now a read is abandoned after RELOAD_SECONDS on the
    daemon's clock (what no server can produce here, a read hung on a network file
    system, is the load function waiting), and the SIGHUP that came meanwhile reads
    the file again and takes it."""
    path = world.write_config()
    hung = threading.Event()  # set: released at the end of the test
    loads: list[int] = []

    def load(source: Path) -> Config:
        loads.append(1)
        if len(loads) == 1:
            hung.wait(30)
        return load_file(source)

    clock = ManualClock(world.clock.now())
    async with App(load_file(path), clock=clock, load_config=load) as app:
        try:
            first = app.request_reload()
            await clock.sleeping()  # the reload's timer
            world.write_config(poll={"interval": "1h"})
            assert app.request_reload() is first  # queued behind the stuck read
            clock.advance(RELOAD_SECONDS)
            await asyncio.wait_for(first, 10)
            assert app.config.poll.interval.total_seconds() == 3600
        finally:
            hung.set()
    assert len(loads) == 2
    assert (
        f"config reload abandoned: reading {path} has not finished after 30s (a file on a "
        "hung network file system?); keeping the running configuration; reading it again"
    ) in caplog.messages
    assert any(m.startswith("configuration reloaded: ") for m in caplog.messages)


async def test_reads_stuck_past_the_bound_refuse_reloads_until_a_restart(
    world: World, caplog: pytest.LogCaptureFixture
):
    """Each abandoned read holds a thread: past MAX_STUCK_RELOADS of them still stuck,
    a reload is refused at once, saying so, rather than piling up threads."""
    path = world.write_config()
    hung = threading.Event()

    def load(source: Path) -> Config:
        hung.wait(30)
        return load_file(source)

    clock = ManualClock(world.clock.now())
    async with App(load_file(path), clock=clock, load_config=load) as app:
        try:
            for _ in range(MAX_STUCK_RELOADS):
                reload = app.request_reload()
                await clock.sleeping()
                clock.advance(RELOAD_SECONDS)
                await asyncio.wait_for(reload, 10)
            await asyncio.wait_for(app.request_reload(), 10)  # refused at once
            threads = [t for t in threading.enumerate() if t.name == "config-reload"]
        finally:
            hung.set()
    assert len(threads) == MAX_STUCK_RELOADS
    abandoned = [m for m in caplog.messages if m.startswith("config reload abandoned")]
    assert len(abandoned) == MAX_STUCK_RELOADS
    assert caplog.messages[-1] == (
        f"config reload refused: {MAX_STUCK_RELOADS} earlier reads of {path} never finished "
        "(a file on a hung network file system?); restart the daemon to read it again"
    )


async def test_a_reload_of_a_config_naming_a_fifo_is_refused_at_once_and_the_next_applies(
    world: World, caplog: pytest.LogCaptureFixture
):
    """The attack itself, with the real loader: a FIFO as the private key file."""
    fifo = world.tmp / "pkfifo"
    os.mkfifo(fifo)
    path = world.write_config()
    data = world.config_data()
    data["atlas"]["auth"] = {"public_key": "pub", "private_key_file": str(fifo)}
    clock = ManualClock(world.clock.now())
    async with App(load_file(path), clock=clock) as app:
        path.write_text(yaml.safe_dump(data))
        await asyncio.wait_for(app.request_reload(), 10)
        world.write_config(poll={"interval": "1h"})
        await asyncio.wait_for(app.request_reload(), 10)
        assert app.config.poll.interval.total_seconds() == 3600
    refused = [m for m in caplog.messages if m.startswith("config reload refused")]
    assert len(refused) == 1
    assert f"atlas.auth.private_key_file: cannot read {fifo}: not a regular file" in refused[0]


async def test_a_reload_of_values_nested_through_aliases_is_refused_at_its_line(
    world: World, caplog: pytest.LogCaptureFixture
):
    """AD-4 on SIGHUP: ten anchors of 60 levels nested through aliases were "config
    reload refused: FILE: maximum recursion depth exceeded", no line or setting named.
    Now one problem at its file:line; the running configuration stays."""
    from tests.test_config import nested_through_aliases

    path = world.write_config()
    clock = ManualClock(world.clock.now())
    async with App(load_file(path), clock=clock) as app:
        path.write_text(nested_through_aliases(10, 60) + path.read_text())
        await asyncio.wait_for(app.request_reload(), 10)
        assert app.config.source == path
    refused = [m for m in caplog.messages if m.startswith("config reload refused")]
    assert refused == [
        f"config reload refused: {path}:2:71: values nested more than 64 levels deep "
        "through aliases (*name); a configuration needs about 5: use fewer aliases of "
        "nested values"
    ]


# -- what a reload says (issue 14 §3, §10) ------------------------------------------------


async def test_a_reload_names_the_keys_the_files_set_and_logs_the_new_warnings(
    world: World, caplog: pytest.LogCaptureFixture
):
    """Renaming a notifier listed keys neither file sets (`notifiers.slack.token`, the
    defaults of the other notifier kind); and a reload did not log the warnings `run`
    logs at start (a `repeat` shorter than the interval printed only `changed:`)."""
    from tests.conftest import make_config

    caplog.set_level(logging.INFO)
    data = world.config_data(poll={"interval": "10m"})
    data["notifiers"]["team-slack"] = data["notifiers"].pop("slack")
    for rule in data["rules"]:
        rule["notify"] = ["team-slack", "mail"]
    data["rules"][0]["repeat"] = "1m"
    async with App(world.config(poll={"interval": "10m"}), clock=world.clock) as app:
        assert await app.reload(make_config(world.tmp, data))
    (line,) = [m for m in caplog.messages if m.startswith("configuration reloaded")]
    assert line == (
        "configuration reloaded: 2 organization(s), 2 rule(s), 2 notifier(s); changed: "
        "notifiers.slack.type, notifiers.team-slack.type, notifiers.slack.webhook_url, "
        "notifiers.team-slack.webhook_url, rules.0.notify, rules.1.notify, rules.0.repeat"
    )
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert ": rules.0.repeat: warning: repeat 1m is shorter than poll.interval 10m" in warnings[0]
