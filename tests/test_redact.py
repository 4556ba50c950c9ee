"""invoice_watch.redact: credentials and configured secrets never survive in text taken
from a server."""

from __future__ import annotations

import pytest

from invoice_watch.config import Secret
from invoice_watch.redact import redact


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
