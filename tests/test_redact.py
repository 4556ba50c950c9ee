"""invoice_watch.redact: credentials and configured secrets (their base64 forms too)
never survive in text taken from a server, and nothing in it acts on a terminal."""

from __future__ import annotations

import base64

import pytest

from invoice_watch.config import Secret
from invoice_watch.redact import forget, printable, redact, register


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Authorization: Bearer eyJhbGciOi.abc-def_123=", "Authorization: Bearer <secret>"),
        ("sent basic dXNlcjpwYXNz== here", "sent basic <secret> here"),
        (
            'got Digest username="pk", realm="MMS Public API", nonce="n1", '
            'uri="/api", response="9f86d0", qop=auth, nc=00000001, cnonce="c" end',
            "got Digest <secret> end",
        ),
        ("no credentials here", "no credentials here"),
    ],
)
def test_redact_removes_http_credentials(text, expected):
    assert redact(text) == expected


def test_redact_removes_every_configured_secret():
    Secret("s3cr3t-value-registered")
    assert redact("detail: s3cr3t-value-registered!") == "detail: <secret>!"
    assert redact("echo other-one", ["other-one"]) == "echo <secret>"


SMTP_PASSWORD = "smtpPASSWORDvalue1"


@pytest.mark.parametrize(
    "echo",
    [
        # AUTH LOGIN: the password alone (attack 12, A12-4).
        base64.b64encode(SMTP_PASSWORD.encode()).decode(),
        # HTTP Basic, without its `Basic ` prefix.
        base64.b64encode(f"mailer@example.com:{SMTP_PASSWORD}".encode()).decode(),
        # SASL PLAIN: \0user\0password.
        base64.b64encode(f"\0mailer@example.com\0{SMTP_PASSWORD}".encode()).decode(),
        # Every alignment, padded or not, in the URL-safe alphabet too.
        *(
            base64.urlsafe_b64encode(b"x" * n + SMTP_PASSWORD.encode() + b"?>").decode()
            for n in range(3)
        ),
    ],
)
def test_redact_removes_the_base64_forms_of_a_registered_secret(echo: str):
    Secret(SMTP_PASSWORD)
    text = redact(f"535 5.7.8 credentials {echo} rejected")
    assert text == "535 5.7.8 credentials <secret> rejected"


def test_redact_leaves_base64_without_a_secret_alone():
    Secret(SMTP_PASSWORD)
    other = base64.b64encode(b"mailer@example.com:another-password").decode()
    assert redact(f"got {other}") == f"got {other}"


def test_forget_stops_redacting_a_replaced_credential():
    register("oauth-token-0123456789")
    assert redact("echo oauth-token-0123456789") == "echo <secret>"
    forget("oauth-token-0123456789")
    assert redact("echo oauth-token-0123456789") == "echo oauth-token-0123456789"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("clear \x1b[2J title \x1b]0;pwned\x07 end", "clear \\x1b[2J title \\x1b]0;pwned\\x07 end"),
        ("nul \x00 del \x7f csi \x9b", "nul \\x00 del \\x7f csi \\x9b"),
        ("rtl \u202eevil\u202c \u2066x\u2069", "rtl \\u202eevil\\u202c \\u2066x\\u2069"),
        ("lone \ud800 surrogate", "lone \\ud800 surrogate"),
        ("cr \r over", "cr \\x0d over"),
        ("lines\nand\ttabs stay, and é, 日本, 🙂", "lines\nand\ttabs stay, and é, 日本, 🙂"),
    ],
)
def test_redact_escapes_what_a_terminal_would_act_on(text: str, expected: str):
    """A server's text (an Atlas error detail, a receiver's error body) goes to logs,
    the state file and `status`: no control character, bidi override or lone
    surrogate survives (attack 12, A12-1 and A12-15)."""
    assert redact(text) == expected
    assert printable(text) == expected
    redact(text).encode("utf-8")  # storable: no lone surrogate left
