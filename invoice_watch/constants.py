"""Constants shared across the pipeline: API media types, defaults, statuses."""

from __future__ import annotations

from pathlib import Path
from typing import Final

ATLAS_BASE_URL: Final = "https://cloud.mongodb.com"
ATLAS_UI_URL: Final = "https://cloud.mongodb.com"
SLACK_API_URL: Final = "https://slack.com/api/"
# PagerDuty's Events API v2 (developer.pagerduty.com, "Send an Alert Event").
PAGERDUTY_EVENTS_URL: Final = "https://events.pagerduty.com/v2/enqueue"

# The Atlas Administration API resource version this release speaks (v2 flavor).
V2_API_VERSION: Final = "2023-01-01"
V2_MEDIA_TYPE: Final = f"application/vnd.atlas.{V2_API_VERSION}+json"
V2_CSV_MEDIA_TYPE: Final = f"application/vnd.atlas.{V2_API_VERSION}+csv"
# `lineItems:search` (daily usage of an invoice) exists from this resource version on: its
# request body and its answer are both of this media type (v2 flavor only).
# The most one line item (one day of one SKU of one cluster) may amount to, either sign:
# USD 100 billion. Larger is no bill but a broken answer: refused by the fetch
# (atlas/usage.py) and by the state (store/sql/usage.py), so that no sum of line items
# the state or a report takes can overflow an int64.
LINE_ITEM_MAX_CENTS: Final = 10**13
USAGE_API_VERSION: Final = "2024-08-05"
USAGE_MEDIA_TYPE: Final = f"application/vnd.atlas.{USAGE_API_VERSION}+json"

# Path prefix of the invoice endpoints per API flavor (`atlas.api`).
API_PREFIXES: Final = {
    "v2": "/api/atlas/v2",
    "v1": "/api/atlas/v1.0",
    "cloud-manager": "/api/public/v1.0",
}
OAUTH_TOKEN_PATH: Final = "/api/oauth/token"

ITEMS_PER_PAGE: Final = 500
# A listing never runs past this many pages (500 invoices each), whatever `totalCount` says.
MAX_PAGES: Final = 1000
# Default cap on one Atlas answer's decoded body (`atlas.max_response_size`): a full
# listing page of 500 invoices is about 260 KB; 16 MiB holds one whose invoices each
# nest some 60 linked invoices.
MAX_RESPONSE_SIZE: Final = 16 * 2**20
REQUIRED_ROLE: Final = "Organization Billing Viewer"
# Linked invoices (cross-organization billing) are listed only to these roles on the
# paying organization.
LINKED_INVOICES_ROLES: Final = "Organization Billing Admin or Organization Owner"

# Invoice statuses (BillingInvoice.statusName in the official spec).
INVOICE_STATUSES: Final = (
    "PENDING",
    "CLOSED",
    "FORGIVEN",
    "FAILED",
    "PAID",
    "FREE",
    "PREPAID",
    "INVOICED",
)
# An invoice in one of these states is not expected to change again: incremental reads
# start after the last of them (listing.incremental_from), and the snapshot keeps them as
# keys (types.Snapshot). PREPAID ("Customer has a pre-paid plan so they won't be
# charged", the official spec's BillingInvoice.statusName) is as final as FREE: nothing
# is charged, and no move out of it is documented. One that changes all the same is
# seen by the periodic full listing (poll.full_listing_every).
FINAL_STATUSES: Final = frozenset({"PAID", "FORGIVEN", "FREE", "PREPAID"})

ONCE_DELIVERY_SECONDS: Final = 60.0
# `run --once` waits at most this long (seconds), after its delivery, for the line
# items stage its cycle started (issue 19); what it had not read then is read by a later
# run.
ONCE_LINE_ITEMS_SECONDS: Final = 60.0
# A cycle holds the messages of the organizations it committed until it ends, to know
# how many each notifier gets (more than delivery.group_over: one grouped message); a
# message is held at most this long (seconds) after its organization was committed:
# then what the cycle holds is released (grouped the same way) while it goes on, so that
# one slow organization (429s, timeouts, long paging) never holds back the others'.
HOLD_SECONDS: Final = 30.0
SHUTDOWN_SECONDS: Final = 10.0

# Where the systemd unit (StateDirectory=invoice-watch) and the container image
# (STATE_DIRECTORY, a volume) keep the state file, and what the service's config sets as
# state.path (README). A command whose default state file does not exist while this one
# does refuses to start a second state (config/paths.py: state_files_elsewhere). Tests
# point it elsewhere (tests/conftest.py).
SERVICE_STATE_PATH: Path = Path("/var/lib/invoice-watch/state.db")

# A grouped message holds at most this many events: a larger group is split into parts,
# each a message of its own (store.message_parts), and every renderer fits this many in
# its channel's limits (notify/render/).
MESSAGE_MAX_EVENTS: Final = 40
