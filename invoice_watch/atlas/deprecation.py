"""``Deprecation`` and ``Sunset`` headers (RFC 9745, RFC 8594): Atlas saying that an
endpoint of the API version this release speaks will go away.

:class:`Deprecations` notes them per endpoint as answers come, and says them once per
read of every organization (:meth:`Deprecations.report`): one warning per endpoint, and
the metrics ``invoice_watch_atlas_deprecation_warnings_total`` and
``invoice_watch_atlas_endpoint_sunset_timestamp_seconds``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING

from invoice_watch.safe_text import server_text

if TYPE_CHECKING:
    from invoice_watch.metrics import Metrics

log = logging.getLogger(__name__)

_SF_DATE = re.compile(r"@(-?[0-9]{1,15})")
_ISO_DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def header_date(value: str) -> datetime | None:
    """The date a ``Deprecation`` or ``Sunset`` header gives, else None: an RFC 9651
    structured-field date (``@1688169599``, RFC 9745's form), an HTTP-date (RFC 9110
    §5.6.7, RFC 8594's form and the older Deprecation drafts'), or an ISO 8601 date or
    timestamp (``2027-10-01``, ``2027-10-01T00:00:00Z``: not what the RFCs say, but
    unambiguous; one without a timezone is read as UTC)."""
    text = value.strip()
    try:
        if m := _SF_DATE.fullmatch(text):
            return datetime.fromtimestamp(int(m[1]), UTC)
        iso = _ISO_DAY.match(text)
        when = datetime.fromisoformat(text) if iso else parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError, OSError):
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


@dataclass
class Deprecation:
    """``Deprecation`` / ``Sunset`` headers seen on one endpoint: their dates, or their
    text (printable, shortened) when it is not a date."""

    deprecated_at: datetime | None = None
    deprecated_text: str = ""  # a Deprecation header that is neither a date nor `true`
    sunset: datetime | None = None
    sunset_text: str = ""  # a Sunset header that is not a date

    def text(self, now: datetime) -> str:
        """``deprecated since 2026-10-01; Atlas will remove it on 2027-10-01: upgrade
        invoice-watch before then`` and its variants (a date to come or gone, none, a
        header that is not a date)."""
        text = "deprecated"
        if self.deprecated_at is not None:
            when = "since" if self.deprecated_at <= now else "from"
            text += f" {when} {self.deprecated_at:%Y-%m-%d}"
        elif self.deprecated_text:
            text += f" (its Deprecation header is not a date: {self.deprecated_text!r})"
        if self.sunset is None and self.sunset_text:
            return text + (
                f"; its Sunset header is not a date ({self.sunset_text!r}): upgrade invoice-watch"
            )
        if self.sunset is None:
            return text + "; no removal date yet: upgrade invoice-watch"
        if self.sunset <= now:
            return text + (
                f"; Atlas was to remove it on {self.sunset:%Y-%m-%d}, which has passed: "
                "upgrade invoice-watch now"
            )
        return text + (
            f"; Atlas will remove it on {self.sunset:%Y-%m-%d}: upgrade invoice-watch before then"
        )


class Deprecations:
    """The ``Deprecation``/``Sunset`` headers seen since the last report, per endpoint
    (its path template, ``/api/atlas/v2/orgs/{orgId}/invoices``)."""

    def __init__(self, version: str, metrics: Metrics | None = None) -> None:
        self._version = version  # the API version, as warnings name it
        self._metrics = metrics
        self._seen: dict[str, Deprecation] = {}

    def note(self, endpoint: str, headers: Mapping[str, str]) -> None:
        """Take what an answer of ``endpoint`` says in its headers."""
        deprecation = headers.get("Deprecation")
        sunset = headers.get("Sunset")
        if deprecation is None and sunset is None:
            return
        seen = self._seen.setdefault(endpoint, Deprecation())
        if deprecation is not None:
            seen.deprecated_at = header_date(deprecation)
            # RFC 9745 is a date; drafts before it also allowed `true` (`?1`: a
            # structured-field boolean).
            flag = deprecation.strip().lower() in ("true", "?1")
            malformed = seen.deprecated_at is None and not flag
            seen.deprecated_text = server_text(deprecation, 40) if malformed else ""
        if sunset is not None:
            seen.sunset = header_date(sunset)
            seen.sunset_text = "" if seen.sunset else server_text(sunset, 40)

    def report(self, now: datetime) -> None:
        """One warning per deprecated endpoint seen since the last report, and the
        metrics (``invoice_watch_atlas_deprecated_endpoint_sunset_timestamp_seconds``)."""
        seen, self._seen = self._seen, {}
        for endpoint, dep in sorted(seen.items()):
            log.warning(
                "Atlas marks %s (API version %s) as %s", endpoint, self._version, dep.text(now)
            )
            if self._metrics is not None:
                self._metrics.atlas_deprecations.labels(endpoint=endpoint).inc()
                if not dep.sunset_text:  # a malformed Sunset is said, not exported as 0
                    self._metrics.atlas_sunset.labels(endpoint=endpoint).set(
                        dep.sunset.timestamp() if dep.sunset else 0
                    )
