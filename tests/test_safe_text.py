"""Text from a server or a receiver made fit to log, store and show
(invoice_watch/safe_text.py, on invoice_watch/redact.py's rules)."""

from __future__ import annotations

import sqlite3

from hypothesis import given
from hypothesis import strategies as st

from invoice_watch import redact
from invoice_watch.safe_text import one_line, server_text, storable, traceback_text


def test_one_line_escapes_controls_and_collapses_whitespace() -> None:
    assert one_line(" a\tb\n\nc\x1b[2J \u202e d\ud800 ") == "a b c\\x1b[2J \\u202e d\\ud800"


def test_server_text_redacts_escapes_collapses_and_bounds() -> None:
    redact.register("s3cret-value-1234")
    said = server_text("  token s3cret-value-1234\n\x1b[2J Bearer abc.def  " + "x" * 500, 60)
    assert said.startswith("token <secret> \\x1b[2J Bearer <secret> xxx")
    assert len(said) == 60 and said.endswith("…")
    assert server_text("echo hunter22-long", secrets=["hunter22-long"]) == "echo <secret>"


def test_traceback_text_redacts_clips_long_lines_and_bounds() -> None:
    """The one traceback formatter of the log (the cycle, the Atlas client, delivery)."""
    redact.register("s3cret-value-5678")

    def fail() -> None:
        raise KeyError("s3cret-value-5678 \x1b[2J" + "y" * 5000)

    try:
        fail()
    except KeyError as exc:
        text = traceback_text(exc)
        short = traceback_text(exc, limit=400)
    assert text.startswith("Traceback") and "in fail" in text
    assert "s3cret-value-5678" not in text and "<secret>" in text and "\x1b" not in text
    assert "y" * 2001 not in text and "…" in text and not text.endswith("\n")
    assert len(short) <= 405 and "[…]" in short


@given(st.text(alphabet=st.characters(codec=None, blacklist_categories=())))
def test_storable_always_encodes_and_sqlite_stores_it(text: str) -> None:
    kept = storable(text, 1000)
    assert len(kept) <= 1000
    with sqlite3.connect(":memory:") as conn:
        conn.execute("CREATE TABLE t (v TEXT)")
        conn.execute("INSERT INTO t VALUES (?)", (kept,))
        assert conn.execute("SELECT v FROM t").fetchone() == (kept,)
