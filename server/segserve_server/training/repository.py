"""A model of a repository, found for the offline tools (`segserve eval`, `quantize`,
`flip-average`, `build-engine`): the folder, the model and its config checked, each failure
raised as the calling tool's own error type with the same message."""

from __future__ import annotations

from pathlib import Path

from segserve_server.model_repository import ModelConfig, RepositoryEntry, scan_repository

__all__ = ["ONNX_PLATFORMS", "QUANTIZATION_REPORT", "repository_entry"]

ONNX_PLATFORMS = ("onnxruntime_onnx", "onnxruntime")
"""config.pbtxt platforms of ONNX models."""

QUANTIZATION_REPORT = "quantization.json"
"""What `segserve quantize` writes in a version folder it made (build-engine reads it)."""


def repository_entry(
    repository: Path, model: str, error: type[Exception]
) -> tuple[RepositoryEntry, ModelConfig]:
    """Model `model` of `repository` and its valid config; `error` naming what is wrong."""
    if not repository.is_dir():
        raise error(f"model repository {str(repository)!r} is not a folder")
    entries = {e.name: e for e in scan_repository(repository)}
    entry = entries.get(model)
    if entry is None:
        raise error(
            f"model {model!r} is not in {repository} (models: {', '.join(sorted(entries))})"
        )
    if entry.config is None or entry.error:
        raise error(f"model {model!r} is invalid: {entry.error}")
    return entry, entry.config
