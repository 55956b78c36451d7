"""Transport-independent parts of the two page streams, shared by the sync and asyncio clients:
request construction, answer checking (order by sequence numbers, one receipt at the end) and the
stream jobs (what one compress or decompress call sends and what it returns); the clients keep
only the transport loop (aio.run_stream) and their retry/recovery loop."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, NamedTuple, Optional

import numpy as np

from ._common import CompressedTensor, assemble, decompress_target, plan_compress
from ._stubs import pb
from .errors import DataLossError, InternalError
from .tensors import ELEMENT_SIZE, check_dtype
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


class _Collector:
    """Checks a stream's answers (pages in input order by sequence and client_sequence, at most one
    receipt, after the pages) and collects them into `result`; the subclass keeps each page's payload."""
    method: ClassVar[str]
    receipt_required: ClassVar[bool]

    def __init__(self, keep_protos: bool = False):
        self.result = self._new_result()
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
        self._keep_payload(p)
        self.result.coordinates.append(coords_of(p.coordinates))
        if self._keep:
            self.result._protos.append(p)
        return True

    def finish(self, count: int, answered: int):
        if answered != count:
            raise DataLossError(f"stream ended after {answered} of {count} pages", method=self.method)
        if self.receipt_required and self.result.receipt is None:
            raise DataLossError("stream finished without a receipt", method=self.method)
        return self.result


class CompressCollector(_Collector):
    method = "CompressPages"
    receipt_required = True
    _new_result = CompressResult

    def _keep_payload(self, p) -> None:
        self.result.frames.append(p.frame)


class DecompressCollector(_Collector):
    method = "DecompressPages"
    receipt_required = False  # DecompressResult.receipt: "when the server sends one"
    _new_result = DecompressResult

    def _keep_payload(self, p) -> None:
        self.result.data.append(p.data)
        self.result.profile_digests.append(p.profile_digest)


@dataclass
class StreamJob:
    """One page stream as data: the header, request i, a fresh collector per attempt (a retried
    stream starts over), the raw bytes of page i for progress, and what the result becomes."""
    method: str
    header: Any
    count: int
    request: Callable[[int], Any]
    collector: Callable[[], _Collector]
    page_bytes: Callable[[_Collector, int], int]
    finish: Callable[[Any], Any] = lambda result: result


def compress_pages_job(digest: str, pages, dtype: str, *, return_page_metrics: bool, label: str, queries,
                       keep_pages: bool) -> StreamJob:
    """CompressPages of raw pages: (coordinates, bytes-like of the page) pairs."""
    pages = list(pages)
    header = compress_header(digest, dtype, return_page_metrics=return_page_metrics, label=label, queries=queries)
    sizes = [len(d) for _, d in pages]
    keep = keep_pages or return_page_metrics
    return StreamJob("CompressPages", header, len(pages),
                     lambda i: raw_page_request(i, pages[i][0], bytes(pages[i][1])),
                     lambda: CompressCollector(keep), lambda c, i: sizes[i])


def decompress_pages_job(frames, dtype: str, digest: str = "", keep_pages: bool = False) -> StreamJob:
    """DecompressPages of frames (bytes-like), decoded to dtype."""
    frames = [bytes(f) for f in frames]
    header = decompress_header(dtype, digest)
    return StreamJob("DecompressPages", header, len(frames), lambda i: frame_request(i, frames[i]),
                     lambda: DecompressCollector(keep_pages), lambda c, i: len(c.result.data[i]))


def compress_tensor_job(tensor, info, *, layout: str, label: str, return_page_metrics: bool,
                        queries) -> StreamJob:
    """CompressPages of a tensor's pages (read from the tensor as they are sent); the result is a
    CompressedTensor."""
    plan = plan_compress(tensor, info, layout)
    coords = plan.coords
    token_bytes = plan.grid.head_dim * ELEMENT_SIZE[info.dtype]
    header = compress_header(info.digest, info.dtype, return_page_metrics=return_page_metrics, label=label,
                             queries=queries)

    def finish(r: CompressResult) -> CompressedTensor:
        return CompressedTensor(frames=r.frames, coordinates=r.coordinates, receipt=r.receipt,
                                profile_digest=info.digest, profile_id=info.profile_id, source_shape=plan.shape,
                                source_dtype=plan.src_dtype, page_dtype=info.dtype,
                                tokens_per_page=info.tokens_per_page, layout=layout, source_kind=plan.kind,
                                pages=r.pages if return_page_metrics else [])
    return StreamJob("CompressPages", header, len(coords),
                     lambda i: raw_page_request(i, coords[i], plan.source.page(*coords[i])),
                     lambda: CompressCollector(return_page_metrics), lambda c, i: coords[i][4] * token_bytes, finish)


def decompress_tensor_job(compressed, dtype, like, shape, layout, tokens_per_page, out) -> StreamJob:
    """DecompressPages of what decompress() was given (see _common.decompress_target); the result is
    the assembled tensor (or `out`, filled)."""
    frames, digest, shp, lay, dt, lk, tpp = decompress_target(compressed, dtype, like, shape, layout,
                                                               tokens_per_page)
    job = decompress_pages_job(frames, dt, digest)
    job.finish = lambda r: assemble(r, shp, lay, dt, lk, tpp, out)
    return job
