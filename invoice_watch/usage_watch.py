"""The line items stage (issue 19): each organization's daily usage, fetched at most once
per ``usage.refresh``, kept in the state, and judged by the ``usage_anomaly`` rules.

Started by the :class:`~invoice_watch.runner.CycleRunner` after each cycle
(:meth:`UsageWatch.after_cycle`), as its own task outside the cycle lock, never inside
one: a cycle's listings never wait for line items nor compete with them for Atlas's
rate limit, a slow ``lineItems:search`` delays no poll, reload or delivery, and a cycle
with no line items due costs nothing more than a look at a few cached times. Each
organization's fetch is bounded (:data:`FETCH_SECONDS`: past it, a failed fetch).

- **Which organizations**: those some enabled ``usage_anomaly`` rule covers, or some
  enabled report (:func:`wanted`). Others are never fetched.
- **When**: when the organization's pending invoice is not the one whose line items
  are held (a new period, a re-issued invoice: at once), or its line items were last
  fetched ``usage.refresh`` (default 6 h) ago or more, as the state records it (a
  restart does not fetch early),
  measured on the monotonic clock (:class:`~invoice_watch.elapsed.Elapsed`: a wall
  clock set back fetches no sooner); after a failed fetch, again after
  :data:`RETRY_AFTER` (at most ``usage.refresh``); after one refused for more line items
  than are kept, after ``usage.refresh`` and at least :data:`TOO_MANY_RETRY` (in this
  process: a restart tries once more after :data:`RETRY_AFTER`).
- **What**: the organization's own PENDING invoice (as the snapshot holds it), through
  :meth:`~invoice_watch.atlas.client.AtlasClient.usage_line_items`
  (``lineItems:search``, else the CSV), project names from the pending invoice's
  ``lineItems``; and the period before's invoice when the snapshot still holds it and
  the state does not hold its line items yet (a baseline that reaches back past the
  1st, a report's "last month"): once it was read; a failure is tried again at the
  organization's next fetch.
- **A failure** never fails the invoice read (that cycle is over): it is logged once per
  organization while it lasts (again only when its cause changes), counted
  (``invoice_watch_line_item_fetch_failures_total``), recorded, and the line items held
  stay in use.
- **The verdicts**: per ``usage_anomaly`` rule and organization (before each cycle too,
  :meth:`UsageWatch.before_cycle`: a restart judges what the state holds),
  :func:`~invoice_watch.anomaly.detect` over the line items held (this period and the
  one before), computed again only when the line items, the rule or the UTC day
  changed. The next cycles' reads carry them to the rules (:attr:`OrgView.usage
  <invoice_watch.rules.OrgView.usage>`): alerts fire, remind and resolve there, as any
  other rule's.
- **Cannot judge**: a rule that cannot judge an organization says so once (per rule
  and organization, in this process): INFO for the normal first days (line items not
  read yet, too short a history), WARNING when it is a fault (the latest usage day too
  old, line items never read because fetches fail, the wall clock behind them; once
  more if a first-days INFO becomes one), INFO when it judges again. ``status`` lists
  them from the state (:func:`cannot_judge`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator, Mapping
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from invoice_watch import format as fmt
from invoice_watch.atlas.usage import TooManyLineItems
from invoice_watch.errors import FetchError, StateError
from invoice_watch.redact import printable
from invoice_watch.safe_text import exception_line, traceback_text
from invoice_watch.types import Invoice, LineItem

if TYPE_CHECKING:
    from invoice_watch import anomaly
    from invoice_watch.anomaly import Detection
    from invoice_watch.atlas.client import AtlasClient
    from invoice_watch.config import Config, UsageAnomalyRule
    from invoice_watch.metrics import Metrics
    from invoice_watch.rules import Age
    from invoice_watch.store import Store
    from invoice_watch.store.records import UsageRead

log = logging.getLogger(__name__)

# After a failed fetch, the next one is tried this much later (at most usage.refresh).
RETRY_AFTER = timedelta(hours=1)
# After a fetch refused for more line items than are kept (TooManyLineItems), the next
# is tried this much later at least (usage.refresh when longer).
TOO_MANY_RETRY = timedelta(days=1)
# Organizations whose line items are fetched together.
CONCURRENCY = 4
# One organization's fetch (its pending invoice's line items, then the period
# before's) takes at most this long (seconds): past it, it counts as failed.
FETCH_SECONDS = 600.0


def _anomaly_rules(config: Config) -> list[UsageAnomalyRule]:
    return [r for r in config.rules if r.enabled and r.type == "usage_anomaly"]


def wanted(config: Config) -> list[str]:
    """The configured organizations whose line items something needs: an enabled
    ``usage_anomaly`` rule covering it, or an enabled report."""
    rules = _anomaly_rules(config)
    reports = [r for r in config.reports if r.enabled]
    if not (rules or reports):
        return []  # (asked twice a cycle: no scan of the organizations)
    found = []
    for org in config.organizations:
        if any(r.orgs is None or org.id in r.orgs for r in rules) or any(
            r.orgs is None or org.id in r.orgs for r in reports
        ):
            found.append(org.id)
    return found


def pending_invoice(invoices: Mapping[str, Invoice], org_id: str) -> Invoice | None:
    """The organization's own PENDING invoice (the latest period's, if several)."""
    pending = [i for i in invoices.values() if i.status == "PENDING" and i.org_id == org_id]
    return max(pending, key=lambda i: (i.start_date, i.id), default=None)


def previous_invoice(invoices: Mapping[str, Invoice], current: Invoice) -> Invoice | None:
    """The organization's own invoice of the period before ``current``'s, when held."""
    before = [
        i
        for i in invoices.values()
        if i.org_id == current.org_id and i.start_date < current.start_date and i.id != current.id
    ]
    return max(before, key=lambda i: (i.start_date, i.id), default=None)


class UsageWatch:
    """What outlives a cycle of the line items stage: the verdicts, what was logged."""

    def __init__(self, metrics: Metrics | None = None) -> None:
        self._metrics = metrics
        # (rule name, org id) -> (what it was computed from, the verdict)
        self._verdicts: dict[tuple[str, str], tuple[object, Detection]] = {}
        self._by_org: dict[str, dict[str, Detection]] = {}  # org -> rule -> its verdict
        self._logged: dict[str, str] = {}  # org -> the failure last logged
        # (rule name, org id) -> whether the rule cannot judge it for a fault (True: a
        # WARNING was logged) or for a short history (False: an INFO)
        self._unjudged: dict[tuple[str, str], bool] = {}
        self._past: set[tuple[str, str]] = set()  # (org, invoice) of past periods read
        self.fetches = 0  # fetches that worked, since the start
        self.fetch_seconds = FETCH_SECONDS  # one organization's fetch, at most
        # org -> how long after its last failure it is tried again, when longer than
        # RETRY_AFTER (its period has more line items than are kept)
        self._backoff: dict[str, timedelta] = {}
        self._refresh = timedelta(hours=6)

    def detections(self, org_id: str) -> dict[str, Detection]:
        """The verdicts on the organization's line items, by usage_anomaly rule name."""
        return dict(self._by_org.get(org_id, {}))

    def _keep(self, verdicts: dict[tuple[str, str], tuple[object, Detection]]) -> None:
        """Keep these verdicts, indexed by organization too: :meth:`detections` is asked
        once per organization and cycle (a scan of every verdict would be quadratic)."""
        self._verdicts = verdicts
        self._by_org = {}
        for (rule, org_id), (_, verdict) in verdicts.items():
            self._by_org.setdefault(org_id, {})[rule] = verdict

    def due(self, config: Config, store: Store, age: Age) -> list[str]:
        """The organizations whose line items are due now (see the module)."""
        refresh = config.usage.refresh
        found = []
        for org_id in wanted(config):
            read = store.usage.read_state(org_id)
            if _is_due(read, refresh, age, self._backoff.get(org_id)) or _new_period(
                read, store, org_id
            ):
                found.append(org_id)
        return found

    async def before_cycle(self, config: Config, store: Store, now: datetime) -> None:
        """The verdicts brought up to date with the line items held (a start: those a
        previous process fetched, so that ``run --once`` judges them too; a new UTC
        day; a reloaded rule) before a cycle reads; costs a look at a few cached times
        when nothing changed. Never raises but for cancellation."""
        if not _anomaly_rules(config):
            self._keep({})
            return
        with _contained("read", "judging them "):
            await self._judge(config, store, now)

    async def after_cycle(
        self, config: Config, store: Store, client: AtlasClient, age: Age, now: datetime
    ) -> None:
        """Fetch the line items due, then judge them (see the module). Never raises but
        for cancellation: a failure is logged and counted."""
        self._refresh = config.usage.refresh
        if self._metrics is not None:  # each watched organization's counter from 0
            for org_id in wanted(config):
                self._metrics.line_item_failures.labels(org=org_id)
        with _contained("read or written", ""):
            due = self.due(config, store, age)
            if due:
                limit = asyncio.Semaphore(CONCURRENCY)

                async def one(org_id: str) -> None:
                    async with limit:
                        await self._fetch(config, store, client, org_id, now)

                await asyncio.gather(*(one(org_id) for org_id in due))
            await self._judge(config, store, now)

    async def _fetch(
        self, config: Config, store: Store, client: AtlasClient, org_id: str, now: datetime
    ) -> None:
        invoices = store.snapshot.get(org_id).live
        pending = pending_invoice(invoices, org_id)
        if pending is None:
            return  # nothing to read yet (no pending invoice listed)
        name = config.org_name(org_id)
        try:
            async with asyncio.timeout(self.fetch_seconds):
                names = await self._names(client, org_id)
                fetched = await client.usage_line_items(org_id, pending.id, names)
            await store.usage.record(
                org_id, pending.id, pending.start_date.date(), fetched.items, fetched.source, now
            )
        except TimeoutError:
            error = f"not read within {fmt.duration(timedelta(seconds=self.fetch_seconds))}"
            await self._failed(store, org_id, name, now, error)
            return
        except TooManyLineItems as exc:
            # Not worth trying every hour (hundreds of requests against the rate limit
            # the invoice reads share): at the next refresh, at least a day later.
            self._backoff[org_id] = max(config.usage.refresh, TOO_MANY_RETRY)
            await self._failed(store, org_id, name, now, printable(str(exc)))
            return
        except (FetchError, ValueError) as exc:
            await self._failed(store, org_id, name, now, printable(str(exc)))
            return
        except StateError:
            raise
        except Exception as exc:  # a bug: this organization's line items only
            log.error(
                "%s: reading its line items failed unexpectedly:\n%s", name, traceback_text(exc)
            )
            await self._failed(store, org_id, name, now, exception_line(exc))
            return
        self.fetches += 1
        self._backoff.pop(org_id, None)
        if self._logged.pop(org_id, None) is not None:
            log.info("%s: line items read again (%d)", name, len(fetched.items))
        else:
            log.info("%s: %d line items read (%s)", name, len(fetched.items), fetched.source)
        before = previous_invoice(invoices, pending)
        if before is not None and (org_id, before.id) not in self._past:
            held = {p.invoice_id for p in await store.usage.periods(org_id)}
            if before.id in held:
                self._past.add((org_id, before.id))
            else:
                try:
                    async with asyncio.timeout(self.fetch_seconds):
                        past = await client.usage_line_items(org_id, before.id, names)
                    await store.usage.record(
                        org_id,
                        before.id,
                        before.start_date.date(),
                        past.items,
                        past.source,
                        now,
                        current=False,
                    )
                    self._past.add((org_id, before.id))  # a failure: tried at the next fetch
                except (FetchError, ValueError, TimeoutError) as exc:
                    log.info(
                        "%s: the last period's line items were not read: %s",
                        name,
                        exc or "timed out",
                    )

    @staticmethod
    async def _names(client: AtlasClient, org_id: str) -> dict[str, str]:
        """Project id -> name, from the pending invoice's ``lineItems`` (empty when that
        cannot be read: the ids are shown then)."""
        try:
            pending = await client.pending_line_items(org_id)
        except FetchError:
            return {}
        return {
            item.project_id: item.project
            for items in pending.values()
            for item in items
            if item.project_id and item.project != item.project_id
        }

    def _retry(self, org_id: str) -> timedelta:
        return self._backoff.get(org_id) or min(RETRY_AFTER, self._refresh)

    async def _failed(
        self, store: Store, org_id: str, name: str, now: datetime, error: str
    ) -> None:
        if self._metrics is not None:
            self._metrics.line_item_failures.labels(org=org_id).inc()
        if self._logged.get(org_id) != error:
            self._logged[org_id] = error
            log.warning(
                "%s: its line items could not be read (the invoices were; the line items "
                "held stay in use, tried again in %s): %s",
                name,
                fmt.duration(self._retry(org_id)),
                error,
            )
        await store.usage.record_failure(org_id, now, error)

    async def _judge(self, config: Config, store: Store, now: datetime) -> None:
        """The verdict of each usage_anomaly rule on each organization it covers whose
        line items are held, computed again when its inputs changed; a rule that cannot
        judge an organization said once (:meth:`_note`)."""
        rules = _anomaly_rules(config)
        if not rules:  # the detector's module is imported only where a rule uses it
            self._keep({})
            self._unjudged = {}
            return
        from invoice_watch import anomaly

        kept: dict[tuple[str, str], tuple[object, Detection]] = {}
        items_of: dict[str, list[LineItem]] = {}
        covered: set[tuple[str, str]] = set()
        for rule in rules:
            params = anomaly.Params(rule.baseline, rule.min_increase_cents, rule.sensitivity)
            for org in config.organizations:
                org_id = org.id
                if rule.orgs is not None and org_id not in rule.orgs:
                    continue
                key = (rule.name, org_id)
                covered.add(key)
                read = store.usage.read_state(org_id)
                if read is None or read.fetched_at is None:
                    self._note(key, config, not_read(read, detail=False))
                    continue
                inputs = (rule.by, params, read.fetched_at, read.invoice_id, now.date())
                before = self._verdicts.get(key)
                if before is not None and before[0] == inputs:
                    kept[key] = before
                    self._note(key, config, unjudged(read, before[1], detail=False))
                    continue
                if org_id not in items_of:
                    periods = await store.usage.periods(org_id)
                    items_of[org_id] = [item for p in periods for item in p.items]
                verdict = await asyncio.to_thread(judge, now, read, items_of[org_id], rule, params)
                kept[key] = (inputs, verdict)
                self._note(key, config, unjudged(read, verdict, detail=False))
        self._keep(kept)
        self._unjudged = {k: v for k, v in self._unjudged.items() if k in covered}

    def _note(self, key: tuple[str, str], config: Config, gap: tuple[str, bool] | None) -> None:
        """Log once that a rule cannot judge an organization (WARNING, or INFO for the
        normal first days: fewer days of usage than the rule needs, line items not
        read yet), again only when that becomes a WARNING, and once (INFO) when it can
        judge again: never once per cycle."""
        rule, org_id = key
        name = config.org_name(org_id)
        was = self._unjudged.get(key)
        if gap is None:
            if was is not None:
                del self._unjudged[key]
                log.info("%s: %s: usage judged again", rule, name)
            return
        why, warn = gap
        if was is None or (warn and not was):
            self._unjudged[key] = warn
            if warn:
                log.warning(
                    "%s: %s: cannot judge its usage (no usage anomaly fires or resolves "
                    "until it can): %s",
                    rule,
                    name,
                    why,
                )
            else:
                log.info("%s: %s: usage not judged yet: %s", rule, name, why)


def not_read(read: UsageRead | None, *, detail: bool = True) -> tuple[str, bool]:
    """Why no line items are held to judge (``read``: the organization's fetch state,
    its ``fetched_at`` None), and whether that is a fault (a fetch failed) rather than
    the normal start-up. ``detail``: with the fetch's error (a log line leaves it to the
    fetch's own WARNING)."""
    if read is None or read.last_error is None:
        return "its line items have not been read yet", False
    return (
        f"its line items have never been read; the last try "
        f"({read.attempted_at.isoformat(timespec='seconds')}) failed{_error(read, detail)}",
        True,
    )


def _error(read: UsageRead, detail: bool) -> str:
    return f": {read.last_error}" if detail else " (logged when it did)"


def unjudged(
    read: UsageRead, verdict: Detection, *, detail: bool = True
) -> tuple[str, bool] | None:
    """Why ``verdict`` judged nothing, and whether that is a fault (line items stopped
    coming, the wall clock, fetches failing) rather than the normal start-up (a short
    history); None when it judged a day. ``detail``: as :func:`not_read`'s."""
    if verdict.day is not None:
        return None
    why, warn = verdict.reason or "nothing judged", not verdict.startup
    if read.last_error is not None:
        why += f"; the last fetch of its line items failed{_error(read, detail)}"
        warn = True
    return why, warn


def judge(
    now: datetime,
    read: UsageRead,
    items: list[LineItem],
    rule: UsageAnomalyRule,
    params: anomaly.Params,
) -> Detection:
    """A usage_anomaly rule's verdict on an organization's line items held (``read``:
    its fetch state, line items fetched)."""
    from invoice_watch import anomaly

    if read.fetched_at is not None and read.fetched_at > now:
        # the wall clock was set back: judge nothing
        return anomaly.Detection(
            None,
            reason=f"the wall clock reads earlier than the line items' fetch "
            f"({read.fetched_at.isoformat(timespec='seconds')})",
        )
    return anomaly.detect(now, anomaly.series(items, rule.by), params)


async def cannot_judge(config: Config, store: Store, now: datetime) -> list[tuple[str, str, str]]:
    """(rule, organization id, why) of each enabled usage_anomaly rule that cannot judge
    an organization it covers, from the state alone (``status``: read-only, beside a
    daemon)."""
    rules = _anomaly_rules(config)
    if not rules:
        return []
    from invoice_watch import anomaly

    found = []
    items_of: dict[str, list[LineItem]] = {}
    for rule in rules:
        params = anomaly.Params(rule.baseline, rule.min_increase_cents, rule.sensitivity)
        for org in config.organizations:
            if rule.orgs is not None and org.id not in rule.orgs:
                continue
            read = store.usage.read_state(org.id)
            gap: tuple[str, bool] | None
            if read is None or read.fetched_at is None:
                gap = not_read(read)
            else:
                if org.id not in items_of:
                    periods = await store.usage.periods(org.id)
                    items_of[org.id] = [item for p in periods for item in p.items]
                gap = unjudged(read, judge(now, read, items_of[org.id], rule, params))
            if gap is not None:
                found.append((rule.name, org.id, gap[0]))
    return found


def _is_due(
    read: UsageRead | None, refresh: timedelta, age: Age, retry: timedelta | None = None
) -> bool:
    """Never fetched, fetched ``refresh`` ago, or failed ``retry`` ago (default
    :data:`RETRY_AFTER`, at most ``refresh``)."""
    if read is None:
        return True
    if read.last_error is not None:
        return age(read.attempted_at) >= (retry or min(RETRY_AFTER, refresh))
    return read.fetched_at is None or age(read.fetched_at) >= refresh


def _new_period(read: UsageRead | None, store: Store, org_id: str) -> bool:
    """Whether the line items last fetched are of an invoice that is no longer the
    organization's pending one (a new billing period began, or the invoice was
    re-issued): due at once, unless the last try failed (then :func:`_is_due`'s retry
    holds)."""
    if read is None or read.fetched_at is None or read.last_error is not None:
        return False
    pending = pending_invoice(store.snapshot.get(org_id).live, org_id)
    return pending is not None and pending.id != read.invoice_id


@contextlib.contextmanager
def _contained(state: str, doing: str) -> Iterator[None]:
    """A failure of the line items' stage is logged (the state's ``could not be <state>``;
    a bug's traceback, ``<doing>failed unexpectedly``), never the cycle's; only a
    cancellation goes through."""
    try:
        yield
    except StateError as exc:
        log.warning("line items: the state could not be %s: %s", state, exc)
    except Exception as exc:  # a bug: never the cycle's
        log.error("line items: %sfailed unexpectedly:\n%s", doing, traceback_text(exc))
