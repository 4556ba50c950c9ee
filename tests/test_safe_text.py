"""Text from outside made safe to show, log and store (invoice_watch/safe_text.py)."""

from __future__ import annotations

import sqlite3

import pytest
from hypothesis import given
from hypothesis import strategies as st

from invoice_watch import redact
from invoice_watch.safe_text import printable, server_text, storable


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("plain text, é, 😀, 日本", "plain text, é, 😀, 日本"),
        ("clear\x1b[2Jtitle\x1b]0;pwned\x07", "clear\\x1b[2Jtitle\\x1b]0;pwned\\x07"),
        ("nul\x00del\x7fc1\x85", "nul\\x00del\\x7fc1\\x85"),
        ("rlo\u202eevil\u2066iso\u2069", "rlo\\u202eevil\\u2066iso\\u2069"),
        ("lone\ud800 and \udcff", "lone\\ud800 and \\udcff"),
        ("tab\tlf\ncr\r", "tab\tlf\ncr\r"),
    ],
)
def test_printable_escapes_what_a_terminal_or_sqlite_cannot_take(text: str, shown: str) -> None:
    assert printable(text) == shown
    shown.encode("utf-8")


def test_printable_one_line_turns_line_breaks_into_spaces() -> None:
    assert printable("a\tb\nc\rd", one_line=True) == "a b c d"


def test_server_text_redacts_escapes_collapses_and_bounds() -> None:
    redact.register("s3cret-value-1234")
    said = server_text("  token s3cret-value-1234\n\x1b[2J Bearer abc.def  " + "x" * 500, 60)
    assert said.startswith("token <secret> \\x1b[2J Bearer <secret> xxx")
    assert len(said) == 60 and said.endswith("…")
    assert server_text("echo hunter22-long", secrets=["hunter22-long"]) == "echo <secret>"


@given(st.text(alphabet=st.characters(codec=None, blacklist_categories=())))
def test_storable_always_encodes_and_sqlite_stores_it(text: str) -> None:
    kept = storable(text, 1000)
    assert len(kept) <= 1000
    with sqlite3.connect(":memory:") as conn:
        conn.execute("CREATE TABLE t (v TEXT)")
        conn.execute("INSERT INTO t VALUES (?)", (kept,))
        assert conn.execute("SELECT v FROM t").fetchone() == (kept,)
