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

from ._common import (
    HEALTH_METHOD, CancelToken, ClientOptions, CompressedTensor, assemble, backoff_delays, channel_args,
    decompress_target, health_request, health_status, plan_compress, register_request, tls_config,
)
from ._streams import (
    CompressCollector, CompressResult, DecompressCollector, DecompressResult, Progress, check_window,
    compress_header, decompress_header, frame_request, raw_page_request,
)
from ._stubs import pb, pb_grpc
from .client import evaluate_request
from .errors import CancelledError, FailedPreconditionError, FibquantError, InvalidArgumentError, NotFoundError, UnavailableError
from .errors import error_from_code as from_rpc_error_parts, from_rpc_error
from .tensors import ELEMENT_SIZE
from .types import Codebook, ProfileInfo, QualityReport, Receipt, ServerInfo

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


async def run_stream(stub, method, header, count, make_req, collector, *, window, timeout, metadata, progress, cancel,
                     page_bytes):
    """One attempt of a pipelined stream on grpc.aio: a writer task sends the header and the items while at
    most `window` are unanswered; answers are read here and checked in order. Also the transport of the
    sync client's streams (on its event-loop thread)."""
    call = getattr(stub, method)(timeout=timeout, metadata=metadata)
    loop = asyncio.get_running_loop()
    room = asyncio.Semaphore(window)
    # The token may fire on any thread; the call belongs to this loop.
    detach = cancel.attach(lambda: loop.call_soon_threadsafe(call.cancel)) if cancel is not None else None

    async def writer():
        await call.write(header)
        for i in range(count):
            await room.acquire()
            await call.write(make_req(i))
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
                    done_bytes += page_bytes(answered - 1)
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
        self._channel = (grpc.aio.secure_channel(target, creds, options=opts) if creds is not None
                         else grpc.aio.insecure_channel(target, options=opts))
        _quiet_poller_race()
        self._stub = pb_grpc.KvCompressionServiceStub(self._channel)
        self._health = self._channel.unary_unary(HEALTH_METHOD)
        self._held: dict = {}
        self._infos: dict = {}

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # ---- plumbing

    async def _unary(self, method: str, request, timeout=None):
        rpc = getattr(self._stub, method)
        delays = backoff_delays(self.options)
        for n in range(1, self.options.max_attempts + 1):
            try:
                return await rpc(request, timeout=timeout or self.options.unary_timeout, metadata=self._metadata)
            except grpc.RpcError as e:
                err = from_rpc_error(e, method)
                if not isinstance(err, UnavailableError) or n >= self.options.max_attempts:
                    raise err from None
            await asyncio.sleep(next(delays))

    async def _retrying(self, fn):
        delays = backoff_delays(self.options)
        for n in range(1, self.options.max_attempts + 1):
            try:
                return await fn()
            except UnavailableError:
                if n >= self.options.max_attempts:
                    raise
            await asyncio.sleep(next(delays))

    async def _recovering(self, digest: str, fn):
        try:
            return await fn()
        except NotFoundError as nf:
            req = self._held.get(digest)
            if req is None:
                raise
            try:
                info = await self._register(req)
            except FibquantError as e:
                raise type(e)(f"re-registering profile {digest} after \"{nf.message}\": {e.message}",
                              code=e.code, method="RegisterProfile") from None
            if info.digest != digest:
                raise FailedPreconditionError(f"re-registered spec of profile {digest} now has digest {info.digest}",
                                              method="RegisterProfile") from None
        return await fn()

    # ---- unary RPCs

    async def _register(self, req, timeout=None) -> ProfileInfo:
        resp = await self._unary("RegisterProfile", req, timeout or self.options.register_timeout)
        info = ProfileInfo.from_proto(resp.profile, already_registered=resp.already_registered)
        self._held[info.digest] = req
        self._infos[info.digest] = info
        return info

    async def register_profile(self, spec, *, timeout=None) -> ProfileInfo:
        return await self._register(register_request(spec), timeout)

    async def get_profile(self, digest: str, *, timeout=None) -> ProfileInfo:
        resp = await self._recovering(
            digest, lambda: self._unary("GetProfile", pb.GetProfileRequest(digest=digest), timeout))
        info = ProfileInfo.from_proto(resp.profile)
        self._infos[info.digest] = info
        return info

    async def list_profiles(self, *, page_size: int = 0, max_profiles: int = 100000, timeout=None) -> list:
        out, token = [], ""
        while len(out) < max_profiles:
            resp = await self._unary("ListProfiles", pb.ListProfilesRequest(page_size=page_size, page_token=token),
                                     timeout)
            out.extend(ProfileInfo.from_proto(p) for p in resp.profiles)
            token = resp.next_page_token
            if not token or not resp.profiles:
                break
        return out[:max_profiles]

    async def get_codebook(self, digest: str, *, include_rotation_matrix: bool = False, timeout=None) -> Codebook:
        req = pb.GetCodebookRequest(digest=digest, include_rotation_matrix=include_rotation_matrix)
        return Codebook.from_proto(await self._recovering(digest, lambda: self._unary("GetCodebook", req, timeout)))

    async def _profile(self, profile) -> ProfileInfo:
        if isinstance(profile, ProfileInfo):
            return profile
        if not isinstance(profile, str):
            raise InvalidArgumentError(f"profile must be a digest string or a ProfileInfo, got {type(profile)}")
        return self._infos.get(profile) or await self.get_profile(profile)

    async def get_receipt(self, receipt_id: str, *, timeout=None) -> Receipt:
        resp = await self._unary("GetReceipt", pb.GetReceiptRequest(receipt_id=receipt_id), timeout)
        return Receipt.from_proto(resp.receipt)

    async def list_receipts(self, profile_digest: str = "", *, max_receipts: int = 1000, timeout=None) -> list:
        out, token = [], ""
        while len(out) < max_receipts:
            req = pb.ListReceiptsRequest(profile_digest=profile_digest, page_size=min(max_receipts - len(out), 1000),
                                         page_token=token)
            resp = await self._unary("ListReceipts", req, timeout)
            out.extend(Receipt.from_proto(r) for r in resp.receipts)
            token = resp.next_page_token
            if not token or not resp.receipts:
                break
        return out[:max_receipts]

    async def evaluate_quality(self, profiles: Sequence = (), candidates: Sequence = (), *, keys=None, values=None,
                               queries=None, top_k: int = 0, timeout=None) -> list:
        req = evaluate_request(profiles, candidates, keys, values, queries, top_k)
        resp = await self._unary("EvaluateQuality", req, timeout or self.options.register_timeout)
        return [QualityReport.from_proto(r) for r in resp.reports]

    async def get_server_info(self, *, timeout=None) -> ServerInfo:
        return ServerInfo.from_proto(await self._unary("GetServerInfo", pb.GetServerInfoRequest(), timeout))

    async def check_health(self, service: str = "", *, timeout=None) -> bool:
        try:
            resp = await self._health(health_request(service), timeout=timeout or self.options.unary_timeout,
                                      metadata=self._metadata)
        except grpc.RpcError as e:
            raise from_rpc_error(e, "Health/Check") from None
        status = health_status(resp)
        if status not in (1, 2):
            raise FibquantError(f"status {status} for {service!r}", method="Health/Check")
        return status == 1

    # ---- streams

    async def _stream(self, method, header, count, make_req, collector, *, window, timeout, progress, cancel,
                      page_bytes):
        window = check_window(self.options.window if window is None else window)
        return await run_stream(self._stub, method, header, count, make_req, collector, window=window,
                                timeout=timeout or self.options.stream_timeout, metadata=self._metadata,
                                progress=progress, cancel=cancel, page_bytes=page_bytes)

    async def compress_pages(self, profile_digest: str, pages: Sequence, input_dtype: str, *,
                             return_page_metrics=False, label="", queries=None, window=None, timeout=None,
                             progress=None, cancel: Optional[CancelToken] = None, keep_pages=False) -> CompressResult:
        pages = list(pages)
        header = compress_header(profile_digest, input_dtype, return_page_metrics=return_page_metrics, label=label,
                                 queries=queries)
        sizes = [len(d) for _, d in pages]

        async def attempt():
            return await self._stream("CompressPages", header, len(pages),
                                      lambda i: raw_page_request(i, pages[i][0], bytes(pages[i][1])),
                                      CompressCollector(keep_pages or return_page_metrics), window=window,
                                      timeout=timeout, progress=progress, cancel=cancel, page_bytes=sizes.__getitem__)
        return await self._recovering(profile_digest, lambda: self._retrying(attempt))

    async def decompress_pages(self, frames: Sequence[bytes], output_dtype: str = "f32", *, profile_digest="",
                               window=None, timeout=None, progress=None, cancel: Optional[CancelToken] = None,
                               keep_pages=False) -> DecompressResult:
        frames = [bytes(f) for f in frames]
        header = decompress_header(output_dtype, profile_digest)
        holder = {}

        async def attempt():
            holder["c"] = DecompressCollector(keep_pages)
            return await self._stream("DecompressPages", header, len(frames), lambda i: frame_request(i, frames[i]),
                                      holder["c"], window=window, timeout=timeout, progress=progress, cancel=cancel,
                                      page_bytes=lambda i: len(holder["c"].result.data[i]))
        if profile_digest:
            return await self._recovering(profile_digest, lambda: self._retrying(attempt))
        return await self._retrying(attempt)

    async def compress(self, tensor, profile: Union[str, ProfileInfo], *, layout="auto", label="",
                       return_page_metrics=False, queries=None, window=None, timeout=None, progress=None,
                       cancel: Optional[CancelToken] = None) -> CompressedTensor:
        info = await self._profile(profile)
        plan = plan_compress(tensor, info, layout)
        coords = plan.coords
        esize = ELEMENT_SIZE[info.dtype]
        D = plan.grid.head_dim
        header = compress_header(info.digest, info.dtype, return_page_metrics=return_page_metrics, label=label,
                                 queries=queries)

        async def attempt():
            return await self._stream("CompressPages", header, len(coords),
                                      lambda i: raw_page_request(i, coords[i], plan.source.page(*coords[i])),
                                      CompressCollector(return_page_metrics), window=window, timeout=timeout,
                                      progress=progress, cancel=cancel, page_bytes=lambda i: coords[i][4] * D * esize)
        r = await self._recovering(info.digest, lambda: self._retrying(attempt))
        return CompressedTensor(frames=r.frames, coordinates=r.coordinates, receipt=r.receipt,
                                profile_digest=info.digest, profile_id=info.profile_id, source_shape=plan.shape,
                                source_dtype=plan.src_dtype, page_dtype=info.dtype,
                                tokens_per_page=info.tokens_per_page, layout=layout, source_kind=plan.kind,
                                pages=r.pages if return_page_metrics else [])

    async def decompress(self, compressed, dtype: Optional[str] = None, *, like=None, shape=None, layout=None,
                         tokens_per_page=None, out=None, window=None, timeout=None, progress=None,
                         cancel: Optional[CancelToken] = None):
        frames, digest, shp, lay, dt, lk, tpp = decompress_target(compressed, dtype, like, shape, layout,
                                                                   tokens_per_page)
        r = await self.decompress_pages(frames, dt, profile_digest=digest, window=window, timeout=timeout,
                                        progress=progress, cancel=cancel)
        return assemble(r, shp, lay, dt, lk, tpp, out)
