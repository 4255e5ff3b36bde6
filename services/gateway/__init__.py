"""The HTTP gateway: OpenAI-compatible API and REST for the platform, over the gRPC services."""
