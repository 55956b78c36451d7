"""The CLI's `.fqc` container (docs/format/container.md, client/cli/container.cc), version 1.

Byte layout: "FQKC", u16 version 1, u16 flags 0, u32 metadata_len, u32 frame_count, metadata JSON,
frame_count x (u32 len, frame), u32 receipt_len, receipt JSON (proto3 JSON of the stream's Receipt),
u64 XXH3-64 (seed 0) of every byte before it. Little-endian. The reader runs the format's checks in
the documented order with the same limits and codes (DataLoss, Unimplemented, ResourceExhausted),
walking every length before copying anything, so a corrupt length never drives an allocation.
Files written here decode with `fibquant decompress` (for rank 2-4 sources), and the CLI's decode
here.
"""
from __future__ import annotations

import json
import os
import struct
import tempfile
from dataclasses import dataclass, field
from typing import Sequence, Union

import xxhash

from .errors import DataLossError, InvalidArgumentError, ResourceExhaustedError, UnimplementedError

MAGIC = b"FQKC"
VERSION = 1
PREAMBLE = 16
CHECKSUM = 8
MAX_METADATA = 1 << 20
MAX_FRAMES = 1 << 22
MAX_FRAME = 256 << 20
MAX_RECEIPT = 16 << 20
MAX_CONTAINER = 64 << 30
META_SCHEMA = "fq_cli_container_meta_v1"


@dataclass
class Container:
    """metadata: the metadata JSON object (see docs/format/container.md); frames: KV page frames in
    stream order; receipt: the stream's Receipt as a proto3-JSON dict."""
    metadata: dict
    frames: list = field(default_factory=list)
    receipt: dict = field(default_factory=dict)

    @property
    def profile_digest(self) -> str:
        return self.metadata.get("profile_digest", "")

    def encode(self) -> bytes:
        meta = json.dumps(self.metadata, separators=(",", ":")).encode()
        receipt = json.dumps(self.receipt, separators=(",", ":")).encode()
        if len(meta) > MAX_METADATA:
            raise InvalidArgumentError(f"container metadata of {len(meta)} bytes is above the limit of {MAX_METADATA}")
        if len(self.frames) > MAX_FRAMES:
            raise InvalidArgumentError(f"container of {len(self.frames)} frames is above the limit of {MAX_FRAMES}")
        if len(receipt) > MAX_RECEIPT:
            raise InvalidArgumentError(f"receipt of {len(receipt)} bytes is above the limit of {MAX_RECEIPT}")
        parts = [MAGIC, struct.pack("<HHII", VERSION, 0, len(meta), len(self.frames)), meta]
        for i, f in enumerate(self.frames):
            if len(f) > MAX_FRAME:
                raise InvalidArgumentError(f"frame {i} of {len(f)} bytes is above the limit of {MAX_FRAME}")
            parts.append(struct.pack("<I", len(f)))
            parts.append(bytes(f))
        parts.append(struct.pack("<I", len(receipt)))
        parts.append(receipt)
        body = b"".join(parts)
        return body + struct.pack("<Q", xxhash.xxh3_64_intdigest(body))


def decode_container(b: Union[bytes, bytearray, memoryview]) -> Container:
    """Parses and verifies a container (the format's reader checks, in order)."""
    b = memoryview(b).cast("B")
    n = len(b)
    if n > MAX_CONTAINER:
        raise ResourceExhaustedError(f"container of {n} bytes is above the limit of {MAX_CONTAINER}")
    if n < PREAMBLE + 4 + CHECKSUM:
        raise DataLossError(f"container truncated: {n} bytes, at least {PREAMBLE + 4 + CHECKSUM} needed")
    if bytes(b[:4]) != MAGIC:
        raise DataLossError('not a fibquant container: bad magic (expected "FQKC")')
    version, flags, meta_len, frame_count = struct.unpack_from("<HHII", b, 4)
    if version != VERSION:
        raise UnimplementedError(f"container version {version} is not supported (this build reads version {VERSION})")
    if flags != 0:
        raise DataLossError(f"container flags 0x{flags:x} are reserved and must be 0")
    if meta_len > MAX_METADATA:
        raise ResourceExhaustedError(f"container metadata_len {meta_len} is above the limit of {MAX_METADATA}")
    if frame_count > MAX_FRAMES:
        raise ResourceExhaustedError(f"container frame_count {frame_count} is above the limit of {MAX_FRAMES}")
    body_end = n - CHECKSUM
    pos = PREAMBLE
    if meta_len > body_end - pos:
        raise DataLossError(f"container metadata_len {meta_len} runs past the end of the file")
    meta_pos = pos
    pos += meta_len
    spans = []
    for i in range(frame_count):
        if body_end - pos < 4:
            raise DataLossError(f"container truncated in the length of frame {i} of {frame_count}")
        (ln,) = struct.unpack_from("<I", b, pos)
        pos += 4
        if ln > MAX_FRAME:
            raise ResourceExhaustedError(f"container frame {i} length {ln} is above the limit of {MAX_FRAME}")
        if ln > body_end - pos:
            raise DataLossError(f"container frame {i} length {ln} runs past the end of the file")
        spans.append((pos, ln))
        pos += ln
    if body_end - pos < 4:
        raise DataLossError("container truncated in the receipt length")
    (receipt_len,) = struct.unpack_from("<I", b, pos)
    pos += 4
    if receipt_len > MAX_RECEIPT:
        raise ResourceExhaustedError(f"container receipt_len {receipt_len} is above the limit of {MAX_RECEIPT}")
    if receipt_len > body_end - pos:
        raise DataLossError(f"container receipt_len {receipt_len} runs past the end of the file")
    receipt_pos = pos
    pos += receipt_len
    if pos != body_end:
        raise DataLossError(f"container has {body_end - pos} unexpected bytes before the checksum")
    (stored,) = struct.unpack_from("<Q", b, body_end)
    computed = xxhash.xxh3_64_intdigest(b[:body_end])
    if stored != computed:
        raise DataLossError(f"container checksum mismatch (stored 0x{stored:x}, computed 0x{computed:x})")

    def obj(pos0, ln, what):
        try:
            v = json.loads(bytes(b[pos0:pos0 + ln]).decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            v = None
        if not isinstance(v, dict):
            raise DataLossError(f"container {what} is not a JSON object")
        return v

    metadata = obj(meta_pos, meta_len, "metadata")
    receipt = obj(receipt_pos, receipt_len, "receipt")
    return Container(metadata, [bytes(b[p:p + ln]) for p, ln in spans], receipt)


def read_container(path: Union[str, os.PathLike]) -> Container:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > MAX_CONTAINER:
            raise ResourceExhaustedError(f"{path}: container of {size} bytes is above the limit of {MAX_CONTAINER}")
        data = f.read()
    try:
        return decode_container(data)
    except (DataLossError, UnimplementedError, ResourceExhaustedError) as e:
        raise type(e)(f"{os.fspath(path)}: {e.message}") from None


def write_container(path: Union[str, os.PathLike], container: Container) -> int:
    """Writes atomically (temporary file in the same directory, then rename); returns the size."""
    data = container.encode()
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".tmp.", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return len(data)


def container_metadata(*, profile_digest: str, profile_id: str, source_file: str, source_dtype: str,
                       source_shape: Sequence[int], page_dtype: str, tokens_per_page: int, pages: int) -> dict:
    """The metadata object `fibquant compress` writes (same keys and order)."""
    return {"schema": META_SCHEMA, "profile_digest": profile_digest, "profile_id": profile_id,
            "source": {"file": source_file, "dtype": source_dtype, "shape": [int(s) for s in source_shape]},
            "page_dtype": page_dtype, "tokens_per_page": int(tokens_per_page), "pages": int(pages)}


def check_metadata(meta: dict, frame_count: int, where: str = "container") -> tuple:
    """(profile_digest, shape, source_dtype, tokens_per_page) of metadata, checked (DataLoss)."""
    def bad(what):
        return DataLossError(f"{where}: container metadata: {what}")

    digest = meta.get("profile_digest")
    if not isinstance(digest, str):
        raise bad("no profile_digest")
    src = meta.get("source")
    if not isinstance(src, dict) or not isinstance(src.get("shape"), list) or not isinstance(src.get("dtype"), str):
        raise bad("no source shape/dtype")
    shape = src["shape"]
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise bad("shape holds a non-integer")
    if not 2 <= len(shape) <= 5 or any(d == 0 or d >= 1 << 32 for d in shape):
        raise bad(f"source shape {shape} is not a rank 2-5 tensor with dimensions in [1, 2^32-1]")
    tpp = meta.get("tokens_per_page")
    if not isinstance(tpp, int) or isinstance(tpp, bool) or tpp < 0:
        raise bad("no tokens_per_page")
    if not 1 <= tpp <= 4096:
        raise bad("tokens_per_page out of range")
    if src["dtype"] not in ("f32", "f16", "bf16"):
        raise bad("unknown source dtype")
    return digest, tuple(shape), src["dtype"], tpp
