"""Generated from protos/llmos/v1 by `make protos`; do not edit the generated modules."""
