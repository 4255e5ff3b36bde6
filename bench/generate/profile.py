"""The generation scheduler's per-step profile, read from the inference service's Prometheus port.

Between two scrapes: the scheduler thread's wall and CPU seconds in each phase of its turns
(admit: admission and prefill; decode: the step's model run; sample; deliver: detokenize and hand
the tokens to their streams), the decode steps, the rows they ran (their mean batch) and their
mean model-run time. The thread's CPU leaves out ONNX Runtime's worker threads; the service's
whole CPU is measured beside it.
"""

from __future__ import annotations

import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

PHASES = ("admit", "decode", "sample", "deliver")
_PHASE_COUNTERS = {"llmos_inference_scheduler_time_seconds_total": "wall_s",
                   "llmos_inference_scheduler_cpu_time_seconds_total": "thread_cpu_s"}
_TOTALS = {"llmos_inference_batch_size_count": "steps", "llmos_inference_batch_size_sum": "rows",
           "llmos_inference_step_time_milliseconds_sum": "step_ms"}


def scrape(addr: str) -> dict[str, float]:
    """The scheduler's running totals now, from the service's Prometheus port `addr`."""
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=10) as response:
        return totals(response.read().decode())


def totals(text: str) -> dict[str, float]:
    """The scheduler's running totals in Prometheus text, summed over the models it serves."""
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in _PHASE_COUNTERS and sample.labels.get("phase") in PHASES:
                key = f"{_PHASE_COUNTERS[sample.name]}:{sample.labels['phase']}"
            elif sample.name in _TOTALS:
                key = _TOTALS[sample.name]
            else:
                continue
            found[key] = found.get(key, 0.0) + sample.value
    return found


def step_profile(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """What ran between two scrapes."""
    spent = {key: after.get(key, 0.0) - before.get(key, 0.0) for key in after}
    steps = spent.get("steps", 0.0)
    return {
        "decode_steps": int(steps),
        "mean_batch": spent.get("rows", 0.0) / steps if steps else 0.0,
        "step_ms_mean": spent.get("step_ms", 0.0) / steps if steps else 0.0,
        **{kind: {phase: spent.get(f"{kind}:{phase}", 0.0) for phase in PHASES} for kind in ("wall_s", "thread_cpu_s")},
    }
