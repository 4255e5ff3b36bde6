"""How the generation benchmark orders and checks its runs: the engines alternate round by round,
the greedy tokens of the two engines are compared prompt by prompt, and the prompts of a run are
checked for prefixes the service's prompt cache could reuse."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

PLATFORM = "platform"
REFERENCE = "reference"
# The greedy tokens compared between the engines on every prompt.
GREEDY_TOKENS = 32


def interleaved_order(rounds: int, engines: Sequence[str] = (PLATFORM, REFERENCE)) -> list[tuple[int, str]]:
    """(round, engine) in the order they run: every engine once per round, rounds one after another
    (platform, reference, platform, reference, ...), so a change in the machine's load during the
    run falls on both engines instead of on whichever ran last."""
    return [(number, engine) for number in range(1, rounds + 1) for engine in engines]


def first_divergence(platform: Sequence[int], reference: Sequence[int], limit: int = GREEDY_TOKENS) -> int | None:
    """The position of the first of the first `limit` tokens where the engines differ (one ending
    while the other goes on counts), or None when they agree on all of them."""
    a, b = list(platform[:limit]), list(reference[:limit])
    for position, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return position
    return None if len(a) == len(b) else min(len(a), len(b))


def agreement(divergences: Iterable[int | None]) -> dict[str, object]:
    """How many prompts the engines agree on fully, and where the others first differ."""
    positions = list(divergences)
    differing = sorted(position for position in positions if position is not None)
    return {
        "prompts": len(positions),
        "agree_fully": len(positions) - len(differing),
        "first_divergence_positions": differing,
        "first_divergence_median": float(np.median(differing)) if differing else None,
    }


def reusable_prefix(prompt: Sequence[int], earlier: Iterable[Sequence[int]]) -> int:
    """The longest token prefix `prompt` shares with a prompt sent before it: what a prompt cache
    holding every earlier prompt could reuse."""
    best = 0
    for other in earlier:
        n = min(len(prompt), len(other))
        same = np.asarray(prompt[:n]) == np.asarray(other[:n])
        best = max(best, n if same.all() else int(np.argmin(same)))
    return best


def prefix_cache_exposure(prompts: Sequence[Sequence[int]], earlier: Sequence[Sequence[int]], min_tokens: int) -> dict[str, int]:
    """For a run's prompts (each also seeing those before it in the run): how many share at least
    `min_tokens` (the cache's threshold) with an earlier prompt, and the longest such prefix."""
    seen = list(earlier)
    shared = []
    for prompt in prompts:
        shared.append(reusable_prefix(prompt, seen))
        seen.append(prompt)
    return {"prompts": len(prompts), "could_hit": sum(1 for n in shared if n >= min_tokens),
            "longest_shared_prefix_tokens": max(shared, default=0), "cache_min_tokens": min_tokens}
