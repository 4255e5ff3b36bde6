"""Ingest service: accept documents, normalize, de-duplicate, chunk by tokens, publish chunks."""
