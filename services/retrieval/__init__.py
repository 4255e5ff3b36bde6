"""Hybrid search, recommendations and document lookup over Qdrant."""
