#!/usr/bin/env bash
# The GPU path on a machine with an NVIDIA GPU, in one command (issue 15, item 8):
#   bash bench/gpu.sh                 check the GPU and its driver, install the `gpu` extra in place of the
#                                     CPU onnxruntime packages, build the fp16 CUDA artefact, check that the
#                                     models start on CUDA and agree with the CPU, benchmark generation at
#                                     1, 8, 32 and 64 streams and embeddings on CUDA, write bench/results/gpu.json
#   bash bench/gpu.sh --dry-run       print that plan and what this machine has; needs no GPU, changes nothing
#   bash bench/gpu.sh --install-only  the checks and the install, nothing else
# Environment: VENV (.venv), NVIDIA_SMI (nvidia-smi), STREAMS (1,8,32,64), MAX_NEW (64), EMBED_COUNT (2000);
# PIP_FIND_LINKS=DIR installs from wheels in DIR where the machine cannot reach the package index.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=$VENV/bin/python
NVIDIA_SMI=${NVIDIA_SMI:-nvidia-smi}
STREAMS=${STREAMS:-1,8,32,64}
MAX_NEW=${MAX_NEW:-64}
EMBED_COUNT=${EMBED_COUNT:-2000}
# onnxruntime-gpu 1.31 on PyPI is built for CUDA 13 (it requires nvidia-cuda-runtime~=13.0):
# the driver must support at least that.
MIN_DRIVER_CUDA=13
RESULTS=bench/results/gpu.json
PARTS=bench/results/gpu-parts

mode=run
for arg in "$@"; do
    case $arg in
        --dry-run) mode=dry ;;
        --install-only) mode=install ;;
        -h | --help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "bench/gpu.sh: unknown argument '$arg' (--dry-run, --install-only, --help)" >&2; exit 2 ;;
    esac
done

refuse() {
    echo "bench/gpu.sh: $*" >&2
    exit 1
}

# Reading pyproject.toml needs Python 3.11 (tomllib): the venv's, or this machine's for a dry run.
toml_python=$PYTHON
[[ -x $toml_python ]] || toml_python=python3

requirements() { # pyproject.toml's dependencies ("" for the runtime ones) or an extra's, one a line
    "$toml_python" -c 'import sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
print("\n".join(project["dependencies"] if not sys.argv[1] else project["optional-dependencies"][sys.argv[1]]))' "$1"
}

mapfile -t GPU_PACKAGES < <(requirements gpu)
# The CPU packages the GPU ones replace (both install the modules onnxruntime and onnxruntime_genai).
mapfile -t CPU_PACKAGES < <(requirements "" | grep -E '^onnxruntime(-genai)?==')
CPU_NAMES=("${CPU_PACKAGES[@]%%==*}")
GPU_NAMES=("${GPU_PACKAGES[@]%%[[=]*}")
# bench.embed's reference (the bench extra's other package, llama-cpp-python, is for the CPU comparison).
mapfile -t EMBED_REFERENCE < <(requirements bench | grep -E '^sentence-transformers')

run() { # description, command...: run it, or print it in a dry run
    local what=$1
    shift
    if [[ $mode == dry ]]; then
        local shown=() word
        for word in "$@"; do
            if [[ $word =~ ^[A-Za-z0-9_./=:,@+-]+$ ]]; then shown+=("$word"); else shown+=("$(printf '%q' "$word")"); fi
        done
        printf '  - %s:\n      %s\n' "$what" "${shown[*]}"
    else
        echo "== $what"
        "$@"
    fi
}

# 1. The GPU and its driver.
check_gpu() {
    local header
    if ! command -v "$NVIDIA_SMI" >/dev/null 2>&1; then
        echo "no $NVIDIA_SMI on PATH: this machine has no NVIDIA driver (and so no usable NVIDIA GPU); run it on a machine with an NVIDIA GPU and its driver"
        return 1
    fi
    if ! header=$("$NVIDIA_SMI" 2>&1); then
        echo "$NVIDIA_SMI failed, so the driver sees no GPU: ${header//$'\n'/ }"
        return 1
    fi
    local cuda
    cuda=$(sed -n 's/.*CUDA Version: *\([0-9][0-9]*\)\..*/\1/p' <<<"$header" | head -n1)
    if [[ -z $cuda || $cuda -lt $MIN_DRIVER_CUDA ]]; then
        echo "the NVIDIA driver supports CUDA ${cuda:-(unknown)}, and the onnxruntime-gpu of the gpu extra needs CUDA $MIN_DRIVER_CUDA or newer: update the driver"
        return 1
    fi
    "$NVIDIA_SMI" --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -n1 | sed "s/^/GPU: /;s/$/ (driver CUDA $cuda)/"
}

# 2. onnxruntime's providers: the CPU package has no CUDAExecutionProvider.
cuda_provider_state() {
    if [[ ! -x $PYTHON ]]; then
        echo "no virtual environment at $VENV"
        return 1
    fi
    "$PYTHON" -c 'import sys, onnxruntime as ort, onnxruntime_genai as og
providers = ort.get_available_providers()
genai_cuda = og.is_cuda_available()
listed = ", ".join(providers)
print(f"onnxruntime {ort.__version__}: {listed}; onnxruntime-genai {og.__version__}: CUDA {genai_cuda}")
ok = "CUDAExecutionProvider" in providers and genai_cuda
sys.exit(0 if ok else 1)'
}

if [[ $mode == dry ]]; then
    echo "bench/gpu.sh plan (dry run: the plan and what this machine has; nothing is installed, built or run)"
    echo "  - check the GPU: $NVIDIA_SMI runs and its driver supports CUDA >= $MIN_DRIVER_CUDA"
    echo "      here: $(check_gpu 2>&1 || true)"
    echo "  - check onnxruntime's providers for CUDAExecutionProvider (and onnxruntime-genai for CUDA)"
    echo "      here: $(cuda_provider_state 2>&1 || true)"
    echo "  - when they lack CUDA, replace the CPU packages (${CPU_PACKAGES[*]}) with the gpu extra's:"
else
    gpu=$(check_gpu) || refuse "$gpu"
    echo "$gpu"
    [[ -x $PYTHON ]] || refuse "no virtual environment at $VENV: \`make install\` creates it (VENV=DIR names another)"
fi

if [[ $mode == dry ]] || ! state=$(cuda_provider_state 2>&1); then
    [[ $mode == dry ]] || echo "installing the gpu extra: ${state:-}"
    # Both sets go first: a CPU package installed over a GPU one (`make install` after pyproject.toml
    # changed) leaves its files in the GPU one's place, which pip would then call installed.
    run "remove the onnxruntime packages" "$PYTHON" -m pip uninstall --yes "${CPU_NAMES[@]}" "${GPU_NAMES[@]}"
    run "install the gpu extra (pyproject.toml)" "$PYTHON" -m pip install "${GPU_PACKAGES[@]}"
    if [[ $mode != dry ]]; then
        state=$(cuda_provider_state 2>&1) || refuse "after installing the gpu extra onnxruntime still has no CUDA: $state
(was the install offline? PIP_FIND_LINKS=DIR installs from a folder of wheels)"
    fi
fi
[[ $mode == dry ]] || echo "$state"
[[ $mode == dry ]] || echo "to go back to the CPU packages: $PYTHON -m pip uninstall --yes ${GPU_NAMES[*]} && $PYTHON -m pip install ${CPU_PACKAGES[*]}"
[[ $mode == install ]] && exit 0

if [[ $mode == dry ]] || ! "$PYTHON" -c 'import sentence_transformers' 2>/dev/null; then
    run "install bench.embed's reference" "$PYTHON" -m pip install "${EMBED_REFERENCE[@]}"
fi

# 3. The artefacts: the defaults where missing, and SmolLM2 fp16 for CUDA (smoke-tested with onnxruntime-genai on CUDA).
run "build the fp16 CUDA artefact" "$VENV/bin/llmos" models build --cuda
# 4. The models start on CUDA, and the decoder with its KV cache in GPU memory agrees with the CPU.
[[ $mode == dry ]] || mkdir -p "$PARTS"
run "check the models on CUDA against the CPU" "$PYTHON" -m bench.gpu_check --out "$PARTS/check.json"
# 5. The benchmarks, through the inference service with LLMOS_INFERENCE_DEVICE=cuda.
run "generation at $STREAMS concurrent streams" \
    "$PYTHON" -m bench.generate.streams --device cuda --streams "$STREAMS" --max-new "$MAX_NEW" --out "$PARTS/generate.json"
run "embeddings" "$PYTHON" -m bench.embed --device cuda --count "$EMBED_COUNT" --results gpu-parts/embed
run "write $RESULTS" "$PYTHON" -m bench.gpu_report --generate "$PARTS/generate.json" --embed "$PARTS/embed.json" --check "$PARTS/check.json" --out "$RESULTS"
[[ $mode == dry ]] || rm -rf "$PARTS"
