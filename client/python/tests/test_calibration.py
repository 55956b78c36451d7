"""Calibrations and recommendations end to end against a real fibquant-server: RecommendProfile on one
head of the real USE-Lite keys and queries (../shared/data/use-lite-qkv, or the 64-token tests/data
fixture when that is absent), its calibration registered and fetched back unchanged, the recommended
calibrated spec registered and used to compress, a budget no candidate meets as an answer (best is
None), and the exact error class of each bad request. Server time stays small: 512 tokens and
codebooks up to N = 256 (about 2 s of one build worker), the rest N = 16."""
from __future__ import annotations

import asyncio
import json
import os
import shutil

import numpy as np
import pytest

import fibquant
from conftest import SOURCE_DIR, ServerProcess

LAYER, HEAD, TOKENS = 1, 1, 512  # layer 1 has head_dim 128
BUDGET = {"max_attention_tv": 0.25}


def _real_qk():
    """Keys and queries [tokens, 4, head_dim] f32 of layer LAYER, and where they come from."""
    shared = os.environ.get("FQ_SHARED_DATA_DIR", str(SOURCE_DIR.parent / "shared" / "data"))
    d = os.path.join(shared, "use-lite-qkv")
    if os.path.isfile(os.path.join(d, "header.json")):
        with open(os.path.join(d, "header.json")) as f:
            layer = json.load(f)["layers"][LAYER]
        shape = layer["shape"]
        return tuple(np.fromfile(os.path.join(d, layer["files"][w]), dtype="<f4").reshape(shape)[:TOKENS]
                     for w in "kq") + (d,)
    fixture = SOURCE_DIR / "tests" / "data"
    return tuple(np.fromfile(fixture / f"L{LAYER}_{w}.f32", dtype="<f4").reshape(64, 4, 128) for w in "kq") + (
        str(fixture),)


@pytest.fixture(scope="module")
def sample():
    k, q, source = _real_qk()
    print(f"sample: {source}, {k.shape[0]} tokens of layer {LAYER} head {HEAD}")
    return k[:, HEAD, :], q[:, HEAD, :]  # strided views: one head of [tokens, heads, head_dim]


@pytest.fixture(scope="module")
def rec(server, sample):
    with fibquant.Client(server.target) as c:
        return c.recommend_profile(sample[0], queries=sample[1], budget=BUDGET, max_codebook_size=256,
                                   profile_id_prefix="py")


def test_recommendation_is_ranked_with_the_best_marked(rec, sample):
    tokens = sample[0].shape[0]
    assert isinstance(rec, fibquant.Recommendation)
    assert rec.best_index == 0 and rec.best is rec.candidates[0], rec.summary
    assert rec.calibration_tokens == tokens // 2 and rec.evaluation_tokens == tokens - tokens // 2
    assert not rec.calibration_stored and rec.calibration_digest.startswith("sha256:")
    assert len(rec.candidates) >= 8  # N <= 256 of the server's grid
    best = rec.best
    assert isinstance(best, fibquant.RecommendedProfile) and best.qualifies and best.meets_budget
    assert isinstance(best.max, fibquant.QualityMetrics) and best.max.attention_tv <= BUDGET["max_attention_tv"]
    assert best.mean.attention_tv <= best.max.attention_tv
    assert best.profile_id.startswith("py") and best.spec["profile_id"] == best.profile_id
    assert best.spec["shape"]["head_dim"] == sample[0].shape[1] and best.spec["shape"]["tokens"] == tokens
    assert all(c.codebook_size <= 256 for c in rec.candidates)
    # Qualifying first, highest ratio first among them; the others say why not.
    flags = [c.qualifies for c in rec.candidates]
    assert flags == sorted(flags, reverse=True)
    ratios = [c.compression_ratio for c in rec.candidates if c.qualifies]
    assert ratios == sorted(ratios, reverse=True) and ratios[0] > 1
    assert all(c.reason for c in rec.candidates if not c.qualifies)


def test_calibration_registers_round_trips_and_enables_the_calibrated_spec(server, rec, sample):
    calibrated = [c for c in rec.candidates if c.calibrated and c.qualifies]
    assert calibrated, rec.summary
    spec = calibrated[0].spec_json
    assert json.loads(spec)["calibration_digest"] == rec.calibration_digest
    with fibquant.Client(server.target) as c:
        # Not stored by the recommendation: the calibrated spec names an unknown artifact.
        with pytest.raises(fibquant.NotFoundError, match="RegisterCalibration first"):
            c.register_profile(spec)
        with pytest.raises(fibquant.NotFoundError, match="is not registered"):
            c.get_calibration(rec.calibration_digest)
        reg = c.register_calibration(rec.calibration_json)
        assert isinstance(reg, fibquant.RegisteredCalibration)
        assert reg.calibration_digest == rec.calibration_digest and reg.created
        again = c.register_calibration(rec)  # idempotent, from the Recommendation itself
        assert again.calibration_digest == reg.calibration_digest and not again.created
        got = c.get_calibration(reg.calibration_digest)
        assert isinstance(got, fibquant.Calibration)
        assert got.calibration_json.encode() == rec.calibration_json.encode()
        assert got.digest == reg.calibration_digest
        doc = got.document
        assert doc["role"] == "key" and doc["head_dim"] == sample[0].shape[1] and len(doc["mean"]) == doc["head_dim"]
        # The recommended spec now registers and compresses the sample (its serving shape).
        info = c.register_profile(calibrated[0])  # a RecommendedProfile registers as its spec_json
        assert info.profile["calibration_digest"] == rec.calibration_digest
        assert c.register_profile(spec).digest == info.digest
        packed = c.compress(sample[0], info)  # a strided [tokens, head_dim] head
        assert packed.receipt.pages >= 1
        assert packed.receipt.compression_ratio == pytest.approx(calibrated[0].compression_ratio, rel=0.1)
        k2 = c.decompress(packed)
        a = np.ascontiguousarray(sample[0], np.float64)
        assert k2.shape == sample[0].shape and k2.dtype == np.float32
        cos = np.sum(a * k2, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(k2, axis=1))
        assert np.mean(cos) > 0.95, np.mean(cos)


def test_budget_no_candidate_meets_is_an_answer(server, sample):
    async def go():
        async with fibquant.AsyncClient(server.target) as c:
            return await c.recommend_profile(sample[0], queries=sample[1], budget={"max_attention_tv": 1e-9},
                                             max_codebook_size=16)
    rec = asyncio.run(go())
    assert rec.best_index == -1 and rec.best is None
    assert "no candidate meets the budget" in rec.summary
    assert rec.candidates and not any(c.qualifies or c.meets_budget for c in rec.candidates)
    assert all(c.reason for c in rec.candidates) and not rec.calibration_stored


def test_any_float_kind_and_stored_calibration_async(server, sample):
    """bf16 bits and f16 samples are accepted like the compress path's; store_calibration registers it."""
    async def go():
        async with fibquant.AsyncClient(server.target) as c:
            r16 = await c.recommend_profile(sample[0].astype(np.float16), queries=fibquant.f32_to_bf16(sample[1]),
                                            budget=BUDGET, max_codebook_size=16, store_calibration=True,
                                            calibration_fraction=0.25)
            return r16, await c.get_calibration(r16.calibration_digest)
    r16, got = asyncio.run(go())
    tokens = sample[0].shape[0]
    assert r16.calibration_stored and r16.calibration_tokens == tokens // 4
    assert all(c.codebook_size == 16 for c in r16.candidates)
    assert got.calibration_json == r16.calibration_json and got.digest == r16.calibration_digest


def test_errors_name_the_exact_class(server, rec, sample):
    k, q = sample
    with fibquant.Client(server.target) as c:
        with pytest.raises(fibquant.NotFoundError, match="is not registered"):
            c.get_calibration("sha256:" + "0" * 64)
        # Tampered artifacts: a digested field changed (sample_vectors, then mean[0] by an f32 step)
        # no longer matches the digest the server recomputes; a value no f32 holds is refused by name.
        for field, change in (("sample_vectors", lambda d: d + 1),
                              ("mean", lambda m: [float(np.nextafter(np.float32(m[0]), np.float32(1e9)))] + m[1:])):
            doc = json.loads(rec.calibration_json)
            doc[field] = change(doc[field])
            with pytest.raises(fibquant.InvalidArgumentError, match="kv_calibration.digest"):
                c.register_calibration(doc)
        doc = json.loads(rec.calibration_json)
        doc["mean"][0] += 0.1
        with pytest.raises(fibquant.InvalidArgumentError, match=r"kv_calibration.mean\[0\] is not an f32 value"):
            c.register_calibration(json.dumps(doc).encode())
        with pytest.raises(fibquant.InvalidArgumentError):
            c.register_calibration("{not json")
        # Malformed samples and settings, refused by the server naming the field.
        with pytest.raises(fibquant.InvalidArgumentError, match="queries must be"):
            c.recommend_profile(k, queries=q[: k.shape[0] // 2], max_codebook_size=16)
        with pytest.raises(fibquant.InvalidArgumentError, match="calibration_fraction"):
            c.recommend_profile(k, queries=q, calibration_fraction=1.5, max_codebook_size=16)
        with pytest.raises(fibquant.InvalidArgumentError, match="max_codebook_size"):
            c.recommend_profile(k, max_codebook_size=8)
        with pytest.raises(fibquant.InvalidArgumentError, match="target_shape_json"):
            c.recommend_profile(k, target_shape="[1]", max_codebook_size=16)
        # Refused before sending: not one head's [tokens, head_dim].
        with pytest.raises(fibquant.InvalidArgumentError, match=r"keys must be one head's sample"):
            c.recommend_profile(k[None], max_codebook_size=16)

    async def unknown():
        async with fibquant.AsyncClient(server.target) as ac:
            await ac.get_calibration("sha256:" + "f" * 64)
    with pytest.raises(fibquant.NotFoundError):
        asyncio.run(unknown())
    # The server kept serving.
    with fibquant.Client(server.target) as c:
        assert c.check_health()


def test_recovery_re_registers_the_calibration_of_a_calibrated_profile(workdir, sample):
    """A server that lost its data dir lost the calibrated profile and its calibration: the client
    holding both (the calibration stored by recommend_profile) registers them again, in that order."""
    d = workdir / "calibrated-recovery"
    d.mkdir()
    s = ServerProcess(d)
    port = s.port
    c = fibquant.Client(s.target, initial_backoff=0.2)
    try:
        rec = c.recommend_profile(sample[0], queries=sample[1], budget=BUDGET, max_codebook_size=16,
                                  store_calibration=True)
        assert rec.calibration_stored
        spec = next(x.spec_json for x in rec.candidates if x.calibrated)
        info = c.register_profile(spec)
        first = c.compress(sample[0], info)
        assert s.stop() == 0
        shutil.rmtree(s.data_dir)
        s = ServerProcess(d, listen=f"127.0.0.1:{port}")
        with fibquant.Client(s.target) as other:
            with pytest.raises(fibquant.NotFoundError):
                other.get_calibration(rec.calibration_digest)  # the new server knows neither ...
            with pytest.raises(fibquant.NotFoundError):
                other.get_profile(info.digest)
        again = c.compress(sample[0], info.digest)  # ... the client holding both recovers them
        assert again.frames == first.frames
        assert c.get_calibration(rec.calibration_digest).calibration_json == rec.calibration_json
    finally:
        c.close()
        assert s.stop() == 0
