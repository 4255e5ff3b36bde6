"""gRPC helpers: server set-up, interceptors, client channels and the error-to-status map."""
