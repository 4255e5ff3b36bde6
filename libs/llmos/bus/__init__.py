"""The NATS JetStream bus: subjects, streams, KV buckets, protobuf codec, handlers and DLQ."""
