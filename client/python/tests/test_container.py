"""`.fqc` containers: a file written by Python decodes with the CLI to the same tensor, a file the
CLI wrote decodes in Python to the CLI's result, and corrupt files fail with the format's codes."""
from __future__ import annotations

import struct
import subprocess

import numpy as np
import pytest

import fibquant
from conftest import cli_binary, real_kv, spec


def cli(server, *args):
    r = subprocess.run([cli_binary(), *args, f"--server={server.target}", "--quiet"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r


@pytest.fixture(scope="module")
def profiles(server):
    with fibquant.Client(server.target) as c:
        return {dt: c.register_profile(spec(f"py-fqc-{dt}", dtype=dt)) for dt in fibquant.DTYPES}


def load_npy(path, dtype):
    a = np.load(path)
    assert a.dtype == fibquant.tensors.np_dtype(dtype)
    return a


@pytest.mark.parametrize("dtype", fibquant.DTYPES)
@pytest.mark.parametrize("rank", [3, 4])
def test_python_written_container_decodes_with_cli(server, client, profiles, tmp_path, dtype, rank):
    k = real_kv(0, "k")
    x = k if rank == 3 else np.stack([k, real_kv(0, "v")]).transpose(0, 2, 1, 3)
    x = fibquant.tensors.convert(x, "f32", dtype)
    packed = client.compress(x, profiles[dtype])
    path = tmp_path / "py.fqc"
    size = packed.save(path, source_file="x.npy")
    assert size == path.stat().st_size
    out = tmp_path / "cli.npy"
    cli(server, "decompress", f"--in={path}", f"--out={out}")
    ours = client.decompress(fibquant.read_container(path))
    assert np.array_equal(load_npy(out, dtype), ours) and ours.shape == x.shape
    # And to another dtype.
    cli(server, "decompress", f"--in={path}", f"--out={out}", "--dtype=f32")
    assert np.array_equal(load_npy(out, "f32"), client.decompress(packed, "f32"))


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_cli_written_container_decodes_in_python(server, client, profiles, tmp_path, dtype):
    x = fibquant.tensors.convert(real_kv(0, "v"), "f32", dtype)
    src = tmp_path / "x.npy"
    np.save(src, x)
    fqc = tmp_path / "cli.fqc"
    extra = ["--npy-bf16"] if dtype == "bf16" else []
    cli(server, "compress", f"--profile={profiles[dtype].digest}", f"--in={src}", f"--out={fqc}", *extra)
    c = fibquant.read_container(fqc)
    assert c.metadata["schema"] == "fq_cli_container_meta_v1" and c.metadata["source"]["shape"] == [64, 4, 64]
    loaded = fibquant.CompressedTensor.load(fqc)
    assert loaded.receipt.pages == len(loaded.frames) == 16 and loaded.receipt.receipt_id
    # The CLI and Python send the same pages, so they get the same frames.
    assert loaded.frames == client.compress(x, profiles[dtype]).frames
    out = tmp_path / "cli.npy"
    cli(server, "decompress", f"--in={fqc}", f"--out={out}")
    assert np.array_equal(client.decompress(loaded), load_npy(out, dtype))
    # Python re-encodes what it read into a container the CLI accepts.
    again = tmp_path / "again.fqc"
    fibquant.write_container(again, c)
    cli(server, "decompress", f"--in={again}", f"--out={out}")
    assert np.array_equal(client.decompress(loaded), load_npy(out, dtype))


def test_corrupt_containers(client, profiles, tmp_path):
    packed = client.compress(real_kv(0, "k"), profiles["f32"])
    good = packed.to_container().encode()
    assert fibquant.container.decode_container(good).frames == packed.frames

    def bad(data, exc, text):
        with pytest.raises(exc) as e:
            fibquant.container.decode_container(bytes(data))
        assert text in e.value.message, e.value.message

    flipped = bytearray(good)
    flipped[200] ^= 0x10
    bad(flipped, fibquant.DataLossError, "checksum mismatch")
    bad(b"XQKC" + good[4:], fibquant.DataLossError, "bad magic")
    bad(good[:4] + struct.pack("<H", 2) + good[6:], fibquant.UnimplementedError, "version 2")
    bad(good[:6] + struct.pack("<H", 1) + good[8:], fibquant.DataLossError, "flags")
    bad(good[:12] + struct.pack("<I", 1 << 23) + good[16:], fibquant.ResourceExhaustedError, "frame_count")
    bad(good[:12] + struct.pack("<I", 1 << 21) + good[16:], fibquant.DataLossError, "truncated in the length of frame")
    bad(good[:20], fibquant.DataLossError, "truncated")
    p = tmp_path / "trunc.fqc"
    p.write_bytes(good[:-1])
    with pytest.raises(fibquant.DataLossError) as e:
        fibquant.read_container(p)
    assert str(p) in e.value.message
