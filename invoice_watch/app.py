"""The application, wired: ``async with App(config) as app: await app.serve(stop)``.

:class:`App` opens what invoice_watch runs on and connects its parts, each the owner of
its own state (``app.cycles.last``, ``app.daemon.health()``, ...): the store
(:func:`~invoice_watch.store.open_store`), the Atlas client, the notifiers and the
deliverer, the poll cycle (:class:`~invoice_watch.runner.CycleRunner`, one
:class:`~invoice_watch.cycle.Cycle` at a time), the daemon around it
(:class:`~invoice_watch.daemon.Daemon`) and configuration reloads
(:class:`~invoice_watch.reload.Reloads`, applied by
:class:`~invoice_watch.reconfigure.Reconfigure` through :meth:`App.reload`); everything it
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
from invoice_watch.leader import Leadership, lease_over
from invoice_watch.metrics import Metrics
from invoice_watch.reconfigure import Reconfigure, delivery_limits
from invoice_watch.reload import Reloads
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
        self._stack = contextlib.AsyncExitStack()
        self._store: Store | None = None
        self._client: AtlasClient | None = None
        self._deliverer: Deliverer | None = None
        self.notifiers: Mapping[str, Notifier] = {}
        self.metrics = Metrics()
        self.cycles = CycleRunner(config, self.clock, self.metrics, self.rng)
        self.reloads = Reloads(lambda: self.config.source, load_config, self.clock, self.reload)
        self._reconfigure = Reconfigure(self, configure_logging)
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
        self._client, self.notifiers = self._new_client(config), self.new_notifiers(config)
        self._deliverer = deliverer = Deliverer(
            store,
            self.notifiers,
            clock=self.clock,
            rng=self.rng,
            metrics=self.metrics,
            elapsed=self.cycles.elapsed,
            **delivery_limits(config),
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

    def replace_client(self, config: Config) -> AtlasClient | None:
        """Use a new Atlas client for ``config`` (a reload); returns the one it
        replaces (None before start), for the caller to close."""
        old, self._client = self._client, self._new_client(config)
        return old

    def new_notifiers(self, config: Config) -> Mapping[str, Notifier]:
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
        """Take a new configuration between cycles
        (:meth:`~invoice_watch.reconfigure.Reconfigure.apply`): each changed setting is
        applied as :data:`invoice_watch.reload.APPLY` says; when one needs a restart
        (``state.path``), or the new ``http.listen`` cannot be used, nothing changes and
        the reload is refused, naming the setting. Returns whether the configuration was
        taken. Raises ValueError for a configuration loaded without its secrets."""
        return await self._reconfigure.apply(config)
