"""Sync client against a real server: every RPC, round trips for every dtype and layout (numpy and
torch, contiguous or not), progress, windows, deadlines, typed results."""
from __future__ import annotations

import json

import numpy as np
import pytest

import fibquant
from conftest import as_f32, real_kv, spec

try:
    import torch
except ImportError:  # torch is optional: its tests skip
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="python3-torch not installed")


@pytest.fixture(scope="module")
def profiles(server):
    """Key profiles for each dtype: 2 layers x 4 heads x 64 tokens x head_dim 64, 16 tokens per page."""
    with fibquant.Client(server.target) as c:
        return {dt: c.register_profile(spec(f"py-k-{dt}", dtype=dt)) for dt in fibquant.DTYPES}


def test_unary_rpcs(client, profiles):
    info = profiles["f16"]
    assert info.digest.startswith("sha256:") and len(info.digest) == 71
    again = client.register_profile(spec("py-k-f16", dtype="f16"))
    assert again.digest == info.digest and again.already_registered
    got = client.get_profile(info.digest)
    assert got == info.__class__.from_proto(got.proto) and got.profile_id == "py-k-f16"
    assert got.tokens_per_page == 16 and got.dtype == "f16" and got.role == "key"
    assert got.build_stats is not None and got.build_stats.cost > 0
    listed = client.list_profiles(page_size=1)  # pagination followed
    assert {p.digest for p in profiles.values()} <= {p.digest for p in listed}
    cb = client.get_codebook(info.digest)
    assert cb.codebook_size == 16 and cb.block_dim == 2 and cb.codewords_array().shape == (16, 2)
    assert cb.rotation is not None and cb.rotation.dim == 64 and not cb.rotation.matrix
    m = np.asarray(client.get_codebook(info.digest, include_rotation_matrix=True).rotation.matrix).reshape(64, 64)
    assert np.allclose(m @ m.T, np.eye(64), atol=1e-9)  # a rotation: orthogonal
    si = client.get_server_info()
    assert "f16" in si.dtypes and si.limits.max_inflight_pages_per_stream >= 1 and si.registered_profiles >= 3
    assert client.check_health("") and client.check_health("fibquant.v1.KvCompressionService")
    with pytest.raises(fibquant.NotFoundError) as e:
        client.check_health("no.such.Service")
    assert e.value.code.name == "NOT_FOUND"


def test_receipts_and_evaluation(client, profiles):
    info = profiles["f32"]
    k = real_kv(0, "k")
    packed = client.compress(k, info, label="receipt-test")
    r = packed.receipt
    assert r.operation == "compress" and r.pages == len(packed.frames) == 2 * 0 + 16 // 4 * 4
    assert r.label == "receipt-test" and r.input_bytes == k.nbytes and r.output_bytes == packed.frame_bytes
    assert client.get_receipt(r.receipt_id) == r
    assert r.receipt_id in [x.receipt_id for x in client.list_receipts(info.digest)]
    assert json.loads(r.receipt_json) == r.document
    q = real_kv(0, "q")
    reports = client.evaluate_quality([info], [spec("py-cand", dtype="f32")], keys=k[:, 0], queries=q[:, 0])
    assert [x.profile_id for x in reports] == ["py-k-f32", "py-cand"]
    m = reports[0].metrics
    assert m.query_source == "caller_queries" and 0 < m.cosine_similarity <= 1 and m.key_logit_mse is not None
    assert m.value_aggregation_mse is None


def _round_trip(client, info, x, **kw):
    packed = client.compress(x, info, **kw)
    y = client.decompress(packed)
    return packed, y


@pytest.mark.parametrize("dtype", fibquant.DTYPES)
@pytest.mark.parametrize("rank", [2, 3, 4, 5])
def test_numpy_round_trip_every_dtype_and_layout(client, profiles, dtype, rank):
    info = profiles[dtype]
    k = real_kv(0, "k")  # [64, 4, 64] f32
    x = {2: k[:, 1], 3: k, 4: np.stack([k, real_kv(0, "v")]).transpose(0, 2, 1, 3),
         5: np.stack([k, real_kv(0, "v")]).transpose(0, 2, 1, 3)[np.newaxis]}[rank]
    src = fibquant.tensors.convert(x, "f32", dtype)  # the tensor in the profile's own dtype
    packed, y = _round_trip(client, info, src)
    assert y.shape == x.shape and y.dtype == src.dtype
    yf, xf = as_f32(y, dtype), as_f32(src, dtype)
    rel = float(((yf - xf) ** 2).sum() / (xf ** 2).sum())
    assert rel < 0.25, rel  # 16 codewords x block 2 = 2 bits/coordinate: a coarse but real codec
    # Decoding again gives the same bytes (frames are deterministic data, decoding is pure).
    assert np.array_equal(client.decompress(packed), y)
    # f32 input to a profile of another dtype is converted (round to nearest even) before sending.
    if dtype != "f32":
        packed32 = client.compress(x, info)
        assert packed32.frames == packed.frames


def test_non_contiguous_and_explicit_layout(client, profiles):
    info = profiles["f32"]
    k = real_kv(0, "k")
    big = np.zeros((64, 8, 128), np.float32)
    big[:, ::2, ::2] = k  # a strided view holding k
    view = big[:, ::2, ::2]
    assert not view.flags.c_contiguous
    a = client.compress(view, info)
    b = client.compress(np.ascontiguousarray(view), info)
    assert a.frames == b.frames
    # One HF layer [batch, heads, tokens, head_dim] through an explicit layout.
    hf = np.ascontiguousarray(k.transpose(1, 0, 2))[np.newaxis]
    c = client.compress(hf, info, layout="bhtd")
    assert c.frames == a.frames  # same pages in the same order
    assert np.array_equal(client.decompress(c), client.decompress(a).transpose(1, 0, 2)[np.newaxis])


@needs_torch
@pytest.mark.parametrize("dtype", fibquant.DTYPES)
def test_torch_round_trip(client, profiles, dtype):
    info = profiles[dtype]
    tdt = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[dtype]
    k = torch.from_numpy(real_kv(0, "k")).to(tdt)
    nc = k.transpose(0, 1)  # [heads, tokens, d]: non-contiguous; compress as layout "htd"
    packed = client.compress(nc, info, layout="htd")
    y = client.decompress(packed)
    assert isinstance(y, torch.Tensor) and y.dtype == tdt and y.shape == nc.shape
    # The same values from numpy give the same frames, and decode to the same bits.
    npk = fibquant.tensors.as_numpy(k)[0]
    packed_np = client.compress(npk, info)
    assert packed_np.frames == client.compress(k, info).frames
    assert np.array_equal(fibquant.tensors.as_numpy(y.transpose(0, 1))[0], client.decompress(packed_np))
    out = torch.empty_like(k)
    client.decompress(packed_np, out=out)
    assert torch.equal(out.view(torch.int16) if dtype == "bf16" else out,
                       y.transpose(0, 1).view(torch.int16) if dtype == "bf16" else y.transpose(0, 1))


def test_decompress_bare_frames_and_pages(client, profiles):
    info = profiles["f16"]
    x = np.stack([real_kv(0, "k"), real_kv(0, "v")]).transpose(0, 2, 1, 3).astype(np.float16)  # [2,4,64,64]
    packed = client.compress(x, info)
    y = client.decompress(packed.frames, "f16")  # shape inferred [layers, heads, tokens, head_dim]
    assert np.array_equal(y, client.decompress(packed))
    r = client.decompress_pages(packed.frames, "f32", profile_digest=info.digest, keep_pages=True)
    assert [p.coordinates.key() for p in r.pages] == [tuple(c) for c in packed.coordinates]
    assert all(p.profile_digest == info.digest for p in r.pages)
    cp = client.compress_pages(info.digest, [((0, 0, 0, 0, 16), x[0, 0, :16].tobytes())], "f16",
                               return_page_metrics=True)
    m = cp.pages[0].metrics
    assert m is not None and m.compressed_vectors + m.raw_vectors == 16 and cp.receipt.pages == 1


def test_progress_window_and_deadline(client, profiles):
    info = profiles["f32"]
    k = real_kv(0, "k")
    seen = []
    packed = client.compress(k, info, window=1, progress=seen.append)
    assert [p.pages_done for p in seen] == list(range(1, 17)) and seen[-1].pages_total == 16
    assert seen[-1].bytes_done == k.nbytes
    got = []
    client.decompress(packed, window=3, progress=got.append)
    assert got[-1].pages_done == 16 and got[-1].bytes_done == k.nbytes
    with pytest.raises(fibquant.DeadlineExceededError) as e:
        client.compress(np.tile(k, (1, 1, 1)), info, timeout=1e-4)
    assert e.value.code.name == "DEADLINE_EXCEEDED" and isinstance(e.value, TimeoutError)
    with pytest.raises(fibquant.InvalidArgumentError):
        client.compress(k, info, window=0)
    # A progress callback that raises ends the stream with its exception.
    def boom(p):
        if p.pages_done == 3:
            raise RuntimeError("stop here")
    with pytest.raises(RuntimeError, match="stop here"):
        client.compress(k, info, progress=boom)
    # Streams cannot be started from a progress callback (it runs on the streams' thread).
    nested = []
    def start_stream(p):
        if p.pages_done == 1:
            try:
                client.compress(k, info)
            except fibquant.InvalidArgumentError as e:
                nested.append(e)
    client.compress(k, info, progress=start_stream)
    assert nested and "progress callback" in nested[0].message


def test_profile_recovery_after_server_lost_its_data(workdir):
    """A profile registered through the client is re-registered when the server answers NOT_FOUND
    (here: restarted on the same port with an empty data dir)."""
    from conftest import ServerProcess
    import shutil
    d = workdir / "recovery"
    d.mkdir()
    s = ServerProcess(d)
    port = s.port
    c = fibquant.Client(s.target, initial_backoff=0.2)
    try:
        info = c.register_profile(spec("py-recover", dtype="f32", codebook_size=16))
        k = real_kv(0, "k")
        first = c.compress(k, info)
        assert s.stop() == 0
        shutil.rmtree(s.data_dir)
        s = ServerProcess(d, listen=f"127.0.0.1:{port}")
        other = fibquant.Client(s.target)
        with pytest.raises(fibquant.NotFoundError):
            other.get_profile(info.digest)  # the new server does not know it ...
        other.close()
        again = c.compress(k, info.digest)  # ... but the client holding the spec recovers it
        assert again.frames == first.frames
        assert c.get_profile(info.digest).digest == info.digest
    finally:
        c.close()
        assert s.stop() == 0


def test_stubs_generated_in_build_tree_and_match_runtime():
    """The stubs come from the build (never committed) and protoc matches the protobuf runtime
    (protoc 3.X pairs with Python protobuf 4.X / 3.X)."""
    import os
    import re
    import subprocess
    from pathlib import Path

    import google.protobuf

    build = os.environ.get("FQ_BUILD_DIR")
    if build:
        assert Path(fibquant.pb.__file__).resolve().is_relative_to(Path(build).resolve())
    assert not (Path(__file__).resolve().parents[1] / "fibquant" / "v1").exists()
    protoc = os.environ.get("FQ_PROTOC", "/usr/bin/protoc")
    version = subprocess.run([protoc, "--version"], capture_output=True, text=True, timeout=60).stdout
    assert re.search(r"\d+\.(\d+)", version).group(1) == google.protobuf.__version__.split(".")[1], (
        version, google.protobuf.__version__)
