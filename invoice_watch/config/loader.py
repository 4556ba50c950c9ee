"""Loading a configuration file (SPEC §6): :func:`load` (text) and :func:`load_file`.

Loading is a pipeline that keeps every problem it finds, each located by line, column
and dotted path (:class:`~invoice_watch.config.locations.Locations`), and raises them
together as one :class:`~invoice_watch.errors.ConfigError`::

    files.read_regular_file: the file, if it is a regular one (never a FIFO's wait)
      -> yaml_tree.read: bounded YAML -> plain data (merge keys, ${VAR}, duplicate keys)
      -> top-level `x-...` keys dropped (extension fields: anchors live there)
      -> `<secret>_file` keys read into their secret field (paths.secret_file_path)
      -> empty sections mean their defaults; the default state path (paths.py)
      -> cross-references (notify names, duplicate rule and report names, org ids)
      -> pydantic validation (models.py, notifiers.py, rules.py), each error located
         (locations.py)
      -> the warnings of a valid configuration (warnings.py)

Relative paths resolve against the configuration file's folder.
"""

from __future__ import annotations

import errno
import os
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from invoice_watch.config.files import FileProblem, read_regular_file
from invoice_watch.config.locations import Loc, Locations, in_file_order, located
from invoice_watch.config.models import Config
from invoice_watch.config.paths import CREDENTIALS_FOLDER, default_state_path, secret_file_path
from invoice_watch.config.values import control_problem
from invoice_watch.config.warnings import find_warnings
from invoice_watch.config.yaml_tree import MAX_CONFIG_BYTES, read, too_large
from invoice_watch.errors import ConfigError
from invoice_watch.report.outbox import REPORT_NOTIFIER_TYPES

# The fields that hold secrets; each also accepts `<field>_file: path`.
SECRET_FIELDS = (
    "private_key", "client_secret", "webhook_url", "token", "password", "url", "secret",
    "routing_key",
)  # fmt: skip
MAX_SECRET_BYTES = 64 * 1024  # a `<secret>_file`
# Top-level keys starting with this are ignored (Docker Compose's extension fields).
EXTENSION_PREFIX = "x-"


def load(
    text: str,
    *,
    filename: str = "<string>",
    env: Mapping[str, str] | None = None,
    base_dir: Path | None = None,
    secrets: bool = True,
) -> Config:
    """Parse and validate a configuration; raises ConfigError with every problem found.

    Relative paths (``state.path``, ``ca_file``, ``*_file`` secrets) resolve against
    ``base_dir`` (default: the working directory). ``env`` defaults to ``os.environ``.
    ``secrets=False`` (the read-only commands: ``status``, ``history``, ``invoices``)
    reads no ``<secret>_file`` and no ``ca_file``, and takes a secret whose ``${VAR}``
    is unset: each secret is then a placeholder (:attr:`Config.secrets_read` is False),
    so that an operator who may read the state file but not the secrets can still look;
    but the state's own (``state.url``, ``state.password`` / ``password_file``: a
    PostgreSQL state's password) are read, as those commands need them, and an unset
    ``${VAR}`` in ``http.listen`` (which they never use) is taken as well.
    Top-level keys starting with ``x-`` are ignored (extension fields, as Docker Compose
    has them: a place for anchors).
    """
    where = Locations(filename)
    env = os.environ if env is None else env
    folder = base_dir or Path()
    # (A read-only command still reads the state's own secrets, which it needs to open
    # a PostgreSQL state, and takes an unset ${VAR} in a key it never uses: http.listen.)
    unread = None if secrets else {name: unread_secret(name) for name in SECRET_FIELDS}
    if unread is not None:
        unread["listen"] = UNREAD_LISTEN
    data = read(text, where, env, unread=unread)
    for key in [key for key in data if key.startswith(EXTENSION_PREFIX)]:
        del data[key]
    _SecretFiles(where, env, folder, read=secrets).read_into(data, ())
    state_origin = _add_defaults(data, env, folder)
    _check_references(data, where)
    config: Config | None = None
    context = {"base_dir": base_dir, "read_files": secrets}
    try:
        config = Config.model_validate(data, context=context)
    except ValidationError as exc:
        where.report_validation(exc, data, context)
    if where.problems or config is None:
        raise ConfigError(in_file_order(where.problems))
    config.state._origin = state_origin
    config._secrets_read = secrets
    config._warnings = find_warnings(config, where)
    return config


def load_file(
    path: str | os.PathLike[str], env: Mapping[str, str] | None = None, *, secrets: bool = True
) -> Config:
    """Load the configuration file at ``path``; relative paths resolve against its folder.
    ``secrets``: as :func:`load`. A FIFO, a device or a folder is refused, never read."""
    filename = os.fspath(path)
    try:
        raw = read_regular_file(path, MAX_CONFIG_BYTES)
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError([too_large(filename)])
        text = raw.decode("utf-8")
    except (FileProblem, UnicodeDecodeError) as exc:
        reason = str(exc) if isinstance(exc, FileProblem) else "not UTF-8 text"
        message = (
            f"cannot read the configuration file: {reason}; give its path with -c FILE or "
            "$INVOICE_WATCH_CONFIG"
        )
        # A UnicodeDecodeError is not chained: it holds the file's bytes, secrets included.
        cause = (exc.__cause__ or exc) if isinstance(exc, FileProblem) else None
        raise ConfigError([located(filename, None, (), message)]) from cause
    config = load(
        text,
        filename=filename,
        env=env,
        base_dir=Path(path).absolute().parent,
        secrets=secrets,
    )
    config._source = Path(path).absolute()
    return config


# What a secret holds when the command reads none (load(secrets=False)): valid for its
# field, and never sent anywhere (App refuses such a configuration).
UNREAD_SECRET = "invoice-watch-secret-not-read"
UNREAD_LISTEN = "127.0.0.1:0"  # http.listen's, for the read-only commands (never bound)
_UNREAD_URL = "https://unread.invalid/invoice-watch-secret-not-read"
# Each placeholder passes its field's own checks (a URL; a Standard Webhooks secret:
# whsec_ and base64 of 24 bytes; a PagerDuty routing key: 32 letters and digits), so
# that the read-only commands (status --check is the Docker HEALTHCHECK) load any
# configuration check-config accepts.
_UNREAD = {
    "webhook_url": _UNREAD_URL,
    "url": _UNREAD_URL,
    "secret": "whsec_" + "A" * 32,
    "routing_key": "0" * 32,
}


def unread_secret(field: str) -> str:
    """The placeholder of the secret ``field`` when secrets are not read."""
    return _UNREAD.get(field, UNREAD_SECRET)


@dataclass(frozen=True)
class _SecretFiles:
    """Reads each ``<secret>_file: path`` of a document into ``<secret>`` (with
    ``read=False``, puts the placeholder there instead)."""

    where: Locations
    env: Mapping[str, str]
    base_dir: Path
    read: bool = True

    def read_into(self, data: Any, loc: Loc) -> None:
        """Replace every `<secret>_file: path` by `<secret>: <file content>`."""
        if isinstance(data, list):
            for i, item in enumerate(data):
                self.read_into(item, (*loc, i))
        if not isinstance(data, dict):
            return
        for key in list(data):
            name = key.removesuffix("_file")
            if name not in SECRET_FIELDS or key == name:
                self.read_into(data[key], (*loc, key))
                continue
            file_loc, secret_loc = (*loc, key), (*loc, name)
            mark = self.where.key_marks[file_loc]
            if name in data:
                self.where.report(mark, file_loc, f"set either {name} or {key}, not both")
                del data[key]
                continue
            value = data.pop(key)
            self.where.marks[secret_loc] = self.where.marks[file_loc]
            self.where.key_marks[secret_loc] = mark
            if not self.read and loc[:1] != ("state",):  # (the state's is needed)
                data[name] = unread_secret(name)
                continue
            text = self._read(value, file_loc)
            if text is None:
                # Reported: the placeholder keeps the rest valid, and the field's own
                # checks (a URL, a token) must not report it again.
                self.where.set_broken(secret_loc)
                text = unread_secret(name)
            data[name] = text

    def _read(self, value: Any, loc: Loc) -> str | None:
        """The secret in the file ``value`` names; None once a problem is reported."""
        if not isinstance(value, str) or not value:
            self.where.report_at(loc, "expected the path of a file holding the secret")
            return None
        path = secret_file_path(value, self.env, self.base_dir)
        try:
            raw = read_regular_file(path, MAX_SECRET_BYTES)
            if len(raw) > MAX_SECRET_BYTES:
                raise FileProblem(f"larger than {MAX_SECRET_BYTES // 1024} KiB; is it the secret?")
            text = raw.decode("utf-8").removesuffix("\n").removesuffix("\r")
        except FileProblem as exc:
            if exc.errno == errno.ENOENT and not Path(value).is_absolute():
                self.where.report_at(loc, f"cannot read {path}: {self._not_found(value)}")
            else:
                self.where.report_at(
                    loc, f"cannot read {path}: {exc}; check the path and permissions"
                )
            return None
        except UnicodeDecodeError:  # not chained: it holds the file's bytes
            self.where.report_at(loc, f"cannot read {path}: not UTF-8 text; is it the secret?")
            return None
        if not text:
            self.where.report_at(
                loc, f"{path} is empty: write the secret into it (one trailing newline is fine)"
            )
            return None
        if problem := control_problem(text) or _invisible_problem(text):
            self.where.report_at(
                loc, f"the content of {path} {problem} (one trailing newline is dropped)"
            )
            return None
        return text

    def _not_found(self, value: str) -> str:
        """A relative ``<secret>_file`` found nowhere: where it was looked for, and how
        it gets there."""
        kept = self.base_dir / CREDENTIALS_FOLDER / value
        if self.env.get("CREDENTIALS_DIRECTORY"):
            return (
                "no such file in $CREDENTIALS_DIRECTORY, where systemd puts the credentials "
                f"the unit loads: add `LoadCredential={value}:{kept.absolute()}` to the "
                "unit (`systemctl edit invoice-watch`; is that line commented out?), or "
                "give the file's full path"
            )
        return (
            f"no such file, nor {kept} (the systemd setup's credentials folder); create "
            "it, readable by the daemon's user only, or give the file's full path"
        )


def _invisible_problem(text: str) -> str | None:
    """What is wrong with a secret file's text that looks right in an editor (AD-6): a
    byte order mark (Notepad writes one), an invisible format character (U+200B...),
    white space around it; no Atlas key, token, URL or password generated for a
    service has them, and the service would refuse the secret with a misleading cause
    ("revoked"). None when there is none."""
    if text.startswith("\ufeff"):
        return (
            "starts with a byte order mark (U+FEFF, as Notepad writes); save the file as "
            "UTF-8 without BOM"
        )
    if not text.strip():
        return "holds only white space; write the secret into it"
    if text != text.strip():
        where = "starts" if text[0].isspace() else "ends"
        return f"{where} with white space; remove it"
    for char in text:
        if unicodedata.category(char) == "Cf":
            return f"contains the invisible character U+{ord(char):04X}; remove it"
    return None


def _add_defaults(data: dict[str, Any], env: Mapping[str, str], base_dir: Path) -> str:
    """Empty sections (``poll:`` with every key commented out) mean their defaults;
    the state path's default depends on the environment and the file's folder. Returns
    where ``state.path`` comes from (see StateConfig.origin)."""
    for key, value in data.items():
        if value is None and key in Config.model_fields and key != "http":
            data[key] = [] if key in ("organizations", "rules", "reports") else {}
    state = data.setdefault("state", {})
    if isinstance(state, dict) and "path" not in state:
        state["path"], origin = default_state_path(env, base_dir)
        return origin
    return "state.path"


def _check_references(data: dict[str, Any], where: Locations) -> None:
    """Checks across sections, on the raw data, so they add to pydantic's problems."""
    orgs = data.get("organizations")
    ids: dict[str, int] = {}
    for i, org in enumerate(orgs if isinstance(orgs, list) else []):
        if isinstance(org, dict) and isinstance(org.get("id"), str):
            what, fix = f"organization id {org['id']}", "list each organization once"
            _check_unique(where, ids, org["id"], ("organizations", i, "id"), what, fix)
    notifiers = data.get("notifiers")
    known = sorted(notifiers) if isinstance(notifiers, dict) and notifiers else None
    for section, kind in (("rules", "rule"), ("reports", "report")):
        _check_section(data.get(section), section, kind, known, where)
    if isinstance(notifiers, dict):
        _check_report_targets(data.get("reports"), notifiers, where)


def _check_report_targets(reports: Any, notifiers: dict[str, Any], where: Locations) -> None:
    """A report goes to notifiers that carry one (:data:`~invoice_watch.report.outbox.
    REPORT_NOTIFIER_TYPES`): webhook, PagerDuty and Alertmanager take alerts only."""
    for i, entry in enumerate(reports if isinstance(reports, list) else []):
        notify = entry.get("notify") if isinstance(entry, dict) else None
        for j, target in enumerate(notify if isinstance(notify, list) else []):
            loc = ("reports", i, "notify", j)
            found = notifiers.get(target) if isinstance(target, str) else None
            kind = found.get("type") if isinstance(found, dict) else None
            if loc in where.broken or not isinstance(kind, str):
                continue
            if kind not in REPORT_NOTIFIER_TYPES:
                where.report_at(
                    loc,
                    f"notifier `{target}` ({kind}) cannot carry a report: reports go to "
                    f"{', '.join(sorted(REPORT_NOTIFIER_TYPES))} notifiers",
                )


def _check_section(
    entries: Any, section: str, kind: str, known: list[str] | None, where: Locations
) -> None:
    """Unique names and known notifiers, each listed once in ``notify``, in the entries of
    ``section`` (rules, reports)."""
    names: dict[str, int] = {}
    for i, entry in enumerate(entries if isinstance(entries, list) else []):
        if not isinstance(entry, dict):
            continue
        name = entry.get("name")
        if isinstance(name, str):
            what, fix = f"{kind} name `{name}`", f"{kind} names must be unique"
            _check_unique(where, names, name, (section, i, "name"), what, fix)
        notify = entry.get("notify")
        targets: dict[str, int] = {}  # a name listed twice would send twice
        for j, target in enumerate(notify if isinstance(notify, list) else []):
            target_loc = (section, i, "notify", j)
            if target_loc in where.broken:
                continue
            if isinstance(target, str) and target in targets:
                what, fix = f"notifier `{target}` in `notify`", "list each notifier once"
                _check_unique(where, targets, target, target_loc, what, fix)
                continue
            if isinstance(target, str):
                targets[target] = where.marks[target_loc].line + 1
            if known is not None and isinstance(target, str) and target not in known:
                where.report_at(
                    target_loc,
                    f"unknown notifier `{target}`; the notifiers defined under "
                    f"`notifiers:` are: {', '.join(known)}",
                )


def _check_unique(
    where: Locations, seen: dict[str, int], value: str, loc: Loc, what: str, fix: str
) -> None:
    """Report the value at ``loc`` if an earlier one in ``seen`` (value -> line) is the
    same, else add it there. ``what`` names it, ``fix`` says what to do."""
    if loc in where.broken:
        return
    if value in seen:
        where.report_at(loc, f"duplicate {what} (first at line {seen[value]}); {fix}")
    else:
        seen[value] = where.marks[loc].line + 1
