"""The `llmos` command line."""
