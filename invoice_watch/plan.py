"""What a cycle decides, pure: each organization's read diffed against its snapshot
(:func:`step_org`: what the rules see and what the store writes), then the alert
lifecycle over the whole cycle (:class:`CyclePlan`: FIRING, REMINDER and NOTICE as each
read is planned, RESOLVED once every organization is).

The stored alert states are the store's notification log's (its cache of firing
alerts, the one owner); a plan keeps only its own decisions not yet committed
(:class:`PlannedAlerts`, an overlay over them), so that an alert that two reads of the
cycle hold fires once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta
from typing import TYPE_CHECKING

from invoice_watch.alerts import Reason, Scope, Transition, plan_holding, plan_resolved
from invoice_watch.atlas.paging import staged_count
from invoice_watch.config import Config
from invoice_watch.diff import Diff, diff, without_news
from invoice_watch.linked import NOTHING_SHARED, Linked, Shared
from invoice_watch.rules import (
    Age,
    History,
    OrgView,
    evaluate,
    settled_statuses,
    usage_recovery,
    wall_age,
)
from invoice_watch.store import AlertState, OrgState, OrgWrite
from invoice_watch.types import Invoice, OrgRead, Snapshot

if TYPE_CHECKING:
    from invoice_watch.anomaly import Detection


def _observed(history: History, cents: int) -> bool:
    """Whether ``cents`` is the last amount the history holds (another listing of the
    invoice observed it already: a new observation would add nothing)."""
    return bool(history) and history[-1][1] == cents


@dataclass(frozen=True)
class OrgStep:
    """What one organization's read means for a cycle: what the rules see of it, what the
    store writes for it (with the organization's invoice count once written), and the
    amount histories of its pending invoices."""

    view: OrgView
    write: OrgWrite
    history: dict[str, History]
    # What the read found changed, for the reads of the cycle after it (Shared.listed).
    listed: Mapping[str, tuple[Invoice, bool]] = field(default_factory=dict)
    # Linked invoices Atlas hid from the read (hidden_linked): their alerts wait.
    hidden: frozenset[str] = frozenset()


def listing_change(
    read: OrgRead,
    snapshot: Snapshot,
    *,
    listed_from: date | None = None,
    stored: Mapping[str, Invoice] | None = None,
    hidden: frozenset[str] = frozenset(),
) -> Diff:
    """What a successful read changes in its organization's snapshot (the diff
    :func:`step_org` takes; arguments as there)."""
    old = {**snapshot.live, **stored} if stored else snapshot.live
    return diff(old, read.invoices, listed_from=listed_from, hidden=hidden)


def step_org(
    read: OrgRead,
    snapshot: Snapshot,
    state: OrgState,
    history_of: Callable[[str], History],
    now: datetime,
    *,
    listed_from: date | None = None,
    stored: Mapping[str, Invoice] | None = None,
    shared: Shared = NOTHING_SHARED,
    change: Diff | None = None,
    hidden: frozenset[str] = frozenset(),
) -> OrgStep:
    """Diff one organization's read against its snapshot. Pure: the stored snapshot,
    read state and histories in; nothing is changed. A failed read leaves the snapshot
    as it was (no invoice "disappears") and only dates the failure (``failing_since``:
    the first failed read's time, decided here for the rules and the store alike).

    ``listed_from``: the first UTC day an incremental read's window covers (None: a
    full listing). ``stored``: the settled invoices that the read changed or no longer
    lists, as the state file holds them (:func:`~invoice_watch.diff.settled_to_load`
    names them). ``shared``: what other configured organizations that list some of
    these invoices already hold (:meth:`~invoice_watch.linked.Linked.shared`): a change
    one of them told already is no news (no status change for the rules, no amount
    observation), though this organization's copy is rewritten; a copy of theirs this
    read finds out of date is updated with it (``OrgWrite.mirrors``). ``change``: the
    read's :func:`listing_change`, when the caller has it already. ``hidden``: linked
    invoices Atlas hides from this read (:func:`~invoice_watch.linked.hidden_linked`):
    kept in the snapshot as they are, and left out of what the rules see (their alerts
    wait, as for a failed read)."""
    org_id = read.org_id
    if not read.ok:
        failing_since = state.failing_since or now
        view = OrgView(
            org_id, ok=False, invoices=snapshot.live, failing_since=failing_since, error=read.error
        )
        write = OrgWrite(
            org_id,
            ok=False,
            error=read.error,
            failing_since=failing_since,
            invoice_count=len(snapshot),
        )
        return OrgStep(view, write, {})
    old = {**snapshot.live, **stored} if stored else snapshot.live
    if change is None:
        change = diff(old, read.invoices, listed_from=listed_from, hidden=hidden)
    new: dict[str, Invoice] | None = None  # copied only when something changed
    if not change.empty:
        new = dict(old)
        for invoice in change.changed:
            new[invoice.id] = invoice
        for invoice in change.gone:
            del new[invoice.id]
    current = old if new is None else new  # read only
    # The news: compared with the other organization's copy where this one holds none.
    base, news = old, change
    if shared.baseline:
        base = {**old, **shared.baseline}
        news = diff(base, read.invoices, listed_from=listed_from)
    told, observed = shared.told, shared.observed
    observations = [
        (i.id, i.amount_billed_cents)
        for i in news.changed
        if i.status == "PENDING"
        and (i.id not in base or base[i.id].amount_billed_cents != i.amount_billed_cents)
        and i.id not in told
        and i.id not in observed
        and not _observed(history_of(i.id), i.amount_billed_cents)
    ]
    history: dict[str, History] = {
        i.id: history_of(i.id) for i in current.values() if i.status == "PENDING"
    }
    for invoice_id, cents in observations:
        history[invoice_id] = [*history.get(invoice_id, ()), (now, cents)]
    if told:
        news = without_news(news, told)
    seen = current
    if hidden:  # kept as they are, but no rule looks at them until they are listed
        seen = {i: invoice for i, invoice in current.items() if i not in hidden}
    view = OrgView(
        org_id,
        ok=True,
        invoices=seen,
        diff=news,
        first_read=state.last_success is None and not shared.baseline,
    )
    mirrors = shared.mirror
    write = OrgWrite(
        org_id,
        ok=True,
        upserts=change.changed,
        gone=[i.id for i in change.gone],
        observations=observations,
        mirrors=[
            replace(i, source_org_id=other)
            for i in change.changed
            if i.id in mirrors
            for other in mirrors[i.id]
        ]
        if mirrors
        else [],
        staged=read.staged,
        invoice_count=len(snapshot)
        + len(change.added)
        + staged_count(read.staged)
        - len(change.gone),
    )
    return OrgStep(view, write, history, shared.listed, hidden)


_MISSING = object()


class PlannedAlerts(Mapping[str, AlertState]):
    """The firing alerts as a cycle sees them while it plans: the store's (``stored``,
    as committed) overlaid with what this cycle planned and did not commit yet (a
    FIRING, a REMINDER, a RESOLVED: the state each transition leaves). Only firing
    alerts are in it, as in the store's."""

    def __init__(self, stored: Mapping[str, AlertState]) -> None:
        self._stored = stored
        self._planned: dict[str, AlertState] = {}
        self._undo: dict[str, list[tuple[str, object]]] = {}  # org -> (key, planned before)

    def __getitem__(self, key: str) -> AlertState:
        state = self._planned.get(key)
        if state is None:
            return self._stored[key]
        if not state.firing:
            raise KeyError(key)
        return state

    def __iter__(self) -> Iterator[str]:
        planned = self._planned
        yield from (key for key, state in planned.items() if state.firing)
        yield from (key for key in self._stored if key not in planned)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def plan(self, transitions: Sequence[Transition], org_id: str | None = None) -> None:
        """Take the states these transitions leave (of ``org_id``'s read, which
        :meth:`withdraw` can take back)."""
        undo: list[tuple[str, object]] | None = None
        if org_id is not None:
            undo = self._undo[org_id] = []
        for t in transitions:
            key = t.state.key
            if undo is not None:
                undo.append((key, self._planned.get(key, _MISSING)))
            self._planned[key] = t.state

    def withdraw(self, org_id: str) -> list[str]:
        """Take back what :meth:`plan` took of ``org_id``'s read; returns the keys."""
        undo = self._undo.pop(org_id, [])
        for key, before in reversed(undo):
            if before is _MISSING:
                self._planned.pop(key, None)
            else:
                assert isinstance(before, AlertState)
                self._planned[key] = before
        return [key for key, _ in undo]


class CyclePlan:
    """What a cycle decides, organization by organization as each one is read, then for
    the whole cycle. Pure: stored alert states (``stored``: the store's firing alerts)
    and each organization's step in, transitions out; nothing is written.

    One invoice is one alert subject, whichever configured organization's listing shows
    it (:mod:`invoice_watch.linked`; ``payers``: linked organization -> paying
    organization, as the state file knows them). Alert keys name the invoice's own
    organization, and the alert states are seen as the cycle changes them
    (:class:`PlannedAlerts`), so that it fires once; a change is news from the first
    listing that shows it only, so that it is one NOTICE and one amount observation, in
    this cycle or when the other listing catches up in a later one; and an alert
    resolves on whichever successful read lists its invoice (:meth:`scope`).
    Resolutions wait for the whole cycle: an alert resolves only when no organization
    holds its condition any more.
    """

    def __init__(
        self,
        config: Config,
        stored: Mapping[str, AlertState],
        *,
        baseline: bool = False,
        payers: Mapping[str, str] | None = None,
        age: Age | None = None,
    ) -> None:
        self.config = config
        self.baseline = baseline
        self._age = age  # how long ago a stored time was (the wall clock's when None)
        self.states = PlannedAlerts(stored)
        # Keys of the conditions that hold -> the organizations whose reads hold them.
        self.held: dict[str, set[str]] = {}
        self.evaluated: set[tuple[str, str]] = set()  # (rule, configured org) scopes
        # (rule, org) -> the usage_anomaly verdict evaluated (RESOLVED messages)
        self.usage: dict[tuple[str, str], Detection] = {}
        self.read_ok: set[str] = set()  # configured organizations read this cycle
        # What a resolution may look up, per configured organization: its live invoices
        # and those of the alerts firing (an invoice may have settled this cycle).
        self.invoices_of: dict[str, Mapping[str, Invoice]] = {}
        self._settles = settled_statuses(config.rules)
        self._alerted = {s.invoice_id for s in stored.values() if s.invoice_id}
        self._configured = frozenset(org.id for org in config.organizations)
        self.linked = Linked(self._configured, payers or {}, self._settles)
        self._noticed: set[str] = set()  # keys of this cycle's notices
        self.failing: dict[str, timedelta] = {}  # org whose read failed -> for how long
        self.changes = 0  # invoices added, changed or gone
        self.invoices = 0  # in the snapshots, once the cycle is committed
        self._counted: dict[str, tuple[int, int]] = {}  # org -> its (invoices, changes)

    def org(
        self, step: OrgStep, now: datetime
    ) -> tuple[list[Transition], dict[str, AlertState | None]]:
        """One organization's FIRING, REMINDER and NOTICE transitions, and the states
        they replace (a reminder's breakdown says what moved since). Raises before it
        changes anything (a read that cannot be evaluated is then taken as a failed
        one)."""
        view = step.view
        evaluation = evaluate(self.config.rules, [view], step.history, now, age=self._age)
        transitions = plan_holding(
            self.config, evaluation, self.states, now, baseline=self.baseline, age=self._age
        )
        noticed: set[str] = set()
        if evaluation.notices:  # one notice per invoice and move, whoever listed it
            kept = []
            for t in transitions:
                if not t.state.firing and t.reason is Reason.NEW:
                    if t.state.key in self._noticed or t.state.key in noticed:
                        continue
                    noticed.add(t.state.key)
                kept.append(t)
            transitions = kept
        invoices_of = view.invoices
        changes = 0
        if view.diff is not None:
            changes = len(view.diff.changed) + len(view.diff.gone)
            changes += staged_count(step.write.staged)  # added, as settled invoices' keys
            if any(i.status in self._settles for i in view.diff.changed):
                invoices_of = {
                    invoice_id: invoice
                    for invoice_id, invoice in view.invoices.items()
                    if invoice.status not in self._settles or invoice_id in self._alerted
                }
        # Nothing below raises: the cycle takes this read.
        org_id = view.org_id
        self._noticed |= noticed
        self.linked.took(org_id, step.listed, step.hidden)
        self.invoices_of[org_id] = invoices_of
        if view.ok:
            self.read_ok.add(org_id)
            self.failing.pop(org_id, None)
        elif view.failing_since is not None:
            self.failing[org_id] = (self._age or wall_age(now))(view.failing_since)
        count = step.write.invoice_count
        invoices_before, changes_before = self._counted.get(org_id, (0, 0))
        self._counted[org_id] = (invoices_before + count, changes_before + changes)
        self.invoices += count
        self.changes += changes
        for key in (*evaluation.holding, *evaluation.undecided):  # undecided: not resolved
            self.held.setdefault(key, set()).add(org_id)
        self.evaluated.update(evaluation.evaluated)
        self.usage.update(evaluation.usage)
        previous = {t.state.key: self.states.get(t.state.key) for t in transitions}
        self.states.plan(transitions, org_id)
        return transitions, previous

    def withdraw(self, org_id: str) -> None:
        """Forget what :meth:`org` planned of ``org_id``'s read, whose part of the cycle
        could not be committed: as if it had not been read yet; plan its failed read
        next. What a read of another organization planned meanwhile from it stays (a
        linked invoice's news it told: that one's read then tells it again, or the
        next)."""
        self.read_ok.discard(org_id)
        self.failing.pop(org_id, None)
        self.evaluated = {scope for scope in self.evaluated if scope[1] != org_id}
        self.usage = {scope: d for scope, d in self.usage.items() if scope[1] != org_id}
        for key in [key for key, orgs in self.held.items() if org_id in orgs]:
            self.held[key].discard(org_id)
            if not self.held[key]:
                del self.held[key]
        self.invoices_of.pop(org_id, None)
        self.linked.withdraw(org_id)
        invoices, changes = self._counted.pop(org_id, (0, 0))
        self.invoices -= invoices
        self.changes -= changes
        self._noticed.difference_update(self.states.withdraw(org_id))

    def resolved(self, now: datetime) -> list[Transition]:
        """The whole cycle's RESOLVED transitions, once every organization is planned."""
        transitions = plan_resolved(
            self.config, self.states, self.held, self.scope, now, baseline=self.baseline
        )
        self.states.plan(transitions)
        return transitions

    def scope(self, state: AlertState) -> Scope:
        """Whether this cycle evaluated the alert's rule on what the alert is about, and
        its invoice as it stands now (:class:`~invoice_watch.alerts.Scope`).

        An invoice alert is evaluated by any successful read that lists its invoice:
        the organization whose read fired it, the invoice's own organization, or its
        payer. When none lists it, by the read that would have to: the invoice's own
        organization when it is configured (its listing always shows its own invoices;
        a payer's may stop showing linked ones when its role changes), else the
        organization that fired it; but an invoice a read did not show because Atlas
        hid it (:func:`~invoice_watch.linked.hidden_linked`) is not evaluated. Other
        alerts: by that organization's read. An alert none of whose organizations (the
        one that read it, its invoice's, that one's payer) is configured any more is
        ``unconfigured``."""
        linked = self.linked
        if linked.unconfigured(state):
            return Scope(False, unconfigured=True)
        if not state.invoice_id:
            detection = self.usage.get((state.rule, state.source_org_id))
            return Scope(
                (state.rule, state.source_org_id) in self.evaluated,
                failing_for=self.failing.get(state.source_org_id),
                recovery=usage_recovery(detection, state.key, state.rule, state.source_org_id)
                if detection is not None
                else None,
            )
        for org_id in linked.readers(state):
            if org_id not in self.read_ok:
                continue
            invoice = self.invoices_of.get(org_id, {}).get(state.invoice_id)
            if invoice is not None:
                return Scope((state.rule, org_id) in self.evaluated, invoice)
        if state.invoice_id in linked.hidden:
            return Scope(False)
        owner = state.org_id if state.org_id in self._configured else state.source_org_id
        return Scope((state.rule, owner) in self.evaluated)
