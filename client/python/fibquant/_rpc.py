"""The RPC table shared by fibquant.Client and fibquant.aio.AsyncClient.

One Rpc per call the clients make (the fibquant.v1.KvCompressionService methods they wrap, and
grpc.health.v1 Check): the method name, how the request is built from the client method's
arguments, how the response becomes the typed result, which ClientOptions deadline applies when a
call gives none, whether UNAVAILABLE is retried (the call is idempotent on the server) and which
profile digest a NOT_FOUND may be recovered for (by re-registering the spec the client holds). The
clients keep only what depends on their transport: calling, waiting between attempts, awaiting.
Also here: the pagination of the List RPCs and the checks of a profile recovery.

Thread safety: the table is immutable; a Pager belongs to one call.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from ._streams import CompressCollector, DecompressCollector, compress_header, decompress_header
from ._stubs import pb
from .errors import FailedPreconditionError, FibquantError, InvalidArgumentError
from .tensors import as_numpy, convert
from .types import (
    Calibration, Codebook, ProfileInfo, QualityReport, Receipt, Recommendation, RecommendedProfile,
    RegisteredCalibration, ServerInfo,
)

SERVICE = "fibquant.v1.KvCompressionService"
HEALTH_METHOD = "/grpc.health.v1.Health/Check"


@dataclass(frozen=True)
class Rpc:
    """kind "unary": request(*args) -> message, result(response) -> typed result.
    kind "paged": request(remaining, page_token, **args) -> message, result(response) -> (items,
    next_page_token); Pager drives it. kind "stream": request builds the header message and result
    is the collector class of the answers (_streams); a StreamJob describes the whole stream."""
    method: str  # KvCompressionService method name; errors name it
    request: Callable[..., Any]
    result: Callable[[Any], Any]
    timeout: str = "unary_timeout"  # the ClientOptions deadline when the call gives none
    retryable: bool = True  # idempotent on the server: UNAVAILABLE is retried with backoff
    recover: Optional[Callable[[Any], str]] = None  # request -> digest to re-register on NOT_FOUND
    kind: str = "unary"
    path: str = ""  # full method path of a method outside KvCompressionService


def register_request(spec) -> Any:
    if isinstance(spec, RecommendedProfile):
        spec = spec.spec_json
    if isinstance(spec, pb.KvProfileSpec):
        return pb.RegisterProfileRequest(structured=spec)
    if isinstance(spec, dict):
        return pb.RegisterProfileRequest(spec_json=json.dumps(spec))
    if isinstance(spec, str):
        return pb.RegisterProfileRequest(spec_json=spec)
    raise InvalidArgumentError("spec must be a dict, a spec JSON string, a KvProfileSpec or a RecommendedProfile, "
                               f"got {type(spec)}")


def register_result(resp) -> ProfileInfo:
    info = ProfileInfo.from_proto(resp.profile, already_registered=resp.already_registered)
    if not info.digest:
        raise FibquantError("server returned no digest", method="RegisterProfile")
    return info


def evaluate_request(profiles, candidates, keys, values, queries, top_k):
    req = pb.EvaluateQualityRequest(top_k=top_k)
    for p in ([profiles] if isinstance(profiles, (str, ProfileInfo)) else profiles):
        req.profile_digests.append(p.digest if isinstance(p, ProfileInfo) else p)
    for c in ([candidates] if isinstance(candidates, (dict, str)) else candidates):
        if isinstance(c, pb.KvProfileSpec):
            req.candidates.append(c)
        elif isinstance(c, dict):
            req.candidate_spec_jsons.append(json.dumps(c))
        elif isinstance(c, str):
            req.candidate_spec_jsons.append(c)
        else:
            raise InvalidArgumentError(f"candidate must be a dict, JSON string or KvProfileSpec, got {type(c)}")
    for name, arr in (("keys", keys), ("values", values), ("queries", queries)):
        if arr is not None:
            a, kind = as_numpy(arr)
            getattr(req, name).extend(np.ascontiguousarray(convert(a, kind, "f32")).ravel())
    return req


def calibration_request(calibration) -> Any:
    """RegisterCalibrationRequest from the artifact's JSON (str, bytes or a dict of it) or from a
    result carrying it (Calibration, Recommendation)."""
    text = getattr(calibration, "calibration_json", calibration)
    if isinstance(text, (bytes, bytearray, memoryview)):
        text = bytes(text).decode("utf-8")
    elif isinstance(text, dict):
        text = json.dumps(text)
    if not isinstance(text, str) or not text:
        raise InvalidArgumentError("calibration must be the artifact's JSON (str, bytes or dict), a Calibration "
                                   f"or a Recommendation, got {type(calibration).__name__}")
    return pb.RegisterCalibrationRequest(calibration_json=text)


def _sample_rows(name: str, arr, head_dim: Optional[int]) -> np.ndarray:
    """One head's sample [tokens, head_dim] of any float kind and strides, as contiguous f32 rows."""
    a, kind = as_numpy(arr)
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
        raise InvalidArgumentError(f"{name} must be one head's sample [tokens, head_dim], got shape {tuple(a.shape)}")
    if head_dim is not None and a.shape[1] != head_dim:
        raise InvalidArgumentError(f"{name} has head_dim {a.shape[1]}, the sample has {head_dim}")
    return np.ascontiguousarray(convert(a, kind, "f32"), dtype=np.float32)


def recommend_request(keys=None, values=None, queries=None, *, role: Optional[str] = None, budget=None,
                      min_ratio: float = 0.0, calibration_fraction: float = 0.0, tokens_per_page: int = 0,
                      max_codebook_size: int = 0, target_shape=None, profile_id_prefix: str = "",
                      store_calibration: bool = False):
    """RecommendProfileRequest. role defaults as `fibquant recommend`: "key" when keys are given, else
    "value"; the role's sample sets head_dim, every other sample must have it."""
    role = role or ("key" if keys is not None else "value")
    if role not in ("key", "value"):
        raise InvalidArgumentError(f"role must be 'key' or 'value', got {role!r}")
    main_name = "keys" if role == "key" else "values"
    main = keys if role == "key" else values
    if main is None:
        raise InvalidArgumentError(f"role {role!r} needs {main_name} (the sample to compress)")
    rows = {main_name: _sample_rows(main_name, main, None)}
    head_dim = rows[main_name].shape[1]
    for name, arr in (("keys", keys), ("values", values), ("queries", queries)):
        if arr is not None and name not in rows:
            rows[name] = _sample_rows(name, arr, head_dim)
    if isinstance(budget, dict):
        try:
            budget = pb.QualityBudget(**budget)
        except (ValueError, TypeError) as e:
            raise InvalidArgumentError(f"budget: {e}") from None
    elif budget is not None and not isinstance(budget, pb.QualityBudget):
        raise InvalidArgumentError(f"budget must be a dict or a QualityBudget, got {type(budget).__name__}")
    if isinstance(target_shape, dict):
        target_shape = json.dumps(target_shape)
    try:
        req = pb.RecommendProfileRequest(
            role=role, head_dim=head_dim, budget=budget, min_ratio=min_ratio,
            calibration_fraction=calibration_fraction, tokens_per_page=tokens_per_page,
            max_codebook_size=max_codebook_size, target_shape_json=target_shape or "",
            profile_id_prefix=profile_id_prefix, store_calibration=store_calibration)
    except (TypeError, ValueError) as e:  # e.g. a negative tokens_per_page, a target_shape not dict or str
        raise InvalidArgumentError(f"RecommendProfile: {e}") from None
    for name, a in rows.items():
        getattr(req, name).extend(a.ravel())
    return req


def health_request(service: str) -> bytes:
    """A serialized grpc.health.v1.HealthCheckRequest (no stubs for it are generated)."""
    name = service.encode()
    if len(name) >= 128:
        raise InvalidArgumentError("health service name too long")
    return b"" if not name else b"\x0a" + bytes([len(name)]) + name


def health_status(resp: bytes) -> int:
    """Field 1 (status enum) of a HealthCheckResponse; 0 when absent."""
    if len(resp) >= 2 and resp[0] == 0x08:
        return resp[1]
    return 0


def health_serving(status: int, service: str) -> bool:
    """True SERVING, False NOT_SERVING; any other status is an error."""
    if status not in (1, 2):
        raise FibquantError(f"status {status} for {service!r}", method="Health/Check")
    return status == 1


def _digest(req) -> str:
    return req.digest


def _header_digest(req) -> str:
    return req.header.profile_digest


REGISTER_PROFILE = Rpc("RegisterProfile", register_request, register_result, timeout="register_timeout")
GET_PROFILE = Rpc("GetProfile", lambda digest: pb.GetProfileRequest(digest=digest),
                  lambda resp: ProfileInfo.from_proto(resp.profile), recover=_digest)
LIST_PROFILES = Rpc(
    "ListProfiles", lambda remaining, token, page_size=0: pb.ListProfilesRequest(page_size=page_size, page_token=token),
    lambda resp: ([ProfileInfo.from_proto(p) for p in resp.profiles], resp.next_page_token), kind="paged")
GET_CODEBOOK = Rpc(
    "GetCodebook", lambda digest, include_rotation_matrix=False: pb.GetCodebookRequest(
        digest=digest, include_rotation_matrix=include_rotation_matrix),
    Codebook.from_proto, recover=_digest)
COMPRESS_PAGES = Rpc("CompressPages", compress_header, CompressCollector, timeout="stream_timeout",
                     recover=_header_digest, kind="stream")
DECOMPRESS_PAGES = Rpc("DecompressPages", decompress_header, DecompressCollector, timeout="stream_timeout",
                       recover=_header_digest, kind="stream")
GET_RECEIPT = Rpc("GetReceipt", lambda receipt_id: pb.GetReceiptRequest(receipt_id=receipt_id),
                  lambda resp: Receipt.from_proto(resp.receipt))
LIST_RECEIPTS = Rpc(
    "ListReceipts", lambda remaining, token, profile_digest="": pb.ListReceiptsRequest(
        profile_digest=profile_digest, page_size=min(remaining, 1000), page_token=token),
    lambda resp: ([Receipt.from_proto(r) for r in resp.receipts], resp.next_page_token), kind="paged")
EVALUATE_QUALITY = Rpc("EvaluateQuality", evaluate_request,
                       lambda resp: [QualityReport.from_proto(r) for r in resp.reports], timeout="register_timeout")
GET_SERVER_INFO = Rpc("GetServerInfo", pb.GetServerInfoRequest, ServerInfo.from_proto)
REGISTER_CALIBRATION = Rpc("RegisterCalibration", calibration_request, RegisteredCalibration.from_proto)
GET_CALIBRATION = Rpc("GetCalibration", lambda digest: pb.GetCalibrationRequest(calibration_digest=digest),
                      Calibration.from_proto)
# Candidate codebooks are built on the server like registrations, hence the registration deadline.
RECOMMEND_PROFILE = Rpc("RecommendProfile", recommend_request, Recommendation.from_proto, timeout="register_timeout")
# One attempt: a probe reports what it sees.
HEALTH_CHECK = Rpc("Health/Check", health_request, health_status, retryable=False, path=HEALTH_METHOD)

RPCS = {r.method: r for r in (REGISTER_PROFILE, GET_PROFILE, LIST_PROFILES, GET_CODEBOOK, COMPRESS_PAGES,
                              DECOMPRESS_PAGES, GET_RECEIPT, LIST_RECEIPTS, EVALUATE_QUALITY, GET_SERVER_INFO,
                              REGISTER_CALIBRATION, GET_CALIBRATION, RECOMMEND_PROFILE, HEALTH_CHECK)}

# KvCompressionService methods the Python client does not wrap (none today);
# tests/test_rpc_table.py fails when the service gains a method that is in neither list.
NOT_WRAPPED: frozenset = frozenset()


def bind(channel, stub) -> dict:
    """method -> the channel's callable for every non-stream RPC of the table."""
    return {r.method: channel.unary_unary(r.path) if r.path else getattr(stub, r.method)
            for r in RPCS.values() if r.kind != "stream"}


class Pager:
    """Follows next_page_token of a paged RPC until `limit` items, an empty token or an empty page:
    next_request() gives the request to send (None when done), add() takes its converted answer."""

    def __init__(self, rpc: Rpc, limit: int, **args):
        self._rpc, self._limit, self._args = rpc, limit, args
        self._items: list = []
        self._token = ""
        self._done = False

    def next_request(self):
        if self._done or len(self._items) >= self._limit:
            return None
        return self._rpc.request(self._limit - len(self._items), self._token, **self._args)

    def add(self, page) -> None:
        items, self._token = page
        self._items.extend(items)
        self._done = not self._token or not items

    @property
    def items(self) -> list:
        return self._items[:self._limit]


def reregistration_failed(digest: str, not_found: FibquantError, err: FibquantError) -> FibquantError:
    """The error to raise when re-registering a held spec after NOT_FOUND failed: err's type and code."""
    return type(err)(f"re-registering profile {digest} after \"{not_found.message}\": {err.message}",
                     code=err.code, method="RegisterProfile")


def check_reregistered(digest: str, info: ProfileInfo) -> None:
    """Profiles are content-addressed: the held spec must register under the same digest again."""
    if info.digest != digest:
        raise FailedPreconditionError(f"re-registered spec of profile {digest} now has digest {info.digest}",
                                      method="RegisterProfile")
