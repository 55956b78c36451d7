"""Error mapping: every failure is a FibquantError subclass carrying the gRPC code and message —
bad shapes (client- and server-side), unknown profile, corrupt frames, server down, TLS with a
wrong CA, missing and wrong admin token."""
from __future__ import annotations

import socket
import subprocess

import grpc
import numpy as np
import pytest

import fibquant
from conftest import SOURCE_DIR, ServerProcess, real_kv, spec


@pytest.fixture(scope="module")
def key_f32(server):
    with fibquant.Client(server.target) as c:
        return c.register_profile(spec("py-err-k", dtype="f32"))


def test_bad_shapes_are_invalid_argument(client, key_f32):
    k = real_kv(0, "k")
    cases = [
        (k[:, :, :32], "head_dim 32 != the profile's head_dim 64"),
        (np.zeros((64, 5, 64), np.float32), "5 heads > the profile's kv_heads 4"),
        (k[:40], "40 tokens is neither the profile's 64 nor a multiple of its tokens_per_page 16"),
        (np.zeros((2, 3, 4, 5, 6, 7), np.float32), "rank 6 tensor"),
        (k.astype(np.float64), "array dtype float64 is not supported"),
    ]
    for x, msg in cases:
        with pytest.raises(fibquant.InvalidArgumentError) as e:
            client.compress(x, key_f32)
        assert msg in e.value.message and e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert isinstance(e.value, ValueError)
    # Server-side: page bytes that do not match the coordinates.
    with pytest.raises(fibquant.InvalidArgumentError) as e:
        client.compress_pages(key_f32.digest, [((0, 0, 0, 0, 16), b"\0" * 100)], "f32")
    assert e.value.method == "CompressPages" and e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    # Server-side: a page outside the profile's shape (layer 7 of 2); the server says OUT_OF_RANGE.
    with pytest.raises(fibquant.OutOfRangeError) as e:
        client.compress_pages(key_f32.digest, [((0, 7, 0, 0, 16), k[:16, 0].tobytes())], "f32")
    assert "layer 7 is outside the shape" in e.value.message and e.value.code == grpc.StatusCode.OUT_OF_RANGE


def test_unknown_profile_is_not_found(client):
    unknown = "sha256:" + "ab" * 32
    for call in (lambda: client.get_profile(unknown), lambda: client.get_codebook(unknown),
                 lambda: client.compress_pages(unknown, [((0, 0, 0, 0, 16), b"\0" * 4096)], "f32"),
                 lambda: client.compress(real_kv(0, "k"), unknown)):
        with pytest.raises(fibquant.NotFoundError) as e:
            call()
        assert e.value.code == grpc.StatusCode.NOT_FOUND and e.value.message
    with pytest.raises(fibquant.NotFoundError):
        client.get_receipt("rcpt-does-not-exist")
    with pytest.raises(fibquant.InvalidArgumentError) as e:
        client.register_profile({"profile_id": "bad", "shape": {}})
    assert e.value.method == "RegisterProfile"


def test_corrupt_frame_is_data_loss(client, key_f32):
    packed = client.compress(real_kv(0, "k"), key_f32)
    bad = bytearray(packed.frames[3])
    bad[len(bad) // 2] ^= 0x01  # one payload bit: the frame checksum no longer matches
    with pytest.raises(fibquant.DataLossError) as e:
        client.decompress_pages([packed.frames[0], bytes(bad)], "f32")
    assert e.value.code == grpc.StatusCode.DATA_LOSS and "page 1" in e.value.message
    # A frame list missing a page does not fit the tensor's grid: DataLoss from the assembler.
    with pytest.raises(fibquant.DataLossError):
        client.decompress(packed.frames[:-1], shape=(64, 4, 64), tokens_per_page=16)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_down_is_unavailable():
    with fibquant.Client(f"127.0.0.1:{_free_port()}", max_attempts=2, initial_backoff=0.05) as c:
        with pytest.raises(fibquant.UnavailableError) as e:
            c.get_server_info()
        assert e.value.code == grpc.StatusCode.UNAVAILABLE and isinstance(e.value, ConnectionError)
        with pytest.raises(fibquant.UnavailableError):
            c.compress_pages("sha256:" + "00" * 32, [((0, 0, 0, 0, 16), b"\0" * 4096)], "f32")
        with pytest.raises(fibquant.UnavailableError):
            c.check_health()


@pytest.fixture(scope="module")
def tls_server(workdir):
    certs = workdir / "certs"
    subprocess.run([str(SOURCE_DIR / "scripts" / "gen-test-certs"), "--negative", str(certs)], check=True,
                   stdout=subprocess.DEVNULL, timeout=120)
    token = "py-admin-token-0123456789"
    (workdir / "admin-token").write_text(token + "\n")
    d = workdir / "tls"
    d.mkdir()
    s = ServerProcess(d, extra=[f"--tls-cert={certs / 'server.crt'}", f"--tls-key={certs / 'server.key'}",
                                f"--admin-token-file={workdir / 'admin-token'}"])
    yield s, certs, token
    assert s.stop() == 0, s.log()


def test_tls_right_ca_and_token(tls_server):
    s, certs, token = tls_server
    with fibquant.Client(s.target, tls=certs / "ca.crt", token=token) as c:
        info = c.register_profile(spec("py-tls-k", dtype="f32"))
        k = real_kv(0, "k")
        assert c.decompress(c.compress(k, info)).shape == k.shape
        assert c.check_health()
    tls = fibquant.TlsConfig.from_files(ca=certs / "ca.crt", server_name="localhost")
    with fibquant.Client(s.target, tls=tls) as c:  # certificate checked against the name "localhost"
        assert c.get_server_info().version


def test_tls_wrong_ca_is_unavailable(tls_server):
    s, certs, token = tls_server
    with fibquant.Client(s.target, tls=certs / "other-ca.crt", token=token, max_attempts=1) as c:
        with pytest.raises(fibquant.UnavailableError) as e:
            c.get_server_info()
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
    # Plaintext to the TLS port is refused too.
    with fibquant.Client(s.target, max_attempts=1) as c:
        with pytest.raises(fibquant.UnavailableError):
            c.get_server_info()


def test_missing_and_wrong_token(tls_server):
    s, certs, token = tls_server
    with fibquant.Client(s.target, tls=certs / "ca.crt", max_attempts=1) as c:
        with pytest.raises(fibquant.UnauthenticatedError) as e:
            c.register_profile(spec("py-tls-notoken", dtype="f32"))
        assert e.value.code == grpc.StatusCode.UNAUTHENTICATED and isinstance(e.value, PermissionError)
        assert c.get_server_info().version  # reads need no token
    with fibquant.Client(s.target, tls=certs / "ca.crt", token="wrong-" + token, max_attempts=1) as c:
        with pytest.raises(fibquant.PermissionDeniedError) as e:
            c.register_profile(spec("py-tls-badtoken", dtype="f32"))
        assert e.value.code == grpc.StatusCode.PERMISSION_DENIED and token not in str(e.value)


def test_error_classes_keep_code_and_message():
    for code in grpc.StatusCode:
        if code == grpc.StatusCode.OK:
            continue
        err = fibquant.error_from_code(code, "msg", "M")
        assert err.code == code and err.message == "msg" and err.method == "M"
        assert isinstance(err, fibquant.FibquantError) and code.name in str(err)


def test_calibration_writes_need_the_admin_token(tls_server):
    """RegisterCalibration and RecommendProfile with store_calibration are admin-guarded like
    RegisterProfile; a recommendation that stores nothing needs no token."""
    s, certs, token = tls_server
    k, q = real_kv(1, "k")[:, 0, :], real_kv(1, "q")[:, 0, :]
    with fibquant.Client(s.target, tls=certs / "ca.crt", max_attempts=1) as c:
        rec = c.recommend_profile(k, queries=q, max_codebook_size=16)
        assert rec.candidates and not rec.calibration_stored
        with pytest.raises(fibquant.UnauthenticatedError):
            c.register_calibration(rec)
        with pytest.raises(fibquant.UnauthenticatedError):
            c.recommend_profile(k, queries=q, max_codebook_size=16, store_calibration=True)
    with fibquant.Client(s.target, tls=certs / "ca.crt", token="wrong-" + token, max_attempts=1) as c:
        with pytest.raises(fibquant.PermissionDeniedError):
            c.register_calibration(rec)
    with fibquant.Client(s.target, tls=certs / "ca.crt", token=token) as c:
        reg = c.register_calibration(rec)
        assert reg.calibration_digest == rec.calibration_digest and reg.created
        assert c.get_calibration(reg.calibration_digest).calibration_json == rec.calibration_json
