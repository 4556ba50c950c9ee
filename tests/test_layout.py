"""The package stays a house a newcomer can change (issue 15 "Done when"): no module
over 500 lines, no class over 250 (the simulator, a test fixture of its own, aside). One
that grows is split along a seam: the outbox (its queries, its writes), the deliverer
(one module a job), the App (what a reload applies: reconfigure.py)."""

from __future__ import annotations

import ast
from pathlib import Path

import invoice_watch

MODULE_LINES = 500
CLASS_LINES = 250


def test_modules_and_their_classes_stay_small():
    root = Path(invoice_watch.__file__).parent
    large = []
    for path in sorted(root.rglob("*.py")):
        where = path.relative_to(root)
        if where.parts[0] == "simulator":
            continue
        text = path.read_text(encoding="utf-8")
        if text.count("\n") > MODULE_LINES:
            large.append(f"{where}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef) and node.end_lineno is not None:
                lines = node.end_lineno - node.lineno + 1
                if lines > CLASS_LINES:
                    large.append(f"{where}: class {node.name}, {lines} lines")
    assert large == []
