"""Server settings: command-line flags over SEGSERVE_* environment variables over a TOML file.

`Settings` is the one source of truth: each field's type, default, bounds and docstring make its
environment variable, its TOML key and its `segserve serve` flag (the CLI builds its flags from
the fields, `cli_flags`), so none of them is written twice.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from segserve_server.cpus import available_cpus

__all__ = ["MIB", "Settings", "check_url", "load_settings"]

MIB = 1024 * 1024
_URL = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")


def check_url(url: str) -> str:
    """A Triton gRPC address as tritonclient takes it: host:port (no scheme), [v6]:port."""
    url = url.strip()
    match = _URL.match(url)
    if match is None or not 0 < int(match.group(2)) < 65536:
        raise ValueError(f"Triton URL {url!r} is not host:port (the server's gRPC port, no scheme)")
    return url


class Settings(BaseSettings):
    """Everything `segserve serve` can be told. Each field is also SEGSERVE_<FIELD_NAME>."""

    model_config = SettingsConfigDict(
        env_prefix="SEGSERVE_",
        extra="forbid",
        env_parse_none_str="off",
        use_attribute_docstrings=True,
    )

    model_repository: Path = Path("model_repository")
    """The Triton-style model repository to serve (one folder per model)."""

    host: str = "0.0.0.0"
    """Address the gRPC and metrics servers bind to."""

    port: int = Field(50051, ge=0, le=65535)
    """gRPC port of the segserve.v1 API, health and reflection; 0 picks a free port."""

    metrics_port: int | None = Field(9464, ge=0, le=65535)
    """Port of the Prometheus /metrics HTTP endpoint; 0 picks a free port; "off" disables it."""

    kserve_port: int | None = Field(8001, ge=0, le=65535)
    """gRPC port of the KServe v2 / Triton protocol (inference.GRPCInferenceService, as Triton's
    own 8001): every model with raw tensors, and `<model>.image` with encoded images. 0 picks a
    free port; "off" disables it."""

    kserve_max_images_per_request: int = Field(64, ge=1)
    """Most images one KServe `<model>.image` request may carry (its IMAGE_BYTES batch)."""

    max_receive_message_bytes: int = Field(64 * MIB, ge=MIB)
    """Largest request message accepted; larger ones get RESOURCE_EXHAUSTED (a 4K PNG fits)."""

    max_send_message_bytes: int = Field(64 * MIB, ge=MIB)
    """Largest response message sent."""

    max_image_pixels: int = Field(40_000_000, ge=1)
    """Images with more pixels (width * height) are refused before decoding."""

    max_image_side: int = Field(16384, ge=1, le=65535)
    """Images wider or taller than this are refused before decoding."""

    worker_threads: int = Field(default_factory=available_cpus, ge=1)
    """Threads that decode, preprocess, postprocess and encode (they release the GIL); default:
    the cores this process may use (affinity, capped by a container's CPU quota)."""

    ort_intra_op_threads: int = Field(0, ge=0)
    """ONNX Runtime intra-op threads per model instance. 0 (the default): on the CPU, one
    single-threaded lane per core, one image each, and a lone request on all cores; elsewhere
    ONNX Runtime's own choice. A number: one session of that many threads, the config's batching."""

    ort_providers: Annotated[list[str] | None, NoDecode] = Field(
        None, json_schema_extra={"flag": "ort-provider"}
    )
    """ONNX Runtime execution providers to use, overriding each model's config.pbtxt choice."""

    jpeg_dct_scaling: bool = True
    """Decode JPEGs at a reduced DCT scale when the model's input is smaller than the image."""

    png_compression_level: int = Field(1, ge=0, le=9)
    """zlib level of PNG and SRLE masks: 1 is fastest and already small for label maps."""

    stream_max_inflight_frames: int = Field(4, ge=1)
    """Frames of one stream processed at once. QUEUE frames hold their place until their answer
    is sent, so further frames wait to be read (flow control); LATEST frames give it back once
    answered, and a frame that finds no place waits in a one-frame mailbox, where a newer frame
    replaces it (DROPPED)."""

    stream_max_unsent_answers: int = Field(64, ge=1)
    """Frames of one stream read and not yet answered to the client (LATEST streams: mostly
    small DROPPED answers); past it the server stops reading, so a client that stops reading
    cannot grow server memory."""

    stream_deadline_margin_s: float = Field(0.1, ge=0)
    """A stream with a gRPC deadline stops reading frames this long before it passes and
    answers every frame read (unfinished ones DEADLINE_EXCEEDED) while it can still send."""

    default_backend: Literal["onnxruntime", "triton"] = "onnxruntime"
    """Backend of the models whose config.pbtxt names none (parameters segserve.backend):
    ONNX Runtime in-process, or the Triton servers of triton_urls."""

    triton_urls: Annotated[list[str], NoDecode] = Field(
        default_factory=list, json_schema_extra={"flag": "triton-url"}
    )
    """Triton servers (host:port of their gRPC endpoint) that run the models on the Triton backend
    unless a model lists its own in parameters segserve.triton_urls. The flag repeats; the
    environment variable takes a comma-separated list."""

    triton_inflight_batches_per_server: int = Field(2, ge=1)
    """Batches of one model sent at once to each Triton server (more hide the network round trip)."""

    triton_timeout_s: float = Field(30.0, gt=0)
    """Longest wait for one batch on a Triton server; past it the server is ejected and the batch
    is retried on another. A batch whose requests have less time left is sent with that time
    instead, and its deadline passing is never the server's fault (no ejection, no retry)."""

    triton_health_interval_s: float = Field(1.0, gt=0)
    """How often an ejected Triton server is probed (server ready and model ready) to readmit it."""

    triton_startup_timeout_s: float = Field(30.0, ge=0)
    """At start, how long a Triton-backed model waits for its first ready server before it is
    reported FAILED."""

    drain_timeout_s: float = Field(30.0, gt=0)
    """On SIGTERM/SIGINT, how long accepted requests get to finish before the server exits."""

    repository_poll_interval_s: float | None = Field(None, gt=0)
    """How often the model repository is scanned for added, changed and removed models and
    versions, which are then loaded or unloaded while the server runs (Triton's
    --model-control-mode=poll). "off" (the default): the repository is read at start, and after
    that only the explicit load and unload calls change what is served."""

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Logging level."""

    log_format: Literal["text", "json"] = "text"
    """Log lines as text, or as one JSON object per line (time, level, logger, message, and the
    exception's traceback) for log collectors."""

    @field_validator("model_repository")
    @classmethod
    def _repository_exists(cls, value: Path) -> Path:
        if not value.is_dir():
            raise ValueError(f"model repository {str(value)!r} is not a directory")
        return value

    @field_validator("ort_providers", "triton_urls", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        """Lists from the environment or a flag come as "a,b,c"."""
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("triton_urls")
    @classmethod
    def _check_urls(cls, value: list[str]) -> list[str]:
        return [check_url(url) for url in value]

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_log_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if settings_cls.model_config.get("toml_file"):
            sources.append(TomlConfigSettingsSource(settings_cls))
        return tuple(sources)


def load_settings(config_file: Path | None = None, **overrides: object) -> Settings:
    """Builds settings from `overrides` (flags), then the environment, then `config_file`.

    Only the settings given are overridden; an override of None means "off" (e.g. a port)."""
    settings_cls = Settings
    if config_file is not None:
        if not config_file.is_file():
            raise ValueError(f"config file {str(config_file)!r} does not exist")

        class FileSettings(Settings):
            model_config = SettingsConfigDict(toml_file=config_file)

        settings_cls = FileSettings
    return settings_cls(**overrides)  # type: ignore[arg-type]
