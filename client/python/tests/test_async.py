"""asyncio client: several concurrent streams on one client give the same frames as the sync
client; cancellation (task cancel, CancelToken) mid-stream ends the server's work on the stream."""
from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

import fibquant
from conftest import real_kv, spec


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


@pytest.fixture(scope="module")
def key_f16(server):
    with fibquant.Client(server.target) as c:
        return c.register_profile(spec("py-async-k", dtype="f16"))


def test_async_unary_and_concurrent_streams(server, key_f16):
    k = real_kv(0, "k").astype(np.float16)
    v = real_kv(0, "v").astype(np.float16)
    inputs = [k, v, k[:, ::-1].copy(), v * np.float16(0.5), k[:32], v[:48]]

    async def main():
        async with fibquant.AsyncClient(server.target) as c:
            info = await c.register_profile(spec("py-async-k", dtype="f16"))
            assert info.digest == key_f16.digest and info.already_registered
            assert (await c.get_profile(info.digest)).profile_id == "py-async-k"
            assert (await c.get_server_info()).limits.max_concurrent_streams >= len(inputs)
            assert await c.check_health()
            assert (await c.get_codebook(info.digest)).codebook_size == 16
            packed = await asyncio.gather(*(c.compress(x, info, window=4) for x in inputs))
            decoded = await asyncio.gather(*(c.decompress(p) for p in packed))
            receipts = await asyncio.gather(*(c.get_receipt(p.receipt.receipt_id) for p in packed))
            assert len(await c.list_receipts(info.digest)) >= len(inputs)
            assert len(await c.list_profiles()) >= 1
            return packed, decoded, receipts

    packed, decoded, receipts = run(main())
    with fibquant.Client(server.target) as s:
        for x, p, y, r in zip(inputs, packed, decoded, receipts):
            assert p.frames == s.compress(x, key_f16).frames
            assert np.array_equal(y, s.decompress(p)) and y.shape == x.shape
            assert r == p.receipt and r.pages == len(p.frames)


def _wait_for(pred, seconds=30.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


@pytest.fixture(scope="module")
def long_profile(server):
    """A profile whose tensor makes a long stream: 8 layers x 4 heads x 1024 tokens, 16 per page."""
    with fibquant.Client(server.target) as c:
        return c.register_profile(spec("py-cancel-k", dtype="f32", layers=8, kv_heads=4, tokens=1024,
                                       tokens_per_page=16))


def _long_tensor():
    rng = np.random.default_rng(7)
    return rng.standard_normal((8, 4, 1024, 64), dtype=np.float32)  # 2048 pages


def test_sync_cancel_mid_stream_frees_server_work(server, long_profile):
    in_flight = 'fibquant_streams_in_flight'
    cancelled = 'fibquant_rpc_handled_total{code="CANCELLED",method="CompressPages"}'
    before = server.metric(cancelled)
    token = fibquant.CancelToken()
    seen = []

    def progress(p):
        seen.append(p.pages_done)
        if p.pages_done == 20:
            assert server.metric(in_flight) >= 1  # the stream is open on the server
            threading.Thread(target=token.cancel).start()

    with fibquant.Client(server.target, window=2) as c:
        with pytest.raises(fibquant.CancelledError) as e:
            c.compress(_long_tensor(), long_profile, progress=progress, cancel=token)
        assert e.value.code.name == "CANCELLED"
    assert 20 <= max(seen) < 2048
    assert _wait_for(lambda: server.metric(in_flight) == 0), server.metrics()
    assert _wait_for(lambda: server.metric(cancelled) >= before + 1), server.metrics()


def test_async_task_cancel_mid_stream_frees_server_work(server, long_profile):
    in_flight = 'fibquant_streams_in_flight'
    x = _long_tensor()

    async def main():
        async with fibquant.AsyncClient(server.target, window=2) as c:
            started = asyncio.Event()

            def progress(p):
                if p.pages_done == 10:
                    started.set()
            task = asyncio.ensure_future(c.compress(x, long_profile, progress=progress))
            await asyncio.wait_for(started.wait(), 60)
            assert server.metric(in_flight) >= 1
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            # A CancelToken works on the asyncio client too.
            token = fibquant.CancelToken()
            token.cancel()
            with pytest.raises(fibquant.CancelledError):
                await c.compress(x, long_profile, cancel=token)

    run(main())
    assert _wait_for(lambda: server.metric(in_flight) == 0), server.metrics()
