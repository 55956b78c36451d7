"""asyncio twin of fibquant.Client on grpc.aio: the same methods as coroutines, the same options,
errors, retries, profile recovery and windowed streams. Many streams can run at once on one
client (asyncio.gather); each stream's writer is its own task, bounded by the window.

    async with fibquant.aio.AsyncClient("127.0.0.1:50051") as c:
        packed = await c.compress(k, digest)
        k2 = await c.decompress(packed)

Cancelling the awaiting task (or a CancelToken) cancels the gRPC call, which ends the server's work.
Thread safety: use a client from the event loop that created it.
"""
from __future__ import annotations

import asyncio
from typing import Optional, Sequence, Union

import grpc
import grpc.aio

from ._common import CancelToken, ClientOptions, CompressedTensor, ProfileBook, check_window, client_setup, retry_delays
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
from .errors import CancelledError, FibquantError, NotFoundError, UnavailableError
from .errors import error_from_code as from_rpc_error_parts, from_rpc_error
from .types import Calibration, Codebook, ProfileInfo, Receipt, Recommendation, RegisteredCalibration, ServerInfo

__all__ = ["AsyncClient"]


def _quiet_poller_race():
    """Installs (once per event loop) the filter for gRPC's benign cross-loop poller wakeup race, which
    appears when sync Clients (whose streams run on their own loop) share the process with this loop."""
    from .client import _ignore_poller_wakeup_race
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return
    if loop.get_exception_handler() is None:
        loop.set_exception_handler(_ignore_poller_wakeup_race)


async def run_stream(stub, job: StreamJob, *, window, timeout, metadata, progress, cancel):
    """One attempt of a pipelined stream on grpc.aio: a writer task sends the header and the items while at
    most `window` are unanswered; answers are read here and checked in order. Also the transport of the
    sync client's streams (on its event-loop thread)."""
    method, count = job.method, job.count
    collector = job.collector()
    call = getattr(stub, method)(timeout=timeout, metadata=metadata)
    loop = asyncio.get_running_loop()
    room = asyncio.Semaphore(window)
    # The token may fire on any thread; the call belongs to this loop.
    detach = cancel.attach(lambda: loop.call_soon_threadsafe(call.cancel)) if cancel is not None else None

    async def writer():
        await call.write(job.header)
        for i in range(count):
            await room.acquire()
            await call.write(job.request(i))
        await call.done_writing()

    wtask = asyncio.ensure_future(writer())
    answered, done_bytes = 0, 0
    try:
        while True:
            resp = await call.read()
            if resp is grpc.aio.EOF:
                break
            try:
                is_page = collector.answer(resp, answered)
            except FibquantError:
                call.cancel()
                raise
            if is_page:
                answered += 1
                room.release()
                if progress is not None:
                    done_bytes += job.page_bytes(collector, answered - 1)
                    progress(Progress(answered, count, done_bytes))
        code = await call.code()  # the final status
        if code != grpc.StatusCode.OK:
            raise from_rpc_error_parts(code, await call.details(), method)
        if not wtask.done():
            await wtask
    except grpc.RpcError as e:
        raise from_rpc_error(e, method) from None
    except asyncio.CancelledError:
        call.cancel()
        task = asyncio.current_task()
        if cancel is not None and cancel.cancelled and not (task is not None and task.cancelling()):
            # Cancelled through the token, not by cancelling this task: a typed error.
            raise CancelledError("cancelled by the caller's CancelToken", method=method) from None
        raise
    except BaseException:  # e.g. a progress callback that raised: end the call, then report that
        call.cancel()
        raise
    finally:
        if detach is not None:
            detach()
        if not wtask.done():
            wtask.cancel()
        try:
            await wtask
        except BaseException:  # the writer fails when the call does; the call's status says why
            pass
    return collector.finish(count, answered)


class AsyncClient:
    """AsyncClient(target, tls=None, token=None, options=None, **option_overrides): see fibquant.Client."""

    def __init__(self, target: str, tls=None, token: Optional[str] = None, *, token_file=None,
                 options: Optional[ClientOptions] = None, **overrides):
        self.target = target
        self.options, self._metadata, creds, opts = client_setup(tls, token, token_file, options, overrides)
        self._channel = (grpc.aio.secure_channel(target, creds, options=opts) if creds is not None
                         else grpc.aio.insecure_channel(target, options=opts))
        _quiet_poller_race()
        self._stub = pb_grpc.KvCompressionServiceStub(self._channel)
        self._calls = bind(self._channel, self._stub)
        self._profiles = ProfileBook()

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # ---- plumbing (what each RPC sends and returns: _rpc.RPCS)

    async def _call(self, rpc: Rpc, *args, timeout=None, **kwargs):
        return await self._send(rpc, rpc.request(*args, **kwargs), timeout)

    async def _send(self, rpc: Rpc, request, timeout=None):
        call = self._calls[rpc.method]
        deadline = timeout or getattr(self.options, rpc.timeout)

        async def once():
            try:
                resp = await call(request, timeout=deadline, metadata=self._metadata)
            except grpc.RpcError as e:
                raise from_rpc_error(e, rpc.method) from None
            return rpc.result(resp)
        return await self._attempts(rpc, request, once)

    async def _list(self, rpc: Rpc, limit: int, timeout, **args) -> list:
        pager = Pager(rpc, limit, **args)
        while (request := pager.next_request()) is not None:
            pager.add(await self._send(rpc, request, timeout))
        return pager.items

    async def _attempts(self, rpc: Rpc, request, once):
        run = (lambda: self._retrying(once)) if rpc.retryable else once
        return await self._recovering(rpc.recover(request) if rpc.recover else "", run)

    async def _retrying(self, fn):
        for delay in retry_delays(self.options):
            try:
                return await fn()
            except UnavailableError:
                pass
            await asyncio.sleep(delay)
        return await fn()

    async def _recovering(self, digest: str, fn):
        try:
            return await fn()
        except NotFoundError as nf:
            req = self._profiles.spec(digest)
            if req is None:
                raise
            try:
                calibration = self._profiles.calibration_for(req)
                if calibration is not None:  # a server that lost the profile may have lost its calibration
                    await self._send(REGISTER_CALIBRATION, calibration)
                info = await self._register(req)
            except FibquantError as e:
                raise reregistration_failed(digest, nf, e) from None
            check_reregistered(digest, info)
        return await fn()

    # ---- unary RPCs

    async def _register(self, req, timeout=None) -> ProfileInfo:
        return self._profiles.registered(req, await self._send(REGISTER_PROFILE, req, timeout))

    async def register_profile(self, spec, *, timeout=None) -> ProfileInfo:
        return await self._register(register_request(spec), timeout)

    async def get_profile(self, digest: str, *, timeout=None) -> ProfileInfo:
        return self._profiles.fetched(await self._call(GET_PROFILE, digest, timeout=timeout))

    async def list_profiles(self, *, page_size: int = 0, max_profiles: int = 100000, timeout=None) -> list:
        return await self._list(LIST_PROFILES, max_profiles, timeout, page_size=page_size)

    async def get_codebook(self, digest: str, *, include_rotation_matrix: bool = False, timeout=None) -> Codebook:
        return await self._call(GET_CODEBOOK, digest, include_rotation_matrix=include_rotation_matrix, timeout=timeout)

    async def _profile(self, profile) -> ProfileInfo:
        info, digest = self._profiles.lookup(profile)
        return info or await self.get_profile(digest)

    async def register_calibration(self, calibration, *, timeout=None) -> RegisteredCalibration:
        req = calibration_request(calibration)
        return self._profiles.calibration_registered(req, await self._send(REGISTER_CALIBRATION, req, timeout))

    async def get_calibration(self, calibration_digest: str, *, timeout=None) -> Calibration:
        return await self._call(GET_CALIBRATION, calibration_digest, timeout=timeout)

    async def recommend_profile(self, keys=None, values=None, queries=None, *, role: Optional[str] = None,
                                budget=None, min_ratio: float = 0.0, calibration_fraction: float = 0.0,
                                tokens_per_page: int = 0, max_codebook_size: int = 0, target_shape=None,
                                profile_id_prefix: str = "", store_calibration: bool = False,
                                timeout=None) -> Recommendation:
        rec = await self._call(RECOMMEND_PROFILE, keys, values, queries, role=role, budget=budget, min_ratio=min_ratio,
                               calibration_fraction=calibration_fraction, tokens_per_page=tokens_per_page,
                               max_codebook_size=max_codebook_size, target_shape=target_shape,
                               profile_id_prefix=profile_id_prefix, store_calibration=store_calibration,
                               timeout=timeout)
        return self._profiles.recommended(rec)

    async def get_receipt(self, receipt_id: str, *, timeout=None) -> Receipt:
        return await self._call(GET_RECEIPT, receipt_id, timeout=timeout)

    async def list_receipts(self, profile_digest: str = "", *, max_receipts: int = 1000, timeout=None) -> list:
        return await self._list(LIST_RECEIPTS, max_receipts, timeout, profile_digest=profile_digest)

    async def evaluate_quality(self, profiles: Sequence = (), candidates: Sequence = (), *, keys=None, values=None,
                               queries=None, top_k: int = 0, timeout=None) -> list:
        return await self._call(EVALUATE_QUALITY, profiles, candidates, keys, values, queries, top_k, timeout=timeout)

    async def get_server_info(self, *, timeout=None) -> ServerInfo:
        return await self._call(GET_SERVER_INFO, timeout=timeout)

    async def check_health(self, service: str = "", *, timeout=None) -> bool:
        return health_serving(await self._call(HEALTH_CHECK, service, timeout=timeout), service)

    # ---- streams

    async def _run(self, job: StreamJob, window, timeout, progress, cancel):
        """A page stream with retries and profile recovery; each attempt is one run_stream."""
        rpc = RPCS[job.method]
        window = check_window(self.options.window if window is None else window)
        deadline = timeout or getattr(self.options, rpc.timeout)

        async def attempt():
            return await run_stream(self._stub, job, window=window, timeout=deadline, metadata=self._metadata,
                                    progress=progress, cancel=cancel)
        return job.finish(await self._attempts(rpc, job.header, attempt))

    async def compress_pages(self, profile_digest: str, pages: Sequence, input_dtype: str, *,
                             return_page_metrics=False, label="", queries=None, window=None, timeout=None,
                             progress=None, cancel: Optional[CancelToken] = None, keep_pages=False) -> CompressResult:
        job = compress_pages_job(profile_digest, pages, input_dtype, return_page_metrics=return_page_metrics,
                                 label=label, queries=queries, keep_pages=keep_pages)
        return await self._run(job, window, timeout, progress, cancel)

    async def decompress_pages(self, frames: Sequence[bytes], output_dtype: str = "f32", *, profile_digest="",
                               window=None, timeout=None, progress=None, cancel: Optional[CancelToken] = None,
                               keep_pages=False) -> DecompressResult:
        return await self._run(decompress_pages_job(frames, output_dtype, profile_digest, keep_pages), window,
                               timeout, progress, cancel)

    async def compress(self, tensor, profile: Union[str, ProfileInfo], *, layout="auto", label="",
                       return_page_metrics=False, queries=None, window=None, timeout=None, progress=None,
                       cancel: Optional[CancelToken] = None) -> CompressedTensor:
        job = compress_tensor_job(tensor, await self._profile(profile), layout=layout, label=label,
                                  return_page_metrics=return_page_metrics, queries=queries)
        return await self._run(job, window, timeout, progress, cancel)

    async def decompress(self, compressed, dtype: Optional[str] = None, *, like=None, shape=None, layout=None,
                         tokens_per_page=None, out=None, window=None, timeout=None, progress=None,
                         cancel: Optional[CancelToken] = None):
        job = decompress_tensor_job(compressed, dtype, like, shape, layout, tokens_per_page, out)
        return await self._run(job, window, timeout, progress, cancel)
