"""Message rendering: turns alert events into plain text, Slack Block Kit, an email
subject and an HTML body, the generic webhook's JSON body, a Teams card, a PagerDuty
event and an Alertmanager alert. Pure functions, no I/O; every notifier renders through
here so a message says the same facts everywhere.

One module a job: :mod:`.facts` (what every rendering shows of an event, each value
within its bound), :mod:`.plain` (plain text: the console, email's plain part, the
fallback of the others), and one module per receiver family: :mod:`.slack`,
:mod:`.email`, :mod:`.webhook`, :mod:`.teams`, :mod:`.pagerduty`, :mod:`.alertmanager`.

One event is one message. Several events are one grouped message (flood control): a
title with the counts per kind and one compact line per event. A group larger than
:data:`~invoice_watch.constants.MESSAGE_MAX_EVENTS` is split into parts by the outbox
(``store.message_parts``), each its own message saying "part i of n".

Every message fits its channel's limits by construction: each value an event carries
(names, summary, details, breakdown, link) is clipped to a bound of its own
(:mod:`.facts`), so one event renders within every limit, and so do up to
``MESSAGE_MAX_EVENTS`` of them as one grouped message
(``tests/test_notify_render.py::test_render_fits_*`` proves it for any values). Slack's
limits are :data:`.slack.SLACK_LIMITS`, kept in UTF-16 code units; email headers are
folded by the ``email`` package (RFC 5322 lines of at most 78 characters, bodies
quoted-printable when a line is longer); the subject is clipped to
:data:`.email.SUBJECT_MAX`. The JSON bodies hold the same bounded, printable values
(names at most 200 characters, the summary 1,000, ten details of 300, ten breakdown
lines per dimension), so every body is bounded too.

Every value an event carries may come from a server (an Atlas error's detail, a name in
a listing): it is shown with its control characters written visibly
(:func:`~invoice_watch.redact.printable`), HTML-escaped in email and mrkdwn-escaped
in Slack, blocks and top-level ``text`` alike (:func:`.slack.slack_text`), so that it
can neither drive a terminal nor mention (``<!channel>``) or link in Slack; a Teams card
puts it in TextRuns, which render no Markdown.
"""
