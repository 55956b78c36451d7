"""fibquant: Python client for the FibQuant KV-cache compression service (fibquant.v1).

Offload and restore LLM KV caches (numpy arrays, PyTorch tensors, Hugging Face past_key_values,
vLLM-style paged blocks) through a fibquant-server, read and write the CLI's `.fqc` container.
See docs/PYTHON.md.

The gRPC stubs (`fibquant.v1.kv_compression_pb2*`) are generated at build time into the build tree
(build/client/python/fibquant/v1); this package's __path__ is extended over every `fibquant`
directory on sys.path so they load as `fibquant.v1` once that directory is on PYTHONPATH.
"""
from __future__ import annotations

import pkgutil as _pkgutil

__path__ = _pkgutil.extend_path(__path__, __name__)  # type: ignore[name-defined]

from ._stubs import pb, pb_grpc  # noqa: E402  (generated code; clear ImportError when missing)
from .errors import (  # noqa: E402
    AbortedError,
    AlreadyExistsError,
    CancelledError,
    DataLossError,
    DeadlineExceededError,
    FailedPreconditionError,
    FibquantError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    OutOfRangeError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
    UnknownError,
    error_from_code,
)
from .types import (  # noqa: E402
    BuildStats,
    Calibration,
    Codebook,
    CompressedPage,
    DecodedPage,
    PageCoordinates,
    PageMetrics,
    ProfileInfo,
    QualityMetrics,
    QualityReport,
    Receipt,
    Recommendation,
    RecommendedProfile,
    RegisteredCalibration,
    RotationParams,
    ServerInfo,
    ServerLimits,
)
from .tensors import DTYPES, bf16_to_f32, f32_to_bf16  # noqa: E402
from .client import CancelToken, Client, CompressedTensor, Progress, TlsConfig  # noqa: E402
from .container import Container, read_container, write_container  # noqa: E402
from .offload import KvOffloader, OffloadResult, RestoreResult  # noqa: E402
from .specs import kv_profile_spec  # noqa: E402
from . import aio  # noqa: E402
from .aio import AsyncClient  # noqa: E402

__version__ = "0.1.0"

__all__ = [name for name in dir() if not name.startswith("_")]
