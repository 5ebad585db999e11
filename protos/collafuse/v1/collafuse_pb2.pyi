from collafuse.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Protocol(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PROTOCOL_UNSPECIFIED: _ClassVar[Protocol]
    PROTOCOL_AMBIENT: _ClassVar[Protocol]
    PROTOCOL_SPLIT: _ClassVar[Protocol]

class Phase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PHASE_UNSPECIFIED: _ClassVar[Phase]
    PHASE_IDLE: _ClassVar[Phase]
    PHASE_WAITING: _ClassVar[Phase]
    PHASE_TRAINING: _ClassVar[Phase]
    PHASE_DONE: _ClassVar[Phase]
PROTOCOL_UNSPECIFIED: Protocol
PROTOCOL_AMBIENT: Protocol
PROTOCOL_SPLIT: Protocol
PHASE_UNSPECIFIED: Phase
PHASE_IDLE: Phase
PHASE_WAITING: Phase
PHASE_TRAINING: Phase
PHASE_DONE: Phase

class ImageSpec(_message.Message):
    __slots__ = ("channels", "height", "width")
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    channels: int
    height: int
    width: int
    def __init__(self, channels: _Optional[int] = ..., height: _Optional[int] = ..., width: _Optional[int] = ...) -> None: ...

class ScheduleSpec(_message.Message):
    __slots__ = ("config_json", "fingerprint")
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    config_json: str
    fingerprint: str
    def __init__(self, config_json: _Optional[str] = ..., fingerprint: _Optional[str] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("client_id", "cut", "protocol", "class_names", "expected_fingerprint", "image_spec")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    CUT_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SPEC_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    cut: int
    protocol: Protocol
    class_names: _containers.RepeatedScalarFieldContainer[str]
    expected_fingerprint: str
    image_spec: ImageSpec
    def __init__(self, client_id: _Optional[str] = ..., cut: _Optional[int] = ..., protocol: _Optional[_Union[Protocol, str]] = ..., class_names: _Optional[_Iterable[str]] = ..., expected_fingerprint: _Optional[str] = ..., image_spec: _Optional[_Union[ImageSpec, _Mapping]] = ...) -> None: ...

class RegisterReply(_message.Message):
    __slots__ = ("server_id", "image_spec", "schedule", "class_names", "fingerprint", "releases_stored", "autoencoder")
    SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SPEC_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    RELEASES_STORED_FIELD_NUMBER: _ClassVar[int]
    AUTOENCODER_FIELD_NUMBER: _ClassVar[int]
    server_id: str
    image_spec: ImageSpec
    schedule: ScheduleSpec
    class_names: _containers.RepeatedScalarFieldContainer[str]
    fingerprint: str
    releases_stored: int
    autoencoder: AutoencoderSpec
    def __init__(self, server_id: _Optional[str] = ..., image_spec: _Optional[_Union[ImageSpec, _Mapping]] = ..., schedule: _Optional[_Union[ScheduleSpec, _Mapping]] = ..., class_names: _Optional[_Iterable[str]] = ..., fingerprint: _Optional[str] = ..., releases_stored: _Optional[int] = ..., autoencoder: _Optional[_Union[AutoencoderSpec, _Mapping]] = ...) -> None: ...

class AutoencoderSpec(_message.Message):
    __slots__ = ("class_name", "config_json", "weights_sha256")
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    class_name: str
    config_json: str
    weights_sha256: str
    def __init__(self, class_name: _Optional[str] = ..., config_json: _Optional[str] = ..., weights_sha256: _Optional[str] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("client_id",)
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    def __init__(self, client_id: _Optional[str] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("server_time", "trainer")
    SERVER_TIME_FIELD_NUMBER: _ClassVar[int]
    TRAINER_FIELD_NUMBER: _ClassVar[int]
    server_time: float
    trainer: TrainerState
    def __init__(self, server_time: _Optional[float] = ..., trainer: _Optional[_Union[TrainerState, _Mapping]] = ...) -> None: ...

class TrainerState(_message.Message):
    __slots__ = ("phase", "step", "max_steps", "last_loss", "releases", "clients_with_releases", "error", "skipped_steps", "save_failures", "save_error", "clipped_steps", "refused_steps", "saved_step")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    LAST_LOSS_FIELD_NUMBER: _ClassVar[int]
    RELEASES_FIELD_NUMBER: _ClassVar[int]
    CLIENTS_WITH_RELEASES_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_STEPS_FIELD_NUMBER: _ClassVar[int]
    SAVE_FAILURES_FIELD_NUMBER: _ClassVar[int]
    SAVE_ERROR_FIELD_NUMBER: _ClassVar[int]
    CLIPPED_STEPS_FIELD_NUMBER: _ClassVar[int]
    REFUSED_STEPS_FIELD_NUMBER: _ClassVar[int]
    SAVED_STEP_FIELD_NUMBER: _ClassVar[int]
    phase: Phase
    step: int
    max_steps: int
    last_loss: float
    releases: int
    clients_with_releases: int
    error: str
    skipped_steps: int
    save_failures: int
    save_error: str
    clipped_steps: int
    refused_steps: int
    saved_step: int
    def __init__(self, phase: _Optional[_Union[Phase, str]] = ..., step: _Optional[int] = ..., max_steps: _Optional[int] = ..., last_loss: _Optional[float] = ..., releases: _Optional[int] = ..., clients_with_releases: _Optional[int] = ..., error: _Optional[str] = ..., skipped_steps: _Optional[int] = ..., save_failures: _Optional[int] = ..., save_error: _Optional[str] = ..., clipped_steps: _Optional[int] = ..., refused_steps: _Optional[int] = ..., saved_step: _Optional[int] = ...) -> None: ...

class ReleaseItem(_message.Message):
    __slots__ = ("image_key", "label", "x_cut")
    IMAGE_KEY_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    X_CUT_FIELD_NUMBER: _ClassVar[int]
    image_key: str
    label: int
    x_cut: _tensor_pb2.Tensor
    def __init__(self, image_key: _Optional[str] = ..., label: _Optional[int] = ..., x_cut: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class ReleaseChunk(_message.Message):
    __slots__ = ("client_id", "cut", "items", "last", "total_items")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    CUT_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ITEMS_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    cut: int
    items: _containers.RepeatedCompositeFieldContainer[ReleaseItem]
    last: bool
    total_items: int
    def __init__(self, client_id: _Optional[str] = ..., cut: _Optional[int] = ..., items: _Optional[_Iterable[_Union[ReleaseItem, _Mapping]]] = ..., last: _Optional[bool] = ..., total_items: _Optional[int] = ...) -> None: ...

class ReleaseAck(_message.Message):
    __slots__ = ("stored", "duplicates", "total_for_client")
    STORED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FOR_CLIENT_FIELD_NUMBER: _ClassVar[int]
    stored: int
    duplicates: int
    total_for_client: int
    def __init__(self, stored: _Optional[int] = ..., duplicates: _Optional[int] = ..., total_for_client: _Optional[int] = ...) -> None: ...

class ForgetRequest(_message.Message):
    __slots__ = ("client_id",)
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    def __init__(self, client_id: _Optional[str] = ...) -> None: ...

class ForgetReply(_message.Message):
    __slots__ = ("removed",)
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    removed: int
    def __init__(self, removed: _Optional[int] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ClientStatus(_message.Message):
    __slots__ = ("client_id", "cut", "protocol", "releases", "last_seen", "strikes", "dropped_until")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    CUT_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    RELEASES_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_FIELD_NUMBER: _ClassVar[int]
    STRIKES_FIELD_NUMBER: _ClassVar[int]
    DROPPED_UNTIL_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    cut: int
    protocol: Protocol
    releases: int
    last_seen: float
    strikes: int
    dropped_until: float
    def __init__(self, client_id: _Optional[str] = ..., cut: _Optional[int] = ..., protocol: _Optional[_Union[Protocol, str]] = ..., releases: _Optional[int] = ..., last_seen: _Optional[float] = ..., strikes: _Optional[int] = ..., dropped_until: _Optional[float] = ...) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("server_id", "fingerprint", "trainer", "clients", "device", "bytes_received", "bytes_sent", "release_conflicts", "next_page_token", "clients_total")
    SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    TRAINER_FIELD_NUMBER: _ClassVar[int]
    CLIENTS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    RELEASE_CONFLICTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    CLIENTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    server_id: str
    fingerprint: str
    trainer: TrainerState
    clients: _containers.RepeatedCompositeFieldContainer[ClientStatus]
    device: str
    bytes_received: int
    bytes_sent: int
    release_conflicts: int
    next_page_token: str
    clients_total: int
    def __init__(self, server_id: _Optional[str] = ..., fingerprint: _Optional[str] = ..., trainer: _Optional[_Union[TrainerState, _Mapping]] = ..., clients: _Optional[_Iterable[_Union[ClientStatus, _Mapping]]] = ..., device: _Optional[str] = ..., bytes_received: _Optional[int] = ..., bytes_sent: _Optional[int] = ..., release_conflicts: _Optional[int] = ..., next_page_token: _Optional[str] = ..., clients_total: _Optional[int] = ...) -> None: ...

class SampleRequest(_message.Message):
    __slots__ = ("client_id", "labels", "seed", "num_inference_steps", "scheduler", "guidance_scale", "cut")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    NUM_INFERENCE_STEPS_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    CUT_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    labels: _containers.RepeatedScalarFieldContainer[int]
    seed: int
    num_inference_steps: int
    scheduler: str
    guidance_scale: float
    cut: int
    def __init__(self, client_id: _Optional[str] = ..., labels: _Optional[_Iterable[int]] = ..., seed: _Optional[int] = ..., num_inference_steps: _Optional[int] = ..., scheduler: _Optional[str] = ..., guidance_scale: _Optional[float] = ..., cut: _Optional[int] = ...) -> None: ...

class SampleProgress(_message.Message):
    __slots__ = ("steps_done", "steps_total")
    STEPS_DONE_FIELD_NUMBER: _ClassVar[int]
    STEPS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    steps_done: int
    steps_total: int
    def __init__(self, steps_done: _Optional[int] = ..., steps_total: _Optional[int] = ...) -> None: ...

class SampleChunk(_message.Message):
    __slots__ = ("offset", "x", "server_steps")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    SERVER_STEPS_FIELD_NUMBER: _ClassVar[int]
    offset: int
    x: _tensor_pb2.Tensor
    server_steps: int
    def __init__(self, offset: _Optional[int] = ..., x: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., server_steps: _Optional[int] = ...) -> None: ...

class SampleEvent(_message.Message):
    __slots__ = ("progress", "chunk")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    progress: SampleProgress
    chunk: SampleChunk
    def __init__(self, progress: _Optional[_Union[SampleProgress, _Mapping]] = ..., chunk: _Optional[_Union[SampleChunk, _Mapping]] = ...) -> None: ...

class SplitForwardRequest(_message.Message):
    __slots__ = ("client_id", "x_t", "t", "labels")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    X_T_FIELD_NUMBER: _ClassVar[int]
    T_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    x_t: _tensor_pb2.Tensor
    t: _containers.RepeatedScalarFieldContainer[int]
    labels: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, client_id: _Optional[str] = ..., x_t: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., t: _Optional[_Iterable[int]] = ..., labels: _Optional[_Iterable[int]] = ...) -> None: ...

class SplitForwardReply(_message.Message):
    __slots__ = ("step_id", "eps_hat", "server_step", "expires_in", "round", "done")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    EPS_HAT_FIELD_NUMBER: _ClassVar[int]
    SERVER_STEP_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_IN_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    step_id: str
    eps_hat: _tensor_pb2.Tensor
    server_step: int
    expires_in: float
    round: int
    done: bool
    def __init__(self, step_id: _Optional[str] = ..., eps_hat: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., server_step: _Optional[int] = ..., expires_in: _Optional[float] = ..., round: _Optional[int] = ..., done: _Optional[bool] = ...) -> None: ...

class SplitBackwardRequest(_message.Message):
    __slots__ = ("client_id", "step_id", "grad", "loss", "last")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    GRAD_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    step_id: str
    grad: _tensor_pb2.Tensor
    loss: float
    last: bool
    def __init__(self, client_id: _Optional[str] = ..., step_id: _Optional[str] = ..., grad: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., loss: _Optional[float] = ..., last: _Optional[bool] = ...) -> None: ...

class SplitBackwardReply(_message.Message):
    __slots__ = ("server_step", "max_steps", "done", "applied", "duplicate", "round", "round_clients", "round_images")
    SERVER_STEP_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ROUND_CLIENTS_FIELD_NUMBER: _ClassVar[int]
    ROUND_IMAGES_FIELD_NUMBER: _ClassVar[int]
    server_step: int
    max_steps: int
    done: bool
    applied: bool
    duplicate: bool
    round: int
    round_clients: int
    round_images: int
    def __init__(self, server_step: _Optional[int] = ..., max_steps: _Optional[int] = ..., done: _Optional[bool] = ..., applied: _Optional[bool] = ..., duplicate: _Optional[bool] = ..., round: _Optional[int] = ..., round_clients: _Optional[int] = ..., round_images: _Optional[int] = ...) -> None: ...

class FetchModelRequest(_message.Message):
    __slots__ = ("client_id",)
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    def __init__(self, client_id: _Optional[str] = ...) -> None: ...

class ModelHeader(_message.Message):
    __slots__ = ("preset", "step", "total_bytes", "sha256")
    PRESET_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    preset: str
    step: int
    total_bytes: int
    sha256: str
    def __init__(self, preset: _Optional[str] = ..., step: _Optional[int] = ..., total_bytes: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class ModelChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: ModelHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[ModelHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...
