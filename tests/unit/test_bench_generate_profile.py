"""bench.generate's scheduler profile: the per-phase totals it reads from the service's metrics."""

from __future__ import annotations

import pytest

from bench.generate.profile import step_profile, totals

pytestmark = pytest.mark.unit


def exposition(decode_s: float, steps: int, rows: int, step_ms: float) -> str:
    """What the inference service's Prometheus port serves for the scheduler (two models' series)."""
    lines = ["# TYPE llmos_inference_scheduler_time_seconds counter"]
    for model_share in (0.75, 0.25):
        lines += [f'llmos_inference_scheduler_time_seconds_total{{phase="{phase}"}} {seconds * model_share}'
                  for phase, seconds in (("admit", 2.0), ("decode", decode_s), ("sample", 0.1), ("deliver", 0.3))]
    lines += ["# TYPE llmos_inference_scheduler_cpu_time_seconds counter",
              'llmos_inference_scheduler_cpu_time_seconds_total{phase="decode"} 1.5',
              "# TYPE llmos_inference_batch_size histogram",
              'llmos_inference_batch_size_bucket{le="+Inf"} ' + str(steps),
              f"llmos_inference_batch_size_count {steps}", f"llmos_inference_batch_size_sum {rows}",
              "# TYPE llmos_inference_step_time_milliseconds histogram",
              f"llmos_inference_step_time_milliseconds_count {steps}", f"llmos_inference_step_time_milliseconds_sum {step_ms}",
              "# TYPE llmos_inference_tokens_generated counter", "llmos_inference_tokens_generated_total 999"]
    return "\n".join(lines) + "\n"


def test_the_profile_is_what_ran_between_two_scrapes() -> None:
    before = totals(exposition(decode_s=4.0, steps=100, rows=100, step_ms=2000.0))
    after = totals(exposition(decode_s=10.0, steps=160, rows=580, step_ms=8000.0))
    profile = step_profile(before, after)
    assert profile["decode_steps"] == 60
    assert profile["mean_batch"] == pytest.approx(8.0)
    assert profile["step_ms_mean"] == pytest.approx(100.0)
    assert profile["wall_s"] == pytest.approx({"admit": 0.0, "decode": 6.0, "sample": 0.0, "deliver": 0.0})
    assert profile["thread_cpu_s"]["decode"] == pytest.approx(0.0)


def test_no_step_between_scrapes_is_an_empty_profile() -> None:
    same = totals(exposition(decode_s=1.0, steps=5, rows=5, step_ms=10.0))
    assert step_profile(same, same) == {"decode_steps": 0, "mean_batch": 0.0, "step_ms_mean": 0.0,
                                        "wall_s": dict.fromkeys(("admit", "decode", "sample", "deliver"), 0.0),
                                        "thread_cpu_s": dict.fromkeys(("admit", "decode", "sample", "deliver"), 0.0)}
