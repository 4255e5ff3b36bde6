"""Tokenizer service: the generation model's tokenizer and chat template over gRPC."""
