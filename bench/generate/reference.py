"""llama.cpp (llama-cpp-python, the same GGUF) as the generation benchmark's reference, built for
the CPU it runs on, in a child process the benchmark drives one generation at a time.

The child loads the model once and answers JSON lines on stdin/stdout: each request gives prompt
token ids (the platform's own tokenizer made them, so both engines read the same tokens) and a
token budget; the answer is the time to the first token, the total time and the greedy token ids.
A child keeps the model warm between rounds, so the benchmark can alternate the two engines; it is
a child so that a build for other CPU features (SIGILL) costs the reference, not the run.

Build (`python -m bench.generate.reference --build`): llama-cpp-python from source with
`GGML_NATIVE=ON` (-march=native: every instruction set /proc/cpuinfo lists, AVX-512 and VNNI
included), the CMake flags recorded beside the models; `build_info` reports them with the
instruction sets the library says it was compiled with and those of this CPU it lacks.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from bench.common import REPO

LLAMA_CPP_VERSION = "0.3.36"
NATIVE_CMAKE_ARGS = "-DGGML_NATIVE=ON"
# llama-cpp-python 0.3.36's requirements (its pyproject.toml).
LLAMA_CPP_DEPENDENCIES = ("typing-extensions>=4.5.0", "numpy>=1.20.0", "diskcache>=5.6.1", "jinja2>=2.11.3")
BUILD_RECORD = REPO / ".llmos" / "bench" / "llama-cpp-build.json"
# ggml's name for an instruction set (llama_print_system_info) -> the /proc/cpuinfo flag.
CPU_FEATURES = {
    "SSE3": "pni", "SSSE3": "ssse3", "AVX": "avx", "AVX2": "avx2", "F16C": "f16c", "FMA": "fma", "BMI2": "bmi2",
    "AVX_VNNI": "avx_vnni", "AVX512": "avx512f", "AVX512_VBMI": "avx512vbmi", "AVX512_VNNI": "avx512_vnni",
    "AVX512_BF16": "avx512_bf16", "AMX_INT8": "amx_int8",
}


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    text = Path("/proc/cpuinfo").read_text(encoding="utf-8") if cpuinfo is None else cpuinfo
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def compiled_features(system_info: str) -> set[str]:
    """The instruction sets a llama.cpp build says it uses (`NAME = 1` in its system info)."""
    return {name for name, value in re.findall(r"([A-Z0-9_]+) = (\d+)", system_info) if value == "1"}


def missing_features(system_info: str, flags: set[str]) -> list[str]:
    """Instruction sets this CPU has that the build does not use: not built for this CPU."""
    used = compiled_features(system_info)
    return sorted(name for name, flag in CPU_FEATURES.items() if flag in flags and name not in used)


def build_info() -> dict[str, Any]:
    """What the installed llama-cpp-python is: version, the CMake flags it was built with (when this
    module built it), the instruction sets it uses and those of this CPU it lacks."""
    import llama_cpp

    system_info = llama_cpp.llama_print_system_info().decode()
    recorded = json.loads(BUILD_RECORD.read_text(encoding="utf-8")) if BUILD_RECORD.is_file() else {}
    same = recorded.get("version") == llama_cpp.__version__
    return {
        "llama_cpp_python": llama_cpp.__version__,
        "cmake_args": recorded.get("cmake_args") if same else "unknown (not built by python -m bench.generate.reference --build)",
        "system_info": system_info.strip(),
        "cpu_features_missing": missing_features(system_info, cpu_flags()),
    }


def build(cmake_args: str = NATIVE_CMAKE_ARGS) -> None:
    """Build and install llama-cpp-python from source for this CPU; record the flags."""
    env = {**os.environ, "CMAKE_ARGS": cmake_args, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 1)}
    print(f"building llama-cpp-python {LLAMA_CPP_VERSION} with CMAKE_ARGS={cmake_args!r} (minutes on a few cores) …")
    # Its dependencies as they are (a forced reinstall would rebuild numpy & co. too), then it.
    subprocess.run([sys.executable, "-m", "pip", "install", *LLAMA_CPP_DEPENDENCIES], check=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--force-reinstall", "--no-cache-dir",
         "--no-binary", "llama-cpp-python", f"llama-cpp-python=={LLAMA_CPP_VERSION}"],
        env=env, check=True,
    )
    record_build(cmake_args)


def record_build(cmake_args: str) -> None:
    """Note the CMake flags the installed llama-cpp-python was built with (build_info reports them)."""
    BUILD_RECORD.parent.mkdir(parents=True, exist_ok=True)
    BUILD_RECORD.write_text(json.dumps({"version": LLAMA_CPP_VERSION, "cmake_args": cmake_args}) + "\n", encoding="utf-8")


class ReferenceUnavailable(RuntimeError):
    """The child died (e.g. SIGILL: built for other CPU features) or llama-cpp-python is missing."""


class Reference:
    """The parent's side: starts the child, asks it for generations."""

    def __init__(self, model: Path, threads: int, omp_wait_policy: str = "") -> None:
        # A file, not a pipe: a chatty library must not fill a pipe nobody reads and stall the child.
        self._stderr = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed in close())
        env = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
        if omp_wait_policy:
            env["OMP_WAIT_POLICY"] = omp_wait_policy
        self._child = subprocess.Popen(
            [sys.executable, "-m", "bench.generate.reference", "--serve", "--model", str(model), "--threads", str(threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True, cwd=REPO, env=env,
        )
        self.pid = self._child.pid
        self.info: dict[str, Any] = self._read()

    def _read(self) -> dict[str, Any]:
        assert self._child.stdout is not None
        for line in self._child.stdout:
            if line.startswith("{"):  # anything else is the library talking
                return dict(json.loads(line))
        code = self._child.wait()
        self._stderr.seek(0)
        stderr = self._stderr.read()
        raise ReferenceUnavailable(f"llama.cpp reference exited with {code}: {stderr.strip()[-400:]}")

    def generate(self, prompt_ids: Sequence[int], max_new: int, reset: bool = False) -> dict[str, Any]:
        """Time to first token (s), total (s) and greedy token ids; `reset` drops its prompt cache first."""
        assert self._child.stdin is not None
        try:
            self._child.stdin.write(json.dumps({"ids": list(prompt_ids), "max_new": max_new, "reset": reset}) + "\n")
            self._child.stdin.flush()
        except BrokenPipeError:
            pass  # _read reports how the child ended
        return self._read()

    def probe(self, prompt_ids: Sequence[int], platform_token: int, reference_token: int) -> dict[str, Any]:
        """At a first divergence: llama.cpp's logits after `prompt_ids` (the prompt and the tokens
        both engines chose), for its own token and the platform's, and the platform's token's rank."""
        assert self._child.stdin is not None
        self._child.stdin.write(json.dumps({"probe": list(prompt_ids), "tokens": [platform_token, reference_token]}) + "\n")
        self._child.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self._child.stdin:
            self._child.stdin.close()
        try:
            self._child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._child.kill()
            self._child.wait()
        self._stderr.close()


def serve(model: Path, threads: int, requests: IO[str], answers: IO[str]) -> None:
    """The child's side: loads the GGUF, then one generation per request line."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(model), n_threads=threads, n_threads_batch=threads, n_ctx=2048, verbose=False)
    vocab = llm._model.vocab  # llama-cpp-python exposes end-of-generation only here

    def answer(message: dict[str, Any]) -> None:
        answers.write(json.dumps(message) + "\n")
        answers.flush()

    answer({"ready": True, **build_info()})
    for line in requests:
        request = json.loads(line)
        if "probe" in request:
            llm.reset()
            llm.eval(request["probe"])
            logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
            ours, theirs = (float(logits[token]) for token in request["tokens"])
            answer({"platform_logit": ours, "reference_logit": theirs, "platform_token_rank": int((logits > ours).sum())})
            continue
        if request["reset"]:
            llm.reset()
        tokens: list[int] = []
        started = time.perf_counter()
        first = 0.0
        # Greedy (temperature 0), no repetition penalty: what the platform does with default sampling.
        for token in llm.generate(request["ids"], temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                break
            if not first:
                first = time.perf_counter() - started
            tokens.append(int(token))
            if len(tokens) >= request["max_new"]:
                break
        answer({"ttft_s": first, "total_s": time.perf_counter() - started, "tokens": tokens})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.generate.reference", description=__doc__.splitlines()[0])
    parser.add_argument("--build", action="store_true", help="build llama-cpp-python for this CPU, then print what it uses")
    parser.add_argument("--cmake-args", default=NATIVE_CMAKE_ARGS, help="with --build: CMAKE_ARGS for the build")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.model, args.threads, sys.stdin, sys.stdout)
        return 0
    if args.build:
        build(args.cmake_args)
    installed = installed_build()
    print(json.dumps(installed, indent=2) if isinstance(installed, dict) else installed)
    return 0 if isinstance(installed, dict) else 1


def installed_build() -> dict[str, Any] | str:
    """build_info of the installed llama-cpp-python, or why it cannot be used. Asked in a fresh
    process: a library built for other CPU features dies there (SIGILL), not in the caller."""
    report = "import json; from bench.generate.reference import build_info; print(json.dumps(build_info()))"
    child = subprocess.run([sys.executable, "-c", report], cwd=REPO, capture_output=True, text=True, check=False)
    if child.returncode != 0:
        return f"llama-cpp-python unusable here (exit {child.returncode}): {child.stderr.strip()[-400:]}"
    return dict(json.loads(child.stdout.strip().splitlines()[-1]))


def ensure_native() -> dict[str, Any] | str:
    """Build llama-cpp-python for this CPU unless the installed one already uses every instruction
    set of this CPU that ggml can; what is installed then (build_info, or why it is unusable)."""
    installed = installed_build()
    if isinstance(installed, dict) and not installed["cpu_features_missing"]:
        return installed
    print(f"llama.cpp reference not built for this CPU ({installed if isinstance(installed, str) else installed['cpu_features_missing']})")
    try:
        build()
    except subprocess.CalledProcessError as exc:
        return f"building llama-cpp-python for this CPU failed (exit {exc.returncode}); see pip's output above"
    return installed_build()


if __name__ == "__main__":
    raise SystemExit(main())
