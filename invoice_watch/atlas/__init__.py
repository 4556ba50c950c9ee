"""Stage 1, fetch: read invoices from the Atlas Administration API.

The package knows Atlas and HTTP, and nothing of the stages after it. One module a job:

- ``client``: :class:`~invoice_watch.atlas.client.AtlasClient`, what a caller uses: one
  :class:`~invoice_watch.types.OrgRead` per organization, line items for breakdowns.
- ``paging``: an organization's listing, page by page, and its caps; the pages of the
  last listing (a body that comes back the same is not parsed again).
- ``parse``: JSON and CSV answers -> ``Invoice``/``LineItem``, checked field by field.
- ``transport``: one GET and its retries: the proxy, ``Retry-After`` and backoff
  (:mod:`invoice_watch.retry`), what each answer means.
- ``connection``: one request over the aiohttp session: the bound on requests in
  flight, the first request alone until one is authenticated, redirects refused.
- ``auth``: HTTP Digest keys, or an OAuth service account's bearer token.
- ``pacing``: Atlas's rate limits (a 429's ``Retry-After``, ``RateLimit-Remaining``).
- ``deprecation``: ``Deprecation``/``Sunset`` headers, warned about and counted.
- ``bounds``: how much of an answer is read, and how many JSON values it may hold.
- ``errors``: the one table of fixes (:data:`~invoice_watch.atlas.errors.FIXES`), the
  status classification, and the messages of :class:`~invoice_watch.errors.FetchError`.

Nothing outside the package sees an aiohttp type; every failure is one organization's
:class:`~invoice_watch.errors.FetchError`, and every text a server sent is redacted and
escaped (:func:`invoice_watch.safe_text.server_text`) before it is logged or stored.
"""
