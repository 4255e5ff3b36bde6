"""Sessions, intents, grounded answers with citations, summaries and voice turns."""
