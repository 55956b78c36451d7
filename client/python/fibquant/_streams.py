"""Transport-independent parts of the two page streams, shared by the sync and asyncio clients:
request construction and answer checking (order by sequence numbers, one receipt at the end)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import numpy as np

from ._stubs import pb
from .errors import DataLossError, InternalError, InvalidArgumentError
from .tensors import check_dtype
from .types import CompressedPage, DecodedPage, Receipt

DTYPE_ENUM = {"f32": pb.DTYPE_F32, "f16": pb.DTYPE_F16, "bf16": pb.DTYPE_BF16}


class Progress(NamedTuple):
    """Passed to a progress callback after every answered page."""
    pages_done: int
    pages_total: int
    bytes_done: int  # raw page bytes (compress: sent; decompress: received)


def compress_header(digest: str, dtype: str, *, return_page_metrics=False, label="", queries=None):
    check_dtype(dtype, "input dtype")
    h = pb.CompressStreamHeader(profile_digest=digest, input_dtype=DTYPE_ENUM[dtype],
                                return_page_metrics=bool(return_page_metrics), label=label or "")
    if queries is not None:
        h.queries.extend(np.asarray(queries, dtype=np.float32).ravel().tolist())
    return pb.CompressPagesRequest(header=h)


def decompress_header(dtype: str, digest: str = ""):
    check_dtype(dtype, "output dtype")
    return pb.DecompressPagesRequest(header=pb.DecompressStreamHeader(output_dtype=DTYPE_ENUM[dtype],
                                                                      profile_digest=digest or ""))


def raw_page_request(i: int, coords: tuple, data: bytes):
    b, l, h, t0, n = coords
    return pb.CompressPagesRequest(page=pb.RawPage(
        coordinates=pb.PageCoordinates(batch=b, layer=l, kv_head=h, token_start=t0, token_count=n),
        data=data, client_sequence=i))


def frame_request(i: int, frame: bytes):
    return pb.DecompressPagesRequest(frame=pb.Frame(frame=frame, client_sequence=i))


def coords_of(c) -> tuple:
    return (c.batch, c.layer, c.kv_head, c.token_start, c.token_count)


@dataclass
class CompressResult:
    """Frames in input order (bytes), the page messages (typed on access) and the receipt."""
    frames: list = field(default_factory=list)
    coordinates: list = field(default_factory=list)
    receipt: Optional[Receipt] = None
    _protos: list = field(default_factory=list, repr=False)

    @property
    def pages(self) -> list:
        return [CompressedPage.from_proto(p) for p in self._protos]


@dataclass
class DecompressResult:
    """Decoded pages in input order: coordinates and raw bytes; the receipt when the server sends one."""
    data: list = field(default_factory=list)
    coordinates: list = field(default_factory=list)
    profile_digests: list = field(default_factory=list)
    receipt: Optional[Receipt] = None
    _protos: list = field(default_factory=list, repr=False)

    @property
    def pages(self) -> list:
        return [DecodedPage.from_proto(p) for p in self._protos]


class CompressCollector:
    method = "CompressPages"

    def __init__(self, keep_protos: bool = False):
        self.result = CompressResult()
        self._keep = keep_protos

    def answer(self, resp, index: int) -> bool:
        """Consumes one response; True for a page. Raises on a protocol violation."""
        kind = resp.WhichOneof("kind")
        if kind == "receipt":
            if self.result.receipt is not None:
                raise InternalError("two receipts", method=self.method)
            self.result.receipt = Receipt.from_proto(resp.receipt)
            return False
        p = resp.page
        if kind != "page" or self.result.receipt is not None or p.sequence != index or p.client_sequence != index:
            raise InternalError(f"answer {index} out of order or malformed (sequence {p.sequence}, "
                                f"client_sequence {p.client_sequence})", method=self.method)
        self.result.frames.append(p.frame)
        self.result.coordinates.append(coords_of(p.coordinates))
        if self._keep:
            self.result._protos.append(p)
        return True

    def finish(self, count: int, answered: int) -> CompressResult:
        if answered != count:
            raise DataLossError(f"stream ended after {answered} of {count} pages", method=self.method)
        if self.result.receipt is None:
            raise DataLossError("stream finished without a receipt", method=self.method)
        return self.result


class DecompressCollector:
    method = "DecompressPages"

    def __init__(self, keep_protos: bool = False):
        self.result = DecompressResult()
        self._keep = keep_protos

    def answer(self, resp, index: int) -> bool:
        kind = resp.WhichOneof("kind")
        if kind == "receipt":
            if self.result.receipt is not None:
                raise InternalError("two receipts", method=self.method)
            self.result.receipt = Receipt.from_proto(resp.receipt)
            return False
        p = resp.page
        if kind != "page" or self.result.receipt is not None or p.sequence != index or p.client_sequence != index:
            raise InternalError(f"answer {index} out of order or malformed (sequence {p.sequence}, "
                                f"client_sequence {p.client_sequence})", method=self.method)
        self.result.data.append(p.data)
        self.result.coordinates.append(coords_of(p.coordinates))
        self.result.profile_digests.append(p.profile_digest)
        if self._keep:
            self.result._protos.append(p)
        return True

    def finish(self, count: int, answered: int) -> DecompressResult:
        if answered != count:
            raise DataLossError(f"stream ended after {answered} of {count} pages", method=self.method)
        return self.result


def check_window(window: int) -> int:
    if not isinstance(window, int) or not 1 <= window <= 1024:
        raise InvalidArgumentError(f"window must be an integer in [1, 1024], got {window!r}")
    return window
