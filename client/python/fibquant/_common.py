"""Configuration and state shared by the sync and asyncio clients: channel credentials, options,
retry delays, held specs (profile recovery), the profile cache, and the tensor-side halves of
compress/decompress."""
from __future__ import annotations

import json
import os
import random
import threading
from dataclasses import dataclass, field
from typing import Optional

import grpc
import numpy as np

from ._stubs import pb
from .container import Container, check_metadata, container_metadata, read_container, write_container
from .errors import InvalidArgumentError
from .tensors import (
    Assembler, PageGrid, PageSource, as_numpy, canonical_view, check_dtype, empty_output, grid_for, is_torch,
    to_output,
)
from .types import ProfileInfo, Receipt

CHANNEL_OPTIONS = [
    # gRPC's default 4 MiB receive limit is below the server's page and message limits; the server
    # enforces its own limits, so the client accepts what the server is willing to send.
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", -1),
]


def _read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@dataclass
class TlsConfig:
    """PEM bytes. root_certs None: the system's roots. client_cert/client_key: mTLS.
    server_name: the name to check in the server certificate when it differs from the target host."""
    root_certs: Optional[bytes] = None
    client_cert: Optional[bytes] = None
    client_key: Optional[bytes] = None
    server_name: Optional[str] = None

    @classmethod
    def from_files(cls, ca=None, cert=None, key=None, server_name=None) -> "TlsConfig":
        if (cert is None) != (key is None):
            raise InvalidArgumentError("TLS client certificate and key must be given together")
        return cls(_read(ca) if ca else None, _read(cert) if cert else None, _read(key) if key else None,
                   server_name)


def tls_config(tls) -> Optional[TlsConfig]:
    if tls is None or tls is False:
        return None
    if tls is True:
        return TlsConfig()
    if isinstance(tls, TlsConfig):
        return tls
    if isinstance(tls, (bytes, bytearray)):
        return TlsConfig(root_certs=bytes(tls))
    if isinstance(tls, (str, os.PathLike)):
        return TlsConfig.from_files(ca=tls)
    raise InvalidArgumentError(f"tls must be None, True, a CA file path, PEM bytes or a TlsConfig, got {type(tls)}")


def channel_args(tls: Optional[TlsConfig]):
    opts = list(CHANNEL_OPTIONS)
    creds = None
    if tls is not None:
        creds = grpc.ssl_channel_credentials(tls.root_certs, tls.client_key, tls.client_cert)
        if tls.server_name:
            opts.append(("grpc.ssl_target_name_override", tls.server_name))
    return creds, opts


class CancelToken:
    """Cancels the streams it is passed to (any thread): cancel() cancels the gRPC call, which
    ends the server's work on it, and the call raises CancelledError."""

    def __init__(self):
        self._lock = threading.Lock()
        self._cancelled = False
        self._callbacks: list = []

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            callbacks, self._callbacks = self._callbacks, []
        for cb in callbacks:
            cb()

    def attach(self, cb):
        """Runs cb on cancel (now if already cancelled); returns a function that detaches it."""
        with self._lock:
            if not self._cancelled:
                self._callbacks.append(cb)

                def detach():
                    with self._lock:
                        if cb in self._callbacks:
                            self._callbacks.remove(cb)
                return detach
        cb()
        return lambda: None


@dataclass
class ClientOptions:
    """Deadlines in seconds per attempt (a stream's covers the whole stream); UNAVAILABLE retries
    with exponential backoff and jitter (every retried call is idempotent on the server); the stream
    window (pages written but not yet answered)."""
    unary_timeout: float = 10.0
    register_timeout: float = 300.0
    stream_timeout: float = 600.0
    max_attempts: int = 5
    initial_backoff: float = 0.1
    max_backoff: float = 5.0
    backoff_multiplier: float = 2.0
    window: int = 32


def retry_delays(o: ClientOptions):
    """The waits between the attempts of a call retried on UNAVAILABLE (max_attempts - 1 of them):
    exponential backoff with jitter."""
    d = o.initial_backoff
    for _ in range(o.max_attempts - 1):
        yield d * random.uniform(0.5, 1.0)
        d = min(d * o.backoff_multiplier, o.max_backoff)


def check_window(window: int) -> int:
    if not isinstance(window, int) or not 1 <= window <= 1024:
        raise InvalidArgumentError(f"window must be an integer in [1, 1024], got {window!r}")
    return window


def client_setup(tls, token: Optional[str], token_file, options: Optional[ClientOptions], overrides: dict):
    """What both clients make of their constructor arguments: (options with the overrides applied,
    call metadata, channel credentials or None, channel options)."""
    options = options or ClientOptions()
    for k, v in overrides.items():
        if not hasattr(options, k):
            raise InvalidArgumentError(f"unknown client option {k!r}")
        setattr(options, k, v)
    check_window(options.window)
    if token_file is not None:
        with open(token_file) as f:
            token = f.read().strip()
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    creds, opts = channel_args(tls_config(tls))
    return options, metadata, creds, opts


class ProfileBook:
    """A client's profiles: the specs it registered (digest -> RegisterProfileRequest), kept to
    re-register a profile a server answers NOT_FOUND for, the calibrations it registered or had
    stored (digest -> RegisterCalibrationRequest), re-registered before a calibrated spec that names
    one, and the ProfileInfos it fetched (immutable per digest). Locked: a sync Client is shared by
    threads."""

    def __init__(self):
        self._lock = threading.Lock()
        self._held: dict = {}
        self._infos: dict = {}
        self._calibrations: dict = {}

    def calibration_registered(self, req, reg):
        """Holds a registered calibration (req: its RegisterCalibrationRequest, reg: the answer)."""
        if reg.calibration_digest:
            with self._lock:
                self._calibrations[reg.calibration_digest] = req
        return reg

    def recommended(self, rec):
        """Holds the calibration a RecommendProfile stored (store_calibration)."""
        if rec.calibration_stored and rec.calibration_digest:
            with self._lock:
                self._calibrations[rec.calibration_digest] = pb.RegisterCalibrationRequest(
                    calibration_json=rec.calibration_json)
        return rec

    def calibration_for(self, spec_req):
        """The RegisterCalibrationRequest held for the calibration a RegisterProfileRequest names, or None."""
        if spec_req.WhichOneof("spec") == "structured":
            digest = spec_req.structured.calibration_digest
        else:
            try:
                digest = json.loads(spec_req.spec_json).get("calibration_digest", "")
            except (ValueError, AttributeError):
                digest = ""
        with self._lock:
            return self._calibrations.get(digest) if digest else None

    def registered(self, req, info: ProfileInfo) -> ProfileInfo:
        with self._lock:
            self._held[info.digest] = req
            self._infos[info.digest] = info
        return info

    def fetched(self, info: ProfileInfo) -> ProfileInfo:
        with self._lock:
            self._infos[info.digest] = info
        return info

    def spec(self, digest: str):
        """The RegisterProfileRequest this client registered for digest, or None."""
        with self._lock:
            return self._held.get(digest)

    def digests(self) -> list:
        with self._lock:
            return sorted(self._held)

    def lookup(self, profile) -> tuple:
        """(the cached ProfileInfo or None, its digest) for a digest string or a ProfileInfo."""
        if isinstance(profile, ProfileInfo):
            return profile, profile.digest
        if not isinstance(profile, str):
            raise InvalidArgumentError(f"profile must be a digest string or a ProfileInfo, got {type(profile)}")
        with self._lock:
            return self._infos.get(profile), profile


def frame_profile_digest(frame: bytes) -> str:
    """The KV profile digest a page frame carries (bytes 12..44, docs/format/kv.md section 5)."""
    if len(frame) < 96 or frame[:4] != b"FQKV":
        raise InvalidArgumentError("not a KV page frame (magic FQKV, at least 96 bytes)")
    return "sha256:" + bytes(frame[12:44]).hex()


def frame_coordinates(frame: bytes) -> tuple:
    """(batch, layer, kv_head, token_start, token_count) of a page frame (unverified header)."""
    if len(frame) < 96 or frame[:4] != b"FQKV":
        raise InvalidArgumentError("not a KV page frame (magic FQKV, at least 96 bytes)")
    return tuple(int(v) for v in np.frombuffer(bytes(frame[44:64]), dtype="<u4"))


@dataclass
class CompressedTensor:
    """A tensor's frames (stream order) with what is needed to rebuild it and the stream's receipt."""
    frames: list
    coordinates: list
    receipt: Receipt
    profile_digest: str
    profile_id: str
    source_shape: tuple
    source_dtype: str
    page_dtype: str
    tokens_per_page: int
    layout: str = "auto"
    source_kind: str = "numpy"  # "numpy" or "torch": the default type decompress returns
    pages: list = field(default_factory=list, repr=False)  # typed CompressedPage when requested

    @property
    def frame_bytes(self) -> int:
        return sum(len(f) for f in self.frames)

    @property
    def raw_bytes(self) -> int:
        return self.receipt.input_bytes if self.receipt else 0

    def to_container(self, source_file: str = "") -> Container:
        meta = container_metadata(profile_digest=self.profile_digest, profile_id=self.profile_id,
                                  source_file=source_file, source_dtype=self.source_dtype,
                                  source_shape=self.source_shape, page_dtype=self.page_dtype,
                                  tokens_per_page=self.tokens_per_page, pages=len(self.frames))
        if self.layout != "auto":
            meta["layout"] = self.layout  # Python-only key; the CLI reads rank 2-4 auto layouts
        receipt = json.loads(self.receipt.to_json()) if self.receipt else {}
        return Container(meta, list(self.frames), receipt)

    def save(self, path, source_file: str = "") -> int:
        """Writes a `.fqc` file `fibquant decompress` reads (rank 2-4 sources); returns its size."""
        return write_container(path, self.to_container(source_file))

    @classmethod
    def from_container(cls, c: Container, where: str = "container") -> "CompressedTensor":
        digest, shape, src_dtype, tpp = check_metadata(c.metadata, len(c.frames), where)
        receipt = None
        if c.receipt:
            from google.protobuf import json_format
            msg = pb.Receipt()
            json_format.ParseDict(c.receipt, msg, ignore_unknown_fields=True)
            receipt = Receipt.from_proto(msg)
        return cls(frames=list(c.frames), coordinates=[], receipt=receipt, profile_digest=digest,
                   profile_id=str(c.metadata.get("profile_id", "")), source_shape=shape,
                   source_dtype=src_dtype, page_dtype=str(c.metadata.get("page_dtype", src_dtype)),
                   tokens_per_page=tpp, layout=str(c.metadata.get("layout", "auto")))

    @classmethod
    def load(cls, path) -> "CompressedTensor":
        return cls.from_container(read_container(path), os.fspath(path))


@dataclass
class CompressPlan:
    grid: PageGrid
    source: PageSource
    coords: list
    page_bytes: int  # bytes of a full page in the page dtype
    shape: tuple
    src_dtype: str
    kind: str


def plan_compress(tensor, info: ProfileInfo, layout: str = "auto") -> CompressPlan:
    arr, src = as_numpy(tensor)
    view = canonical_view(arr, layout)
    grid = grid_for(view.shape, info.shape, info.tokens_per_page)
    from .tensors import ELEMENT_SIZE
    return CompressPlan(grid, PageSource(view, src, info.dtype), grid.plan(),
                        info.tokens_per_page * grid.head_dim * ELEMENT_SIZE[info.dtype], tuple(arr.shape), src,
                        "torch" if is_torch(tensor) else "numpy")


def decompress_target(obj, dtype: Optional[str], like: Optional[str], shape, layout, tokens_per_page):
    """(frames, digest, shape, layout, out dtype, like, tokens_per_page or None) of what decompress got."""
    if isinstance(obj, (str, os.PathLike)):
        obj = CompressedTensor.load(obj)
    if isinstance(obj, Container):
        obj = CompressedTensor.from_container(obj)
    if isinstance(obj, CompressedTensor):
        return (obj.frames, obj.profile_digest, tuple(shape or obj.source_shape), layout or obj.layout,
                check_dtype(dtype or obj.source_dtype), like or obj.source_kind, obj.tokens_per_page)
    frames = list(obj)
    if not frames:
        raise InvalidArgumentError("no frames to decompress")
    return (frames, "", tuple(shape) if shape is not None else None, layout or "auto",
            check_dtype(dtype or "f32"), like or "numpy", tokens_per_page)


def assemble(result, shape, layout, dtype, like, tokens_per_page, out=None):
    """Places decoded pages (a DecompressResult) into a tensor of `shape` (inferred as
    [layers, heads, tokens, head_dim], or rank 5 when batch > 0 appears, when None)."""
    from .tensors import ELEMENT_SIZE
    coords = result.coordinates
    if shape is None:
        B = max(c[0] for c in coords) + 1
        L = max(c[1] for c in coords) + 1
        H = max(c[2] for c in coords) + 1
        T = max(c[3] + c[4] for c in coords)
        D = len(result.data[0]) // (coords[0][4] * ELEMENT_SIZE[dtype])
        shape = (B, L, H, T, D) if B > 1 else (L, H, T, D)
        layout = "auto"
    if tokens_per_page is None:
        tokens_per_page = max(c[4] for c in coords)
    if out is not None and is_torch(out) and out.device.type != "cpu":
        out.copy_(assemble(result, shape, layout, dtype, "torch", tokens_per_page))
        return out
    if out is not None:
        arr, out_dtype = as_numpy(out)
        if out_dtype != dtype:
            raise InvalidArgumentError(f"out holds {out_dtype} elements but the decode dtype is {dtype}")
        if not arr.flags.writeable:
            raise InvalidArgumentError("out is not writeable")
        view = canonical_view(arr, layout)
        target = arr
    else:
        target, view = empty_output(shape, layout, dtype)
    B, L, H, T, D = view.shape
    grid = PageGrid(B, L, H, T, D, tokens_per_page)
    asm = Assembler(grid, target, view, dtype)
    for c, data in zip(coords, result.data):
        asm.add(c, data)
    asm.finish()
    if out is not None:
        return out
    return to_output(target, dtype, like)
