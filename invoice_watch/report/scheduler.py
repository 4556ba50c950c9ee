"""Reports sent on their schedule by the daemon (issue 19 §2), and a report made now
(``invoice-watch report``).

:class:`Reporter` looks at every enabled report on the injected clock: at start, then at
the next time one is due (waiting at most :data:`LOOK_EVERY` at a time, so a wall clock
stepped forward or back is noticed). A report due for a scope (an organization, or
:data:`SCOPE_ALL` for a ``combined`` one) is built from the state (the organization's
pending invoice, its daily line items as the state holds them (:class:`StateUsage`),
the ``forecast`` rules, the firing alerts), its chart drawn in a short-lived child
process (:mod:`invoice_watch.report.render`: the daemon never imports matplotlib, so
its memory does not grow because reports exist), and put in the outbox with its due
instant recorded in ``report_runs``, in one transaction
(:class:`~invoice_watch.store.sql.reports.SqlReportRuns`): delivery sends and retries it
like an alert, a restart never loses it nor sends it twice. Times missed while the
daemon was down give one report when it comes back (the latest of them,
:meth:`~invoice_watch.report.schedule.ReportSchedule.due`), and a report seen for the
first time waits for its first time. A last due time recorded later than the next time
the schedule gives is a wall-clock fault (stepped forward, then corrected; or a report
first seen while the clock was ahead): it is capped at now, with a warning, and the
report goes again at its next time. A changed schedule (the last due time is not one of
its times) waits for its next time too, as does a report re-enabled or an organization
added back (the rows of what no enabled report covers are forgotten). A change whose new
schedule holds the last due time (``mon 09:00`` to ``daily 09:00``) is not noticed: its
times since then count as missed, one report goes. A standby replica sends none
(``leading``). With no report enabled the task waits for a configuration reload, with no
timer; a reload looks at the schedules again at once.

A report that cannot be built (the state unreadable) is tried again at the next look; a
chart that cannot be drawn (the child failed, or took longer than its timeout) leaves
the report without it: one WARNING says why, and the text and HTML go, saying there is
no chart.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from invoice_watch.errors import StateError
from invoice_watch.format import billing_url
from invoice_watch.report.data import OrgSpend, ReportData, build_report
from invoice_watch.report.outbox import ReportMessage, make_message
from invoice_watch.report.render import Renderer
from invoice_watch.types import Invoice, LineItem

if TYPE_CHECKING:
    from invoice_watch.clock import Clock
    from invoice_watch.config import Config, OrgConfig, ReportConfig
    from invoice_watch.store import Store
    from invoice_watch.store.protocols import ReportRunRepository

log = logging.getLogger(__name__)

SCOPE_ALL = "*"  # the scope of a combined report
LOOK_EVERY = 300.0  # seconds: the longest wait between two looks at the schedules


class UsageSource(Protocol):
    """Daily line items of an organization, this billing period's and the last's
    (``lineItems:search``, as the state caches them)."""

    async def line_items(self, org_id: str) -> Sequence[LineItem]: ...


class NoUsage:
    """No daily line items known: a report shows the invoice's figures only."""

    async def line_items(self, org_id: str) -> Sequence[LineItem]:
        return ()


class StateUsage:
    """The daily line items the state holds (the line items stage,
    :mod:`invoice_watch.usage_watch`, keeps this period's and the last's of every
    organization an enabled report covers): ``store`` gives the state."""

    def __init__(self, store: Callable[[], Store]) -> None:
        self._store = store

    async def line_items(self, org_id: str) -> Sequence[LineItem]:
        periods = await self._store().usage.periods(org_id, 2)
        return [item for period in periods for item in period.items]


def scope_name(scope: str) -> str:
    """A scope as a log line says it."""
    return "all organizations" if scope == SCOPE_ALL else scope


def pending_invoice(store: Store, org_id: str) -> Invoice | None:
    """The organization's pending invoice as last listed (its own; the latest)."""
    pending = [
        invoice
        for invoice in store.snapshot.get(org_id).live.values()
        if invoice.status == "PENDING" and invoice.org_id == org_id
    ]
    return max(pending, key=lambda invoice: invoice.start_date, default=None)


def scopes(report: ReportConfig, config: Config) -> list[tuple[str, list[OrgConfig]]]:
    """The report's scopes: one per organization it covers, or one (:data:`SCOPE_ALL`)
    for them all when ``combined``. An organization it names that is not configured is
    left out (check-config warns)."""
    known = {org.id: org for org in config.organizations}
    orgs = [known[i] for i in report.orgs if i in known] if report.orgs else list(known.values())
    if not orgs:
        return []
    if report.combined:
        return [(SCOPE_ALL, orgs)]
    return [(org.id, [org]) for org in orgs]


async def report_data(
    config: Config,
    store: Store,
    usage: UsageSource,
    orgs: Sequence[OrgConfig],
    now: datetime,
) -> ReportData:
    """What a report of ``orgs`` says at ``now``, from the state."""
    spends = [
        OrgSpend(
            org_id=org.id,
            org_name=org.display_name,
            pending=pending_invoice(store, org.id),
            items=tuple(await usage.line_items(org.id)),
            billing_url=billing_url(config.atlas.ui_url, org.id),
        )
        for org in orgs
    ]
    firing = [s.last_event for s in store.alerts.firing().values() if s.last_event is not None]
    return build_report(spends, now, rules=config.rules, firing=firing)


class Reporter:
    """Sends the configured reports on their schedules (module docstring).
    ``config``: the current configuration (a reload changes it); ``runs``: the
    ``report_runs`` table; ``leading``: whether this process sends (HA); ``renderer``
    draws the charts (a child process each)."""

    def __init__(
        self,
        config: Callable[[], Config],
        store: Callable[[], Store],
        runs: Callable[[], ReportRunRepository],
        clock: Clock,
        *,
        usage: UsageSource | None = None,
        cache: Path | None = None,
        leading: Callable[[], bool] = lambda: True,
        on_enqueued: Callable[[], None] = lambda: None,
    ) -> None:
        self._config = config
        self._store = store
        self._runs = runs
        self._clock = clock
        self.usage: UsageSource = usage or StateUsage(store)
        self._cache = cache
        self.renderer = Renderer()
        self._leading = leading
        self._on_enqueued = on_enqueued
        self.enqueued = 0  # reports put in the outbox by this process
        # Set by a configuration reload: the schedules are looked at again at once.
        self.reconfigured = asyncio.Event()

    def _reports(self) -> list[ReportConfig]:
        return [report for report in self._config().reports if report.enabled]

    async def look(self) -> int:
        """Enqueue every report due now (module docstring); how many were."""
        if not self._leading():
            return 0
        reports = self._reports()
        if not reports:
            return 0
        config, runs = self._config(), self._runs()
        now = self._clock.now()
        known = await runs.last_due()
        covered = {
            (report.name, scope) for report in reports for scope, _ in scopes(report, config)
        }
        if gone := sorted(set(known) - covered):
            # Disabled, removed, or an organization no longer covered: seen again, it
            # waits for its first time rather than sending one weeks stale at once.
            await runs.forget(gone)
        count = 0
        for report in reports:
            schedule = report.when
            for scope, orgs in scopes(report, config):
                since = known.get((report.name, scope))
                if since is None:  # a new report waits for its first time
                    since = await runs.start(report.name, scope, schedule.latest_at(now))
                elif since > schedule.next_after(now):
                    # Recorded while the wall clock read later than it does now (stepped
                    # forward, then corrected): no report was really due then. Capped at
                    # now, so the report goes again at its next time, not in a year.
                    log.warning(
                        "report %s (%s) was last due %s UTC, after the next time it is due "
                        "(%s UTC): the wall clock was wrong then or is now; it goes again "
                        "at its next time",
                        report.name,
                        scope_name(scope),
                        f"{since:%Y-%m-%d %H:%M}",
                        f"{schedule.next_after(now):%Y-%m-%d %H:%M}",
                    )
                    since = await runs.move(report.name, scope, since, schedule.latest_at(now))
                elif schedule.latest_at(since) != since:
                    # Not a time of this schedule: the schedule was changed. It waits for
                    # its next time, as a new report does, rather than count the times
                    # of the new schedule since the last report as missed.
                    log.info(
                        "report %s (%s): schedule changed to %s; first due %s UTC",
                        report.name,
                        scope_name(scope),
                        schedule,
                        f"{schedule.next_after(now):%Y-%m-%d %H:%M}",
                    )
                    since = await runs.move(report.name, scope, since, schedule.latest_at(now))
                due = schedule.due(since, now)
                if due is None:
                    continue
                message = await self.build(config, report, scope, orgs, due, now)
                if await runs.enqueue(
                    report.name,
                    scope,
                    due,
                    report.notify,
                    message.to_json(),
                    message.summary,
                    self._clock.now(),
                ):
                    count += 1
                    log.info(
                        "report %s (%s) due %s UTC: in the outbox for %s",
                        report.name,
                        scope_name(scope),
                        f"{due:%Y-%m-%d %H:%M}",
                        ", ".join(report.notify),
                    )
        if count:
            self.enqueued += count
            self._on_enqueued()
        return count

    async def build(
        self,
        config: Config,
        report: ReportConfig,
        scope: str,
        orgs: Sequence[OrgConfig],
        due: datetime,
        now: datetime,
    ) -> ReportMessage:
        """The report ``report`` for ``scope`` due at ``due``, as of ``now``."""
        data = await report_data(config, self._store(), self.usage, orgs, now)
        chart = await self.renderer.draw(data, self._cache)
        return make_message(data, chart, report=report.name, scope=scope, due=due)

    def wait(self) -> float:
        """Seconds until the next look: the next time a report is due, at most
        :data:`LOOK_EVERY`, at least 1."""
        now = self._clock.now()
        times = [report.when.next_after(now) for report in self._reports()]
        if not times:
            return LOOK_EVERY
        return max(1.0, min(LOOK_EVERY, (min(times) - now) / timedelta(seconds=1)))

    async def run(self) -> None:
        """Look at the schedules until cancelled; a state error waits for the next look.
        With no report enabled, it waits for a reload (no timer at all)."""
        while True:
            self.reconfigured.clear()
            if not self._reports():
                await self.reconfigured.wait()
                continue
            try:
                await self.look()
            except StateError as exc:
                log.error("reports: %s; tried again at the next look", exc)
            except Exception:  # a bug must not stop the reports for good
                log.exception("reports: unexpected error; tried again at the next look")
            sleep = asyncio.ensure_future(self._clock.sleep(self.wait()))
            reload = asyncio.ensure_future(self.reconfigured.wait())
            try:
                await asyncio.wait({sleep, reload}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in (sleep, reload):
                    waiter.cancel()
                await asyncio.gather(sleep, reload, return_exceptions=True)
