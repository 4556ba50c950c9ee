"""Stage 1, fetch: read invoices from the Atlas Administration API."""
