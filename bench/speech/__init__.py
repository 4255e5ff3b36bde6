"""Speech benchmarks: `python -m bench.speech`."""
