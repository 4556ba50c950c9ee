"""Message rendering: golden files for every kind and for grouped messages, plus the
facts each message must state (SPEC §5) and escaping of hostile names.

Regenerate the golden files with ``UPDATE_GOLDEN=1 pytest tests/test_notify_render.py``,
then read them: they are what people receive.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
from aiosmtplib.email import flatten_message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from invoice_watch import format as fmt
from invoice_watch.constants import MESSAGE_MAX_EVENTS
from invoice_watch.format import billing_url
from invoice_watch.notify import ConsoleNotifier, EmailNotifier
from invoice_watch.notify.render import facts, plain
from invoice_watch.notify.render.email import SUBJECT_MAX, email_html, email_subject
from invoice_watch.notify.render.slack import slack_blocks, slack_brief_text, slack_text
from invoice_watch.types import AlertEvent, BreakdownLine, EventKind, Part, Severity
from tests.fakes_slack import BLOCK_TEXT_MAX, TEXT_MAX, block_text, slack_problem, units

GOLDEN = Path(__file__).parent / "golden"

PROD = "5f1e2d3c4b5a69788796a5b4"
STAGING = "6a7b8c9d0e1f2a3b4c5d6e7f"
AT = datetime(2026, 11, 15, 12, 0, tzinfo=UTC)


def pending_event(**changes: object) -> AlertEvent:
    """A FIRING pending_amount alert with details and a breakdown."""
    event = AlertEvent(
        kind=EventKind.FIRING,
        key=f"pending-over-budget|{PROD}|66a0f1c2e4b0a1b2c3d4e5f6",
        rule="pending-over-budget",
        rule_type="pending_amount",
        severity=Severity.WARNING,
        org_id=PROD,
        org_name="Production",
        billing_url=billing_url("https://cloud.mongodb.com", PROD),
        summary="The pending invoice is $6,000.00, over the $5,000.00 threshold.",
        at=AT,
        invoice_id="66a0f1c2e4b0a1b2c3d4e5f6",
        invoice_status="PENDING",
        amount_cents=600_000,
        period_start=date(2026, 11, 1),
        period_end=date(2026, 12, 1),
        details=(("Threshold", "$5,000.00"),),
        breakdown=(
            BreakdownLine("project", "analytics", 400_000, 120_000),
            BreakdownLine("project", "web", 200_000),
            BreakdownLine("sku", "ATLAS_AWS_INSTANCE_M30", 350_000),
            BreakdownLine("sku", "ATLAS_AWS_DATA_TRANSFER", 250_000, -3_000),
        ),
    )
    return replace(event, **changes)  # type: ignore[arg-type]


def resolved_failed_event() -> AlertEvent:
    """A failed charge that was paid: RESOLVED after firing for 3h 5m."""
    return AlertEvent(
        kind=EventKind.RESOLVED,
        key=f"failed-charge|{STAGING}|66b1e2d3c4b5a69788796a5b",
        rule="failed-charge",
        rule_type="invoice_status",
        severity=Severity.CRITICAL,
        org_id=STAGING,
        org_name="Staging",
        billing_url=billing_url("https://cloud.mongodb.com", STAGING),
        summary="The invoice is no longer FAILED: it is PAID.",
        at=AT,
        invoice_id="66b1e2d3c4b5a69788796a5b",
        invoice_status="PAID",
        amount_cents=123_456,
        period_start=date(2026, 10, 1),
        period_end=date(2026, 11, 1),
        firing_since=AT - timedelta(hours=3, minutes=5),
    )


def notice_event() -> AlertEvent:
    """A one-shot status_change event, PENDING -> FAILED, for an org without a name."""
    return AlertEvent(
        kind=EventKind.NOTICE,
        key=f"status-moves|{STAGING}|66b1e2d3c4b5a69788796a5b",
        rule="status-moves",
        rule_type="status_change",
        severity=Severity.INFO,
        org_id=STAGING,
        org_name=STAGING,
        billing_url=billing_url("https://cloud.mongodb.com", STAGING),
        summary="The invoice moved from PENDING to FAILED.",
        at=AT,
        invoice_id="66b1e2d3c4b5a69788796a5b",
        invoice_status="FAILED",
        previous_status="PENDING",
        amount_cents=123_456,
        period_start=date(2026, 10, 1),
        period_end=date(2026, 11, 1),
    )


def poll_failure_event() -> AlertEvent:
    """An alert with no invoice at all (poll_failure)."""
    return AlertEvent(
        kind=EventKind.FIRING,
        key=f"atlas-unreachable|{PROD}",
        rule="atlas-unreachable",
        rule_type="poll_failure",
        severity=Severity.CRITICAL,
        org_id=PROD,
        org_name="Production",
        billing_url=billing_url("https://cloud.mongodb.com", PROD),
        summary="Invoices of Production could not be read for 1h 2m.",
        at=AT,
        details=(("Last error", "HTTP 503 from the Atlas API"),),
    )


def grouped_events() -> list[AlertEvent]:
    """12 events: 9 FIRING, 3 RESOLVED, as one grouped message."""
    events = []
    for i in range(9):
        events.append(
            pending_event(
                key=f"k{i}",
                invoice_id=f"66a0f1c2e4b0a1b2c3d4e5{i:02d}",
                amount_cents=500_000 + i * 12_345,
                at=AT - timedelta(minutes=i),
            )
        )
    events[4] = poll_failure_event()
    for i in range(3):
        events.append(replace(resolved_failed_event(), key=f"r{i}", amount_cents=1_000 * (i + 1)))
    return events


def check_golden(name: str, content: str) -> None:
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN") == "1":
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(content, encoding="utf-8")
    assert path.exists(), f"{path} is missing: run with UPDATE_GOLDEN=1 and read it"
    assert content == path.read_text(encoding="utf-8")


def as_json(value: object) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False) + "\n"


@pytest.mark.parametrize(
    ("name", "events"),
    [
        ("firing_pending.txt", [pending_event()]),
        ("resolved_failed.txt", [resolved_failed_event()]),
        ("notice.txt", [notice_event()]),
        ("poll_failure.txt", [poll_failure_event()]),
        ("grouped.txt", grouped_events()),
    ],
)
def test_text_matches_golden(name: str, events: list[AlertEvent]) -> None:
    check_golden(name, plain.text(events))


@pytest.mark.parametrize(
    ("name", "events"),
    [
        ("slack_firing.json", [pending_event()]),
        ("slack_resolved.json", [resolved_failed_event()]),
        ("slack_grouped.json", grouped_events()),
    ],
)
def test_slack_blocks_matches_golden(name: str, events: list[AlertEvent]) -> None:
    check_golden(name, as_json(slack_blocks(events)))


@pytest.mark.parametrize(
    ("name", "events"),
    [
        ("email_firing.html", [pending_event()]),
        ("email_notice.html", [notice_event()]),
        ("email_grouped.html", grouped_events()),
    ],
)
def test_email_html_matches_golden(name: str, events: list[AlertEvent]) -> None:
    check_golden(name, email_html(events))


@pytest.mark.parametrize(
    "event", [pending_event(), resolved_failed_event(), notice_event()], ids=lambda e: e.kind
)
def test_text_states_every_fact(event: AlertEvent) -> None:
    out = plain.text([event])
    for fact in (
        event.kind.value,
        event.rule,
        event.org_id,
        event.invoice_id,
        event.invoice_status,
        "$1,234.56" if event.amount_cents == 123_456 else "$6,000.00",
        fmt.period(event.period_start, event.period_end),
        event.billing_url,
        event.summary,
    ):
        assert fact and fact in out
    assert event.org_name in out


def test_text_resolved_says_how_long_it_fired() -> None:
    assert "Fired for:     3h 5m (since 2026-11-15 08:55 UTC)" in plain.text(
        [resolved_failed_event()]
    )


def test_text_notice_shows_status_change() -> None:
    assert "Status:        PENDING -> FAILED" in plain.text([notice_event()])


def test_text_without_invoice_leaves_invoice_facts_out() -> None:
    out = plain.text([poll_failure_event()])
    assert "Invoice:" not in out and "Amount:" not in out and "Period:" not in out
    assert "Last error:    HTTP 503 from the Atlas API" in out


def test_text_grouped_counts_and_lists_each_event() -> None:
    events = grouped_events()
    out = plain.text(events)
    assert out.startswith("12 alerts: 9 FIRING, 3 RESOLVED\n")
    for event in events:
        assert event.invoice_id is None or event.invoice_id in out


@pytest.mark.parametrize(
    ("events", "subject"),
    [
        (
            [pending_event()],
            "[invoice-watch] FIRING pending-over-budget: Production $6,000.00",
        ),
        ([poll_failure_event()], "[invoice-watch] FIRING atlas-unreachable: Production"),
        ([notice_event()], f"[invoice-watch] NOTICE status-moves: {STAGING} $1,234.56"),
        (grouped_events(), "[invoice-watch] 12 alerts: 9 FIRING, 3 RESOLVED"),
        (
            [pending_event(org_name="Prod\r\nBcc: evil@example.com")],
            "[invoice-watch] FIRING pending-over-budget: Prod Bcc: evil@example.com $6,000.00",
        ),
    ],
)
def test_email_subject_formats(events: list[AlertEvent], subject: str) -> None:
    assert email_subject(events) == subject


HOSTILE = '<script>alert("x")</script> & Co'


def test_email_html_escapes_every_value() -> None:
    event = pending_event(
        org_name=HOSTILE,
        summary=HOSTILE,
        details=((HOSTILE, HOSTILE),),
        breakdown=(BreakdownLine("project", HOSTILE, 1),),
        billing_url='https://x.test/"><script>',
    )
    for events in ([event], [event, event]):
        out = email_html(events)
        assert "<script>" not in out
        assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; Co" in out


def test_slack_blocks_escape_mrkdwn() -> None:
    event = pending_event(org_name="A <!channel> & B|C", summary="<@U123> pay up & <!here>")
    for events in ([event], [event, event]):
        out = json.dumps(slack_blocks(events))
        assert "<!channel>" not in out and "<!here>" not in out and "<@U123>" not in out
        assert "&lt;!channel&gt; &amp; B" in out


def test_slack_blocks_emoji_by_state() -> None:
    def header(event: AlertEvent) -> str:
        text: str = slack_blocks([event])[0]["text"]["text"]
        return text

    assert header(pending_event(severity=Severity.CRITICAL)).startswith(":rotating_light: FIRING")
    assert header(pending_event()).startswith(":warning: FIRING")
    assert header(notice_event()).startswith(":information_source: NOTICE")
    assert header(pending_event(kind=EventKind.REMINDER)).startswith(":bell: REMINDER")
    assert header(resolved_failed_event()).startswith(":white_check_mark: RESOLVED")


def test_slack_blocks_has_billing_button() -> None:
    actions = slack_blocks([pending_event()])[-1]
    button = actions["elements"][0]
    assert button["text"]["text"] == "Open billing in Atlas"
    assert button["url"] == billing_url("https://cloud.mongodb.com", PROD)


def test_slack_blocks_more_events_than_a_message_holds_stay_within_limits() -> None:
    """The outbox never groups more than MESSAGE_MAX_EVENTS (it splits into parts); a
    renderer given more all the same still fits, and says how many it left out."""
    events = [pending_event(key=str(i), rule="r" * 100) for i in range(2000)]
    blocks = slack_blocks(events)
    assert slack_problem({"text": plain.text(events), "blocks": blocks}) is None
    assert "…and 1960 more" in blocks[-2]["text"]["text"]


def test_slack_blocks_long_names_are_clipped() -> None:
    event = pending_event(rule="x" * 500, summary="y" * 5000)
    blocks = slack_blocks([event])
    assert len(blocks[0]["text"]["text"]) <= 150 and blocks[0]["text"]["text"].endswith("…")
    assert blocks[1]["text"]["text"] == "y" * 999 + "…"


def test_slack_limits_count_emoji_as_slack_does() -> None:
    """Issue 13 §10: Slack may count UTF-16 code units (an emoji counts twice): 200-emoji
    names made blocks Slack refuses (msg_blocks_too_long, a header over 150), so every
    message fell back to plain text. Every limit is kept in code units."""
    name = "🚀" * 200
    one = pending_event(rule=name, org_name=name, summary="💸" * 3000, invoice_id=name)
    many = [replace(one, key=str(i), rule=f"{i}{name}") for i in range(MESSAGE_MAX_EVENTS)]
    for events in ([one], many):
        body = {"text": slack_text(events), "blocks": slack_blocks(events)}
        assert slack_problem(body) is None
    assert facts.units("🚀a") == 3 and facts.units("") == 0


def test_slack_text_escapes_what_a_server_says() -> None:
    """Issue 12 §16: the blocks were escaped, the top-level ``text`` (what Slack shows
    when it refuses the blocks, and in notifications) was not: an Atlas error carrying
    ``<!channel>`` or a link with a fake label went out as it came."""
    hostile = "<!channel> log in at <https://evil.example/login|cloud.mongodb.com> & <@U1>"
    event = pending_event(summary=hostile, org_name=hostile, details=(("Error", hostile),))
    for events in ([event], [event, event]):
        for text in (slack_text(events), slack_brief_text(events)):
            assert "<!channel>" not in text and "<https://evil" not in text
            assert "<@U1>" not in text and "<" not in text.replace("&lt;", "")
        assert "&lt;!channel&gt;" in slack_text(events)
    assert "<!channel>" in plain.text([event])  # plain text elsewhere (email, console)


def test_text_shows_control_characters_visibly() -> None:
    """Issue 12 §15, in messages: an Atlas detail with ``ESC [2J`` (clears a terminal),
    an OSC title, a right-to-left override, a NUL or a lone surrogate is shown as
    escapes, on the console as in Slack and email, and every form encodes as UTF-8."""
    hostile = "boom\x1b[2J\x1b]0;pwned\x07\u202eevil\x00\ud800"
    event = pending_event(summary=hostile, org_name=hostile, details=(("Error", hostile),))
    for events in ([event], [event, event]):
        outputs = [
            plain.text(events),
            slack_text(events),
            json.dumps(slack_blocks(events), ensure_ascii=False),
            email_html(events),
            email_subject(events),
        ]
        for out in outputs:
            assert not any(c in out for c in "\x1b\x07\u202e\x00\ud800")
            out.encode("utf-8")
    assert "boom\\x1b[2J\\x1b]0;pwned\\x07\\u202eevil\\x00\\ud800" in plain.text([event])


# -- every message fits its channel, whatever the values --------------------------------

# Values of every length, with the characters that escaping makes longer, and those
# Slack may count twice (UTF-16: an emoji beyond the Basic Multilingual Plane).
_LONG = st.one_of(
    st.text(max_size=40),
    st.builds(
        lambda chunk, n: chunk * n,
        st.sampled_from(
            ["x", "&", "<>", "é", " a", "*_`", "|", "\r\n", "😀", "\x1b[2J", "\u202e", "\ud800"]
        ),
        st.integers(0, 5000),
    ),
)


@st.composite
def any_event(draw: st.DrawFn) -> AlertEvent:
    event = pending_event(
        kind=draw(st.sampled_from(list(EventKind))),
        rule=draw(_LONG),
        rule_type=draw(_LONG),
        org_name=draw(_LONG),
        org_id=draw(_LONG),
        summary=draw(_LONG),
        invoice_id=draw(st.none() | _LONG),
        invoice_status=draw(st.none() | _LONG),
        previous_status=draw(st.none() | _LONG),
        amount_cents=draw(st.none() | st.integers(-(10**15), 10**15)),
        billing_url="https://cloud.mongodb.com/" + draw(_LONG),
        details=tuple(draw(st.lists(st.tuples(_LONG, _LONG), max_size=15))),
        breakdown=tuple(
            BreakdownLine(dim, name, cents, growth)
            for dim, name, cents, growth in draw(
                st.lists(
                    st.tuples(
                        st.sampled_from(["project", "sku", "cluster"]),
                        _LONG,
                        st.integers(0, 10**12),
                        st.none() | st.integers(-(10**12), 10**12),
                    ),
                    max_size=30,
                )
            )
        ),
    )
    return event


@st.composite
def any_message(draw: st.DrawFn) -> tuple[list[AlertEvent], Part | None]:
    events = draw(st.lists(any_event(), min_size=1, max_size=MESSAGE_MAX_EVENTS))
    part = None
    if len(events) > 1 and draw(st.booleans()):
        count = draw(st.integers(2, 1000))
        part = Part(draw(st.integers(1, count)), count)
    return events, part


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(any_message())
def test_render_fits_slack_limits_whatever_the_values(
    message: tuple[list[AlertEvent], Part | None],
) -> None:
    """Up to MESSAGE_MAX_EVENTS events with values of any length (Slack's limits as the
    fake Slack enforces them), and each fallback form the notifier may send."""
    events, part = message
    blocks = slack_blocks(events, part)
    text = slack_text(events, part)
    assert slack_problem({"text": text, "blocks": blocks}) is None
    assert block_text(blocks) <= BLOCK_TEXT_MAX
    assert units(text) <= TEXT_MAX
    assert slack_problem({"text": slack_brief_text(events, part)}) is None
    if part is not None:
        assert str(part) in blocks[0]["text"]["text"] or len(blocks[0]["text"]["text"]) == 150
        assert str(part) in text.splitlines()[0]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(any_message())
def test_render_fits_email_limits_whatever_the_values(
    message: tuple[list[AlertEvent], Part | None],
) -> None:
    """RFC 5322: no line of the message as aiosmtplib puts it on the wire is longer than
    998 characters (headers are folded at 78); the subject is at most SUBJECT_MAX."""
    events, part = message
    mailer = EmailNotifier(
        "mail", host="127.0.0.1", port=25, from_addr="a@example.com", to=["b@example.com"]
    )
    message_ = mailer.build_message(events, part)
    assert len(email_subject(events, part)) <= SUBJECT_MAX
    wire = flatten_message(message_, cte_type="8bit")
    assert max(len(line) for line in wire.split(b"\r\n")) <= 998
    for name in ("Subject", "From", "To", "Date", "Message-ID"):
        assert name in message_


async def test_console_notifier_separates_messages(capsys: pytest.CaptureFixture[str]) -> None:
    stream = io.StringIO()
    notifier = ConsoleNotifier("console", stream)
    await notifier.send([pending_event()])
    await notifier.send(grouped_events())
    await notifier.send([])
    rule = "─" * 72 + "\n"
    assert stream.getvalue() == (
        rule + plain.text([pending_event()]) + rule + plain.text(grouped_events())
    )
    await ConsoleNotifier("stdout").send([notice_event()])
    assert capsys.readouterr().out == rule + plain.text([notice_event()])
