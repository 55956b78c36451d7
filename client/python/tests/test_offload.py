"""KvOffloader: Hugging Face past_key_values and vLLM-style paged caches, keyed by block hashes.
Restored caches are bit-for-bit the decode of the stored frames (Client.decompress_pages) and the
CLI's decode of the same frames; receipts come back; known hashes are not sent again."""
from __future__ import annotations

import subprocess

import numpy as np
import pytest

import fibquant
from conftest import cli_binary, real_kv, spec

try:
    import torch
except ImportError:
    torch = None

L, H, T, D, BS = 2, 4, 64, 64, 16


@pytest.fixture(scope="module")
def offloader_profiles(server):
    with fibquant.Client(server.target) as c:
        out = {}
        for dt in ("f16", "bf16"):
            out[dt] = (c.register_profile(spec(f"py-off-k-{dt}", "key", dt, L, H, T, D, BS, first_tokens_raw=4)),
                       c.register_profile(spec(f"py-off-v-{dt}", "value", dt, L, H, T, D, BS)))
        return out


def hf_cache(dtype):
    """Per-layer (K, V) [1, H, T, D] from the real data, as numpy in the dtype's representation."""
    k, v = real_kv(0, "k"), real_kv(0, "v")  # [T, H, D]
    layers = []
    for l in range(L):
        kk = (k * (1 + l)).transpose(1, 0, 2)[np.newaxis]
        vv = (v - l).transpose(1, 0, 2)[np.newaxis]
        layers.append(tuple(fibquant.tensors.convert(np.ascontiguousarray(a), "f32", dtype) for a in (kk, vv)))
    return layers


def expected_from_frames(client, blocks, dtype):
    """The HF cache rebuilt by hand from decompress_pages of the stored frames (block j at j*BS)."""
    out = [[np.zeros((1, H, len(blocks) * BS, D), fibquant.tensors.np_dtype(dtype)) for _ in range(2)] for _ in range(L)]
    for j, b in enumerate(blocks):
        for role, frames in ((0, b.key_frames), (1, b.value_frames)):
            r = client.decompress_pages(frames, dtype)
            for (bt, l, h, t0, n), data in zip(r.coordinates, r.data):
                t = j * BS + t0 - b.position * BS
                out[l][role][0, h, t:t + n] = np.frombuffer(data, fibquant.tensors.np_dtype(dtype)).reshape(n, D)
    return out


def test_hf_offload_restore_bit_identical_and_cli(server, client, offloader_profiles, tmp_path):
    kp, vp = offloader_profiles["f16"]
    off = fibquant.KvOffloader(client, kp, vp)
    pkv = hf_cache("f16")
    hashes = [f"h{j}" for j in range(T // BS)]
    res = off.offload_hf(pkv, hashes, label="py-hf")
    assert res.offloaded == hashes and not res.skipped
    assert res.key_receipt.pages == res.value_receipt.pages == (T // BS) * L * H
    assert res.key_receipt.label == "py-hf" and res.compression_ratio > 1
    assert res.key_receipt.raw_vectors >= 4 * L * H  # first_tokens_raw = 4 of every (layer, head)
    again = off.offload_hf(pkv, hashes)
    assert again.skipped == hashes and not again.offloaded and again.key_receipt is None

    restored, rr = off.restore_hf(hashes, like="numpy")
    assert rr.pages == 2 * (T // BS) * L * H and rr.restored == hashes
    want = expected_from_frames(client, [off.store[h] for h in hashes], "f16")
    for l in range(L):
        for role in range(2):
            assert restored[l][role].tobytes() == want[l][role].tobytes()
            rel = np.abs(restored[l][role].astype(np.float32) - pkv[l][role].astype(np.float32)).mean()
            assert rel < 0.5 * np.abs(pkv[l][role].astype(np.float32)).mean()
    # The CLI decodes the same key frames (as a [layers, heads, tokens, head_dim] container) to the
    # same bits.
    frames = [f for h in hashes for f in off.store[h].key_frames]
    c = fibquant.Container(fibquant.container.container_metadata(
        profile_digest=kp.digest, profile_id=kp.profile_id, source_file="hf", source_dtype="f16",
        source_shape=(L, H, T, D), page_dtype="f16", tokens_per_page=BS, pages=len(frames)), frames,
        {"receiptId": res.key_receipt.receipt_id})
    path, out = tmp_path / "k.fqc", tmp_path / "k.npy"
    fibquant.write_container(path, c)
    r = subprocess.run([cli_binary(), "decompress", f"--in={path}", f"--out={out}", f"--server={server.target}",
                        "--quiet"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    cli_k = np.load(out)
    for l in range(L):
        assert cli_k[l].tobytes() == restored[l][0][0].tobytes()
    # Restoring a subset in another order puts block j at tokens j*BS.
    sub, _ = off.restore_hf([hashes[2], hashes[0]], like="numpy")
    assert sub[1][0][0, :, :BS].tobytes() == restored[1][0][0, :, 2 * BS:3 * BS].tobytes()
    with pytest.raises(fibquant.NotFoundError):
        off.restore_hf(["never-offloaded"])


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_paged_offload_restore_into_other_blocks(client, offloader_profiles, kind):
    if kind == "torch" and torch is None:
        pytest.skip("python3-torch not installed")
    kp, vp = offloader_profiles["bf16"]
    rng = np.random.default_rng(3)
    nb = 10
    caches = [fibquant.f32_to_bf16(rng.standard_normal((nb, 2, BS, H, D), dtype=np.float32)) for _ in range(L)]
    if kind == "torch":
        caches = [torch.from_numpy(c.view(np.int16)).view(torch.bfloat16) for c in caches]
    table, hashes = [3, 7, 1, 5], ["a", "b", "c", "d"]
    off = fibquant.KvOffloader(client, kp, vp)
    res = off.offload_paged(caches, table, hashes)
    assert res.offloaded == hashes and res.key_receipt.pages == 4 * L * H
    fresh = [np.zeros((nb, 2, BS, H, D), np.uint16) for _ in range(L)]
    if kind == "torch":
        fresh = [torch.from_numpy(c.view(np.int16)).view(torch.bfloat16) for c in fresh]
    dest = [0, 2, 4, 6]
    rr = off.restore_paged(fresh, dest, hashes)
    assert rr.pages == 2 * 4 * L * H
    as_np = [fibquant.tensors.as_numpy(c)[0] for c in fresh]
    want = expected_from_frames(client, [off.store[h] for h in hashes], "bf16")  # HF-shaped [1,H,4*BS,D]
    for l in range(L):
        for i, bid in enumerate(dest):
            for role in range(2):
                got = as_np[l][bid, role].transpose(1, 0, 2)  # [H, BS, D]
                assert got.tobytes() == np.ascontiguousarray(want[l][role][0, :, i * BS:(i + 1) * BS]).tobytes()
        assert not as_np[l][[1, 3, 5, 7, 8, 9]].any()  # other blocks untouched
    # The same blocks restored HF-style hold the same bits (one store, either layout).
    hf, _ = off.restore_hf(hashes, like="numpy")
    assert hf[1][1][0, :, BS:2 * BS].tobytes() == np.ascontiguousarray(as_np[1][2, 1].transpose(1, 0, 2)).tobytes()
    with pytest.raises(fibquant.InvalidArgumentError):
        off.offload_paged(caches, [99], ["z"])


def test_tampered_store_is_data_loss(client, offloader_profiles):
    import dataclasses
    kp, vp = offloader_profiles["f16"]
    off = fibquant.KvOffloader(client, kp, vp)
    off.offload_hf(hf_cache("f16"), ["b0", "b1", "b2", "b3"])
    b = off.store["b1"]
    cache = [np.zeros((4, 2, BS, H, D), np.float16) for _ in range(L)]
    off.store["dup"] = dataclasses.replace(b, key_frames=(b.key_frames[0],) * len(b.key_frames))
    with pytest.raises(fibquant.DataLossError, match="appears twice"):
        off.restore_paged(cache, [0], ["dup"])
    off.store["moved"] = dataclasses.replace(b, position=b.position + 1)  # frames outside the block now
    with pytest.raises(fibquant.DataLossError, match="outside the block"):
        off.restore_paged(cache, [0], ["moved"])
    off.store["short"] = dataclasses.replace(b, value_frames=b.value_frames[:-1])
    with pytest.raises(fibquant.DataLossError, match="expected"):
        off.restore_hf(["short"])
    off.store["swapped"] = dataclasses.replace(b, key_frames=b.value_frames, value_frames=b.key_frames)
    with pytest.raises(fibquant.DataLossError, match="belongs to profile"):
        off.restore_hf(["swapped"])
    with pytest.raises(fibquant.InvalidArgumentError, match="the cache has"):
        off.restore_paged([np.zeros((4, 2, BS, H, D), np.float16)], [0], ["b1"])  # 1 layer, block has 2
