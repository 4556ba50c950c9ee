"""The application, wired: ``async with App(config) as app: await app.serve(stop)``.

:class:`App` opens what invoice_watch runs on and connects its parts, each the owner of
its own state (``app.cycles.last``, ``app.daemon.health()``, ...): the store
(:func:`~invoice_watch.store.open_store`), the Atlas client, the notifiers and the
deliverer, the poll cycle (:class:`~invoice_watch.runner.CycleRunner`, one
:class:`~invoice_watch.cycle.Cycle` at a time), the daemon around it
(:class:`~invoice_watch.daemon.Daemon`) and configuration reloads
(:class:`~invoice_watch.reload.Reloads`, applied by :meth:`App.reload`); everything it
opened closes, in reverse order, when it is left. Signals, printing and exit statuses
are the CLI's business (:mod:`invoice_watch.cli`), so tests embed the App.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path

from invoice_watch.atlas.client import AtlasClient
from invoice_watch.clock import Clock, SystemClock
from invoice_watch.config import Config, LogConfig, load_file
from invoice_watch.cycle import CycleResult
from invoice_watch.daemon import Daemon, OnceOutcome, run_once
from invoice_watch.deliver.deliverer import Deliverer
from invoice_watch.errors import ListenError
from invoice_watch.http_endpoint import HttpEndpoint
from invoice_watch.leader import Leadership, lease_over
from invoice_watch.metrics import Metrics
from invoice_watch.reload import Apply, Reloads, changes
from invoice_watch.report.scheduler import NoUsage, Reporter, UsageSource
from invoice_watch.rules import settled_statuses
from invoice_watch.runner import CycleRunner
from invoice_watch.store import Store, location, open_copy, open_store
from invoice_watch.types import Notifier

log = logging.getLogger(__name__)


class App:
    """invoice_watch, embeddable: ``async with App(config) as app: await app.serve(stop)``.

    ``load_config`` reads the config file again on :meth:`request_reload` (SIGHUP);
    ``configure_logging`` applies a reload's ``log`` section (the CLI's; an embedded App
    leaves logging alone)."""

    def __init__(
        self,
        config: Config,
        *,
        clock: Clock | None = None,
        notifiers: Mapping[str, Notifier] | None = None,
        rng: random.Random | None = None,
        dry_run: bool = False,
        load_config: Callable[[Path], Config] = load_file,
        configure_logging: Callable[[LogConfig], None] | None = None,
    ) -> None:
        if not config.secrets_read:
            raise ValueError("a configuration loaded without its secrets cannot run")
        self.config = config
        self.clock = clock or SystemClock()
        self.rng = rng or random.Random()
        self._notifiers_given = notifiers
        self.dry_run = dry_run
        self._configure_logging = configure_logging
        self._stack = contextlib.AsyncExitStack()
        self._store: Store | None = None
        self._client: AtlasClient | None = None
        self._deliverer: Deliverer | None = None
        self.notifiers: Mapping[str, Notifier] = {}
        self.metrics = Metrics()
        self.cycles = CycleRunner(config, self.clock, self.metrics, self.rng)
        self.reloads = Reloads(lambda: self.config.source, load_config, self.clock, self.reload)
        self.daemon = Daemon(self)
        self.leadership: Leadership | None = None  # replicas on PostgreSQL (leader.py)
        self.reporter: Reporter | None = None  # reports on their schedules (once open)

    # -- opening and closing ---------------------------------------------------------

    async def __aenter__(self) -> App:
        try:
            await self._start()
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self.daemon.stop()
        finally:
            try:
                await self.cycles.cancel_line_items(close=True)  # before client and store
            finally:
                await self._stack.aclose()

    async def _start(self) -> None:
        config = self.config
        settles = settled_statuses(config.rules)
        if self.dry_run:
            store = await open_copy(location(config.state), settles=settles)
        else:
            store = await open_store(location(config.state), settles=settles)
        self._store = store
        self._stack.push_async_callback(store.close)
        self.metrics.billing.bind(self._billing_source)
        self.leadership = self._leadership(store)
        if not self.dry_run and self.leadership is None:
            # Messages of a cycle that a crash cut short (its organizations committed,
            # its end not reached) go out now.
            held = await store.release_held(config.delivery.group_over, self.clock.now())
            if held:
                log.info("released %d message(s) held by a cycle that did not end", held)
        self._client, self.notifiers = self._new_client(config), self._new_notifiers(config)
        self._deliverer = deliverer = Deliverer(
            store,
            self.notifiers,
            clock=self.clock,
            max_age=config.delivery.max_age,
            max_backoff=config.delivery.max_backoff,
            retention=config.delivery.retention,
            rng=self.rng,
            metrics=self.metrics,
            elapsed=self.cycles.elapsed,
            quiet=config.quiet_windows(),
        )
        if self.leadership is not None:
            deliverer.may_send = self.leadership.leading
            self.leadership.on_step_down = deliverer.drop_unrecorded
        self.reporter = self._new_reporter()

    def reporter_usage(self) -> UsageSource:
        """The daily line items the reports read (the state's)."""
        return self.reporter.usage if self.reporter is not None else NoUsage()

    def _new_reporter(self) -> Reporter:
        """The reports on their schedules (issue 19 §2), with the chart's cache beside
        the state (or systemd's ``CacheDirectory=``)."""
        from invoice_watch.report.chart import cache_dir

        leadership = self.leadership
        return Reporter(
            lambda: self.config,
            lambda: self.store,
            lambda: self.store.reports,
            self.clock,
            cache=cache_dir(self.config.state.path),
            leading=leadership.leading if leadership is not None else lambda: True,
            on_enqueued=self.deliverer.wake.set,
        )

    def _billing_source(self) -> tuple[Config, Store, datetime] | None:
        """What the billing gauges are read from at a scrape: nothing on a standby
        replica (its snapshot is not kept up to date: :mod:`~invoice_watch.billing_metrics`)."""
        if self._store is None:
            return None
        if self.leadership is not None and not self.leadership.leading():
            return None
        return self.config, self._store, self.clock.now()

    def _leadership(self, store: Store) -> Leadership | None:
        """Replicas on a PostgreSQL state: this one's part in the lease (None: an SQLite
        file, which one daemon locks, or a dry run, which writes nothing)."""
        if self.dry_run:
            return None
        config = self.config
        leadership = lease_over(store, location(config.state), config, self.clock, self.metrics)
        if leadership is not None:
            self._stack.push_async_callback(leadership.stop)
            leadership.on_lead = self.daemon.poll.run_now  # a new leader polls at once
        return leadership

    def _new_client(self, config: Config) -> AtlasClient:
        """The Atlas client for ``config``, closed when the App is."""
        client = AtlasClient(
            config.atlas,
            clock=self.clock,
            rng=self.rng,
            org_names={o.id: o.display_name for o in config.organizations},
            metrics=self.metrics,
        )
        self._stack.push_async_callback(client.aclose)
        return client

    def _new_notifiers(self, config: Config) -> Mapping[str, Notifier]:
        """The notifiers for ``config`` (those given to the App, if any), closed when
        the App is."""
        if self._notifiers_given is not None:
            return self._notifiers_given
        from invoice_watch.notify import build_notifiers

        notifiers = build_notifiers(config.notifiers)
        for notifier in notifiers.values():
            self._stack.push_async_callback(notifier.aclose)
        return notifiers

    @property
    def started(self) -> bool:
        """Whether the App is open (inside ``async with``)."""
        return self._client is not None

    @property
    def store(self) -> Store:
        assert self._store is not None, "use App inside `async with`"
        return self._store

    @property
    def client(self) -> AtlasClient:
        assert self._client is not None, "use App inside `async with`"
        return self._client

    @property
    def deliverer(self) -> Deliverer:
        assert self._deliverer is not None, "use App inside `async with`"
        return self._deliverer

    # -- entry points ----------------------------------------------------------------

    async def run_cycle(self, *, baseline: bool = False) -> CycleResult:
        """One poll cycle (:class:`~invoice_watch.cycle.Cycle`); then wake delivery."""
        return await self.cycles.run(
            self.store,
            self.client,
            baseline=baseline,
            delivering=self.daemon.serving,
            wake=self.deliverer.wake.set,
        )

    async def run_once(
        self, *, baseline: bool = False, stop: asyncio.Event | None = None
    ) -> OnceOutcome:
        """``run --once`` (:func:`~invoice_watch.daemon.run_once`)."""
        return await run_once(self, baseline=baseline, stop=stop)

    async def serve(self, stop: asyncio.Event) -> None:
        """The daemon until ``stop`` is set (:meth:`~invoice_watch.daemon.Daemon.serve`)."""
        await self.daemon.serve(stop)

    def request_reload(self) -> asyncio.Task[None]:
        """Read the config file again and take it (SIGHUP; see
        :meth:`~invoice_watch.reload.Reloads.request`)."""
        return self.reloads.request()

    async def reload(self, config: Config) -> bool:
        """Take a new configuration between cycles. Each changed setting is applied as
        :data:`invoice_watch.reload.APPLY` says; when one needs a restart (``state.path``),
        or the new ``http.listen`` cannot be used, nothing changes and the reload is
        refused, naming the setting. Returns whether the configuration was taken; logs
        the keys the files changed, and the new configuration's warnings."""
        if not config.secrets_read:
            raise ValueError("a configuration loaded without its secrets cannot run")
        changed = changes(self.config, config)
        restart = [key for key, how in changed.items() if how is Apply.RESTART]
        if restart:
            log.error(
                "config reload refused: %s changed, which takes a restart; keeping the "
                "running configuration",
                ", ".join(restart),
            )
            return False
        kinds = set(changed.values())
        daemon = self.daemon
        async with self.cycles.lock:
            moved: tuple[HttpEndpoint | None, int | None] | None = None
            if Apply.HTTP in kinds and daemon.serving:
                try:
                    moved = await daemon.endpoint.move(config.http, self.config.http)
                except ListenError as exc:
                    log.error("config reload refused: %s; keeping the running configuration", exc)
                    return False
            old_client, old_notifiers, old_config = self._client, self.notifiers, self.config
            if Apply.ATLAS in kinds:
                await self.cycles.cancel_line_items()  # it reads on the old client
                self._client = self._new_client(config)
            if Apply.NOTIFIERS in kinds:
                self.notifiers = self._new_notifiers(config)
            if kinds & {Apply.NOTIFIERS, Apply.DELIVERY}:
                self.deliverer.configure(
                    self.notifiers,
                    max_age=config.delivery.max_age,
                    max_backoff=config.delivery.max_backoff,
                    retention=config.delivery.retention,
                    quiet=config.quiet_windows(),
                )
            self.config = self.cycles.config = config
            if self.reporter is not None:  # its schedules are looked at again now
                self.reporter.reconfigured.set()
            if Apply.RULES in kinds:  # what the rules watch may have changed
                await self.store.snapshot.settle(settled_statuses(config.rules))
            if Apply.SCHEDULE in kinds:
                daemon.poll.configure(config.poll.interval, config.poll.jitter)
            if Apply.LOGGING in kinds and self._configure_logging is not None:
                self._configure_logging(config.log)
            if self.notifiers is not old_notifiers:
                for notifier in old_notifiers.values():
                    await notifier.aclose()
            if self._client is not old_client and old_client is not None:
                await old_client.aclose()
            if moved is not None:
                await daemon.endpoint.swap(moved)
        log.info(
            "configuration reloaded: %d organization(s), %d rule(s), %d notifier(s)%s",
            len(config.organizations),
            len(config.rules),
            len(config.notifiers),
            _changed_text(list(changes(old_config, config, given=True))),
        )
        for warning in config.warnings:
            log.warning("%s", warning)
        return True


def _changed_text(keys: list[str], most: int = 10) -> str:
    """``; changed: a, b`` for the reload's log line, at most ``most`` keys named."""
    if not keys:
        return "; nothing changed"
    more = f" and {len(keys) - most} more" if len(keys) > most else ""
    return f"; changed: {', '.join(keys[:most])}{more}"
