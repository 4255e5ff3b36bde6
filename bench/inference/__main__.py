"""`make bench-inference`: the embedding benchmark, then the generation benchmark."""

from __future__ import annotations

import sys

from bench.embed.__main__ import main as embed_main
from bench.generate.__main__ import main as generate_main

if __name__ == "__main__":
    sys.exit(embed_main(sys.argv[1:]) or generate_main(sys.argv[1:]))
