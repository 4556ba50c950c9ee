"""The daemon's Prometheus metrics (served at ``/metrics`` by
:mod:`invoice_watch.http_endpoint`): :class:`Metrics` holds the series in a private
registry, so that tests and two daemons in one process never collide."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.cycles = Counter("invoice_watch_cycles", "Poll cycles run", ["outcome"], registry=r)
        self.cycle_seconds = Histogram(
            "invoice_watch_cycle_duration_seconds",
            "Wall time of a poll cycle",
            buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
            registry=r,
        )
        self.orgs_failing = Gauge(
            "invoice_watch_orgs_failing", "Organizations whose last read failed", registry=r
        )
        self.invoices_seen = Gauge(
            "invoice_watch_invoices_seen", "Invoices in the snapshot", registry=r
        )
        self.alerts_firing = Gauge(
            "invoice_watch_alerts_firing", "Alerts firing now", ["rule"], registry=r
        )
        self.notifications = Counter(
            "invoice_watch_notifications",
            "Delivery attempts by outcome",
            ["notifier", "outcome"],
            registry=r,
        )
        self.leader = Gauge(
            "invoice_watch_leader",
            "1 while this replica holds the lease (PostgreSQL state, ha), else 0",
            registry=r,
        )
        self.lease_transitions = Counter(
            "invoice_watch_lease_transitions",
            "Times this replica became the leader or a standby",
            ["to"],
            registry=r,
        )
        self.outbox_depth = Gauge(
            "invoice_watch_outbox_depth", "Notifications waiting or failed", ["state"], registry=r
        )
        self.cycles_late = Counter(
            "invoice_watch_cycles_late",
            "Poll cycles that ran past the start of the next one (longer than poll.interval)",
            registry=r,
        )
        self.http_refused = Counter(
            "invoice_watch_http_connections_refused",
            "Connections to /healthz and /metrics closed at once: http.max_connections were open",
            registry=r,
        )
        self.http_stalled = Counter(
            "invoice_watch_http_connections_stalled",
            "Connections to /healthz and /metrics closed because the client did not read "
            "its answers for http.idle_timeout",
            registry=r,
        )
        self.http_evicted = Counter(
            "invoice_watch_http_connections_evicted",
            "Idle keep-alive connections to /healthz and /metrics closed to make room for a "
            "new one: http.max_connections were open",
            registry=r,
        )
        self.atlas_deprecations = Counter(
            "invoice_watch_atlas_deprecation_warnings",
            "Cycles in which Atlas marked an endpoint deprecated (Deprecation/Sunset headers)",
            ["endpoint"],
            registry=r,
        )
        self.atlas_sunset = Gauge(
            "invoice_watch_atlas_endpoint_sunset_timestamp_seconds",
            "When Atlas says it will remove a deprecated endpoint (Unix time; 0: no date yet)",
            ["endpoint"],
            registry=r,
        )
        # Messages for a notifier a reload (or an edit) removed or renamed (deliver.py).
        self.outbox_unrouted = Gauge(
            "invoice_watch_outbox_unrouted",
            "Pending notifications whose notifier is no longer configured (kept until max_age)",
            ["notifier"],
            registry=r,
        )
        # A full disk after a send: outcomes kept in memory until the state file takes them.
        self.outbox_unrecorded = Gauge(
            "invoice_watch_outbox_unrecorded",
            "Delivery outcomes the state file could not record yet (kept in memory)",
            registry=r,
        )
        self.outbox_write_errors = Counter(
            "invoice_watch_outbox_write_errors",
            "Writes of a delivery outcome the state file refused",
            registry=r,
        )
        self.last_cycle_finished = Gauge(
            "invoice_watch_last_cycle_timestamp_seconds",
            "When the last cycle finished (Unix time)",
            registry=r,
        )
