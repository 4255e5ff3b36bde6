"""bench/gpu.sh (issue 15, item 8), as far as a machine without an NVIDIA GPU can run it: its
syntax, its dry-run plan, its refusals (no nvidia-smi, a driver too old), and gpu.json's shape.

Every run that is not a dry run points VENV at a folder without Python, so a script that failed
to refuse could not install anything here."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from bench.gpu_report import parse_gpu_info, report

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "gpu.sh"
SMI_HEADER = """+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 580.65.06              Driver Version: 580.65.06      CUDA Version: {cuda}     |
|-----------------------------------------+------------------------+----------------------+"""


def gpu_sh(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, env={"PATH": "/usr/bin:/bin", **env},
                          capture_output=True, text=True, timeout=120)


def fake_nvidia_smi(folder: Path, cuda: str) -> Path:
    """An nvidia-smi that answers like a driver supporting CUDA `cuda` with one H100."""
    path = folder / "nvidia-smi"
    header = SMI_HEADER.format(cuda=cuda)
    path.write_text(f"""#!/bin/bash
case $1 in
    --query-gpu=name,driver_version,memory.total) echo "NVIDIA H100 80GB HBM3, 580.65.06, 81559 MiB"; exit 0 ;;
    --query-gpu=*) echo "NVIDIA H100 80GB HBM3, 580.65.06, 81559 MiB, 9.0"; exit 0 ;;
esac
cat <<'EOF'
{header}
EOF
""")
    path.chmod(0o755)
    return path


def test_the_script_parses() -> None:
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True).returncode == 0


def test_the_dry_run_prints_every_step_and_what_this_machine_lacks(tmp_path: Path) -> None:
    result = gpu_sh("--dry-run", env={"NVIDIA_SMI": str(tmp_path / "nvidia-smi")})
    assert result.returncode == 0, result.stderr
    plan = result.stdout
    steps = [
        f"here: no {tmp_path / 'nvidia-smi'} on PATH",
        "check onnxruntime's providers for CUDAExecutionProvider",
        "pip uninstall --yes onnxruntime onnxruntime-genai onnxruntime-gpu onnxruntime-genai-cuda",
        "pip install onnxruntime-gpu",
        "onnxruntime-genai-cuda==0.18.0",
        "llmos models build --cuda",
        "-m bench.gpu_check --out bench/results/gpu-parts/check.json",
        "-m bench.generate.streams --device cuda --streams 1,8,32,64 --max-new 64",
        "-m bench.embed --device cuda --count 2000 --results gpu-parts/embed",
        "-m bench.gpu_report",
        "--out bench/results/gpu.json",
    ]
    positions = [plan.find(step) for step in steps]
    assert -1 not in positions, [step for step, at in zip(steps, positions, strict=True) if at == -1]
    assert positions == sorted(positions)  # in the order they run
    assert not (REPO / "bench" / "results" / "gpu-parts").exists()


def test_the_dry_run_reads_the_gpu_extra_from_pyproject(tmp_path: Path) -> None:
    import tomllib

    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    plan = gpu_sh("--dry-run", "--help", env={"NVIDIA_SMI": str(tmp_path / "nvidia-smi")})
    assert plan.returncode == 0 and "--dry-run" in plan.stdout  # --help wins and prints the usage
    plan = gpu_sh("--dry-run", env={"NVIDIA_SMI": str(tmp_path / "nvidia-smi"), "STREAMS": "1,2"})
    for requirement in extra:
        assert requirement.split("[")[0].split("==")[0] in plan.stdout and requirement.split("==")[1] in plan.stdout
    assert "--streams 1,2" in plan.stdout


def test_without_nvidia_smi_it_refuses_before_installing_anything(tmp_path: Path) -> None:
    result = gpu_sh(env={"NVIDIA_SMI": str(tmp_path / "nvidia-smi"), "VENV": str(tmp_path / "no-venv")})
    assert result.returncode == 1
    assert result.stderr.startswith(f"bench/gpu.sh: no {tmp_path / 'nvidia-smi'} on PATH: this machine has no NVIDIA driver")
    assert "run it on a machine with an NVIDIA GPU and its driver" in result.stderr
    assert "==" not in result.stdout  # no step started


def test_a_driver_too_old_for_cuda_13_is_refused(tmp_path: Path) -> None:
    smi = fake_nvidia_smi(tmp_path, "12.4")
    result = gpu_sh(env={"NVIDIA_SMI": str(smi), "VENV": str(tmp_path / "no-venv")})
    assert result.returncode == 1
    assert "the NVIDIA driver supports CUDA 12, and the onnxruntime-gpu of the gpu extra needs CUDA 13 or newer" in result.stderr


def test_with_a_gpu_it_goes_on_to_onnxruntimes_providers(tmp_path: Path) -> None:
    smi = fake_nvidia_smi(tmp_path, "13.0")
    result = gpu_sh("--install-only", env={"NVIDIA_SMI": str(smi), "VENV": str(tmp_path / "no-venv")})
    assert "GPU: NVIDIA H100 80GB HBM3, 580.65.06, 81559 MiB (driver CUDA 13)" in result.stdout
    # The next check finds no virtual environment to install into.
    assert result.stderr == f"bench/gpu.sh: no virtual environment at {tmp_path / 'no-venv'}: `make install` creates it (VENV=DIR names another)\n"
    assert result.returncode == 1


def test_gpu_json_holds_the_device_versions_streams_and_embeddings() -> None:
    gpu = parse_gpu_info("NVIDIA H100 80GB HBM3, 580.65.06, 81559 MiB, 9.0\n", SMI_HEADER.format(cuda="13.0"))
    assert gpu == {"name": "NVIDIA H100 80GB HBM3", "driver": "580.65.06", "driver_cuda": "13.0",
                   "memory": "81559 MiB", "compute_capability": "9.0"}
    stream = {"aggregate_tokens_per_s": 900.0, "ttft_ms_p50": 9.0, "ttft_ms_p95": 12.0, "stream_decode_tokens_per_s_median": 400.0}
    generate = {"model": {"name": "smollm2-135m-instruct", "variant": "cuda-fp16", "execution_provider": "CUDAExecutionProvider"},
                "max_new_tokens": 64, "load": {}, "streams": {"1": stream, "64": {**stream, "aggregate_tokens_per_s": 9000.0}}}
    embed = {"texts": 2000, "direct_providers": ["CUDAExecutionProvider", "CPUExecutionProvider"], "served_sentences_per_s": 3000.0,
             "direct_sentences_per_s": 4000.0, "reference_sentences_per_s": 2500.0, "reference_device": "cuda",
             "served_min_cosine": 0.9999}
    results = report(gpu, {"greedy_agreement_with_cpu": 1.0}, generate, embed, {"onnxruntime-gpu": "1.31.1"})
    assert results["gpu"]["name"] == "NVIDIA H100 80GB HBM3" and results["versions"] == {"onnxruntime-gpu": "1.31.1"}
    assert results["generation"]["model"]["variant"] == "cuda-fp16"
    assert results["generation"]["streams"]["64"] == {"tokens_per_s": 9000.0, "ttft_ms_p50": 9.0, "ttft_ms_p95": 12.0,
                                                      "stream_decode_tokens_per_s": 400.0}
    assert results["embedding"]["served_sentences_per_s"] == 3000.0 and results["check"]["greedy_agreement_with_cpu"] == 1.0
