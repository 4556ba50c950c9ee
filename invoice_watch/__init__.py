"""invoice_watch: a billing watchdog for MongoDB Atlas organizations.

One poll cycle is a pipeline, one module (or package) a stage::

    atlas -> diff -> rules -> alerts -> store -> deliver

``atlas`` (the fetch) lists invoices through the Atlas Administration API and hands each
organization's read back as it completes, ``diff`` compares it with the SQLite
snapshot, ``rules`` evaluates the configured conditions, ``alerts`` decides which alert
events to send, ``commit`` writes an organization's snapshot, alert state and outbox
rows in one transaction (each organization as soon as it is read), and ``deliver``
sends the outbox through the ``notify`` notifiers.
``app`` schedules the cycle; ``cli`` is the command line.
"""

from __future__ import annotations

__version__ = "0.1.0"
