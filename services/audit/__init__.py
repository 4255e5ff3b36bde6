"""Audit service: a tamper-evident, hash-chained log of who did what."""
