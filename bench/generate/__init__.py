"""Generation through the inference service against llama.cpp (`python -m bench.generate`)."""
