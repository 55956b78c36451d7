"""pytest fixtures: a real fibquant-server (FQ_SERVER_BINARY) on a free 127.0.0.1 port.

The server picks the port itself (--listen=127.0.0.1:0) and logs "serving ... on 127.0.0.1:PORT";
the fixture waits for that line (bounded) as tests/server/ops_test_util.h does. Teardown sends
SIGTERM and requires a clean drain (exit code 0); a server that hangs is killed.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

import fibquant

SOURCE_DIR = Path(os.environ.get("FQ_SOURCE_DIR", Path(__file__).resolve().parents[3]))
START_TIMEOUT = 120  # generous: a loaded 2-core machine (or a sanitizer build) starts slowly
_SERVING = re.compile(r"serving \S+ on [^ ]+:(\d+) ")
_METRICS = re.compile(r"metrics on http://127\.0\.0\.1:(\d+)/metrics")


def server_binary() -> str:
    b = os.environ.get("FQ_SERVER_BINARY")
    if not b or not os.access(b, os.X_OK):
        pytest.fail("FQ_SERVER_BINARY must name the fibquant-server binary (CTest sets it)")
    return b


def cli_binary() -> str:
    b = os.environ.get("FQ_CLI_BINARY")
    if not b or not os.access(b, os.X_OK):
        pytest.fail("FQ_CLI_BINARY must name the fibquant CLI binary (CTest sets it)")
    return b


class ServerProcess:
    def __init__(self, workdir: Path, extra=(), listen="127.0.0.1:0", data_dir=None):
        self.workdir = workdir
        self.data_dir = data_dir or workdir / "data"
        self.log_path = workdir / f"server-{time.monotonic_ns()}.log"
        args = [server_binary(), f"--listen={listen}", "--metrics-listen=127.0.0.1:0",
                f"--data-dir={self.data_dir}", "--workers=2", "--build-workers=1", "--drain-seconds=5", *extra]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT)
        self.port = None
        self.metrics_port = None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            log = self.log()
            m = _SERVING.search(log)
            if m:
                self.port = int(m.group(1))
                mm = _METRICS.search(log)
                self.metrics_port = int(mm.group(1)) if mm else None
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"fibquant-server did not start:\n{self.log()}")

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=30) as r:
            return r.read().decode()

    def metric(self, series: str) -> float:
        for line in self.metrics().splitlines():
            if line.startswith(series + " "):
                return float(line.split()[-1])
        return 0.0

    def stop(self) -> int:
        """SIGTERM, bounded wait; returns the exit code (SIGKILL and -9 after 60 s)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()
        return self.proc.returncode

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


@pytest.fixture(scope="session")
def workdir():
    d = Path(tempfile.mkdtemp(prefix="fq-py-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def server(workdir):
    s = ServerProcess(workdir)
    yield s
    code = s.stop()
    assert code == 0, f"server exit code {code} after SIGTERM:\n{s.log()}"


@pytest.fixture()
def client(server):
    with fibquant.Client(server.target) as c:
        yield c


def spec(profile_id, role="key", dtype="f16", layers=2, kv_heads=4, tokens=64, head_dim=64, tokens_per_page=16,
         **kw):
    """Small, fast-to-build profiles (block_dim 2, 16 codewords) for the tests."""
    kw.setdefault("codebook_size", 16)
    return fibquant.kv_profile_spec(profile_id, role=role, layers=layers, kv_heads=kv_heads, tokens=tokens,
                                    head_dim=head_dim, tokens_per_page=tokens_per_page, dtype=dtype, **kw)


def real_kv(layer=0, which="k", tokens=64):
    """Real K/V from tests/data ([64, 4, head_dim] f32; layer 0 head_dim 64, layer 1 128)."""
    raw = np.fromfile(SOURCE_DIR / "tests" / "data" / f"L{layer}_{which}.f32", dtype="<f4")
    d = 64 if layer == 0 else 128
    return raw.reshape(64, 4, d)[:tokens]


def as_f32(a, dtype):
    """numpy representation of dtype -> float32 values."""
    return fibquant.bf16_to_f32(a) if dtype == "bf16" else np.asarray(a, dtype=np.float32)
