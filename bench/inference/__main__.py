"""`make bench-inference`: the embedding benchmark, the generation benchmark, then the fidelity of
the served generation artefacts to the weights they are built from."""

from __future__ import annotations

import sys

from bench.embed.__main__ import main as embed_main
from bench.generate.__main__ import main as generate_main
from bench.generate.fidelity import main as fidelity_main

if __name__ == "__main__":
    sys.exit(embed_main(sys.argv[1:]) or generate_main(sys.argv[1:]) or fidelity_main([]))
