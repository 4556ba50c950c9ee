"""A configuration reload (SIGHUP): every setting is applied or the reload is refused
naming it (issue 14 §2)."""

from __future__ import annotations

from invoice_watch.reload import APPLY, Apply, changes, keys
from tests.world import World


def test_every_config_key_says_how_a_reload_applies_it():
    """Walks the pydantic models: a key added to config.py without a line in
    invoice_watch/reload.py's APPLY (or a line left for a key that is gone) fails."""
    model_keys = set(keys())
    assert not model_keys - APPLY.keys(), (
        "classify these keys in invoice_watch/reload.py APPLY (how a reload applies them, "
        f"or Apply.RESTART): {sorted(model_keys - APPLY.keys())}"
    )
    assert not APPLY.keys() - model_keys, f"not config keys: {sorted(APPLY.keys() - model_keys)}"


def test_keys_are_written_as_in_the_file_through_every_union_member():
    model_keys = keys()
    for key in (
        "atlas.auth.public_key",  # digest
        "atlas.auth.client_secret",  # service account
        "notifiers.*.webhook_url",  # slack
        "notifiers.*.from",  # email, by its YAML name
        "rules.*.threshold",  # pending_amount, by its YAML name
        "rules.*.after",  # poll_failure
        "organizations.*.id",
        "http.listen",
    ):
        assert key in model_keys


def test_changes_name_each_changed_setting_and_how_it_applies(world: World):
    old = world.config()
    data = world.config_data(http={"listen": "127.0.0.1:9464"}, poll={"interval": "1h"})
    data["notifiers"]["mail"]["to"] = ["someone@example.com"]
    data["rules"][1]["threshold"] = 6000
    data["state"] = {"path": str(world.tmp / "other.db")}
    from tests.conftest import make_config

    new = make_config(world.tmp, data)
    assert changes(old, old) == {}
    assert changes(old, new) == {
        "http.listen": Apply.HTTP,
        "http.max_connections": Apply.HTTP,  # the section appeared: its defaults too
        "http.idle_timeout": Apply.HTTP,
        "notifiers.mail.to": Apply.NOTIFIERS,
        "poll.interval": Apply.SCHEDULE,
        "rules.1.threshold": Apply.RULES,
        "state.path": Apply.RESTART,
    }
