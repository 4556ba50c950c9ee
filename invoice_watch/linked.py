"""Linked invoices: one invoice that two configured organizations list.

A linked organization's invoice is in its own listing and nested in its paying
organization's (``linkedInvoices``); it is one alert subject all the same. This module
owns what a cycle knows of them: which organization pays for which (:class:`Linked`,
learnt from the state file and from the reads), what each read of the cycle found
changed (so that a change is news from the first listing that shows it only:
:meth:`Linked.shared` -> :class:`Shared`), the linked invoices Atlas hides from a read
(:func:`hidden_linked`), and the warning that says so (:class:`HiddenLinkedWarning`).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import date

from invoice_watch.config import Config
from invoice_watch.diff import starts_before
from invoice_watch.store import AlertState
from invoice_watch.types import Invoice, OrgRead, Snapshot

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shared:
    """What the other configured organizations already hold of the invoices one read
    found changed, when they list them too: see :meth:`Linked.shared`."""

    # Invoices whose listed version another configured organization already holds or
    # told (it listed it in this cycle, or a cycle before): no news.
    told: frozenset[str] = frozenset()
    # Invoices whose listed version another listing of this cycle added (it held none):
    # their amount is observed already; a move from this organization's copy is news.
    observed: frozenset[str] = frozenset()
    # Invoices this organization holds no copy of, and another one does: what this read
    # is compared with (the other's copy), so that a move is news here too.
    baseline: Mapping[str, Invoice] = field(default_factory=dict)
    # Organization -> its settled copies to read from the state file into ``baseline``
    # (:meth:`loaded`): settled invoices are kept in memory as keys only.
    load: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # Invoice id -> the other organizations whose stored copy differs from this listing.
    mirror: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # The organizations whose listing of this cycle told (their write must come first).
    tellers: frozenset[str] = frozenset()
    # What this read found changed, for the reads after it: invoice id -> (the invoice,
    # whether it was compared with a copy), taken when its step is planned.
    listed: Mapping[str, tuple[Invoice, bool]] = field(default_factory=dict)

    def loaded(self, invoices: Iterable[Invoice]) -> Shared:
        """These, with the copies :attr:`load` names (as the state file holds them)."""
        return replace(self, baseline={**self.baseline, **{i.id: i for i in invoices}}, load={})


NOTHING_SHARED = Shared()


def same_invoice(a: Invoice, b: Invoice) -> bool:
    """Whether two listings show one invoice alike (whichever organization listed it)."""
    if a.source_org_id != b.source_org_id:
        a = replace(a, source_org_id=b.source_org_id)
    return a == b


def hidden_linked(
    read: OrgRead,
    snapshot: Snapshot,
    paying: Collection[str],
    *,
    listed_from: date | None = None,
    stored: Mapping[str, Invoice] | None = None,
) -> frozenset[str]:
    """The linked invoices a paying organization's successful read does not show
    because Atlas hides them, not because they are gone: its listing shows none of the
    linked invoices (nested in ``linkedInvoices``) at all, while its snapshot holds some
    that the listing's window covers. Atlas lists linked invoices only to Organization
    Billing Admin or Owner on the paying organization: a role that drops to Billing
    Viewer hides every one of them at once, and they are kept as they are (not gone,
    their alerts neither resolved nor fired again) until a listing shows them again.
    ``paying``: the organizations known to pay for another (whose listing showed
    linked invoices, as the state file knows them); ``listed_from`` (the window's first
    UTC day), ``stored``: as for :func:`~invoice_watch.plan.step_org`. Costs nothing
    for an organization that pays for no other."""
    org_id = read.org_id
    if not read.ok or read.linked or org_id not in paying:
        return frozenset()
    listed = {invoice.id for invoice in read.invoices}
    candidates = (*snapshot.live.values(), *(stored or {}).values())
    return frozenset(
        invoice.id
        for invoice in candidates
        if invoice.org_id != org_id
        and invoice.id not in listed
        and (listed_from is None or not starts_before(invoice, listed_from))
    )


class Linked:
    """What one cycle knows of the invoices two configured organizations list: who pays
    for whom (``payers``: linked organization -> paying organization, as the state file
    knows them, configured or not; ``configured``: the configured organizations), what
    each read of the cycle found changed, and the invoices a read did not show because
    Atlas hid them. ``settles``: the statuses kept settled (an invoice that can still
    change is remembered even when not known to be linked yet)."""

    def __init__(
        self, configured: frozenset[str], payers: Mapping[str, str], settles: frozenset[str]
    ) -> None:
        self._configured = configured
        self._settles = settles
        self._payers = dict(payers)  # linked -> payer, configured or not
        # Linked organization -> its payer, both configured: they list the same invoices.
        self._payer = {
            linked: payer
            for linked, payer in payers.items()
            if linked != payer and linked in configured and payer in configured
        }
        # Invoices found changed this cycle (those of linked organizations, and those
        # that can still change), whether their read compared them with a copy, and the
        # organization whose read it was.
        self._listed: dict[str, tuple[Invoice, bool, str]] = {}
        self.hidden: set[str] = set()  # invoices a read did not show: Atlas hid them

    def to_load(
        self, read: OrgRead, own: Snapshot, snapshot_of: Callable[[str], Snapshot]
    ) -> dict[str, list[str]]:
        """The other organizations' settled copies that :meth:`shared` may compare a
        successful ``read`` with (``own``, ``snapshot_of`` as there), to read from the
        state file before the diff (settled invoices are kept in memory as keys only):
        organization -> ids. Those of the invoices this organization holds no copy of
        that the other one (its payer, or the linked organization whose invoice it is)
        holds settled in another version. Usually none; costs nothing for an
        organization not known to be linked whose listing nests no linked invoice."""
        org_id = read.org_id
        payer = self._payer.get(org_id)
        load: dict[str, list[str]] = {}
        if payer is None and not read.linked:
            return load
        for invoice in read.invoices:
            owner = invoice.org_id
            if owner == org_id and payer is None:
                continue
            other = payer if owner == org_id else owner
            if other not in self._configured or invoice.id in own:
                continue
            key = snapshot_of(other).settled.get(invoice.id)
            if key is not None and key != invoice.settled_key():
                load.setdefault(other, []).append(invoice.id)
        return load

    def shared(
        self,
        org_id: str,
        changed: Iterable[Invoice],
        own: Snapshot,
        snapshot_of: Callable[[str], Snapshot],
        copies: Mapping[str, Mapping[str, Invoice]] | None = None,
    ) -> Shared:
        """What the other configured organizations that list some invoices of a read of
        ``org_id`` (its payer, or the linked organization whose invoice it is) already
        hold of those it found ``changed`` (added or changed: its
        :func:`~invoice_watch.plan.listing_change`; ``own``: the reading organization's
        snapshot; ``snapshot_of``: any organization's, as committed): whether one listed
        the same version earlier in this cycle, or holds it already (no news), which of
        their copies are out of date (updated with this read's), and, for an invoice this
        organization holds no copy of, the other's copy to compare this read with (its
        first read, or a payer that did not list its linked invoices before; a settled
        copy is taken from ``copies``, organization -> id -> invoice, as read for
        :meth:`to_load`, else named in :attr:`Shared.load`). Call it
        once per read, in the order reads are taken: what each read found changed is
        remembered once its step is planned (:meth:`took`; of an organization not known
        to be linked yet, as in a first cycle, the invoices that can still change: a
        pending amount is then observed once too). Costs nothing when nothing changed."""
        payer = self._payer.get(org_id)
        listed, settles = self._listed, self._settles
        told: set[str] = set()
        observed: set[str] = set()
        tellers: set[str] = set()
        remember: dict[str, tuple[Invoice, bool]] = {}
        baseline: dict[str, Invoice] = {}
        load: dict[str, list[str]] = defaultdict(list)
        mirror: dict[str, tuple[str, ...]] = {}
        for invoice in changed:
            invoice_id = invoice.id
            earlier = listed.get(invoice_id)
            owner = invoice.org_id
            if earlier is None and owner == org_id and payer is None:
                # Not known to be linked (most organizations): remember what can still
                # change, in case a payer not known yet lists it later in this cycle.
                if invoice.status not in settles:
                    remember[invoice_id] = (invoice, invoice_id in own)
                continue
            held = invoice_id in own
            if earlier is not None and same_invoice(earlier[0], invoice):
                # Listed so by another one in this cycle: news it told, or only added.
                (told if earlier[1] else observed).add(invoice_id)
                tellers.add(earlier[2])
                remember[invoice_id] = (invoice, earlier[1] or held)
                continue
            if owner == org_id:
                other = payer
            elif owner in self._configured:  # a linked organization's, nested in this one
                other = owner
                self._payer[owner] = org_id  # learnt here if the state file did not know
            else:
                other = None
            compared = held  # whether this read's news says what moved (not just "added")
            if other is not None:
                theirs = snapshot_of(other)
                copy = theirs.live.get(invoice_id)
                key = theirs.settled.get(invoice_id) if copy is None else None
                if copy is not None or key is not None:
                    compared = True
                    if (
                        same_invoice(copy, invoice)
                        if copy is not None
                        else key == invoice.settled_key()
                    ):
                        told.add(invoice_id)  # it holds this version: no news
                    else:
                        mirror[invoice_id] = (other,)
                        if not held:  # compared with the other's copy, none being here
                            if copy is None and copies is not None:
                                copy = copies.get(other, {}).get(invoice_id)
                            if copy is not None:
                                baseline[invoice_id] = copy
                            else:
                                load[other].append(invoice_id)
            if other is not None or invoice.status not in settles:
                remember[invoice_id] = (invoice, compared)
        if not (told or observed or baseline or load or mirror or remember):
            return NOTHING_SHARED
        return Shared(
            frozenset(told),
            frozenset(observed),
            baseline,
            {org: tuple(ids) for org, ids in load.items()},
            mirror,
            frozenset(tellers),
            remember,
        )

    def took(
        self, org_id: str, listed: Mapping[str, tuple[Invoice, bool]], hidden: Collection[str]
    ) -> None:
        """``org_id``'s read is part of the cycle: what it found changed
        (:attr:`Shared.listed`) and the linked invoices Atlas hid from it."""
        for invoice_id, (invoice, compared) in listed.items():
            self._listed[invoice_id] = (invoice, compared, org_id)
        self.hidden.update(hidden)

    def withdraw(self, org_id: str) -> None:
        """Forget what ``org_id``'s read found changed (its part was not committed)."""
        for invoice_id in [i for i, listed in self._listed.items() if listed[2] == org_id]:
            del self._listed[invoice_id]

    def unconfigured(self, state: AlertState) -> bool:
        """Whether none of the organizations that could read the alert (the one that
        read it, its invoice's, that one's payer) is configured any more."""
        payer = self._payers.get(state.org_id)
        return not ({state.source_org_id, state.org_id, payer} & self._configured)

    def readers(self, state: AlertState) -> tuple[str, ...]:
        """The organizations whose successful read evaluates an invoice alert when it
        lists the invoice, in order: the one that fired it, the invoice's own, and that
        one's configured payer."""
        payer = self._payer.get(state.org_id)
        orgs = (state.source_org_id, state.org_id)
        return orgs if payer is None else (*orgs, payer)


class HiddenLinkedWarning:
    """Says once, at the first read that shows it, that a paying organization's listing
    shows none of the linked invoices it showed before (and again if they come back and
    vanish again): Atlas shows linked invoices only to Organization Billing Admin or
    Organization Owner on the paying organization."""

    def __init__(self) -> None:
        self._said: set[str] = set()  # paying organizations warned about (once each)

    def check(
        self,
        config: Config,
        read: OrgRead,
        payers: Mapping[str, str],
        hidden: Collection[str],
        *,
        full: bool,
    ) -> None:
        """``hidden``: :func:`hidden_linked` of ``read``; a ``full`` listing: one that
        should show every organization known to be linked to it."""
        org_id = read.org_id
        if read.linked:
            self._said.discard(org_id)  # said again if they vanish again
            return
        if org_id in self._said or not (hidden or full):
            return  # (before the scan of every payer below: most reads end here)
        linked = sorted(linked for linked, payer in payers.items() if payer == org_id)
        if not (hidden or linked):
            return
        self._said.add(org_id)
        log.warning(
            "%s: Atlas listed no linked invoices for this paying organization, though it "
            "listed invoices of %s nested in its listing before. Atlas shows linked "
            "invoices only to Organization Billing Admin or Organization Owner on the "
            "paying organization (Organization Billing Viewer sees none): grant the API "
            "key or service account one of those roles on %s.%s A linked organization "
            "under `organizations:` is still read through its own listing.",
            config.org_name(org_id),
            ", ".join(config.org_name(other) for other in linked) or "other organizations",
            org_id,
            f" Until Atlas lists them again, the {len(hidden)} linked invoice(s) "
            "invoice-watch holds for it are kept as they were, and their alerts neither "
            "resolve nor fire."
            if hidden
            else "",
        )
