#!/usr/bin/python3
"""Throughput of the Python client against the C++ CLI bench (`fibquant bench`), same server, same run.

Both sides register the same profile (the CLI bench's generated spec: key, per_token, block_dim 2,
256 codewords, one layer and head, f16 by default), send the same number of streams x pages of
standard-normal f16 data with the same window, then decompress the frames; each reports raw f16
MB/s (10^6 bytes of raw page data per second) for compress and for decompress. The two clients run
alternately (CLI, Python sync client with a thread per stream, Python asyncio client) for
--rounds rounds so drift on a shared machine hits both; the medians are compared. For each Python
client it also reports the client process's CPU time per page (user + system, every thread, over
the timed phase): the per-message cost, which the machine's load affects less than MB/s.
--grpc-sync-api adds a fourth client to every round: the same page streams on gRPC's synchronous
stream-stream API (a request iterator consumed by gRPC's thread, answers read on the stream's
thread), to compare its per-message cost with grpc.aio's (what fibquant.Client uses).

Usage (from the repo root, after `make build`):
  PYTHONPATH=client/python:build/client/python /usr/bin/python3 client/python/examples/bench_vs_cli.py \
      --server-binary build/server/fibquant-server --cli build/client/cli/fibquant
  (or --server HOST:PORT for a running loopback server)
Bounded: at most 64 streams x 100000 pages, every call has a deadline.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

import grpc

import fibquant
from fibquant._streams import compress_pages_job, decompress_pages_job
from fibquant.errors import from_rpc_error

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def bench_spec(dtype: str, head_dim: int, page_tokens: int, pages: int) -> dict:
    """The spec `fibquant bench` registers (client/cli/bench.cc BenchSpecJson), so both use one profile."""
    return {"profile_id": f"fibquant-bench-d{head_dim}-t{page_tokens}-{dtype}",
            "shape": {"role": "key", "attention_kind": "mha", "batch": 1, "layers": 1, "kv_heads": 1,
                      "query_heads": 1, "tokens": page_tokens * min(pages, 256), "head_dim": head_dim,
                      "dtype": dtype, "rope_state": "pre_rope"},
            "axis_policy": "per_token", "tokens_per_page": page_tokens,
            "fibquant": {"block_dim": 2, "codebook_size": 256, "seed": 20260526, "training_samples": 32768},
            "fallback": {"mode": "keep_raw"}}


def run_cli(cli: str, target: str, a) -> dict:
    r = subprocess.run([cli, "bench", f"--server={target}", f"--streams={a.streams}", f"--pages={a.pages}",
                        f"--page-tokens={a.page_tokens}", f"--head-dim={a.head_dim}", f"--dtype={a.dtype}",
                        f"--window={a.window}", "--max-seconds=300", "--quiet"],
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"fibquant bench failed: {r.stderr}")
    j = json.loads(r.stdout)
    if j.get("errors"):
        raise RuntimeError(f"fibquant bench reported errors: {j.get('first_error')}")
    return {"compress": j["compress"]["raw_bytes_per_second"] / 1e6,
            "decompress": j["decompress"]["raw_bytes_per_second"] / 1e6}


def make_work(info, a):
    per_seq = info.shape["tokens"] // a.page_tokens
    rng = np.random.default_rng(1)
    work = []
    for s in range(a.streams):
        x = rng.standard_normal((a.pages, a.page_tokens, a.head_dim), dtype=np.float32)
        x = fibquant.tensors.convert(x, "f32", a.dtype)
        work.append([((0, 0, 0, (i % per_seq) * a.page_tokens, a.page_tokens), x[i].tobytes())
                     for i in range(a.pages)])
    return work


def check(work, decoded, dtype):
    """Round-trip check (outside the timed sections): every page back, close to what was sent."""
    for s, (pages, dec) in enumerate(zip(work, decoded)):
        if len(dec.data) != len(pages):
            raise RuntimeError(f"stream {s}: {len(dec.data)} of {len(pages)} pages decoded")
        for (c, d), out in zip(pages, dec.data):
            x = fibquant.tensors.convert(np.frombuffer(d, fibquant.tensors.np_dtype(dtype)), dtype, "f32")
            y = np.frombuffer(out, np.float32)
            rel = float(((x - y) ** 2).sum() / (x ** 2).sum())
            if not rel <= 0.05:
                raise RuntimeError(f"stream {s}: page {c} relative squared error {rel}")


def cpu_seconds() -> float:
    """CPU time of this process so far (user + system, every thread)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def on_threads(fn, streams: int) -> tuple:
    """fn(s) on one thread per stream: (wall seconds, CPU seconds)."""
    c0, t0 = cpu_seconds(), time.perf_counter()
    threads = [threading.Thread(target=fn, args=(s,)) for s in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, cpu_seconds() - c0


def figures(work, compress: tuple, decompress: tuple) -> dict:
    """MB/s and client CPU microseconds per page of the two phases, each (wall, cpu) seconds."""
    raw = sum(len(d) for w in work for _, d in w)
    pages = sum(len(w) for w in work)
    return {"compress": raw / compress[0] / 1e6, "decompress": raw / decompress[0] / 1e6,
            "compress_cpu_us_per_page": compress[1] / pages * 1e6,
            "decompress_cpu_us_per_page": decompress[1] / pages * 1e6}


def run_python_sync(client: fibquant.Client, info, work, a) -> dict:
    """fibquant.Client: one thread per stream."""
    results, decoded = [None] * a.streams, [None] * a.streams

    def compress(s):
        results[s] = client.compress_pages(info.digest, work[s], a.dtype, window=a.window, timeout=300)

    def decompress(s):
        decoded[s] = client.decompress_pages(results[s].frames, "f32", profile_digest=info.digest,
                                             window=a.window, timeout=300)

    c, d = on_threads(compress, a.streams), on_threads(decompress, a.streams)
    check(work, decoded, a.dtype)
    return figures(work, c, d)


def sync_api_stream(stub, job, window: int, timeout: float):
    """One page stream on gRPC's synchronous stream-stream API: gRPC's thread consumes the request
    iterator, which waits while `window` pages are unanswered; answers are read on this thread."""
    collector = job.collector()
    room = threading.Semaphore(window)
    ended = threading.Event()

    def requests():
        yield job.header
        for i in range(job.count):
            while not room.acquire(timeout=0.1):
                if ended.is_set():
                    return
            yield job.request(i)

    answered = 0
    try:
        for resp in getattr(stub, job.method)(requests(), timeout=timeout):
            if collector.answer(resp, answered):
                answered += 1
                room.release()
    except grpc.RpcError as e:
        raise from_rpc_error(e, job.method) from None
    finally:
        ended.set()
    return job.finish(collector.finish(job.count, answered))


def run_grpc_sync_api(target: str, info, work, a) -> dict:
    """The same streams on gRPC's synchronous API (one thread per stream), no fibquant.Client."""
    results, decoded = [None] * a.streams, [None] * a.streams
    with grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", 64 << 20)]) as ch:
        stub = fibquant.pb_grpc.KvCompressionServiceStub(ch)

        def compress(s):
            job = compress_pages_job(info.digest, work[s], a.dtype, return_page_metrics=False, label="",
                                     queries=None, keep_pages=False)
            results[s] = sync_api_stream(stub, job, a.window, 300)

        def decompress(s):
            job = decompress_pages_job(results[s].frames, "f32", info.digest)
            decoded[s] = sync_api_stream(stub, job, a.window, 300)

        c, d = on_threads(compress, a.streams), on_threads(decompress, a.streams)
    check(work, decoded, a.dtype)
    return figures(work, c, d)


def run_python_aio(target: str, info, work, a) -> dict:
    """fibquant.aio.AsyncClient: all streams on one event loop (asyncio.gather)."""

    async def go():
        async with fibquant.AsyncClient(target) as c:
            await c.get_profile(info.digest)
            c0, t0 = cpu_seconds(), time.perf_counter()
            results = await asyncio.gather(*(c.compress_pages(info.digest, w, a.dtype, window=a.window, timeout=300)
                                             for w in work))
            comp = (time.perf_counter() - t0, cpu_seconds() - c0)
            c0, t0 = cpu_seconds(), time.perf_counter()
            decoded = await asyncio.gather(*(c.decompress_pages(r.frames, "f32", profile_digest=info.digest,
                                                                window=a.window, timeout=300) for r in results))
            return comp, (time.perf_counter() - t0, cpu_seconds() - c0), decoded

    comp, decomp, decoded = asyncio.run(go())
    check(work, decoded, a.dtype)
    return figures(work, comp, decomp)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server", help="HOST:PORT of a running loopback server (else one is started)")
    p.add_argument("--server-binary", default="build/server/fibquant-server")
    p.add_argument("--cli", default="build/client/cli/fibquant")
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--pages", type=int, default=2000)
    p.add_argument("--page-tokens", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="f16", choices=fibquant.DTYPES)
    p.add_argument("--window", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, default=0, help="server --workers when started here")
    p.add_argument("--grpc-sync-api", action="store_true",
                   help="also run the streams on gRPC's synchronous API (per-message cost against grpc.aio)")
    a = p.parse_args()
    if not (1 <= a.streams <= 64 and 1 <= a.pages <= 100000 and 1 <= a.rounds <= 20):
        p.error("--streams in [1, 64], --pages in [1, 100000], --rounds in [1, 20]")
    server = None
    target = a.server
    if target is None:
        import os
        import tempfile
        from conftest import ServerProcess
        os.environ["FQ_SERVER_BINARY"] = a.server_binary
        server = ServerProcess(Path(tempfile.mkdtemp(prefix="fq-bench-")), extra=[f"--workers={a.workers}"])
        target = server.target
    try:
        with fibquant.Client(target) as c:
            info = c.register_profile(bench_spec(a.dtype, a.head_dim, a.page_tokens, a.pages))
            work = make_work(info, a)
            rows = {"cli": [], "python_sync": [], "python_aio": []}
            if a.grpc_sync_api:
                rows["grpc_sync_api"] = []
            for r in range(a.rounds):
                rows["cli"].append(run_cli(a.cli, target, a))
                rows["python_sync"].append(run_python_sync(c, info, work, a))
                rows["python_aio"].append(run_python_aio(target, info, work, a))
                if a.grpc_sync_api:
                    rows["grpc_sync_api"].append(run_grpc_sync_api(target, info, work, a))
                print(f"round {r + 1}: " + "  ".join(
                    f"{k} " + " ".join(f"{n} {x:.1f}" for n, x in v[-1].items()) for k, v in rows.items()),
                    file=sys.stderr)
        med = {k: {ph: statistics.median(x[ph] for x in v) for ph in v[0]} for k, v in rows.items()}
        report = {"server": target, "streams": a.streams, "pages_per_stream": a.pages, "page_tokens": a.page_tokens,
                  "head_dim": a.head_dim, "dtype": a.dtype, "window": a.window, "rounds": a.rounds,
                  "raw_mb_per_s_median": med, "rounds_detail": rows,
                  "over_cli": {k: {ph: med[k][ph] / med["cli"][ph] for ph in ("compress", "decompress")}
                               for k in rows if k != "cli"},
                  "load_average": open("/proc/loadavg").read().split()[:3]}
        print(json.dumps(report, indent=2))
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
