"""A stand-in for the MongoDB Atlas Administration API invoice endpoints (SPEC §9).

A real aiohttp server (:class:`Simulator`) following a :class:`Scenario` of orgs,
invoices and a timeline of changes; the demo, the tests and the benchmarks run against
it, and ``invoice-watch simulate`` serves it (:func:`serve`).
"""

from __future__ import annotations

from invoice_watch.simulator.faults import Fault, Faults, RequestRecord
from invoice_watch.simulator.scenario import (
    Scenario,
    ScenarioInvoice,
    ScenarioLineItem,
    ScenarioOrg,
    Step,
    demo_scenario,
    load_scenario,
)
from invoice_watch.simulator.server import Simulator, serve

__all__ = [
    "Fault",
    "Faults",
    "RequestRecord",
    "Scenario",
    "ScenarioInvoice",
    "ScenarioLineItem",
    "ScenarioOrg",
    "Simulator",
    "Step",
    "demo_scenario",
    "load_scenario",
    "serve",
]
