"""Server settings: command-line flags over SEGSERVE_* environment variables over a TOML file.

`Settings` is the one source of truth: each field's type, default, bounds and docstring make its
environment variable, its TOML key and its `segserve serve` flag (the CLI builds its flags from
the fields, `cli_flags`), so none of them is written twice.
"""

from __future__ import annotations

import re
import ssl
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from segserve_server.auth import load_tokens
from segserve_server.cpus import available_cpus

__all__ = ["MIB", "Settings", "check_tls_files", "check_url", "load_settings"]

MIB = 1024 * 1024
_ORIGIN = re.compile(r"^https?://(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+)(:\d{1,5})?$")
_URL = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")


def check_url(url: str) -> str:
    """A Triton gRPC address as tritonclient takes it: host:port (no scheme), [v6]:port."""
    url = url.strip()
    match = _URL.match(url)
    if match is None or not 0 < int(match.group(2)) < 65536:
        raise ValueError(f"Triton URL {url!r} is not host:port (the server's gRPC port, no scheme)")
    return url


class _Secret(str):
    """A token string whose repr hides it (what validation errors print of their input)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "'<hidden>'"


def check_tls_files(cert: Path | None, key: Path | None, client_ca: Path | None) -> None:
    """Raises ValueError naming the file unless the certificate, key and client CA given exist
    and load (the key matching the certificate)."""
    for what, path in (
        ("tls_cert_file", cert),
        ("tls_key_file", key),
        ("tls_client_ca_file", client_ca),
    ):
        if path is not None and not path.is_file():
            raise ValueError(f"{what} {str(path)!r} is not a file")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    if cert is not None and key is not None:
        try:
            context.load_cert_chain(cert, key)
        except (ssl.SSLError, OSError) as exc:
            raise ValueError(
                f"tls_cert_file {str(cert)!r} and tls_key_file {str(key)!r} do not load as a "
                f"PEM certificate chain and its key: {exc}"
            ) from exc
    if client_ca is not None:
        try:
            context.load_verify_locations(cafile=client_ca)
        except (ssl.SSLError, OSError) as exc:
            raise ValueError(
                f"tls_client_ca_file {str(client_ca)!r} does not load as PEM CA certificates: {exc}"
            ) from exc


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
    """Address the gRPC, HTTP and metrics servers bind to."""

    port: int = Field(50051, ge=0, le=65535)
    """gRPC port of the segserve.v1 API, health and reflection; 0 picks a free port."""

    metrics_port: int | None = Field(9464, ge=0, le=65535)
    """Port of the Prometheus /metrics HTTP endpoint; 0 picks a free port; "off" disables it."""

    metrics_host: str | None = None
    """Address the metrics server binds to, when not `host` (e.g. an internal interface: the
    metrics port has no TLS and no authentication; it carries counts and timings, no request
    data)."""

    kserve_port: int | None = Field(8001, ge=0, le=65535)
    """gRPC port of the KServe v2 / Triton protocol (inference.GRPCInferenceService, as Triton's
    own 8001): every model with raw tensors, and `<model>.image` with encoded images. 0 picks a
    free port; "off" disables it."""

    http_port: int | None = Field(8000, ge=0, le=65535)
    """HTTP port (as Triton's own 8000): the KServe v2 REST protocol under /v2, the plain REST
    endpoint POST /v1/models/{name}/segment and the browser console at /console/ (docs/http.md).
    Same TLS, tokens and limits as the gRPC ports. 0 picks a free port; "off" disables it."""

    http_gzip_min_bytes: int = Field(1024, ge=0)
    """HTTP answers at least this long are gzip-compressed for clients that accept gzip (the
    /v1 JSON answers with base64 masks and polygons); 0 turns compression off. Images (PNG,
    JPEG, WebP), event streams and KServe's /v2 answers (as Triton's) are sent as they are."""

    http_cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, json_schema_extra={"flag": "http-cors-origin"}
    )
    """Origins (scheme://host[:port], or "*") whose browser scripts may call the HTTP port
    (CORS). Empty (the default): CORS is off, only same-origin pages (the console) may. The flag
    repeats; the environment variable takes a comma-separated list."""

    tls_cert_file: Path | None = None
    """PEM certificate chain of the gRPC ports and the HTTP port: with tls_key_file, each of them
    speaks TLS only (HTTPS on the HTTP port). Both or neither; checked at start to exist and to
    load with the key."""

    tls_key_file: Path | None = Field(None, validate_default=True)
    """PEM private key of tls_cert_file (keep it readable by the server's user only)."""

    tls_client_ca_file: Path | None = Field(None, validate_default=True)
    """PEM CA certificates for mutual TLS: every client must present a certificate this CA
    signed (needs tls_cert_file and tls_key_file). "off" (the default): no client certificate."""

    auth_tokens_file: Path | None = None
    """TOML file of the bearer tokens accepted (per token: name, sha256 or secret, and optional
    models, admin, rate_per_s, burst; see docs/security.md). With it or auth_tokens, every call
    needs `authorization: Bearer <token>`; "off" (the default, with no auth_tokens): no
    authentication."""

    auth_tokens: str | None = Field(None, repr=False)
    """More tokens, as comma-separated name=token pairs (every model, no admin, no rate limit):
    give them in the environment (SEGSERVE_AUTH_TOKENS), not the flag, which `ps` shows."""

    health_requires_auth: bool = False
    """Require a token for gRPC health, reflection and KServe ServerLive / ServerReady too, and on
    the HTTP port for /v2/health/* and the console's files (by default they are open, for load
    balancers and orchestrators)."""

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

    max_upload_bytes: int = Field(1024 * MIB, ge=1)
    """Largest encoded image a SegmentUpload (chunked upload, for images beyond
    max_receive_message_bytes) may declare; larger ones are refused INVALID_ARGUMENT before a
    byte is kept. An upload's buffer grows with what arrives, up to its declared size."""

    max_upload_bytes_in_flight: int = Field(2048 * MIB, ge=1)
    """Bytes the SegmentUploads running at once may hold between them (at least
    max_upload_bytes): the chunk that would pass it is refused RESOURCE_EXHAUSTED (retry later)
    before it is kept. A call's bytes count until it ends."""

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

    sixteen_bit_scaling: Literal["shift", "minmax"] = "shift"
    """How 16-bit PNG and TIFF samples become the 8-bit pixels a model takes when a request sets
    no scaling: "shift" keeps the top 8 bits (full-range data, what segserve always did),
    "minmax" stretches each image's own range to 0..255 (10- or 12-bit data stored in 16 bits).
    A request's scaling (SHIFT, MINMAX, WINDOW) wins; DICOM keeps its windowing rule."""

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

    @field_validator("ort_providers", "triton_urls", "http_cors_origins", mode="before")
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

    @field_validator("http_cors_origins")
    @classmethod
    def _check_origins(cls, value: list[str]) -> list[str]:
        """Browsers send an origin as scheme://host[:port]; anything else would never match."""
        for origin in value:
            if origin != "*" and not _ORIGIN.match(origin):
                raise ValueError(
                    f"CORS origin {origin[:100]!r} is not scheme://host[:port] (no path, no "
                    "trailing slash) or *"
                )
        return value

    @model_validator(mode="before")
    @classmethod
    def _mask_tokens(cls, data: object) -> object:
        """auth_tokens holds secrets: a validation error shows its input as asterisks."""
        if isinstance(data, dict) and isinstance(data.get("auth_tokens"), str):
            data = {**data, "auth_tokens": _Secret(data["auth_tokens"])}
        return data

    @field_validator("max_upload_bytes_in_flight")
    @classmethod
    def _check_upload_budget(cls, value: int, info: ValidationInfo) -> int:
        single = info.data.get("max_upload_bytes")
        if single is not None and value < single:
            raise ValueError(
                f"max_upload_bytes_in_flight {value} is below max_upload_bytes {single}: an "
                "upload of the largest accepted size could never finish"
            )
        return value

    @field_validator("tls_key_file")
    @classmethod
    def _check_tls_pair(cls, key: Path | None, info: ValidationInfo) -> Path | None:
        cert = info.data.get("tls_cert_file")
        if (cert is None) != (key is None):
            raise ValueError("tls_cert_file and tls_key_file go together: give both or neither")
        check_tls_files(cert, key, None)
        return key

    @field_validator("tls_client_ca_file")
    @classmethod
    def _check_client_ca(cls, client_ca: Path | None, info: ValidationInfo) -> Path | None:
        if client_ca is not None and info.data.get("tls_key_file") is None:
            raise ValueError("tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file")
        check_tls_files(None, None, client_ca)
        return client_ca

    @field_validator("auth_tokens_file")
    @classmethod
    def _check_tokens_file(cls, path: Path | None) -> Path | None:
        load_tokens(file=path)
        return path

    @field_validator("auth_tokens")
    @classmethod
    def _check_tokens(cls, tokens: str | None, info: ValidationInfo) -> str | None:
        """The tokens parse, and with the file's make one table (unique names and tokens)."""
        load_tokens(file=info.data.get("auth_tokens_file"), env=tokens)
        return None if tokens is None else str(tokens)

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
