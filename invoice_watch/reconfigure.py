"""A configuration reload, applied to the running daemon: what each changed setting's
kind (:class:`~invoice_watch.reload.Apply`, per key in
:data:`~invoice_watch.reload.APPLY`) does to the parts that run.

:class:`Reconfigure` takes a new :class:`~invoice_watch.config.Config` between two
cycles (under the cycle lock) and applies it to a :class:`Running` daemon (the App,
whose :meth:`~invoice_watch.app.App.reload` is this): the HTTP endpoint moved, a new
Atlas client or notifiers (the old ones closed), the deliverer's limits
(:func:`delivery_limits`, also what the App starts the deliverer with), what the state
keeps settled, the poll schedule, logging; or it refuses the whole reload (a key that
takes a restart, an address it cannot listen on), naming why, and changes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Protocol, TypedDict

from invoice_watch.config import Config, LogConfig
from invoice_watch.errors import ListenError
from invoice_watch.reload import Apply, changes
from invoice_watch.rules import settled_statuses

if TYPE_CHECKING:
    from invoice_watch.atlas.client import AtlasClient
    from invoice_watch.daemon import Daemon
    from invoice_watch.deliver.deliverer import Deliverer
    from invoice_watch.http_endpoint import HttpEndpoint
    from invoice_watch.quiet import QuietWindow
    from invoice_watch.report.scheduler import Reporter
    from invoice_watch.runner import CycleRunner
    from invoice_watch.store import Store
    from invoice_watch.types import Notifier

log = logging.getLogger(__name__)


class DeliveryLimits(TypedDict):
    """The deliverer's settings from the configuration (``delivery.*`` and the
    notifiers' quiet hours), as :class:`~invoice_watch.deliver.deliverer.Deliverer` and
    its ``configure`` take them (keyword arguments)."""

    max_age: timedelta
    max_backoff: timedelta
    retention: timedelta
    quiet: Mapping[str, QuietWindow]


def delivery_limits(config: Config) -> DeliveryLimits:
    """The deliverer's settings in ``config`` (at start, and on each reload that
    changes them: :attr:`Apply.DELIVERY`, :attr:`Apply.NOTIFIERS`)."""
    return DeliveryLimits(
        max_age=config.delivery.max_age,
        max_backoff=config.delivery.max_backoff,
        retention=config.delivery.retention,
        quiet=config.quiet_windows(),
    )


class Running(Protocol):
    """The running daemon's parts a reload changes (the App is one, once open)."""

    config: Config
    notifiers: Mapping[str, Notifier]
    reporter: Reporter | None
    cycles: CycleRunner
    daemon: Daemon

    @property
    def deliverer(self) -> Deliverer: ...

    @property
    def store(self) -> Store: ...

    def replace_client(self, config: Config) -> AtlasClient | None:
        """Use a new Atlas client for ``config`` (closed when the daemon is); returns
        the one it replaces (None before start), for the caller to close."""
        ...

    def new_notifiers(self, config: Config) -> Mapping[str, Notifier]:
        """The notifiers for ``config`` (closed when the daemon is)."""
        ...


class Reconfigure:
    """Applies a new configuration to the ``running`` daemon, between two cycles (under
    its cycle lock), each changed setting as :data:`~invoice_watch.reload.APPLY` says.
    ``configure_logging`` takes a new ``log`` section (None: logging is left alone, as
    an embedded App does)."""

    def __init__(
        self, running: Running, configure_logging: Callable[[LogConfig], None] | None = None
    ) -> None:
        self._running = running
        self._configure_logging = configure_logging

    async def apply(self, config: Config) -> bool:
        """Take ``config``. When a changed setting needs a restart (``state.path``), or
        the new ``http.listen`` cannot be used, nothing changes and the reload is
        refused, naming the setting (logged). Returns whether the configuration was
        taken; logs the keys the files changed, and the new configuration's warnings.
        Raises ValueError for a configuration loaded without its secrets."""
        if not config.secrets_read:
            raise ValueError("a configuration loaded without its secrets cannot run")
        running = self._running
        changed = changes(running.config, config)
        restart = [key for key, how in changed.items() if how is Apply.RESTART]
        if restart:
            log.error(
                "config reload refused: %s changed, which takes a restart; keeping the "
                "running configuration",
                ", ".join(restart),
            )
            return False
        old_config = running.config
        async with running.cycles.lock:
            if not await self._apply(config, set(changed.values())):
                return False
        log.info(
            "configuration reloaded: %d organization(s), %d rule(s), %d notifier(s)%s",
            len(config.organizations),
            len(config.rules),
            len(config.notifiers),
            _changed_text(list(changes(old_config, config, given=True))),
        )
        for warning in config.warnings:
            log.warning("%s", warning)
        return True

    async def _apply(self, config: Config, kinds: set[Apply]) -> bool:
        """The changes of one reload, under the cycle lock; False: refused, nothing
        changed (the new ``http.listen`` cannot be used)."""
        running, daemon = self._running, self._running.daemon
        moved: tuple[HttpEndpoint | None, int | None] | None = None
        if Apply.HTTP in kinds and daemon.serving:
            try:
                moved = await daemon.endpoint.move(config.http, running.config.http)
            except ListenError as exc:
                log.error("config reload refused: %s; keeping the running configuration", exc)
                return False
        old_client, old_notifiers = None, running.notifiers
        if Apply.ATLAS in kinds:
            await running.cycles.cancel_line_items()  # it reads on the old client
            old_client = running.replace_client(config)
        if Apply.NOTIFIERS in kinds:
            running.notifiers = running.new_notifiers(config)
        if kinds & {Apply.NOTIFIERS, Apply.DELIVERY}:
            running.deliverer.configure(running.notifiers, **delivery_limits(config))
        running.config = running.cycles.config = config
        if running.reporter is not None:  # its schedules are looked at again now
            running.reporter.reconfigured.set()
        if Apply.RULES in kinds:  # what the rules watch may have changed
            await running.store.snapshot.settle(settled_statuses(config.rules))
        if Apply.SCHEDULE in kinds:
            daemon.poll.configure(config.poll.interval, config.poll.jitter)
        if Apply.LOGGING in kinds and self._configure_logging is not None:
            self._configure_logging(config.log)
        if running.notifiers is not old_notifiers:
            for notifier in old_notifiers.values():
                await notifier.aclose()
        if old_client is not None:
            await old_client.aclose()
        if moved is not None:
            await daemon.endpoint.swap(moved)
        return True


def _changed_text(keys: list[str], most: int = 10) -> str:
    """``; changed: a, b`` for the reload's log line, at most ``most`` keys named."""
    if not keys:
        return "; nothing changed"
    more = f" and {len(keys) - most} more" if len(keys) > most else ""
    return f"; changed: {', '.join(keys[:most])}{more}"
