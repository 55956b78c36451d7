"""Synchronous client for fibquant.v1.KvCompressionService.

    import fibquant
    with fibquant.Client("127.0.0.1:50051") as c:
        info = c.register_profile(fibquant.kv_profile_spec("k", role="key", layers=1, kv_heads=4,
                                                            tokens=64, head_dim=128, tokens_per_page=16))
        packed = c.compress(k, info)          # numpy or torch, [tokens, heads, head_dim] etc.
        k2 = c.decompress(packed)             # same shape and dtype (torch in -> torch out)

What it adds over the generated stub (as the C++ client, client/client.h, does):
  - deadlines on every call (ClientOptions; `timeout=` overrides one call);
  - UNAVAILABLE retries with exponential backoff and jitter (every retried call is idempotent);
  - profile recovery: specs registered through the client are kept, and a NOT_FOUND for one of
    their digests (a replica that never saw it, a lost data dir) re-registers the spec, checks the
    digest is unchanged and retries once (profiles are content-addressed);
  - pipelined streams: up to `window` pages written and not yet answered while answers are read, in
    input order (checked by sequence); the streams of every Client run on one shared asyncio event
    loop thread (grpc.aio), the calling thread waits for the result;
  - errors as FibquantError subclasses keeping the gRPC code and message (fibquant.errors).

Thread safety: a Client may be shared by threads (each call has its own gRPC call; shared state is
locked). Ownership: the client owns its channel; close() or `with` releases it.
"""
from __future__ import annotations

import threading
import time
from typing import Callable, Optional, Sequence, Union

import grpc
import numpy as np

from ._common import (
    HEALTH_METHOD, CancelToken, ClientOptions, CompressedTensor, TlsConfig, assemble, backoff_delays, channel_args,
    decompress_target, health_request, health_status, plan_compress, register_request, tls_config,
)
from ._streams import (
    CompressCollector, CompressResult, DecompressCollector, DecompressResult, Progress, check_window,
    compress_header, decompress_header, frame_request, raw_page_request,
)
from ._stubs import pb, pb_grpc
from .errors import FailedPreconditionError, FibquantError, InvalidArgumentError, NotFoundError, UnavailableError
from .errors import from_rpc_error
from .tensors import ELEMENT_SIZE, check_dtype
from .types import Codebook, ProfileInfo, QualityReport, Receipt, ServerInfo

__all__ = ["Client", "CancelToken", "CompressedTensor", "Progress", "TlsConfig", "ClientOptions",
           "CompressResult", "DecompressResult"]

ProgressFn = Callable[[Progress], None]


class _ProfileState:
    """Held specs (digest -> RegisterProfileRequest) and fetched ProfileInfos (immutable per digest)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.held: dict = {}
        self.infos: dict = {}


class Client:
    """Client(target, tls=None, token=None, options=None, **option_overrides).

    target: "host:port" (or any gRPC target). tls: None (plaintext), True (system roots), a CA file
    path, PEM bytes or a TlsConfig (mTLS, server name override). token: admin bearer token (sent as
    `authorization: Bearer <token>` on every call; RegisterProfile needs it on servers started with
    --admin-token-file), or token_file= a file holding it.
    """

    def __init__(self, target: str, tls=None, token: Optional[str] = None, *, token_file=None,
                 options: Optional[ClientOptions] = None, **overrides):
        self.target = target
        self.options = options or ClientOptions()
        for k, v in overrides.items():
            if not hasattr(self.options, k):
                raise InvalidArgumentError(f"unknown client option {k!r}")
            setattr(self.options, k, v)
        check_window(self.options.window)
        if token_file is not None:
            with open(token_file) as f:
                token = f.read().strip()
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        creds, opts = channel_args(tls_config(tls))
        self._creds, self._opts = creds, opts
        self._channel = (grpc.secure_channel(target, creds, options=opts) if creds is not None
                         else grpc.insecure_channel(target, options=opts))
        self._transport_lock = threading.Lock()
        self._loop_transport: Optional[_LoopTransport] = None
        self._stub = pb_grpc.KvCompressionServiceStub(self._channel)
        self._health = self._channel.unary_unary(HEALTH_METHOD)
        self._profiles = _ProfileState()

    # ---- lifecycle

    def close(self) -> None:
        with self._transport_lock:
            t, self._loop_transport = self._loop_transport, None
        if t is not None:
            t.close()
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- call plumbing

    def _unary(self, method: str, request, timeout: Optional[float] = None, retry: bool = True):
        rpc = getattr(self._stub, method)
        attempts = self.options.max_attempts if retry else 1
        delays = backoff_delays(self.options)
        for n in range(1, attempts + 1):
            try:
                return rpc(request, timeout=timeout or self.options.unary_timeout, metadata=self._metadata)
            except grpc.RpcError as e:
                err = from_rpc_error(e, method)
                if not isinstance(err, UnavailableError) or n >= attempts:
                    raise err from None
            time.sleep(next(delays))

    def _retrying(self, fn):
        """Runs fn() again on UnavailableError, up to max_attempts in all."""
        delays = backoff_delays(self.options)
        for n in range(1, self.options.max_attempts + 1):
            try:
                return fn()
            except UnavailableError:
                if n >= self.options.max_attempts:
                    raise
            time.sleep(next(delays))

    def _recovering(self, digest: str, fn):
        """fn(); on NOT_FOUND for a digest this client registered, re-register and retry once."""
        try:
            return fn()
        except NotFoundError as nf:
            if not self._recover(digest, nf):
                raise
        return fn()

    def _recover(self, digest: str, nf: FibquantError) -> bool:
        with self._profiles.lock:
            req = self._profiles.held.get(digest)
        if req is None:
            return False
        try:
            info = self._register(req)
        except FibquantError as e:
            raise type(e)(f"re-registering profile {digest} after \"{nf.message}\": {e.message}",
                          code=e.code, method="RegisterProfile") from None
        if info.digest != digest:
            raise FailedPreconditionError(f"re-registered spec of profile {digest} now has digest {info.digest}",
                                          method="RegisterProfile")
        return True

    # ---- profiles

    def _register(self, req, timeout=None) -> ProfileInfo:
        resp = self._unary("RegisterProfile", req, timeout or self.options.register_timeout)
        info = ProfileInfo.from_proto(resp.profile, already_registered=resp.already_registered)
        if not info.digest:
            raise FibquantError("server returned no digest", method="RegisterProfile")
        with self._profiles.lock:
            self._profiles.held[info.digest] = req
            self._profiles.infos[info.digest] = info
        return info

    def register_profile(self, spec, *, timeout: Optional[float] = None) -> ProfileInfo:
        """Registers a spec (dict or spec JSON string as `fibquant profile register` reads, or a
        KvProfileSpec message) and remembers it for recovery. Idempotent: same spec, same digest."""
        return self._register(register_request(spec), timeout)

    def get_profile(self, digest: str, *, timeout: Optional[float] = None) -> ProfileInfo:
        resp = self._recovering(digest, lambda: self._unary("GetProfile", pb.GetProfileRequest(digest=digest), timeout))
        info = ProfileInfo.from_proto(resp.profile)
        with self._profiles.lock:
            self._profiles.infos[info.digest] = info
        return info

    def list_profiles(self, *, page_size: int = 0, max_profiles: int = 100000,
                      timeout: Optional[float] = None) -> list:
        """Registered profiles ordered by digest (follows next_page_token)."""
        out, token = [], ""
        while len(out) < max_profiles:
            resp = self._unary("ListProfiles", pb.ListProfilesRequest(page_size=page_size, page_token=token), timeout)
            out.extend(ProfileInfo.from_proto(p) for p in resp.profiles)
            token = resp.next_page_token
            if not token or not resp.profiles:
                break
        return out[:max_profiles]

    def get_codebook(self, digest: str, *, include_rotation_matrix: bool = False,
                     timeout: Optional[float] = None) -> Codebook:
        req = pb.GetCodebookRequest(digest=digest, include_rotation_matrix=include_rotation_matrix)
        return Codebook.from_proto(self._recovering(digest, lambda: self._unary("GetCodebook", req, timeout)))

    def held_digests(self) -> list:
        with self._profiles.lock:
            return sorted(self._profiles.held)

    def _profile(self, profile: Union[str, ProfileInfo]) -> ProfileInfo:
        if isinstance(profile, ProfileInfo):
            return profile
        if not isinstance(profile, str):
            raise InvalidArgumentError(f"profile must be a digest string or a ProfileInfo, got {type(profile)}")
        with self._profiles.lock:
            info = self._profiles.infos.get(profile)
        return info or self.get_profile(profile)

    # ---- receipts, evaluation, server

    def get_receipt(self, receipt_id: str, *, timeout: Optional[float] = None) -> Receipt:
        return Receipt.from_proto(self._unary("GetReceipt", pb.GetReceiptRequest(receipt_id=receipt_id), timeout).receipt)

    def list_receipts(self, profile_digest: str = "", *, max_receipts: int = 1000,
                      timeout: Optional[float] = None) -> list:
        """Receipts newest first (optionally of one profile), following next_page_token."""
        out, token = [], ""
        while len(out) < max_receipts:
            req = pb.ListReceiptsRequest(profile_digest=profile_digest, page_size=min(max_receipts - len(out), 1000),
                                         page_token=token)
            resp = self._unary("ListReceipts", req, timeout)
            out.extend(Receipt.from_proto(r) for r in resp.receipts)
            token = resp.next_page_token
            if not token or not resp.receipts:
                break
        return out[:max_receipts]

    def evaluate_quality(self, profiles: Sequence = (), candidates: Sequence = (), *, keys=None, values=None,
                         queries=None, top_k: int = 0, timeout: Optional[float] = None) -> list:
        """Quality reports (registered profiles first, then candidates, in order). keys/values
        [tokens, head_dim] and queries [count, head_dim], any float array (sent as f32)."""
        req = evaluate_request(profiles, candidates, keys, values, queries, top_k)
        resp = self._unary("EvaluateQuality", req, timeout or self.options.register_timeout)
        return [QualityReport.from_proto(r) for r in resp.reports]

    def get_server_info(self, *, timeout: Optional[float] = None) -> ServerInfo:
        return ServerInfo.from_proto(self._unary("GetServerInfo", pb.GetServerInfoRequest(), timeout))

    def check_health(self, service: str = "", *, timeout: Optional[float] = None) -> bool:
        """grpc.health.v1 Check: True SERVING, False NOT_SERVING; NotFoundError for an unknown
        service. One attempt (a probe reports what it sees)."""
        try:
            resp = self._health(health_request(service), timeout=timeout or self.options.unary_timeout,
                                metadata=self._metadata)
        except grpc.RpcError as e:
            raise from_rpc_error(e, "Health/Check") from None
        status = health_status(resp)
        if status not in (1, 2):
            raise FibquantError(f"status {status} for {service!r}", method="Health/Check")
        return status == 1

    # ---- streams

    def _stream(self, method: str, header, count: int, make_req, collector, *, window: Optional[int],
                timeout: Optional[float], progress: Optional[ProgressFn], cancel: Optional[CancelToken],
                page_bytes: Callable[[int], int]):
        """One attempt of a pipelined stream, run on the client's event-loop thread (grpc.aio): one
        thread multiplexes every stream of the client, which costs far less per page than a gRPC
        request thread plus a reader thread per stream. progress is called on that thread."""
        from .aio import run_stream
        window = check_window(self.options.window if window is None else window)
        t = self._transport()
        return t.run(run_stream(t.stub, method, header, count, make_req, collector, window=window,
                                timeout=timeout or self.options.stream_timeout, metadata=self._metadata,
                                progress=progress, cancel=cancel, page_bytes=page_bytes))

    def _transport(self) -> "_LoopTransport":
        with self._transport_lock:
            if self._loop_transport is None:
                self._loop_transport = _LoopTransport(self.target, self._creds, self._opts)
            return self._loop_transport

    def compress_pages(self, profile_digest: str, pages: Sequence, input_dtype: str, *,
                       return_page_metrics: bool = False, label: str = "", queries=None,
                       window: Optional[int] = None, timeout: Optional[float] = None,
                       progress: Optional[ProgressFn] = None, cancel: Optional[CancelToken] = None,
                       keep_pages: bool = False) -> CompressResult:
        """CompressPages on raw pages: a sequence of (coordinates, data) where coordinates is
        (batch, layer, kv_head, token_start, token_count) and data a bytes-like of token_count x
        head_dim elements of input_dtype, token-major. All or nothing: an error raises."""
        pages = list(pages)
        header = compress_header(profile_digest, input_dtype, return_page_metrics=return_page_metrics,
                                 label=label, queries=queries)
        sizes = [len(d) for _, d in pages]

        def attempt():
            return self._stream("CompressPages", header, len(pages),
                                lambda i: raw_page_request(i, pages[i][0], bytes(pages[i][1])),
                                CompressCollector(keep_pages or return_page_metrics), window=window,
                                timeout=timeout, progress=progress, cancel=cancel, page_bytes=sizes.__getitem__)
        return self._recovering(profile_digest, lambda: self._retrying(attempt))

    def decompress_pages(self, frames: Sequence[bytes], output_dtype: str = "f32", *, profile_digest: str = "",
                         window: Optional[int] = None, timeout: Optional[float] = None,
                         progress: Optional[ProgressFn] = None, cancel: Optional[CancelToken] = None,
                         keep_pages: bool = False) -> DecompressResult:
        """DecompressPages: decoded pages (coordinates, bytes of output_dtype) in input order.
        profile_digest (optional) makes the server check every frame belongs to it and lets the
        client recover that profile on NOT_FOUND."""
        frames = [bytes(f) for f in frames]
        check_dtype(output_dtype, "output dtype")
        header = decompress_header(output_dtype, profile_digest)
        holder = {}

        def attempt():
            holder["c"] = DecompressCollector(keep_pages)
            return self._stream("DecompressPages", header, len(frames), lambda i: frame_request(i, frames[i]),
                                holder["c"], window=window, timeout=timeout, progress=progress, cancel=cancel,
                                page_bytes=lambda i: len(holder["c"].result.data[i]))
        if profile_digest:
            return self._recovering(profile_digest, lambda: self._retrying(attempt))
        return self._retrying(attempt)

    # ---- tensors

    def compress(self, tensor, profile: Union[str, ProfileInfo], *, layout: str = "auto", label: str = "",
                 return_page_metrics: bool = False, queries=None, window: Optional[int] = None,
                 timeout: Optional[float] = None, progress: Optional[ProgressFn] = None,
                 cancel: Optional[CancelToken] = None) -> CompressedTensor:
        """Compresses a numpy array or torch tensor (f32/f16/bf16, any strides; torch tensors on
        another device are copied to the CPU) with a registered profile. Layout by rank, as the CLI:
        [tokens, head_dim], [tokens, heads, head_dim], [layers, heads, tokens, head_dim], or
        [batch, layers, heads, tokens, head_dim]; or `layout` letters (e.g. "bhtd" for one HF layer).
        Values are converted to the profile's dtype (round to nearest even) before sending."""
        info = self._profile(profile)
        plan = plan_compress(tensor, info, layout)
        coords = plan.coords
        esize = ELEMENT_SIZE[info.dtype]
        D = plan.grid.head_dim
        header = compress_header(info.digest, info.dtype, return_page_metrics=return_page_metrics, label=label,
                                 queries=queries)

        def attempt():
            return self._stream("CompressPages", header, len(coords),
                                lambda i: raw_page_request(i, coords[i], plan.source.page(*coords[i])),
                                CompressCollector(return_page_metrics), window=window, timeout=timeout,
                                progress=progress, cancel=cancel, page_bytes=lambda i: coords[i][4] * D * esize)
        r = self._recovering(info.digest, lambda: self._retrying(attempt))
        return CompressedTensor(frames=r.frames, coordinates=r.coordinates, receipt=r.receipt,
                                profile_digest=info.digest, profile_id=info.profile_id, source_shape=plan.shape,
                                source_dtype=plan.src_dtype, page_dtype=info.dtype,
                                tokens_per_page=info.tokens_per_page, layout=layout, source_kind=plan.kind,
                                pages=r.pages if return_page_metrics else [])

    def decompress(self, compressed, dtype: Optional[str] = None, *, like: Optional[str] = None, shape=None,
                   layout: Optional[str] = None, tokens_per_page: Optional[int] = None, out=None,
                   window: Optional[int] = None, timeout: Optional[float] = None,
                   progress: Optional[ProgressFn] = None, cancel: Optional[CancelToken] = None):
        """Decompresses into a tensor. `compressed`: a CompressedTensor, a Container, a `.fqc` path,
        or a sequence of frames (then `shape`/`layout` place them; without `shape` the result is
        [layers, heads, tokens, head_dim]). dtype: default the source's dtype (f32 for bare frames).
        like: "numpy" or "torch" (default: what was compressed). out: a tensor to fill in place.
        numpy bf16 results are uint16 arrays of bf16 bits (fibquant.bf16_to_f32 converts)."""
        frames, digest, shp, lay, dt, lk, tpp = decompress_target(compressed, dtype, like, shape, layout,
                                                                   tokens_per_page)
        r = self.decompress_pages(frames, dt, profile_digest=digest, window=window, timeout=timeout,
                                  progress=progress, cancel=cancel)
        return assemble(r, shp, lay, dt, lk, tpp, out)


def _ignore_poller_wakeup_race(loop, context):
    """gRPC's asyncio poller is one socket per process; when two event loops use grpc.aio (this
    module's thread and an application's loop), each wakeup byte is read by one of them and the
    other's read fails with EAGAIN. gRPC hands every event to the loop that owns its call, so the
    failed read is harmless: drop exactly that report, pass everything else on."""
    exc = context.get("exception")
    if isinstance(exc, BlockingIOError) and "PollerCompletionQueue" in repr(context.get("handle", "")):
        return
    loop.default_exception_handler(context)


class _LoopThread:
    """One asyncio event loop on a daemon thread, shared by every sync Client of the process, which
    runs their streams on grpc.aio. run() blocks the calling thread until the coroutine finishes;
    KeyboardInterrupt (or any exception in the waiting thread) cancels the coroutine, which cancels
    the gRPC call."""

    _lock = threading.Lock()
    _instance: "Optional[_LoopThread]" = None

    @classmethod
    def get(cls) -> "_LoopThread":
        with cls._lock:
            if cls._instance is None or not cls._instance.thread.is_alive():
                cls._instance = cls()
            return cls._instance

    def __init__(self):
        import asyncio
        self._asyncio = asyncio
        self.loop = asyncio.new_event_loop()
        self.loop.set_exception_handler(_ignore_poller_wakeup_race)
        self.thread = threading.Thread(target=self.loop.run_forever, name="fibquant-streams", daemon=True)
        self.thread.start()

    def run(self, coro):
        if threading.current_thread() is self.thread:
            coro.close()
            raise InvalidArgumentError("a sync Client stream was started from a progress callback (which runs on "
                                       "the client's event-loop thread); start it from another thread")
        fut = self._asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result()
        except BaseException:
            fut.cancel()
            raise


class _LoopTransport:
    """A client's grpc.aio channel and stub on the shared loop thread."""

    def __init__(self, target, creds, opts):
        import grpc.aio
        self.loop_thread = _LoopThread.get()

        async def make():
            ch = (grpc.aio.secure_channel(target, creds, options=opts) if creds is not None
                  else grpc.aio.insecure_channel(target, options=opts))
            return ch, pb_grpc.KvCompressionServiceStub(ch)
        self.channel, self.stub = self.loop_thread.run(make())

    def run(self, coro):
        return self.loop_thread.run(coro)

    def close(self):
        self.loop_thread.run(self.channel.close())


def evaluate_request(profiles, candidates, keys, values, queries, top_k):
    req = pb.EvaluateQualityRequest(top_k=top_k)
    for p in ([profiles] if isinstance(profiles, (str, ProfileInfo)) else profiles):
        req.profile_digests.append(p.digest if isinstance(p, ProfileInfo) else p)
    import json
    for c in ([candidates] if isinstance(candidates, (dict, str)) else candidates):
        if isinstance(c, pb.KvProfileSpec):
            req.candidates.append(c)
        elif isinstance(c, dict):
            req.candidate_spec_jsons.append(json.dumps(c))
        elif isinstance(c, str):
            req.candidate_spec_jsons.append(c)
        else:
            raise InvalidArgumentError(f"candidate must be a dict, JSON string or KvProfileSpec, got {type(c)}")
    from .tensors import as_numpy, convert
    for name, arr in (("keys", keys), ("values", values), ("queries", queries)):
        if arr is not None:
            a, kind = as_numpy(arr)
            getattr(req, name).extend(np.ascontiguousarray(convert(a, kind, "f32")).ravel())
    return req
