"""The daemon's Prometheus metrics (served at ``/metrics`` by
:mod:`invoice_watch.http_endpoint`): :class:`Metrics` holds the series in a private
registry, so that tests and two daemons in one process never collide. The billing
gauges (pending, month to date, forecast, budget, last read) are computed at each scrape
(:mod:`invoice_watch.billing_metrics`)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from invoice_watch.billing_metrics import BillingCollector


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry

        # Every series goes into this registry alone.
        def counter(name: str, doc: str, *labels: str) -> Counter:
            return Counter(name, doc, labels, registry=r)

        def gauge(name: str, doc: str, *labels: str) -> Gauge:
            return Gauge(name, doc, labels, registry=r)

        def histogram(name: str, doc: str, *, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, buckets=buckets, registry=r)

        self.cycles = counter("invoice_watch_cycles", "Poll cycles run", "outcome")
        self.cycle_seconds = histogram(
            "invoice_watch_cycle_duration_seconds",
            "Wall time of a poll cycle",
            buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
        )
        self.orgs_failing = gauge(
            "invoice_watch_orgs_failing", "Organizations whose last read failed"
        )
        self.invoices_seen = gauge("invoice_watch_invoices_seen", "Invoices in the snapshot")
        self.alerts_firing = gauge("invoice_watch_alerts_firing", "Alerts firing now", "rule")
        self.notifications = counter(
            "invoice_watch_notifications", "Delivery attempts by outcome", "notifier", "outcome"
        )
        self.leader = gauge(
            "invoice_watch_leader",
            "1 while this replica holds the lease (PostgreSQL state, ha), else 0",
        )
        self.lease_transitions = counter(
            "invoice_watch_lease_transitions",
            "Times this replica became the leader or a standby",
            "to",
        )
        self.outbox_depth = gauge(
            "invoice_watch_outbox_depth", "Notifications waiting or failed", "state"
        )
        self.cycles_late = counter(
            "invoice_watch_cycles_late",
            "Poll cycles that ran past the start of the next one (longer than poll.interval)",
        )
        self.http_refused = counter(
            "invoice_watch_http_connections_refused",
            "Connections to /healthz and /metrics closed at once: http.max_connections were open",
        )
        self.http_stalled = counter(
            "invoice_watch_http_connections_stalled",
            "Connections to /healthz and /metrics closed because the client did not read "
            "its answers for http.idle_timeout",
        )
        self.http_evicted = counter(
            "invoice_watch_http_connections_evicted",
            "Idle keep-alive connections to /healthz and /metrics closed to make room for a "
            "new one: http.max_connections were open",
        )
        self.atlas_deprecations = counter(
            "invoice_watch_atlas_deprecation_warnings",
            "Cycles in which Atlas marked an endpoint deprecated (Deprecation/Sunset headers)",
            "endpoint",
        )
        self.atlas_sunset = gauge(
            "invoice_watch_atlas_endpoint_sunset_timestamp_seconds",
            "When Atlas says it will remove a deprecated endpoint (Unix time; 0: no date yet)",
            "endpoint",
        )
        # Messages for a notifier a reload (or an edit) removed or renamed (deliver/unrouted.py).
        self.outbox_unrouted = gauge(
            "invoice_watch_outbox_unrouted",
            "Pending notifications whose notifier is no longer configured (kept until max_age)",
            "notifier",
        )
        # A full disk after a send: outcomes kept in memory until the state file takes them.
        self.outbox_unrecorded = gauge(
            "invoice_watch_outbox_unrecorded",
            "Delivery outcomes the state file could not record yet (kept in memory)",
        )
        self.outbox_write_errors = counter(
            "invoice_watch_outbox_write_errors",
            "Writes of a delivery outcome the state file refused",
        )
        self.line_item_failures = counter(
            "invoice_watch_line_item_fetch_failures",
            "Fetches of an organization's line items (lineItems:search or the CSV) that "
            "failed; the invoices were read, the line items held stay in use",
            "org",
        )
        self.billing = BillingCollector()  # bound to the state by the App
        r.register(self.billing)
        self.last_cycle_finished = gauge(
            "invoice_watch_last_cycle_timestamp_seconds", "When the last cycle finished (Unix time)"
        )
