"""LLM OS shared library: settings, bus, telemetry, gRPC helpers, auth, errors and models."""
