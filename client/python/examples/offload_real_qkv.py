#!/usr/bin/python3
"""End-to-end example: offload a real KV cache through the service, restore it, and measure what
compression did to attention.

Data: the real Q/K/V of Universal Sentence Encoder Lite (2 layers, 4 heads, head_dim 64 and 128,
1940 tokens of the GPL text in independent chunks) from $FQ_SHARED_DATA_DIR/use-lite-qkv (default
../shared/data next to the repository), or the 64-token fixture in tests/data when that is absent.
Per layer it builds an HF-style past_key_values entry (K, V as [1, heads, tokens, head_dim], f16),
offloads it block by block (16 tokens, hashed by content) with a KvOffloader, restores it, and
compares attention outputs softmax(scale * Q K^T) V per chunk, original vs restored cache.

Usage (from the repo root, after `make build`):
  PYTHONPATH=client/python:build/client/python /usr/bin/python3 client/python/examples/offload_real_qkv.py
      [--server HOST:PORT | --server-binary build/server/fibquant-server] [--bits 4]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

import fibquant

REPO = Path(__file__).resolve().parents[3]
BLOCK = 16


def load_data():
    shared = Path(os.environ.get("FQ_SHARED_DATA_DIR", REPO.parent / "shared" / "data")) / "use-lite-qkv"
    if (shared / "header.json").is_file():
        h = json.loads((shared / "header.json").read_text())
        layers = []
        for lay in h["layers"]:
            T, H, D = lay["shape"]
            qkv = {w: np.fromfile(shared / lay["files"][w], dtype="<f4").reshape(T, H, D) for w in "qkv"}
            layers.append((qkv, lay["scale"]))
        chunks = [(c["token_offset"], c["n_tokens"]) for c in h["chunks"]]
        return layers, chunks, str(shared)
    fixture = REPO / "tests" / "data"
    layers = []
    for layer, d in ((0, 64), (1, 128)):
        qkv = {w: np.fromfile(fixture / f"L{layer}_{w}.f32", dtype="<f4").reshape(64, 4, d) for w in "qkv"}
        layers.append((qkv, 1 / np.sqrt(d)))
    return layers, [(0, 64)], str(fixture)


def attention(q, k, v, scale):
    """[T, H, D] each -> outputs [T, H, D] and probabilities [H, T, T] (bidirectional, float64)."""
    logits = scale * np.einsum("thd,shd->hts", q.astype(np.float64), k.astype(np.float64))
    logits -= logits.max(axis=-1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=-1, keepdims=True)
    return np.einsum("hts,shd->thd", p, v.astype(np.float64)), p


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", help="HOST:PORT of a running server (else one is started on 127.0.0.1)")
    ap.add_argument("--server-binary", default=str(REPO / "build" / "server" / "fibquant-server"))
    ap.add_argument("--bits", type=int, default=4, choices=(2, 3, 4), help="bits per coordinate (block_dim 2)")
    a = ap.parse_args()
    server = None
    target = a.server
    if target is None:
        sys.path.insert(0, str(REPO / "client" / "python" / "tests"))
        os.environ.setdefault("FQ_SERVER_BINARY", a.server_binary)
        from conftest import ServerProcess
        server = ServerProcess(Path(tempfile.mkdtemp(prefix="fq-example-")))
        target = server.target
    layers, chunks, source = load_data()
    print(f"data: {source}; server {target}")
    try:
        with fibquant.Client(target) as c:
            for li, (qkv, scale) in enumerate(layers):
                T, H, D = qkv["k"].shape
                T -= T % BLOCK  # whole blocks only (a partial tail stays on the node)
                def prof(role):
                    return c.register_profile(fibquant.kv_profile_spec(
                        f"example-use-lite-l{li}-{role}", role=role, layers=1, kv_heads=H, tokens=T, head_dim=D,
                        tokens_per_page=BLOCK, dtype="f16", codebook_size=2 ** (2 * a.bits),
                        first_tokens_raw=0))
                off = fibquant.KvOffloader(c, prof("key"), prof("value"))
                # One HF layer: K, V [1, heads, tokens, head_dim] in f16, as a serving node holds them.
                k = np.ascontiguousarray(qkv["k"][:T].transpose(1, 0, 2))[None].astype(np.float16)
                v = np.ascontiguousarray(qkv["v"][:T].transpose(1, 0, 2))[None].astype(np.float16)
                hashes = [hashlib.sha256(k[..., j * BLOCK:(j + 1) * BLOCK, :].tobytes()
                                         + v[..., j * BLOCK:(j + 1) * BLOCK, :].tobytes()).hexdigest()
                          for j in range(T // BLOCK)]
                res = off.offload_hf([(k, v)], hashes, label=f"example-l{li}")
                restored, rr = off.restore_hf(hashes, like="numpy")
                (rk, rv), = restored
                # Attention per chunk with the original f16 cache vs the restored one.
                kk, vv = k[0].transpose(1, 0, 2), v[0].transpose(1, 0, 2)
                rkk, rvv = rk[0].transpose(1, 0, 2), rv[0].transpose(1, 0, 2)
                num = den = 0.0
                tv, top1, cos = [], [], []
                for start, n in chunks:
                    if start + n > T:
                        continue
                    s = slice(start, start + n)
                    o, p = attention(qkv["q"][s], kk[s], vv[s], scale)
                    o2, p2 = attention(qkv["q"][s], rkk[s], rvv[s], scale)
                    num += float(((o - o2) ** 2).sum())
                    den += float((o ** 2).sum())
                    tv.append(0.5 * np.abs(p - p2).sum(axis=-1).mean())
                    top1.append((p.argmax(-1) == p2.argmax(-1)).mean())
                    cos.append(float((o * o2).sum() / np.sqrt((o ** 2).sum() * (o2 ** 2).sum())))
                raw = k.nbytes + v.nbytes
                print(f"layer {li}: {T} tokens x {H} heads x head_dim {D}, {len(hashes)} blocks; "
                      f"{raw} f16 bytes -> {res.frame_bytes} frame bytes ({raw / res.frame_bytes:.2f}x, "
                      f"{raw - res.frame_bytes} bytes saved); receipts {res.key_receipt.receipt_id}, "
                      f"{res.value_receipt.receipt_id}")
                print(f"  attention outputs: relative squared error {num / den:.5f}, cosine {np.mean(cos):.5f}; "
                      f"attention TV {np.mean(tv):.4f}, top-1 agreement {np.mean(top1):.3f} "
                      f"({len(tv)} chunks, restored {rr.pages} pages)")
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
