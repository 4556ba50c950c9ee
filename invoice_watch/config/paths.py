"""Where the files of a configuration are: the configuration file itself
(:func:`find_config_file`), the state file when ``state.path`` is not set
(:func:`default_state_path`; :func:`state_files_elsewhere` for the other places one may
be) and a ``<secret>_file`` (:func:`secret_file_path`, systemd credentials).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from invoice_watch import constants

DEFAULT_CONFIG_PATH = Path("/etc/invoice-watch/config.yaml")
# Where the systemd setup keeps the secrets beside the config (see secret_file_path).
CREDENTIALS_FOLDER = "credentials"


def find_config_file(explicit: str | None, env: Mapping[str, str]) -> Path:
    """``-c`` value, else $INVOICE_WATCH_CONFIG, else ./config.yaml if it exists, else
    /etc/invoice-watch/config.yaml."""
    if explicit:
        return Path(explicit)
    if env.get("INVOICE_WATCH_CONFIG"):
        return Path(env["INVOICE_WATCH_CONFIG"])
    local = Path("config.yaml")
    return local if local.is_file() else DEFAULT_CONFIG_PATH


def _lexists(path: Path) -> bool:
    """Whether something is at ``path`` (an unreadable file counts: reading it then
    says why)."""
    try:
        os.lstat(path)
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def default_state_path(env: Mapping[str, str], config_dir: Path) -> tuple[Path, str]:
    """The state file when ``state.path`` is not set, and why (SPEC §6):
    ``$STATE_DIRECTORY/state.db`` when set (systemd's ``StateDirectory=``, the container
    image), else ``invoice-watch.db`` beside the config file.

    It depends on the environment and the config's folder only, never on which files
    exist: a daemon's reload computes the path it started with, and a state file that
    appears elsewhere (the service's) never moves another one onto it. Where the default
    names no file yet while another documented place holds one, the commands refuse to
    guess (:func:`state_files_elsewhere`); the service's own config sets ``state.path``."""
    state_dir = env.get("STATE_DIRECTORY", "").split(":")[0]
    if state_dir:
        return Path(state_dir).absolute() / "state.db", "$STATE_DIRECTORY"
    return config_dir.absolute() / "invoice-watch.db", "beside the config file"


def state_files_elsewhere(
    path: Path, env: Mapping[str, str], config_dir: Path
) -> list[tuple[Path, str]]:
    """The documented places of a state file other than ``path`` that hold one, each with
    what it is: the service's (:data:`~invoice_watch.constants.SERVICE_STATE_PATH`, the
    systemd unit's and the container's), ``$STATE_DIRECTORY/state.db`` and
    ``invoice-watch.db`` beside the config file. A place this user may not look into
    counts as holding one (systemd keeps a ``DynamicUser`` service's state under
    /var/lib/private, root only): opening it then says "permission denied" rather than
    this user silently getting a second file."""
    places = [(constants.SERVICE_STATE_PATH, "the invoice-watch service's state file")]
    state_dir = env.get("STATE_DIRECTORY", "").split(":")[0]
    if state_dir:
        places.append((Path(state_dir).absolute() / "state.db", "in $STATE_DIRECTORY"))
    places.append((config_dir.absolute() / "invoice-watch.db", "beside the config file"))
    seen = {os.path.abspath(path)}
    found = []
    for place, what in places:
        key = os.path.abspath(place)
        if key not in seen and _lexists(place):
            found.append((place, what))
        seen.add(key)
    return found


def secret_file_path(value: str, env: Mapping[str, str], config_dir: Path) -> Path:
    """The file that ``<secret>_file: value`` names. A relative path is under
    ``$CREDENTIALS_DIRECTORY`` when set (systemd's ``LoadCredential=``), else beside the
    config file, or in ``credentials/`` beside it when only that one exists: from a
    shell, a systemd setup's credentials are there (``LoadCredential=`` copies them from
    there), so ``invoice-watch status -c /etc/invoice-watch/config.yaml`` reads what the
    service reads."""
    path = Path(value)
    if path.is_absolute():
        return path
    credentials = env.get("CREDENTIALS_DIRECTORY")
    path = (Path(credentials) if credentials else config_dir) / path
    kept = config_dir / CREDENTIALS_FOLDER / value
    if not credentials and not _lexists(path) and _lexists(kept):
        return kept
    return path
