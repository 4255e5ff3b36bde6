"""Embedding throughput of the served path against sentence-transformers (`python -m bench.embed`)."""
