from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PixelFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PIXEL_FORMAT_UNSPECIFIED: _ClassVar[PixelFormat]
    PIXEL_FORMAT_RGB8: _ClassVar[PixelFormat]
    PIXEL_FORMAT_BGR8: _ClassVar[PixelFormat]
    PIXEL_FORMAT_GRAY8: _ClassVar[PixelFormat]

class SampleScaling(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SAMPLE_SCALING_UNSPECIFIED: _ClassVar[SampleScaling]
    SAMPLE_SCALING_SHIFT: _ClassVar[SampleScaling]
    SAMPLE_SCALING_MINMAX: _ClassVar[SampleScaling]
    SAMPLE_SCALING_WINDOW: _ClassVar[SampleScaling]

class MaskEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MASK_ENCODING_UNSPECIFIED: _ClassVar[MaskEncoding]
    MASK_ENCODING_PNG: _ClassVar[MaskEncoding]
    MASK_ENCODING_SRLE: _ClassVar[MaskEncoding]
    MASK_ENCODING_RAW: _ClassVar[MaskEncoding]
    MASK_ENCODING_DICOM_SEG: _ClassVar[MaskEncoding]
    MASK_ENCODING_GEOTIFF: _ClassVar[MaskEncoding]

class OutputSize(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTPUT_SIZE_UNSPECIFIED: _ClassVar[OutputSize]
    OUTPUT_SIZE_ORIGINAL: _ClassVar[OutputSize]
    OUTPUT_SIZE_MODEL: _ClassVar[OutputSize]

class AnnotationFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ANNOTATION_FORMAT_UNSPECIFIED: _ClassVar[AnnotationFormat]
    ANNOTATION_FORMAT_COCO_RLE: _ClassVar[AnnotationFormat]
    ANNOTATION_FORMAT_CVAT_MASK: _ClassVar[AnnotationFormat]
    ANNOTATION_FORMAT_LABEL_STUDIO_RLE: _ClassVar[AnnotationFormat]
    ANNOTATION_FORMAT_POLYGONS: _ClassVar[AnnotationFormat]

class StreamPolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STREAM_POLICY_UNSPECIFIED: _ClassVar[StreamPolicy]
    STREAM_POLICY_QUEUE: _ClassVar[StreamPolicy]
    STREAM_POLICY_LATEST: _ClassVar[StreamPolicy]

class FrameStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FRAME_STATUS_UNSPECIFIED: _ClassVar[FrameStatus]
    FRAME_STATUS_OK: _ClassVar[FrameStatus]
    FRAME_STATUS_DROPPED: _ClassVar[FrameStatus]
    FRAME_STATUS_EXPIRED: _ClassVar[FrameStatus]
    FRAME_STATUS_ERROR: _ClassVar[FrameStatus]

class ModelState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_STATE_UNSPECIFIED: _ClassVar[ModelState]
    MODEL_STATE_LOADING: _ClassVar[ModelState]
    MODEL_STATE_READY: _ClassVar[ModelState]
    MODEL_STATE_FAILED: _ClassVar[ModelState]
    MODEL_STATE_UNLOADED: _ClassVar[ModelState]
PIXEL_FORMAT_UNSPECIFIED: PixelFormat
PIXEL_FORMAT_RGB8: PixelFormat
PIXEL_FORMAT_BGR8: PixelFormat
PIXEL_FORMAT_GRAY8: PixelFormat
SAMPLE_SCALING_UNSPECIFIED: SampleScaling
SAMPLE_SCALING_SHIFT: SampleScaling
SAMPLE_SCALING_MINMAX: SampleScaling
SAMPLE_SCALING_WINDOW: SampleScaling
MASK_ENCODING_UNSPECIFIED: MaskEncoding
MASK_ENCODING_PNG: MaskEncoding
MASK_ENCODING_SRLE: MaskEncoding
MASK_ENCODING_RAW: MaskEncoding
MASK_ENCODING_DICOM_SEG: MaskEncoding
MASK_ENCODING_GEOTIFF: MaskEncoding
OUTPUT_SIZE_UNSPECIFIED: OutputSize
OUTPUT_SIZE_ORIGINAL: OutputSize
OUTPUT_SIZE_MODEL: OutputSize
ANNOTATION_FORMAT_UNSPECIFIED: AnnotationFormat
ANNOTATION_FORMAT_COCO_RLE: AnnotationFormat
ANNOTATION_FORMAT_CVAT_MASK: AnnotationFormat
ANNOTATION_FORMAT_LABEL_STUDIO_RLE: AnnotationFormat
ANNOTATION_FORMAT_POLYGONS: AnnotationFormat
STREAM_POLICY_UNSPECIFIED: StreamPolicy
STREAM_POLICY_QUEUE: StreamPolicy
STREAM_POLICY_LATEST: StreamPolicy
FRAME_STATUS_UNSPECIFIED: FrameStatus
FRAME_STATUS_OK: FrameStatus
FRAME_STATUS_DROPPED: FrameStatus
FRAME_STATUS_EXPIRED: FrameStatus
FRAME_STATUS_ERROR: FrameStatus
MODEL_STATE_UNSPECIFIED: ModelState
MODEL_STATE_LOADING: ModelState
MODEL_STATE_READY: ModelState
MODEL_STATE_FAILED: ModelState
MODEL_STATE_UNLOADED: ModelState

class RawImage(_message.Message):
    __slots__ = ("pixels", "width", "height", "format")
    PIXELS_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    pixels: bytes
    width: int
    height: int
    format: PixelFormat
    def __init__(self, pixels: _Optional[bytes] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., format: _Optional[_Union[PixelFormat, str]] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("encoded", "raw")
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    encoded: bytes
    raw: RawImage
    def __init__(self, encoded: _Optional[bytes] = ..., raw: _Optional[_Union[RawImage, _Mapping]] = ...) -> None: ...

class EncodedMask(_message.Message):
    __slots__ = ("encoding", "data")
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    encoding: MaskEncoding
    data: bytes
    def __init__(self, encoding: _Optional[_Union[MaskEncoding, str]] = ..., data: _Optional[bytes] = ...) -> None: ...

class ClassPresence(_message.Message):
    __slots__ = ("class_id", "name", "pixel_count")
    CLASS_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PIXEL_COUNT_FIELD_NUMBER: _ClassVar[int]
    class_id: int
    name: str
    pixel_count: int
    def __init__(self, class_id: _Optional[int] = ..., name: _Optional[str] = ..., pixel_count: _Optional[int] = ...) -> None: ...

class StageTimings(_message.Message):
    __slots__ = ("decode_us", "preprocess_us", "queue_us", "infer_us", "postprocess_us", "encode_us", "total_us", "batch_size")
    DECODE_US_FIELD_NUMBER: _ClassVar[int]
    PREPROCESS_US_FIELD_NUMBER: _ClassVar[int]
    QUEUE_US_FIELD_NUMBER: _ClassVar[int]
    INFER_US_FIELD_NUMBER: _ClassVar[int]
    POSTPROCESS_US_FIELD_NUMBER: _ClassVar[int]
    ENCODE_US_FIELD_NUMBER: _ClassVar[int]
    TOTAL_US_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    decode_us: int
    preprocess_us: int
    queue_us: int
    infer_us: int
    postprocess_us: int
    encode_us: int
    total_us: int
    batch_size: int
    def __init__(self, decode_us: _Optional[int] = ..., preprocess_us: _Optional[int] = ..., queue_us: _Optional[int] = ..., infer_us: _Optional[int] = ..., postprocess_us: _Optional[int] = ..., encode_us: _Optional[int] = ..., total_us: _Optional[int] = ..., batch_size: _Optional[int] = ...) -> None: ...

class SegmentRequest(_message.Message):
    __slots__ = ("model", "model_version", "image", "encodings", "output_size", "include_pixel_counts", "embed_palette", "priority", "timeout_us", "annotations", "polygon_tolerance_px", "include_confidence", "confidence_threshold", "ignore_exif_orientation", "scaling", "window_center", "window_width", "bands", "map_coordinates")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    ENCODINGS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_PIXEL_COUNTS_FIELD_NUMBER: _ClassVar[int]
    EMBED_PALETTE_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_US_FIELD_NUMBER: _ClassVar[int]
    ANNOTATIONS_FIELD_NUMBER: _ClassVar[int]
    POLYGON_TOLERANCE_PX_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EXIF_ORIENTATION_FIELD_NUMBER: _ClassVar[int]
    SCALING_FIELD_NUMBER: _ClassVar[int]
    WINDOW_CENTER_FIELD_NUMBER: _ClassVar[int]
    WINDOW_WIDTH_FIELD_NUMBER: _ClassVar[int]
    BANDS_FIELD_NUMBER: _ClassVar[int]
    MAP_COORDINATES_FIELD_NUMBER: _ClassVar[int]
    model: str
    model_version: int
    image: Image
    encodings: _containers.RepeatedScalarFieldContainer[MaskEncoding]
    output_size: OutputSize
    include_pixel_counts: bool
    embed_palette: bool
    priority: int
    timeout_us: int
    annotations: _containers.RepeatedScalarFieldContainer[AnnotationFormat]
    polygon_tolerance_px: float
    include_confidence: bool
    confidence_threshold: float
    ignore_exif_orientation: bool
    scaling: SampleScaling
    window_center: float
    window_width: float
    bands: _containers.RepeatedScalarFieldContainer[int]
    map_coordinates: bool
    def __init__(self, model: _Optional[str] = ..., model_version: _Optional[int] = ..., image: _Optional[_Union[Image, _Mapping]] = ..., encodings: _Optional[_Iterable[_Union[MaskEncoding, str]]] = ..., output_size: _Optional[_Union[OutputSize, str]] = ..., include_pixel_counts: _Optional[bool] = ..., embed_palette: _Optional[bool] = ..., priority: _Optional[int] = ..., timeout_us: _Optional[int] = ..., annotations: _Optional[_Iterable[_Union[AnnotationFormat, str]]] = ..., polygon_tolerance_px: _Optional[float] = ..., include_confidence: _Optional[bool] = ..., confidence_threshold: _Optional[float] = ..., ignore_exif_orientation: _Optional[bool] = ..., scaling: _Optional[_Union[SampleScaling, str]] = ..., window_center: _Optional[float] = ..., window_width: _Optional[float] = ..., bands: _Optional[_Iterable[int]] = ..., map_coordinates: _Optional[bool] = ...) -> None: ...

class ImageScores(_message.Message):
    __slots__ = ("uncertainty", "mean_confidence", "boundary_length", "regions")
    UNCERTAINTY_FIELD_NUMBER: _ClassVar[int]
    MEAN_CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    BOUNDARY_LENGTH_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    uncertainty: float
    mean_confidence: float
    boundary_length: int
    regions: int
    def __init__(self, uncertainty: _Optional[float] = ..., mean_confidence: _Optional[float] = ..., boundary_length: _Optional[int] = ..., regions: _Optional[int] = ...) -> None: ...

class ClassConfidence(_message.Message):
    __slots__ = ("class_id", "mean")
    CLASS_ID_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    class_id: int
    mean: float
    def __init__(self, class_id: _Optional[int] = ..., mean: _Optional[float] = ...) -> None: ...

class Ring(_message.Message):
    __slots__ = ("xy", "map_xy")
    XY_FIELD_NUMBER: _ClassVar[int]
    MAP_XY_FIELD_NUMBER: _ClassVar[int]
    xy: _containers.RepeatedScalarFieldContainer[int]
    map_xy: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, xy: _Optional[_Iterable[int]] = ..., map_xy: _Optional[_Iterable[float]] = ...) -> None: ...

class Region(_message.Message):
    __slots__ = ("outer", "holes")
    OUTER_FIELD_NUMBER: _ClassVar[int]
    HOLES_FIELD_NUMBER: _ClassVar[int]
    outer: Ring
    holes: _containers.RepeatedCompositeFieldContainer[Ring]
    def __init__(self, outer: _Optional[_Union[Ring, _Mapping]] = ..., holes: _Optional[_Iterable[_Union[Ring, _Mapping]]] = ...) -> None: ...

class ClassAnnotation(_message.Message):
    __slots__ = ("class_id", "name", "area", "bbox", "coco_rle_counts", "cvat_mask", "label_studio_rle", "polygons")
    CLASS_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    AREA_FIELD_NUMBER: _ClassVar[int]
    BBOX_FIELD_NUMBER: _ClassVar[int]
    COCO_RLE_COUNTS_FIELD_NUMBER: _ClassVar[int]
    CVAT_MASK_FIELD_NUMBER: _ClassVar[int]
    LABEL_STUDIO_RLE_FIELD_NUMBER: _ClassVar[int]
    POLYGONS_FIELD_NUMBER: _ClassVar[int]
    class_id: int
    name: str
    area: int
    bbox: _containers.RepeatedScalarFieldContainer[int]
    coco_rle_counts: str
    cvat_mask: _containers.RepeatedScalarFieldContainer[int]
    label_studio_rle: bytes
    polygons: _containers.RepeatedCompositeFieldContainer[Region]
    def __init__(self, class_id: _Optional[int] = ..., name: _Optional[str] = ..., area: _Optional[int] = ..., bbox: _Optional[_Iterable[int]] = ..., coco_rle_counts: _Optional[str] = ..., cvat_mask: _Optional[_Iterable[int]] = ..., label_studio_rle: _Optional[bytes] = ..., polygons: _Optional[_Iterable[_Union[Region, _Mapping]]] = ...) -> None: ...

class SegmentResponse(_message.Message):
    __slots__ = ("width", "height", "masks", "classes", "model", "model_version", "timings", "annotations", "confidence", "class_confidence", "scores")
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    MASKS_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    ANNOTATIONS_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    CLASS_CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    width: int
    height: int
    masks: _containers.RepeatedCompositeFieldContainer[EncodedMask]
    classes: _containers.RepeatedCompositeFieldContainer[ClassPresence]
    model: str
    model_version: int
    timings: StageTimings
    annotations: _containers.RepeatedCompositeFieldContainer[ClassAnnotation]
    confidence: EncodedMask
    class_confidence: _containers.RepeatedCompositeFieldContainer[ClassConfidence]
    scores: ImageScores
    def __init__(self, width: _Optional[int] = ..., height: _Optional[int] = ..., masks: _Optional[_Iterable[_Union[EncodedMask, _Mapping]]] = ..., classes: _Optional[_Iterable[_Union[ClassPresence, _Mapping]]] = ..., model: _Optional[str] = ..., model_version: _Optional[int] = ..., timings: _Optional[_Union[StageTimings, _Mapping]] = ..., annotations: _Optional[_Iterable[_Union[ClassAnnotation, _Mapping]]] = ..., confidence: _Optional[_Union[EncodedMask, _Mapping]] = ..., class_confidence: _Optional[_Iterable[_Union[ClassConfidence, _Mapping]]] = ..., scores: _Optional[_Union[ImageScores, _Mapping]] = ...) -> None: ...

class StreamOptions(_message.Message):
    __slots__ = ("policy", "max_age_ms", "priority")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    MAX_AGE_MS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    policy: StreamPolicy
    max_age_ms: int
    priority: int
    def __init__(self, policy: _Optional[_Union[StreamPolicy, str]] = ..., max_age_ms: _Optional[int] = ..., priority: _Optional[int] = ...) -> None: ...

class SegmentStreamRequest(_message.Message):
    __slots__ = ("frame_id", "request", "options", "policy", "max_age_ms", "capture_time_us")
    FRAME_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    MAX_AGE_MS_FIELD_NUMBER: _ClassVar[int]
    CAPTURE_TIME_US_FIELD_NUMBER: _ClassVar[int]
    frame_id: int
    request: SegmentRequest
    options: StreamOptions
    policy: StreamPolicy
    max_age_ms: int
    capture_time_us: int
    def __init__(self, frame_id: _Optional[int] = ..., request: _Optional[_Union[SegmentRequest, _Mapping]] = ..., options: _Optional[_Union[StreamOptions, _Mapping]] = ..., policy: _Optional[_Union[StreamPolicy, str]] = ..., max_age_ms: _Optional[int] = ..., capture_time_us: _Optional[int] = ...) -> None: ...

class FrameError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class SegmentStreamResponse(_message.Message):
    __slots__ = ("frame_id", "response", "error", "status", "capture_time_us", "receive_time_us", "answer_time_us")
    FRAME_ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CAPTURE_TIME_US_FIELD_NUMBER: _ClassVar[int]
    RECEIVE_TIME_US_FIELD_NUMBER: _ClassVar[int]
    ANSWER_TIME_US_FIELD_NUMBER: _ClassVar[int]
    frame_id: int
    response: SegmentResponse
    error: FrameError
    status: FrameStatus
    capture_time_us: int
    receive_time_us: int
    answer_time_us: int
    def __init__(self, frame_id: _Optional[int] = ..., response: _Optional[_Union[SegmentResponse, _Mapping]] = ..., error: _Optional[_Union[FrameError, _Mapping]] = ..., status: _Optional[_Union[FrameStatus, str]] = ..., capture_time_us: _Optional[int] = ..., receive_time_us: _Optional[int] = ..., answer_time_us: _Optional[int] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelSummary(_message.Message):
    __slots__ = ("name", "versions", "serving_version", "state", "reason")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    SERVING_VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    name: str
    versions: _containers.RepeatedScalarFieldContainer[int]
    serving_version: int
    state: ModelState
    reason: str
    def __init__(self, name: _Optional[str] = ..., versions: _Optional[_Iterable[int]] = ..., serving_version: _Optional[int] = ..., state: _Optional[_Union[ModelState, str]] = ..., reason: _Optional[str] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "limits")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelSummary]
    limits: ServerLimits
    def __init__(self, models: _Optional[_Iterable[_Union[ModelSummary, _Mapping]]] = ..., limits: _Optional[_Union[ServerLimits, _Mapping]] = ...) -> None: ...

class ServerLimits(_message.Message):
    __slots__ = ("max_request_bytes", "max_image_pixels", "max_image_side", "max_upload_bytes")
    MAX_REQUEST_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_SIDE_FIELD_NUMBER: _ClassVar[int]
    MAX_UPLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    max_request_bytes: int
    max_image_pixels: int
    max_image_side: int
    max_upload_bytes: int
    def __init__(self, max_request_bytes: _Optional[int] = ..., max_image_pixels: _Optional[int] = ..., max_image_side: _Optional[int] = ..., max_upload_bytes: _Optional[int] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class ClassInfo(_message.Message):
    __slots__ = ("id", "name", "red", "green", "blue")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    RED_FIELD_NUMBER: _ClassVar[int]
    GREEN_FIELD_NUMBER: _ClassVar[int]
    BLUE_FIELD_NUMBER: _ClassVar[int]
    id: int
    name: str
    red: int
    green: int
    blue: int
    def __init__(self, id: _Optional[int] = ..., name: _Optional[str] = ..., red: _Optional[int] = ..., green: _Optional[int] = ..., blue: _Optional[int] = ...) -> None: ...

class BatchingInfo(_message.Message):
    __slots__ = ("max_batch_size", "preferred_batch_sizes", "max_queue_delay_us", "max_queue_size", "priority_levels", "default_priority_level")
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    PREFERRED_BATCH_SIZES_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_DELAY_US_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_LEVELS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_PRIORITY_LEVEL_FIELD_NUMBER: _ClassVar[int]
    max_batch_size: int
    preferred_batch_sizes: _containers.RepeatedScalarFieldContainer[int]
    max_queue_delay_us: int
    max_queue_size: int
    priority_levels: int
    default_priority_level: int
    def __init__(self, max_batch_size: _Optional[int] = ..., preferred_batch_sizes: _Optional[_Iterable[int]] = ..., max_queue_delay_us: _Optional[int] = ..., max_queue_size: _Optional[int] = ..., priority_levels: _Optional[int] = ..., default_priority_level: _Optional[int] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "state", "reason", "platform", "backend", "input_width", "input_height", "classes", "batching", "outputs_labels", "description", "has_confidence", "pipeline", "tiling")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    INPUT_WIDTH_FIELD_NUMBER: _ClassVar[int]
    INPUT_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    BATCHING_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_LABELS_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    HAS_CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    PIPELINE_FIELD_NUMBER: _ClassVar[int]
    TILING_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    state: ModelState
    reason: str
    platform: str
    backend: str
    input_width: int
    input_height: int
    classes: _containers.RepeatedCompositeFieldContainer[ClassInfo]
    batching: BatchingInfo
    outputs_labels: bool
    description: str
    has_confidence: bool
    pipeline: str
    tiling: TilingInfo
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., state: _Optional[_Union[ModelState, str]] = ..., reason: _Optional[str] = ..., platform: _Optional[str] = ..., backend: _Optional[str] = ..., input_width: _Optional[int] = ..., input_height: _Optional[int] = ..., classes: _Optional[_Iterable[_Union[ClassInfo, _Mapping]]] = ..., batching: _Optional[_Union[BatchingInfo, _Mapping]] = ..., outputs_labels: _Optional[bool] = ..., description: _Optional[str] = ..., has_confidence: _Optional[bool] = ..., pipeline: _Optional[str] = ..., tiling: _Optional[_Union[TilingInfo, _Mapping]] = ...) -> None: ...

class TilingInfo(_message.Message):
    __slots__ = ("enabled", "overlap_px", "scale", "blend")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    OVERLAP_PX_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    BLEND_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    overlap_px: int
    scale: float
    blend: str
    def __init__(self, enabled: _Optional[bool] = ..., overlap_px: _Optional[int] = ..., scale: _Optional[float] = ..., blend: _Optional[str] = ...) -> None: ...

class LoadModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class LoadModelResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: ModelStatus
    def __init__(self, model: _Optional[_Union[ModelStatus, _Mapping]] = ...) -> None: ...

class UnloadModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class UnloadModelResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: ModelStatus
    def __init__(self, model: _Optional[_Union[ModelStatus, _Mapping]] = ...) -> None: ...

class RepositoryIndexRequest(_message.Message):
    __slots__ = ("ready_only",)
    READY_ONLY_FIELD_NUMBER: _ClassVar[int]
    ready_only: bool
    def __init__(self, ready_only: _Optional[bool] = ...) -> None: ...

class RepositoryIndexResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelStatus]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelStatus, _Mapping]]] = ...) -> None: ...

class ModelStatus(_message.Message):
    __slots__ = ("name", "state", "reason", "serving_version", "versions")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SERVING_VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    name: str
    state: ModelState
    reason: str
    serving_version: int
    versions: _containers.RepeatedCompositeFieldContainer[VersionStatus]
    def __init__(self, name: _Optional[str] = ..., state: _Optional[_Union[ModelState, str]] = ..., reason: _Optional[str] = ..., serving_version: _Optional[int] = ..., versions: _Optional[_Iterable[_Union[VersionStatus, _Mapping]]] = ...) -> None: ...

class VersionStatus(_message.Message):
    __slots__ = ("version", "state", "reason")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    version: int
    state: ModelState
    reason: str
    def __init__(self, version: _Optional[int] = ..., state: _Optional[_Union[ModelState, str]] = ..., reason: _Optional[str] = ...) -> None: ...

class UploadHeader(_message.Message):
    __slots__ = ("request", "total_bytes")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    request: SegmentRequest
    total_bytes: int
    def __init__(self, request: _Optional[_Union[SegmentRequest, _Mapping]] = ..., total_bytes: _Optional[int] = ...) -> None: ...

class SegmentUploadRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: UploadHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[UploadHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...
