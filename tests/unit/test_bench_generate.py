"""What the generation benchmark decides without running a model (issue 15, item 7): the order the
engines run in, the greedy-token comparison, the prompt-cache exposure of its prompts, noisy runs,
spreads over rounds, and whether a llama.cpp build uses this CPU's instruction sets."""

from __future__ import annotations

import os

import pytest

from bench.common import NOISY_LOAD, LoadWindow, noisy, spread
from bench.generate.reference import compiled_features, cpu_flags, missing_features
from bench.generate.rounds import (
    PLATFORM,
    REFERENCE,
    agreement,
    first_divergence,
    interleaved_order,
    prefix_cache_exposure,
    reusable_prefix,
)

# llama_print_system_info of llama-cpp-python 0.3.36, built with -DGGML_AVX512=OFF and built natively.
NO_AVX512 = "CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 | "
NATIVE = ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | AVX512 = 1 | AVX512_VBMI = 1 | "
          "AVX512_VNNI = 1 | AVX512_BF16 = 1 | LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 | ")
ZEN4_FLAGS = "flags\t\t: fpu sse2 pni ssse3 fma f16c avx avx2 bmi2 avx512f avx512bw avx512vbmi avx512_vnni avx512_bf16\n"


def test_engines_alternate_round_by_round() -> None:
    assert interleaved_order(3) == [
        (1, PLATFORM), (1, REFERENCE), (2, PLATFORM), (2, REFERENCE), (3, PLATFORM), (3, REFERENCE),
    ]
    assert interleaved_order(0) == []


@pytest.mark.parametrize(
    ("platform", "reference", "expected"),
    [
        (list(range(40)), list(range(40)), None),  # only the first 32 count, and they agree
        ([1, 2, 3] + [9] * 40, [1, 2, 3] + [9] * 29 + [7], None),  # differ at 32: past the compared tokens
        ([1, 2, 3, 4], [1, 2, 5, 4], 2),
        ([5, 6], [7, 6], 0),
        ([1, 2, 3], [1, 2, 3, 4, 5], 3),  # one engine ended (end of sequence) while the other went on
        ([1, 2, 3], [1, 2, 3], None),  # both ended at the same token
        ([], [], None),
    ],
)
def test_first_divergence_of_the_first_32_greedy_tokens(platform: list[int], reference: list[int], expected: int | None) -> None:
    assert first_divergence(platform, reference) == expected


def test_agreement_counts_prompts_and_divergence_positions() -> None:
    assert agreement([None, 7, None, 3, 20]) == {
        "prompts": 5, "agree_fully": 2, "first_divergence_positions": [3, 7, 20], "first_divergence_median": 7.0,
    }
    assert agreement([None])["first_divergence_median"] is None


def test_reusable_prefix_is_the_longest_shared_with_any_earlier_prompt() -> None:
    assert reusable_prefix([1, 2, 3, 4], [[1, 2, 9], [1, 2, 3, 8], [5]]) == 3
    assert reusable_prefix([1, 2], [[1, 2, 3]]) == 2  # a prompt wholly inside an earlier one
    assert reusable_prefix([1, 2], []) == 0


def test_prefix_cache_exposure_sees_earlier_prompts_of_the_same_run() -> None:
    head = list(range(20))
    fresh = [head + [100 + i] + list(range(50)) for i in range(3)]  # numbered early: share only the head
    found = prefix_cache_exposure(fresh, [head + [99]], min_tokens=32)
    assert found == {"prompts": 3, "could_hit": 0, "longest_shared_prefix_tokens": 20, "cache_min_tokens": 32}
    repeated = prefix_cache_exposure([fresh[0], fresh[0]], [], min_tokens=32)
    assert repeated["could_hit"] == 1  # the second sees the first


@pytest.mark.parametrize(
    ("before", "others", "expected"),
    [(0.3, 0.1, False), (NOISY_LOAD, NOISY_LOAD, False), (1.5, 0.0, True), (0.2, 1.2, True)],
)
def test_a_run_above_a_load_of_one_is_noisy(before: float, others: float, expected: bool) -> None:
    assert noisy(before, others) is expected


def test_load_window_records_load_and_does_not_count_its_own_cpu() -> None:
    window = LoadWindow()
    sum(i * i for i in range(2_000_000))  # this process's own work
    reading = window.close()
    assert set(reading) == {"load_average_1m_before", "load_average_1m_after", "other_processes_cores", "noisy"}
    assert reading["load_average_1m_before"] >= 0.0
    assert 0.0 <= float(reading["other_processes_cores"]) <= (os.cpu_count() or 1)


def test_spread_over_rounds() -> None:
    figure = spread([3.0, 1.0, 2.0, 5.0, 4.0])
    assert (figure["min"], figure["median"], figure["max"], figure["rounds"]) == (1.0, 3.0, 5.0, 5)
    assert figure["p5"] == pytest.approx(1.2)
    assert figure["p95"] == pytest.approx(4.8)
    assert spread([]) == {}


def test_a_build_without_avx512_is_not_native_on_an_avx512_cpu() -> None:
    flags = cpu_flags(ZEN4_FLAGS)
    assert missing_features(NO_AVX512, flags) == ["AVX512", "AVX512_BF16", "AVX512_VBMI", "AVX512_VNNI"]
    assert missing_features(NATIVE, flags) == []
    assert "OPENMP" in compiled_features(NATIVE)
    assert "AVX512" not in compiled_features("CPU : AVX512 = 0 | AVX2 = 1 |")


@pytest.mark.parametrize(
    ("installed", "builds"),
    [
        ({"cpu_features_missing": []}, False),
        ({"cpu_features_missing": ["AVX512", "AVX512_VNNI"]}, True),  # built with AVX-512 off
        ("llama-cpp-python unusable here (exit 1): No module named 'llama_cpp'", True),
    ],
)
def test_the_bench_builds_the_reference_unless_it_is_native(
    monkeypatch: pytest.MonkeyPatch, installed: dict[str, list[str]] | str, builds: bool
) -> None:
    from bench.generate import reference

    built: list[str] = []
    monkeypatch.setattr(reference, "installed_build", lambda: installed)
    monkeypatch.setattr(reference, "build", lambda cmake_args=reference.NATIVE_CMAKE_ARGS: built.append(cmake_args))
    reference.ensure_native()
    assert built == (["-DGGML_NATIVE=ON"] if builds else [])


def test_the_bandwidth_limit_of_one_stream() -> None:
    """issue 15's own example: 38 GB/s over 86 MB of int4 weights is about 442 tokens/s."""
    from bench.generate.bandwidth import decode_limit, read_bandwidth_gb_s

    limit = decode_limit(38.0, 86_000_000, 221.0)
    assert round(limit["limit_tps"]) == 442 and round(limit["single_decode_fraction_of_limit"], 2) == 0.5
    measured = read_bandwidth_gb_s(threads=2, array_bytes=64 << 20, passes=2)
    assert 0.5 < measured < 2000  # a real read of 64 MiB in GB/s, whatever the machine
