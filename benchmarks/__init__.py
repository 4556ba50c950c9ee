"""Benchmarks of invoice_watch (not tests): run ``python -m benchmarks.cycle``."""
