"""What a cycle holds in memory (issue 16: the daemon's peak RSS at 100,000 invoices):
one organization's cold cycle through the simulator, measured with tracemalloc (Python's
own allocations, the simulator's included: it runs in this process), per invoice.

An organization's listing is held until its one transaction commits (README,
Guarantees): its first page and the invoices that can still change as
:class:`~invoice_watch.types.Invoice` objects (about 320 bytes an invoice: the object,
its id, its amounts), the settled ones of its other pages as keys, their rows waiting in
the state's staging area; the snapshot then keeps a settled invoice as its id and a key
(about 150 bytes). These bounds catch a listing held twice or kept as objects, or its
pages' JSON kept (about 1,200 bytes an invoice), not a few bytes more.
"""

from __future__ import annotations

import gc
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import yaml

from invoice_watch.app import App
from invoice_watch.atlas.client import AtlasClient
from invoice_watch.clock import FakeClock
from invoice_watch.config import load
from invoice_watch.constants import FINAL_STATUSES
from invoice_watch.simulator import Scenario, Simulator
from invoice_watch.types import OrgRead, Snapshot
from tests.conftest import base_config, make_config
from tests.test_incremental import NOW, Silent

INVOICES = 6000
# What the cycle may hold at its peak, and keep after it: so much per invoice listed
# (bytes), and so much that does not grow with the listing (a page and its JSON being
# rendered by the simulator and parsed, the timestamp caches of the parser and of the
# state file). Measured at 6,000 and 12,000 invoices: 4.2 MB + 372 B an invoice at the
# peak, 3.3 MB + 153 B kept.
PEAK_PER_INVOICE, PEAK_FIXED = 500, 4.5 * 2**20
KEPT_PER_INVOICE, KEPT_FIXED = 200, 3.75 * 2**20
# What a cold listing may hold beyond what the snapshot keeps, per invoice more.
TRANSIENT_PER_INVOICE = 100


async def cold_cycle(tmp_path: Path, invoices: int) -> tuple[int, int]:
    """One organization's cold cycle of ``invoices`` invoices, through the simulator:
    the traced memory it held at its peak and kept after it (bytes, over what was
    traced before it)."""
    scenario = Scenario.generate(orgs=1, invoices_per_org=invoices, now=NOW, monthly=True)
    async with Simulator(scenario, clock=FakeClock(NOW)) as sim:
        data: dict[str, Any] = {
            "atlas": {
                "base_url": sim.base_url,
                "auth": {"public_key": sim.public_key, "private_key": sim.private_key},
            },
            "organizations": [{"id": org_id} for org_id in sim.org_ids],
            "state": {"path": str(tmp_path / "state.db")},
            "notifiers": {"console": {"type": "console"}},
            "rules": [{"name": "failed-charge", "type": "invoice_status", "notify": ["console"]}],
        }
        config = load(yaml.safe_dump(data), filename="memory.yaml", env={}, base_dir=tmp_path)
        async with App(config, clock=FakeClock(NOW), notifiers={"console": Silent()}) as app:
            gc.collect()
            tracemalloc.start()
            try:
                before = tracemalloc.get_traced_memory()[0]
                result = await app.run_cycle()
                del result
                gc.collect()
                after, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            assert len(app.store.snapshot.get(sim.org_ids[0])) == invoices
            stored = await app.store.snapshot.stored_invoices(sim.org_ids[0])
            assert len(stored) == invoices
    return peak - before, after - before


async def test_a_cold_listing_is_held_once_and_kept_as_keys(tmp_path: Path):
    held, kept = await cold_cycle(tmp_path, INVOICES)
    assert held <= PEAK_FIXED + INVOICES * PEAK_PER_INVOICE, f"held at the peak: {held:,} B"
    assert kept <= KEPT_FIXED + INVOICES * KEPT_PER_INVOICE, f"kept: {kept:,} B"


async def test_a_big_organizations_cold_listing_holds_no_more_for_more_invoices(tmp_path: Path):
    """What a cold listing holds beyond what the snapshot keeps (its peak over what is
    kept after it) does not grow with the organization's size: the settled invoices of
    its pages after the first wait for its commit in the state's staging area
    (invoice_watch.store.sql.staging), not in memory. Held whole until the commit, it
    grew by about 190 bytes an invoice (5,000 -> 15,000 invoices: 1.9 MB more); now by
    what the listing's duplicate check and page tuples take (40-90 bytes, measured)."""
    small, large = 4_000, 20_000
    held_small, kept_small = await cold_cycle(tmp_path / "small", small)
    held_large, kept_large = await cold_cycle(tmp_path / "large", large)
    growth = (held_large - kept_large) - (held_small - kept_small)
    assert growth <= (large - small) * TRANSIENT_PER_INVOICE, (
        f"a listing of {large:,} held {growth:,} B more than one of {small:,}, beyond "
        "what the snapshot keeps"
    )


async def restart_read(tmp_path: Path, count: int) -> OrgRead:
    """A restart's first full listing of one organization whose ``count`` invoices its
    snapshot holds, all settled: a new client (every page parsed), each invoice found
    as the snapshot's key."""
    from tests.test_incremental import BIG_ORG, Listing

    async with Listing(count, count) as server:
        atlas = base_config()["atlas"] | {"base_url": server.url}
        config = make_config(tmp_path, base_config(atlas=atlas))
        async with AtlasClient(config.atlas) as client:
            empty = Snapshot(settles=FINAL_STATUSES)
            known = empty.updated((await client.read_org(BIG_ORG, None, empty)).invoices, [])
        async with AtlasClient(config.atlas) as client:
            return await client.read_org(BIG_ORG, None, known)


async def test_a_restarts_first_full_listing_holds_its_keys_in_a_few_bytes_each(
    tmp_path: Path,
):
    """A restart's first cycle lists a big organization in full, its settled invoices
    found as the snapshot's keys: the read holds those ints (the snapshot's own) in a
    sorted list, 8 bytes a key, as the listing's duplicate and repeated-page checks do.
    A frozenset in the read, and a set in the checks, took about 40 bytes a key each
    (52 here; at 100,000 invoices 4 MB apiece, what kept a restarted daemon past 80 MB)."""
    count = 10_000
    read = await restart_read(tmp_path, count)
    assert read.ok and len(read.settled) == count and not read.invoices
    assert list(read.settled) == sorted(set(read.settled))  # ascending, each once
    held = sys.getsizeof(read.settled) / count
    assert held <= 9, f"the read's settled keys: {held:.1f} B a key"
