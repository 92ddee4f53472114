"""The `segserve.*` parameters of a model's config.pbtxt, read and checked: the strings of
`parameters`, per-channel numbers, class colours, the pipeline and device, tiling, and flip
averaging. `model_repository.parse_config` assembles them into a ModelConfig."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from segserve_server.errors import ModelConfigError

__all__ = [
    "PIPELINES",
    "TilingConfig",
    "colors",
    "default_palette",
    "flip_average",
    "flip_average_filename",
    "floats",
    "parameter",
    "pipeline_and_device",
    "tiling",
]

PIPELINES = ("host", "device")


@dataclass(frozen=True)
class TilingConfig:
    """segserve.tiling*: whether images larger than the input are cut into tiles, and how."""

    enabled: bool = False
    overlap_px: int = 32
    scale: float = 1.0
    blend: str = "auto"  # or "centre"


def parameter(raw: mc.ModelConfig, key: str) -> str | None:
    """The string value of parameter `key`, or None when the config has none."""
    if key in raw.parameters:
        value: str = raw.parameters[key].string_value
        return value
    return None


def floats(
    raw: mc.ModelConfig, key: str, default: tuple[float, float, float]
) -> tuple[float, float, float]:
    """Parameter `key` as three comma-separated numbers (one per channel), else `default`."""
    text = parameter(raw, key)
    if text is None:
        return default
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError as exc:
        raise ModelConfigError(
            f"parameter {key} = {text!r} is not comma-separated numbers"
        ) from exc
    if len(values) != 3:
        raise ModelConfigError(f"parameter {key} = {text!r} needs 3 values, one per channel")
    return values[0], values[1], values[2]


def colors(raw: mc.ModelConfig, count: int) -> list[tuple[int, int, int]]:
    """segserve.colors, one R,G,B per class, else `default_palette`."""
    text = parameter(raw, "segserve.colors")
    if text is None:
        return default_palette(count)
    colors: list[tuple[int, int, int]] = []
    for item in text.split(";"):
        parts = [p.strip() for p in item.split(",")]
        if len(parts) != 3 or not all(p.isdigit() and int(p) <= 255 for p in parts):
            raise ModelConfigError(f"segserve.colors entry {item!r} is not R,G,B in 0..255")
        colors.append((int(parts[0]), int(parts[1]), int(parts[2])))
    if len(colors) != count:
        raise ModelConfigError(f"segserve.colors has {len(colors)} colours for {count} classes")
    return colors


def flip_average_filename(model_filename: str) -> str:
    """The file of a version's flip-averaging variant: model.onnx -> model.flip.onnx."""
    path = Path(model_filename)
    return f"{path.stem}.flip{path.suffix}"


def flip_average(raw: mc.ModelConfig) -> bool:
    """segserve.flip_average, checked (it runs in segserve's onnxruntime backend only)."""
    text = parameter(raw, "segserve.flip_average")
    if text is None or text.strip().lower() in ("false", "0", "no", ""):
        return False
    if text.strip().lower() not in ("true", "1", "yes"):
        raise ModelConfigError(f"segserve.flip_average {text[:40]!r} is not true or false")
    if (parameter(raw, "segserve.backend") or "onnxruntime") != "onnxruntime":
        raise ModelConfigError(
            "segserve.flip_average runs in segserve's onnxruntime backend, not segserve.backend "
            f"{parameter(raw, 'segserve.backend')!r}"
        )
    return True


def default_palette(count: int) -> list[tuple[int, int, int]]:
    """Distinct colours for models that name none (the Pascal VOC bit-interleaving scheme)."""
    palette = []
    for index in range(count):
        r = g = b = 0
        value = index
        for bit in range(8):
            r |= ((value >> 0) & 1) << (7 - bit)
            g |= ((value >> 1) & 1) << (7 - bit)
            b |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        palette.append((r, g, b))
    return palette


def tiling(raw: mc.ModelConfig, pipeline: str, height: int, width: int) -> TilingConfig:
    """segserve.tiling and its parameters, checked: the overlap below half the shorter side."""
    mode = (parameter(raw, "segserve.tiling") or "off").strip().lower()
    if mode not in ("on", "off"):
        raise ModelConfigError(f'segserve.tiling {mode[:40]!r} is not "on" or "off"')
    overlap, scale = (
        parameter(raw, "segserve.tile_overlap_px"),
        parameter(raw, "segserve.tile_scale"),
    )
    blend = (parameter(raw, "segserve.tile_blend") or "auto").strip().lower()
    try:
        config = TilingConfig(
            mode == "on",
            int(overlap or min(32, min(height, width) // 4)),
            float(scale or 1.0),
            blend,
        )
    except ValueError as exc:
        raise ModelConfigError(
            f"segserve.tile_overlap_px {str(overlap)[:40]!r} or segserve.tile_scale "
            f"{str(scale)[:40]!r} is not a number"
        ) from exc
    if not 0 <= config.overlap_px < min(height, width) // 2:
        raise ModelConfigError(
            f"segserve.tile_overlap_px {config.overlap_px} is outside 0..{min(height, width) // 2 - 1}"
            f" (below half the input's shorter side, {min(height, width)})"
        )
    if not 0.05 <= config.scale <= 64:
        raise ModelConfigError(f"segserve.tile_scale {config.scale:g} is outside 0.05..64")
    if blend not in ("auto", "centre"):
        raise ModelConfigError(f'segserve.tile_blend {blend[:40]!r} is not "auto" or "centre"')
    if config.enabled and pipeline != "host":
        raise ModelConfigError('segserve.tiling "on" runs on segserve.pipeline "host" only')
    return config


def pipeline_and_device(raw: mc.ModelConfig) -> tuple[str, str]:
    """segserve.pipeline and segserve.device, checked (the device's existence is checked when
    the model loads, where torch is imported)."""
    pipeline = (parameter(raw, "segserve.pipeline") or "host").strip().lower()
    if pipeline not in PIPELINES:
        raise ModelConfigError(f"segserve.pipeline {pipeline[:40]!r} is not one of {PIPELINES}")
    device = (parameter(raw, "segserve.device") or "cuda:0").strip().lower()
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda") or (index and (kind == "cpu" or not index.isdigit())):
        raise ModelConfigError(f'segserve.device {device[:40]!r} is not "cpu", "cuda" or "cuda:N"')
    return pipeline, "cuda:0" if device == "cuda" else device
