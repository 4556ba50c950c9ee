"""The billing gauges of ``/metrics`` (issue 19 §3): what Grafana charts and alerts on.

Computed when ``/metrics`` is scraped (a Prometheus custom collector), from what the
daemon holds in memory: the snapshot (pending invoices, each organization's read state),
the line items last fetched (:class:`~invoice_watch.store.protocols.UsageRepository`'s
cached totals per project) and the configuration. A poll cycle pays nothing for them.

=================================================================  ==================
gauge                                                               labels
=================================================================  ==================
``invoice_watch_pending_amount_usd``: the pending invoices'          ``org``
  ``amountBilledCents`` (USD)
``invoice_watch_month_to_date_usd``: the line items of the           ``org``
  pending invoice so far (USD; organizations whose line items are
  read: a usage_anomaly rule or a report covers them)
``invoice_watch_project_month_to_date_usd``: the same per project,   ``org``,
  the :data:`TOP_PROJECTS` largest, the rest as ``project="other"``    ``project``,
                                                                     ``project_id``
``invoice_watch_forecast_usd``: the pending amount extrapolated to   ``org``
  the end of its period (:func:`~invoice_watch.rules.forecast`)
``invoice_watch_budget_usd``: each enabled ``forecast`` rule's        ``rule``
  budget
``invoice_watch_last_successful_read_timestamp_seconds``: when the    ``org``
  organization's invoices were last read (Unix time)
``invoice_watch_line_items_fetched_timestamp_seconds``: when the      ``org``
  organization's line items were last fetched (Unix time;
  organizations whose line items are read)
=================================================================  ==================

The month-to-date gauges are those of the organization's current PENDING invoice only:
line items of a period that closed (the next one's not fetched yet) are no month to
date. A standby replica (HA: another one holds the lease) exports none of these gauges
(its ``source`` gives None): its snapshot is not kept up to date, and a dashboard that
sums the replicas counts each organization once.

``org`` is the configured organization's id; ``org_name`` is its name, on every series
that has ``org``. Label sets are bounded: the configured organizations, the forecast
rules, and at most ``TOP_PROJECTS + 1`` projects per organization.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime
from typing import TYPE_CHECKING

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from invoice_watch.rules import forecast

if TYPE_CHECKING:
    from invoice_watch.config import Config
    from invoice_watch.store import Store

TOP_PROJECTS = 10
OTHER = "other"

# What the gauges are read from, at each scrape: (configuration, state, now); None
# before the state is open, and on a standby replica.
Source = Callable[[], "tuple[Config, Store, datetime] | None"]


class BillingCollector(Collector):
    """The billing gauges (see the module), read from ``source`` at each scrape."""

    def __init__(self) -> None:
        self._source: Source = lambda: None

    def bind(self, source: Source) -> None:
        """Read the gauges from ``source`` from now on."""
        self._source = source

    def describe(self) -> list[Metric]:
        return []  # computed at each scrape: nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        got = self._source()
        if got is None:
            return
        config, store, now = got
        org_labels = ["org", "org_name"]
        pending = GaugeMetricFamily(
            "invoice_watch_pending_amount_usd",
            "The pending invoices' amount billed so far (USD)",
            labels=org_labels,
        )
        mtd = GaugeMetricFamily(
            "invoice_watch_month_to_date_usd",
            "Spend of the billing period so far from its daily line items (USD)",
            labels=org_labels,
        )
        projects = GaugeMetricFamily(
            "invoice_watch_project_month_to_date_usd",
            f"Spend of the billing period so far per project: the {TOP_PROJECTS} largest, "
            "the rest as project=other (USD)",
            labels=[*org_labels, "project", "project_id"],
        )
        forecasts = GaugeMetricFamily(
            "invoice_watch_forecast_usd",
            "The pending amount extrapolated to the end of its billing period (USD)",
            labels=org_labels,
        )
        last_read = GaugeMetricFamily(
            "invoice_watch_last_successful_read_timestamp_seconds",
            "When the organization's invoices were last read (Unix time)",
            labels=org_labels,
        )
        fetched = GaugeMetricFamily(
            "invoice_watch_line_items_fetched_timestamp_seconds",
            "When the organization's daily line items were last fetched (Unix time)",
            labels=org_labels,
        )
        for org in config.organizations:
            labels = [org.id, org.display_name]
            live = store.snapshot.get(org.id).live
            own = [i for i in live.values() if i.status == "PENDING" and i.org_id == org.id]
            if own:
                pending.add_metric(labels, sum(i.amount_billed_cents for i in own) / 100)
                projected = [forecast(i, now) for i in own]
                if all(p is not None for p in projected):
                    forecasts.add_metric(labels, sum(p or 0 for p in projected) / 100)
            state = store.snapshot.org_state(org.id)
            if state.last_success is not None:
                last_read.add_metric(labels, state.last_success.timestamp())
            read = store.usage.read_state(org.id)
            if read is not None and read.fetched_at is not None:
                fetched.add_metric(labels, read.fetched_at.timestamp())
            current = read is not None and any(i.id == read.invoice_id for i in own)
            totals = store.usage.project_totals(org.id) if current else {}
            if totals:
                mtd.add_metric(labels, sum(totals.values()) / 100)
                ranked = sorted(totals.items(), key=lambda kv: (-kv[1], kv[0]))
                for (project_id, name), cents in ranked[:TOP_PROJECTS]:
                    projects.add_metric([*labels, name, project_id], cents / 100)
                rest = ranked[TOP_PROJECTS:]
                if rest:
                    projects.add_metric([*labels, OTHER, ""], sum(cents for _, cents in rest) / 100)
        budgets = GaugeMetricFamily(
            "invoice_watch_budget_usd",
            "The budget of each enabled forecast rule (USD)",
            labels=["rule"],
        )
        for rule in config.rules:
            if rule.enabled and rule.type == "forecast":
                budgets.add_metric([rule.name], rule.budget_cents / 100)
        yield from (pending, mtd, projects, forecasts, budgets, last_read, fetched)
