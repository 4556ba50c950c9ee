"""What a configuration reload (SIGHUP) does with each setting.

:data:`APPLY` maps every key of the config model (as written in the file, ``*`` for a
list item or a mapping's name) to how a running daemon takes a new value of it;
:func:`changes` compares two configurations key by key through that table, and
:class:`~invoice_watch.reconfigure.Reconfigure` (behind
:meth:`App.reload <invoice_watch.app.App.reload>`) does what the changed keys need, or
refuses the whole reload, naming the keys, when one of them needs a restart;
:class:`Reloads` reads the file again on each request (SIGHUP), off the event loop and
one at a time, and hands the new configuration to it. A setting
is never silently ignored (issue 14 §2): ``tests/test_reload.py`` walks the pydantic
models and fails on any key missing from the table, so a new key is classified by one
line here (``"poll.full_listing_every": Apply.CYCLE,``).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from types import NoneType, UnionType
from typing import Annotated, Any, TypeVar, Union, get_args, get_origin

from pydantic import BaseModel

from invoice_watch.clock import Clock
from invoice_watch.config import Config
from invoice_watch.config.quantities import config_duration
from invoice_watch.errors import ConfigError

log = logging.getLogger(__name__)

_T = TypeVar("_T")

# A reload's read of the configuration file (and its secret files) that takes longer is
# abandoned, logged, and the running configuration kept (a file on a hung network file
# system): one stuck read never blocks the reloads after it. Past this many abandoned
# reads still stuck, reloads are refused until a restart (each holds a thread).
RELOAD_SECONDS = 30.0
MAX_STUCK_RELOADS = 4


class Apply(enum.Enum):
    """How a reload applies a changed setting. The new configuration always replaces
    the old one, between two cycles; each kind says what else is done."""

    CYCLE = "read by every cycle"
    ATLAS = "a new Atlas client"
    NOTIFIERS = "new notifiers"
    DELIVERY = "the delivery limits"
    RULES = "the rules (and what the state keeps settled)"
    SCHEDULE = "the poll schedule, from the last cycle's start"
    HTTP = "the HTTP endpoint, listening anew"
    LOGGING = "the log level and format"
    RESTART = "only at start: the reload is refused"


APPLY: dict[str, Apply] = {
    # atlas.*: the client is built from the whole section (and the organizations' names)
    "atlas.base_url": Apply.ATLAS,
    "atlas.ui_url": Apply.CYCLE,  # links in messages, built by each cycle
    "atlas.api": Apply.ATLAS,
    "atlas.auth.public_key": Apply.ATLAS,
    "atlas.auth.private_key": Apply.ATLAS,
    "atlas.auth.client_id": Apply.ATLAS,
    "atlas.auth.client_secret": Apply.ATLAS,
    "atlas.timeout": Apply.ATLAS,
    "atlas.max_concurrency": Apply.ATLAS,
    "atlas.retries": Apply.ATLAS,
    "atlas.max_backoff": Apply.ATLAS,
    "atlas.max_response_size": Apply.ATLAS,
    "atlas.proxy": Apply.ATLAS,
    "organizations.*.id": Apply.ATLAS,
    "organizations.*.name": Apply.ATLAS,  # the client names organizations in its errors
    "poll.interval": Apply.SCHEDULE,
    "poll.jitter": Apply.SCHEDULE,
    "poll.full_listing_every": Apply.CYCLE,  # FullListings takes it at each cycle
    "state.path": Apply.RESTART,  # the open, locked state file cannot move
    "state.url": Apply.RESTART,  # nor the database (nor its lease) change under it
    "state.password": Apply.RESTART,
    "ha.lease_ttl": Apply.RESTART,
    "delivery.max_age": Apply.DELIVERY,
    "delivery.max_backoff": Apply.DELIVERY,
    "delivery.retention": Apply.DELIVERY,
    "delivery.group_over": Apply.CYCLE,
    # notifiers.*: every notifier is built anew from its section
    "notifiers.*.type": Apply.NOTIFIERS,
    "notifiers.*.webhook_url": Apply.NOTIFIERS,
    "notifiers.*.token": Apply.NOTIFIERS,
    "notifiers.*.channel": Apply.NOTIFIERS,
    "notifiers.*.api_url": Apply.NOTIFIERS,
    "notifiers.*.proxy": Apply.NOTIFIERS,
    "notifiers.*.host": Apply.NOTIFIERS,
    "notifiers.*.port": Apply.NOTIFIERS,
    "notifiers.*.tls": Apply.NOTIFIERS,
    "notifiers.*.ca_file": Apply.NOTIFIERS,
    "notifiers.*.username": Apply.NOTIFIERS,
    "notifiers.*.password": Apply.NOTIFIERS,
    "notifiers.*.from": Apply.NOTIFIERS,
    "notifiers.*.to": Apply.NOTIFIERS,
    "notifiers.*.timeout": Apply.NOTIFIERS,
    "notifiers.*.url": Apply.NOTIFIERS,
    "notifiers.*.secret": Apply.NOTIFIERS,
    "notifiers.*.headers": Apply.NOTIFIERS,
    "notifiers.*.routing_key": Apply.NOTIFIERS,
    "notifiers.*.notices": Apply.NOTIFIERS,
    "notifiers.*.resend_every": Apply.NOTIFIERS,
    "notifiers.*.quiet_hours.timezone": Apply.DELIVERY,
    "notifiers.*.quiet_hours.from": Apply.DELIVERY,
    "notifiers.*.quiet_hours.to": Apply.DELIVERY,
    "notifiers.*.quiet_hours.days": Apply.DELIVERY,
    "notifiers.*.quiet_hours.except": Apply.DELIVERY,
    # rules.*: evaluated by every cycle; what is kept settled follows them
    "rules.*.name": Apply.RULES,
    "rules.*.type": Apply.RULES,
    "rules.*.notify": Apply.RULES,
    "rules.*.orgs": Apply.RULES,
    "rules.*.severity": Apply.RULES,
    "rules.*.repeat": Apply.RULES,
    "rules.*.send_resolved": Apply.RULES,
    "rules.*.enabled": Apply.RULES,
    "rules.*.statuses": Apply.RULES,
    "rules.*.threshold": Apply.RULES,
    "rules.*.from": Apply.RULES,
    "rules.*.to": Apply.RULES,
    "rules.*.percent": Apply.RULES,
    "rules.*.window": Apply.RULES,
    "rules.*.budget": Apply.RULES,
    "rules.*.min_elapsed": Apply.RULES,
    "rules.*.after": Apply.RULES,
    "rules.*.by": Apply.RULES,
    "rules.*.baseline": Apply.RULES,
    "rules.*.min_increase": Apply.RULES,
    "rules.*.sensitivity": Apply.RULES,
    # usage.refresh: read by the line items stage after each cycle (usage_watch.py);
    # reports.*: the reports' task looks at them again at once (report/scheduler.py)
    "usage.refresh": Apply.CYCLE,
    "reports.*.name": Apply.CYCLE,
    "reports.*.schedule": Apply.CYCLE,
    "reports.*.timezone": Apply.CYCLE,
    "reports.*.notify": Apply.CYCLE,
    "reports.*.orgs": Apply.CYCLE,
    "reports.*.combined": Apply.CYCLE,
    "reports.*.enabled": Apply.CYCLE,
    "http.listen": Apply.HTTP,
    "http.max_connections": Apply.HTTP,
    "http.idle_timeout": Apply.HTTP,
    "log.level": Apply.LOGGING,
    "log.format": Apply.LOGGING,
}


def keys(model: type[BaseModel] = Config) -> list[str]:
    """Every key of ``model``, dotted as in the file (``*`` for a list item or a
    mapping's name), through every member of a union (each notifier and rule type)."""
    return sorted(set(_keys(model, "")))


def _keys(tp: Any, prefix: str) -> Iterator[str]:
    tp = _unwrap(tp)
    origin = get_origin(tp)
    if origin in (Union, UnionType):
        for member in get_args(tp):
            if member is not NoneType:
                yield from _keys(member, prefix)
    elif origin is list and _is_model_like(get_args(tp)[0]):
        yield from _keys(get_args(tp)[0], f"{prefix}*.")
    elif origin is dict and _is_model_like(get_args(tp)[1]):
        yield from _keys(get_args(tp)[1], f"{prefix}*.")
    elif isinstance(tp, type) and issubclass(tp, BaseModel):
        for name, field in tp.model_fields.items():
            yield from _keys(field.annotation, f"{prefix}{field.alias or name}.")
    else:
        yield prefix.removesuffix(".")


def _unwrap(tp: Any) -> Any:
    while get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    return tp


def _is_model_like(tp: Any) -> bool:
    """A model, or a union with a model among its members (a list of those has keys)."""
    tp = _unwrap(tp)
    if get_origin(tp) in (Union, UnionType):
        return any(_is_model_like(m) for m in get_args(tp))
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def values(config: Config, key: str, *, given: bool = False) -> dict[str, object]:
    """The values of ``key`` (a pattern of :data:`APPLY`) in ``config``, by concrete
    path: ``values(c, "notifiers.*.to") == {"notifiers.mail.to": [...]}``. A section or
    a union member without the key has no value. ``given``: only the values the file
    sets (not the defaults)."""
    out: dict[str, object] = {}
    _values(config, key.split("."), (), out, given)
    return out


def _values(
    value: object, parts: list[str], path: tuple[str, ...], out: dict[str, object], given: bool
) -> None:
    if not parts:
        out[".".join(path)] = value
        return
    part, rest = parts[0], parts[1:]
    if part == "*":
        if isinstance(value, dict):
            items = [(str(k), v) for k, v in value.items()]
        elif isinstance(value, list | tuple):
            items = [(str(i), v) for i, v in enumerate(value)]
        else:
            return
        for name, item in items:
            _values(item, rest, (*path, name), out, given)
        return
    if not isinstance(value, BaseModel):  # an absent optional section
        return
    fields = type(value).model_fields
    field = next((n for n, f in fields.items() if part in (n, f.alias)), None)
    if field is None or (given and not rest and field not in value.model_fields_set):
        return
    _values(getattr(value, field), rest, (*path, part), out, given)


def changes(old: Config, new: Config, *, given: bool = False) -> dict[str, Apply]:
    """The keys whose values differ between ``old`` and ``new`` (concrete paths, e.g.
    ``notifiers.mail.to``), each with how a reload applies it. ``given``: only those
    that one of the two files sets (what a person changed: renaming a webhook notifier
    changes its ``token`` from unset to absent, which is no news)."""
    changed: dict[str, Apply] = {}
    for key, how in APPLY.items():
        before, after = values(old, key), values(new, key)
        if given:
            named = values(old, key, given=True).keys() | values(new, key, given=True).keys()
        for path in sorted(before.keys() | after.keys()):
            if before.get(path, _ABSENT) != after.get(path, _ABSENT) and (
                not given or path in named
            ):
                changed[path] = how
    return changed


_ABSENT = object()


class Reloads:
    """Reads the configuration file again on request and hands it to ``apply`` (the
    App's reload, :class:`~invoice_watch.reconfigure.Reconfigure`; it logs what it
    did). ``source``: the running configuration's file (None: not read from a file);
    ``load_config`` reads and validates one, timed on ``clock``."""

    def __init__(
        self,
        source: Callable[[], Path | None],
        load_config: Callable[[Path], Config],
        clock: Clock,
        apply: Callable[[Config], Awaitable[bool]],
    ) -> None:
        self._source = source
        self._load_config = load_config
        self._clock = clock
        self._apply = apply
        self._task: asyncio.Task[None] | None = None
        self._wanted = False
        self._parsing: set[threading.Thread] = set()  # reload reads, maybe stuck

    def request(self) -> asyncio.Task[None]:
        """Read the config file again and take it (SIGHUP). The file is parsed in a
        thread, off the event loop (a huge or hostile file cannot freeze the daemon);
        at most one reload runs at a time, and requests that arrive meanwhile make one
        more reload once it ends (the file as it is then), whatever their number; a
        read that takes :data:`RELOAD_SECONDS` is abandoned (logged). Returns the task
        that takes this request (done once it is taken or refused)."""
        self._wanted = True
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._reloads(), name="reload")
        return self._task

    async def cancel(self) -> None:
        """Stop the reload in progress, if any (a parse in its thread is abandoned)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _reloads(self) -> None:
        while self._wanted:
            self._wanted = False
            source = self._source()
            if source is None:
                log.error("config reload refused: the configuration was not read from a file")
                return
            self._parsing = {thread for thread in self._parsing if thread.is_alive()}
            if len(self._parsing) >= MAX_STUCK_RELOADS:
                log.error(
                    "config reload refused: %d earlier reads of %s never finished (a file "
                    "on a hung network file system?); restart the daemon to read it again",
                    len(self._parsing),
                    source,
                )
                continue
            try:
                config = await self._parse(source)
            except TimeoutError:
                log.error(
                    "config reload abandoned: reading %s has not finished after %s (a file "
                    "on a hung network file system?); keeping the running configuration%s",
                    source,
                    config_duration(RELOAD_SECONDS),
                    "; reading it again" if self._wanted else "",
                )
                continue
            except ConfigError as exc:
                for problem in exc.problems:
                    log.error("config reload refused: %s", problem)
                log.error("keeping the running configuration")
                continue
            except Exception as exc:  # an unreadable file, a bug: the daemon goes on
                log.error("config reload refused: %s: %s", source, exc)
                log.error("keeping the running configuration")
                continue
            await self._apply(config)

    async def _parse(self, source: Path) -> Config:
        """The configuration file, read and validated in a thread of its own (off the
        event loop). Raises TimeoutError when that takes :data:`RELOAD_SECONDS` on the
        daemon's clock (the thread is left to itself: a daemon thread, holding nothing)."""
        parse = asyncio.ensure_future(_in_thread(self._load_config, source, self._parsing))
        timer = asyncio.ensure_future(self._clock.sleep(RELOAD_SECONDS))
        try:
            await asyncio.wait({parse, timer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            timer.cancel()
            if not parse.done():
                parse.cancel()
            await asyncio.gather(timer, parse, return_exceptions=True)
        if parse.cancelled():
            raise TimeoutError
        return parse.result()


async def _in_thread(
    function: Callable[[Path], _T], path: Path, threads: set[threading.Thread]
) -> _T:
    """``function(path)`` in a daemon thread, added to ``threads``: the event loop goes
    on meanwhile, and a thread still parsing at exit does not hold the process
    (``asyncio.to_thread``'s executor is joined by ``asyncio.run``). Cancelling the
    wait leaves the thread to end by itself."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[_T] = loop.create_future()

    def settle(result: _T | None, error: BaseException | None) -> None:
        if future.done():  # cancelled: the daemon is stopping
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        result: _T | None = None
        error: BaseException | None = None
        try:
            result = function(path)
        except BaseException as exc:
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            loop.call_soon_threadsafe(settle, result, error)

    thread = threading.Thread(target=run, name="config-reload", daemon=True)
    threads.add(thread)
    thread.start()
    return await future
