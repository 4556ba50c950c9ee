"""What ``run --once`` imports (issue 16, the import baseline): a start pays only for
the modules its config uses. Each notifier's module (and its libraries: slack_sdk for
Slack and Teams, aiosmtplib for email) is imported when a notifier of its type is
configured; the usage anomaly detector when a ``usage_anomaly`` rule is. A fresh
interpreter runs the command against the simulator and says what it imported."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.world import World

# Runs the command line as `python -m invoice_watch` does, then writes sys.modules.
SCRIPT = """
import gc, json, sys
report = sys.argv.pop(1)
from invoice_watch.__main__ import main
status = main()
with open(report, "w") as out:
    json.dump({"status": status, "modules": sorted(sys.modules),
               "gc": [gc.isenabled(), gc.get_freeze_count()]}, out)
"""

# Modules a config with the console notifier only and invoice rules has no use for.
NOT_NEEDED = (
    "invoice_watch.anomaly",
    "invoice_watch.notify.alertmanager",
    "invoice_watch.notify.email",
    "invoice_watch.notify.msteams",
    "invoice_watch.notify.pagerduty",
    "invoice_watch.notify.slack",
    "invoice_watch.notify.webhook",
    "invoice_watch.notify.render.slack",
    "invoice_watch.notify.render.teams",
    "slack_sdk",
    "aiosmtplib",
)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


async def run_once_modules(world: World, notifiers: dict[str, Any]) -> set[str]:
    """The modules a fresh ``invoice-watch run --once`` imported with these notifiers
    (every rule notifying all of them). Its cyclic garbage collector, off while it
    started, ran again after, what the start made frozen (``cli.commands.started``)."""
    data = world.config_data()
    data["notifiers"] = notifiers
    for rule in data["rules"]:
        rule["notify"] = list(notifiers)
    path = world.tmp / "imports.yaml"
    path.write_text(yaml.safe_dump(data))
    report = world.tmp / "modules.json"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        SCRIPT,
        str(report),
        "run",
        "--once",
        "-c",
        str(path),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=os.environ.copy(),
    )
    async with asyncio.timeout(90):
        _, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    result = read_json(report)
    assert result["status"] == 0, err.decode()
    enabled, frozen = result["gc"]
    assert enabled
    assert frozen > 10_000  # the start's objects (about 50,000)
    return set(result["modules"])


async def test_run_once_with_the_console_notifier_imports_no_other_receiver(
    world: World,
) -> None:
    modules = await run_once_modules(world, {"out": {"type": "console"}})
    assert "invoice_watch.notify.console" in modules  # the one configured
    imported = sorted(
        name for name in NOT_NEEDED if any(m == name or m.startswith(name + ".") for m in modules)
    )
    assert imported == []


async def test_run_once_imports_the_receivers_configured(world: World) -> None:
    """The other side: a configured notifier's module is there (built and sent through)."""
    notifiers = {
        "slack": {"type": "slack", "webhook_url": world.slack.webhook_url},
        "mail": {
            "type": "email",
            "host": "127.0.0.1",
            "port": world.smtp_port,
            "tls": "none",
            "from": "invoice-watch@example.com",
            "to": ["finops@example.com"],
        },
    }
    modules = await run_once_modules(world, notifiers)
    assert {"invoice_watch.notify.slack", "invoice_watch.notify.email"} <= modules
    assert "invoice_watch.notify.msteams" not in modules
    assert "invoice_watch.notify.console" not in modules


def test_a_command_other_than_run_collects_garbage_from_its_start(world: World) -> None:
    """``python -m invoice_watch`` starts with the cyclic garbage collector off (see
    ``cli.commands.started``); every command but ``run``, which turns it on once its App
    is open, turns it on at once: ``simulate`` and ``demo`` run for hours."""
    from invoice_watch import cli

    path = world.write_config()
    gc.disable()
    try:
        assert cli.main(["check-config", "-c", str(path)]) == 0
        assert gc.isenabled()
    finally:
        gc.enable()
