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
    their digests (a replica that never saw it, a lost data dir) re-registers the spec (after the
    calibration it names, when the client registered that too), checks the digest is unchanged and
    retries once (profiles are content-addressed);
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

from ._common import (
    CancelToken, ClientOptions, CompressedTensor, ProfileBook, TlsConfig, check_window, client_setup, retry_delays,
)
from ._rpc import (
    EVALUATE_QUALITY, GET_CALIBRATION, GET_CODEBOOK, GET_PROFILE, GET_RECEIPT, GET_SERVER_INFO, HEALTH_CHECK,
    LIST_PROFILES, LIST_RECEIPTS, RECOMMEND_PROFILE, REGISTER_CALIBRATION, REGISTER_PROFILE, RPCS, Pager, Rpc, bind,
    calibration_request, check_reregistered, health_serving, register_request, reregistration_failed,
)
from ._streams import (
    CompressResult, DecompressResult, Progress, StreamJob, compress_pages_job, compress_tensor_job,
    decompress_pages_job, decompress_tensor_job,
)
from ._stubs import pb_grpc
from .errors import FibquantError, InvalidArgumentError, NotFoundError, UnavailableError, from_rpc_error
from .types import Calibration, Codebook, ProfileInfo, Receipt, Recommendation, RegisteredCalibration, ServerInfo

__all__ = ["Client", "CancelToken", "CompressedTensor", "Progress", "TlsConfig", "ClientOptions",
           "CompressResult", "DecompressResult"]

ProgressFn = Callable[[Progress], None]


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
        self.options, self._metadata, self._creds, self._opts = client_setup(tls, token, token_file, options,
                                                                             overrides)
        self._channel = (grpc.secure_channel(target, self._creds, options=self._opts) if self._creds is not None
                         else grpc.insecure_channel(target, options=self._opts))
        self._transport_lock = threading.Lock()
        self._loop_transport: Optional[_LoopTransport] = None
        self._calls = bind(self._channel, pb_grpc.KvCompressionServiceStub(self._channel))
        self._profiles = ProfileBook()

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

    # ---- call plumbing (what each RPC sends and returns: _rpc.RPCS)

    def _call(self, rpc: Rpc, *args, timeout: Optional[float] = None, **kwargs):
        return self._send(rpc, rpc.request(*args, **kwargs), timeout)

    def _send(self, rpc: Rpc, request, timeout: Optional[float] = None):
        """One RPC of the table: retried on UNAVAILABLE if idempotent, its profile recovered on
        NOT_FOUND, the answer converted to its typed result."""
        call = self._calls[rpc.method]
        deadline = timeout or getattr(self.options, rpc.timeout)

        def once():
            try:
                resp = call(request, timeout=deadline, metadata=self._metadata)
            except grpc.RpcError as e:
                raise from_rpc_error(e, rpc.method) from None
            return rpc.result(resp)
        return self._attempts(rpc, request, once)

    def _list(self, rpc: Rpc, limit: int, timeout: Optional[float], **args) -> list:
        pager = Pager(rpc, limit, **args)
        while (request := pager.next_request()) is not None:
            pager.add(self._send(rpc, request, timeout))
        return pager.items

    def _attempts(self, rpc: Rpc, request, once):
        run = (lambda: self._retrying(once)) if rpc.retryable else once
        return self._recovering(rpc.recover(request) if rpc.recover else "", run)

    def _retrying(self, fn):
        """Runs fn() again on UnavailableError, up to max_attempts in all."""
        for delay in retry_delays(self.options):
            try:
                return fn()
            except UnavailableError:
                pass
            time.sleep(delay)
        return fn()

    def _recovering(self, digest: str, fn):
        """fn(); on NOT_FOUND for a digest this client registered, re-register and retry once."""
        try:
            return fn()
        except NotFoundError as nf:
            req = self._profiles.spec(digest)
            if req is None:
                raise
            try:
                calibration = self._profiles.calibration_for(req)
                if calibration is not None:  # a server that lost the profile may have lost its calibration
                    self._send(REGISTER_CALIBRATION, calibration)
                info = self._register(req)
            except FibquantError as e:
                raise reregistration_failed(digest, nf, e) from None
            check_reregistered(digest, info)
        return fn()

    # ---- profiles

    def _register(self, req, timeout=None) -> ProfileInfo:
        return self._profiles.registered(req, self._send(REGISTER_PROFILE, req, timeout))

    def register_profile(self, spec, *, timeout: Optional[float] = None) -> ProfileInfo:
        """Registers a spec (dict or spec JSON string as `fibquant profile register` reads, a
        KvProfileSpec message, or a RecommendedProfile) and remembers it for recovery. Idempotent:
        same spec, same digest."""
        return self._register(register_request(spec), timeout)

    def get_profile(self, digest: str, *, timeout: Optional[float] = None) -> ProfileInfo:
        return self._profiles.fetched(self._call(GET_PROFILE, digest, timeout=timeout))

    def list_profiles(self, *, page_size: int = 0, max_profiles: int = 100000,
                      timeout: Optional[float] = None) -> list:
        """Registered profiles ordered by digest (follows next_page_token)."""
        return self._list(LIST_PROFILES, max_profiles, timeout, page_size=page_size)

    def get_codebook(self, digest: str, *, include_rotation_matrix: bool = False,
                     timeout: Optional[float] = None) -> Codebook:
        return self._call(GET_CODEBOOK, digest, include_rotation_matrix=include_rotation_matrix, timeout=timeout)

    def held_digests(self) -> list:
        return self._profiles.digests()

    def _profile(self, profile: Union[str, ProfileInfo]) -> ProfileInfo:
        info, digest = self._profiles.lookup(profile)
        return info or self.get_profile(digest)

    # ---- calibrations and recommendations

    def register_calibration(self, calibration, *, timeout: Optional[float] = None) -> RegisteredCalibration:
        """Stores a calibration artifact: its JSON (str, bytes or dict), or a Calibration or
        Recommendation carrying it. The server recomputes the digest (InvalidArgumentError on a
        mismatch). Idempotent: `created` is False when it was registered already. Admin-guarded."""
        req = calibration_request(calibration)
        return self._profiles.calibration_registered(req, self._send(REGISTER_CALIBRATION, req, timeout))

    def get_calibration(self, calibration_digest: str, *, timeout: Optional[float] = None) -> Calibration:
        """A registered calibration artifact (NotFoundError when unknown)."""
        return self._call(GET_CALIBRATION, calibration_digest, timeout=timeout)

    def recommend_profile(self, keys=None, values=None, queries=None, *, role: Optional[str] = None, budget=None,
                          min_ratio: float = 0.0, calibration_fraction: float = 0.0, tokens_per_page: int = 0,
                          max_codebook_size: int = 0, target_shape=None, profile_id_prefix: str = "",
                          store_calibration: bool = False, timeout: Optional[float] = None) -> Recommendation:
        """RecommendProfile on one head's sample: keys/values/queries [tokens, head_dim], any float
        array of any strides (sent as f32). role: "key" (default when keys are given) compresses keys,
        with queries one per token; "value" compresses values (keys optional: attention weights).
        budget: a dict of QualityBudget fields ({"max_attention_tv": 0.15}) per held-out page.
        target_shape: the serving KvShape (dict or JSON). store_calibration also registers the
        calibration (admin-guarded). No candidate meeting the budget is an answer: `best` is None."""
        rec = self._call(RECOMMEND_PROFILE, keys, values, queries, role=role, budget=budget, min_ratio=min_ratio,
                         calibration_fraction=calibration_fraction, tokens_per_page=tokens_per_page,
                         max_codebook_size=max_codebook_size, target_shape=target_shape,
                         profile_id_prefix=profile_id_prefix, store_calibration=store_calibration, timeout=timeout)
        return self._profiles.recommended(rec)

    # ---- receipts, evaluation, server

    def get_receipt(self, receipt_id: str, *, timeout: Optional[float] = None) -> Receipt:
        return self._call(GET_RECEIPT, receipt_id, timeout=timeout)

    def list_receipts(self, profile_digest: str = "", *, max_receipts: int = 1000,
                      timeout: Optional[float] = None) -> list:
        """Receipts newest first (optionally of one profile), following next_page_token."""
        return self._list(LIST_RECEIPTS, max_receipts, timeout, profile_digest=profile_digest)

    def evaluate_quality(self, profiles: Sequence = (), candidates: Sequence = (), *, keys=None, values=None,
                         queries=None, top_k: int = 0, timeout: Optional[float] = None) -> list:
        """Quality reports (registered profiles first, then candidates, in order). keys/values
        [tokens, head_dim] and queries [count, head_dim], any float array (sent as f32)."""
        return self._call(EVALUATE_QUALITY, profiles, candidates, keys, values, queries, top_k, timeout=timeout)

    def get_server_info(self, *, timeout: Optional[float] = None) -> ServerInfo:
        return self._call(GET_SERVER_INFO, timeout=timeout)

    def check_health(self, service: str = "", *, timeout: Optional[float] = None) -> bool:
        """grpc.health.v1 Check: True SERVING, False NOT_SERVING; NotFoundError for an unknown
        service. One attempt (a probe reports what it sees)."""
        return health_serving(self._call(HEALTH_CHECK, service, timeout=timeout), service)

    # ---- streams

    def _run(self, job: StreamJob, window: Optional[int], timeout: Optional[float],
             progress: Optional[ProgressFn], cancel: Optional[CancelToken]):
        """A page stream with retries and profile recovery. Each attempt is a pipelined stream run
        on the client's event-loop thread (grpc.aio): one thread multiplexes every stream of the
        client, which costs far less per page than a gRPC request thread plus a reader thread per
        stream. progress is called on that thread."""
        from .aio import run_stream
        rpc = RPCS[job.method]
        window = check_window(self.options.window if window is None else window)
        deadline = timeout or getattr(self.options, rpc.timeout)

        def attempt():
            t = self._transport()
            return t.run(run_stream(t.stub, job, window=window, timeout=deadline, metadata=self._metadata,
                                    progress=progress, cancel=cancel))
        return job.finish(self._attempts(rpc, job.header, attempt))

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
        job = compress_pages_job(profile_digest, pages, input_dtype, return_page_metrics=return_page_metrics,
                                 label=label, queries=queries, keep_pages=keep_pages)
        return self._run(job, window, timeout, progress, cancel)

    def decompress_pages(self, frames: Sequence[bytes], output_dtype: str = "f32", *, profile_digest: str = "",
                         window: Optional[int] = None, timeout: Optional[float] = None,
                         progress: Optional[ProgressFn] = None, cancel: Optional[CancelToken] = None,
                         keep_pages: bool = False) -> DecompressResult:
        """DecompressPages: decoded pages (coordinates, bytes of output_dtype) in input order.
        profile_digest (optional) makes the server check every frame belongs to it and lets the
        client recover that profile on NOT_FOUND."""
        return self._run(decompress_pages_job(frames, output_dtype, profile_digest, keep_pages), window, timeout,
                         progress, cancel)

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
        job = compress_tensor_job(tensor, self._profile(profile), layout=layout, label=label,
                                  return_page_metrics=return_page_metrics, queries=queries)
        return self._run(job, window, timeout, progress, cancel)

    def decompress(self, compressed, dtype: Optional[str] = None, *, like: Optional[str] = None, shape=None,
                   layout: Optional[str] = None, tokens_per_page: Optional[int] = None, out=None,
                   window: Optional[int] = None, timeout: Optional[float] = None,
                   progress: Optional[ProgressFn] = None, cancel: Optional[CancelToken] = None):
        """Decompresses into a tensor. `compressed`: a CompressedTensor, a Container, a `.fqc` path,
        or a sequence of frames (then `shape`/`layout` place them; without `shape` the result is
        [layers, heads, tokens, head_dim]). dtype: default the source's dtype (f32 for bare frames).
        like: "numpy" or "torch" (default: what was compressed). out: a tensor to fill in place.
        numpy bf16 results are uint16 arrays of bf16 bits (fibquant.bf16_to_f32 converts)."""
        job = decompress_tensor_job(compressed, dtype, like, shape, layout, tokens_per_page, out)
        return self._run(job, window, timeout, progress, cancel)


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
