"""Speech recognition (PocketSphinx) and synthesis (Kokoro, espeak-ng), Riva-shaped."""
