"""Typed results: frozen dataclasses built from the fibquant.v1 response messages.

Each has `from_proto(msg)`; the message itself stays available as `.proto` (not compared, not in
repr) for fields a newer server adds. Optional proto3 fields that are unset are None. DType enums
are given by name ("f32", "f16", "bf16").
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

from ._stubs import pb

_DTYPE_NAMES = {pb.DTYPE_F32: "f32", pb.DTYPE_F16: "f16", pb.DTYPE_BF16: "bf16"}


class _FromProto:
    """The one field mapping of every result: each dataclass field but `proto` is the message field
    of the same name. Repeated fields become tuples; a field with presence (a message, or proto3
    `optional`) that is unset becomes None; _nested converts message fields to their result class,
    _convert maps a value further. Fields the message lacks keep their default unless given."""
    _nested: ClassVar[dict] = {}
    _convert: ClassVar[dict] = {}

    @classmethod
    def from_proto(cls, msg):
        return cls._from_proto(msg)

    @classmethod
    def _from_proto(cls, msg, **given):
        fields = msg.DESCRIPTOR.fields_by_name
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name in given:
                kwargs[f.name] = given[f.name]
            elif f.name != "proto" and f.name in fields:
                v = _value(msg, fields[f.name], cls._nested.get(f.name))
                kwargs[f.name] = cls._convert[f.name](v) if f.name in cls._convert else v
        return cls(**kwargs, proto=msg)


def _value(msg, fd, nested):
    v = getattr(msg, fd.name)
    if fd.label == fd.LABEL_REPEATED:
        return tuple(nested.from_proto(m) for m in v) if nested else tuple(v)
    if fd.has_presence and not msg.HasField(fd.name):
        return None
    return nested.from_proto(v) if nested else v


def _proto_field():
    return field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class BuildStats(_FromProto):
    seconds: float
    threads: int
    init_mse: float
    training_mse: float
    best_restart: int
    empty_cells_repaired: int
    cost: int
    loaded_from_disk: bool
    proto: Any = _proto_field()


@dataclass(frozen=True)
class ProfileInfo(_FromProto):
    digest: str
    profile_id: str
    profile_json: str
    fibquant_profile_digest: str
    codebook_digest: str
    rotation_digest: str
    head_dim: int
    block_dim: int
    codebook_size: int
    wire_index_bits: int
    code_bytes_per_vector: int
    paper_bits_per_coord: float
    wire_bits_per_coord: float
    rotation_algorithm: str
    build_stats: Optional[BuildStats]
    registered_unix_seconds: int
    already_registered: bool = False
    proto: Any = _proto_field()
    _nested: ClassVar[dict] = {"build_stats": BuildStats}

    @classmethod
    def from_proto(cls, msg, already_registered: bool = False):
        return cls._from_proto(msg, already_registered=already_registered)

    @property
    def profile(self) -> dict:
        """The full validated KV profile (the KV layer's canonical JSON) as a dict."""
        return json.loads(self.profile_json)

    @property
    def tokens_per_page(self) -> int:
        return int(self.profile["page_geometry"]["tokens_per_page"])

    @property
    def shape(self) -> dict:
        return self.profile["shape"]

    @property
    def dtype(self) -> str:
        return self.shape["dtype"]

    @property
    def role(self) -> str:
        return self.shape["role"]


@dataclass(frozen=True)
class RotationParams(_FromProto):
    algorithm: str
    dim: int
    seed: int
    digest: str
    matrix: tuple
    signs: tuple
    proto: Any = _proto_field()


@dataclass(frozen=True)
class Codebook(_FromProto):
    profile_digest: str
    fibquant_profile_json: str
    fibquant_profile_digest: str
    codebook_digest: str
    codewords: tuple
    codebook_size: int
    block_dim: int
    wire_index_bits: int
    rotation: Optional[RotationParams]
    build_stats: Optional[BuildStats]
    proto: Any = _proto_field()
    _nested: ClassVar[dict] = {"rotation": RotationParams, "build_stats": BuildStats}

    def codewords_array(self):
        """Codewords as a float32 numpy array [codebook_size, block_dim]."""
        import numpy as np

        return np.asarray(self.proto.codewords, dtype=np.float32).reshape(self.codebook_size, self.block_dim)


@dataclass(frozen=True)
class PageCoordinates(_FromProto):
    batch: int
    layer: int
    kv_head: int
    token_start: int
    token_count: int
    proto: Any = _proto_field()

    def key(self) -> tuple:
        return (self.batch, self.layer, self.kv_head, self.token_start, self.token_count)


@dataclass(frozen=True)
class PageMetrics(_FromProto):
    mse: float
    cosine_similarity: float
    compressed_vectors: int
    raw_vectors: int
    key_logit_mse: Optional[float]
    attention_tv: Optional[float]
    attention_kl: Optional[float]
    topk_disagreement: Optional[float]
    value_aggregation_mse: Optional[float]
    query_source: str
    raw_reasons: tuple
    proto: Any = _proto_field()


@dataclass(frozen=True)
class CompressedPage(_FromProto):
    sequence: int
    client_sequence: int
    coordinates: PageCoordinates
    frame: bytes
    frame_digest: str
    metrics: Optional[PageMetrics]
    proto: Any = _proto_field()
    _nested: ClassVar[dict] = {"coordinates": PageCoordinates, "metrics": PageMetrics}


@dataclass(frozen=True)
class DecodedPage(_FromProto):
    sequence: int
    client_sequence: int
    profile_digest: str
    coordinates: PageCoordinates
    data: bytes
    proto: Any = _proto_field()
    _nested: ClassVar[dict] = {"coordinates": PageCoordinates}


@dataclass(frozen=True)
class Receipt(_FromProto):
    receipt_id: str
    operation: str
    profile_digest: str
    pages: int
    compressed_vectors: int
    raw_vectors: int
    input_bytes: int
    output_bytes: int
    compression_ratio: float
    fallback_reasons: tuple
    receipt_json: str
    receipt_digest: str
    recorded_unix_seconds: int
    label: str
    persisted: bool
    proto: Any = _proto_field()

    @property
    def document(self) -> dict:
        """The KV layer's receipt document as a dict."""
        return json.loads(self.receipt_json) if self.receipt_json else {}

    def to_json(self) -> str:
        """The proto3 JSON form (lowerCamelCase, every field), as the CLI writes into `.fqc` files."""
        from google.protobuf import json_format

        return json.dumps(json_format.MessageToDict(self.proto, including_default_value_fields=True),
                          separators=(",", ":"))


@dataclass(frozen=True)
class ServerLimits(_FromProto):
    max_message_bytes: int
    max_page_bytes: int
    max_inflight_pages_per_stream: int
    max_concurrent_streams: int
    max_profile_build_cost: int
    receipt_retention: int
    max_profiles: int
    worker_threads: int
    worker_queue_capacity: int
    max_eval_values: int
    build_workers: int
    build_threads: int
    proto: Any = _proto_field()


@dataclass(frozen=True)
class ServerInfo(_FromProto):
    version: str
    frame_formats: tuple
    rotation_algorithms: tuple
    axis_policies: tuple
    dtypes: tuple
    limits: Optional[ServerLimits]
    registered_profiles: int
    stored_receipts: int
    proto: Any = _proto_field()
    _nested: ClassVar[dict] = {"limits": ServerLimits}
    _convert: ClassVar[dict] = {"dtypes": lambda v: tuple(_DTYPE_NAMES.get(d, str(d)) for d in v)}


@dataclass(frozen=True)
class QualityMetrics(_FromProto):
    reconstruction_mse: float
    cosine_similarity: float
    key_logit_mse: Optional[float]
    attention_tv: Optional[float]
    attention_kl: Optional[float]
    topk_disagreement: Optional[float]
    value_aggregation_mse: Optional[float]
    query_source: str
    proto: Any = _proto_field()


@dataclass(frozen=True)
class QualityReport(_FromProto):
    profile_digest: str
    profile_id: str
    metrics: Optional[QualityMetrics]
    within_budget: bool
    violations: tuple
    wire_bits_per_coord: float
    compression_ratio: float
    report_json: str
    proto: Any = _proto_field()
    _nested: ClassVar[dict] = {"metrics": QualityMetrics}


@dataclass(frozen=True)
class RegisteredCalibration(_FromProto):
    """RegisterCalibration's answer: the artifact's digest (recomputed by the server) and whether this
    call stored it (False: it was registered already)."""
    calibration_digest: str
    created: bool
    proto: Any = _proto_field()


@dataclass(frozen=True)
class Calibration(_FromProto):
    """A calibration artifact (docs/format/kv.md, "Calibration artifact") as GetCalibration returns it."""
    calibration_json: str
    proto: Any = _proto_field()

    @property
    def document(self) -> dict:
        return json.loads(self.calibration_json)

    @property
    def digest(self) -> str:
        """The digest the artifact names itself by (the server checked it on registration)."""
        return self.document["digest"]


@dataclass(frozen=True)
class RecommendedProfile(_FromProto):
    """One measured candidate of RecommendProfile; spec_json is ready for Client.register_profile."""
    profile_id: str
    spec_json: str
    compression_ratio: float
    bits_per_value: float
    mean: Optional[QualityMetrics]
    max: Optional[QualityMetrics]
    meets_budget: bool
    qualifies: bool
    reason: str
    block_dim: int
    codebook_size: int
    calibrated: bool
    centering: str
    renormalize: bool
    proto: Any = _proto_field()
    _nested: ClassVar[dict] = {"mean": QualityMetrics, "max": QualityMetrics}

    @property
    def spec(self) -> dict:
        return json.loads(self.spec_json)


@dataclass(frozen=True)
class Recommendation(_FromProto):
    """RecommendProfile's answer: candidates ranked (qualifying first, highest ratio first). A budget
    no candidate meets is an answer, not an error: best_index is -1 and `best` None, `summary` says
    which metric failed or how far the ratio fell short."""
    candidates: tuple
    best_index: int
    summary: str
    calibration_digest: str
    calibration_json: str
    calibration_stored: bool
    calibration_tokens: int
    evaluation_tokens: int
    seconds: float
    proto: Any = _proto_field()
    _nested: ClassVar[dict] = {"candidates": RecommendedProfile}

    @property
    def best(self) -> Optional[RecommendedProfile]:
        """The best candidate that meets the budget and min_ratio, or None when none does."""
        return self.candidates[self.best_index] if 0 <= self.best_index < len(self.candidates) else None
