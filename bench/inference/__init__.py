"""Inference benchmarks: `python -m bench.inference` runs bench.embed then bench.generate."""
