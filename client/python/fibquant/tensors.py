"""Tensors <-> pages: element types, layouts, page planning and reassembly (no network).

Element types: "f32", "f16", "bf16". numpy has no bfloat16, so on the numpy side bf16 values are
np.uint16 arrays holding the bit patterns (a dtype named "bfloat16", e.g. ml_dtypes', is accepted
too); torch.bfloat16 tensors are used as they are. Conversions round to nearest even exactly like
the C++ core (core/half.cc), so pages sent from Python equal the CLI's for the same input.

Layouts (C order), chosen by rank like the CLI (client/cli/kv_pages.h) plus the canonical rank 5:
  2 [tokens, head_dim]; 3 [tokens, heads, head_dim]; 4 [layers, heads, tokens, head_dim];
  5 [batch, layers, heads, tokens, head_dim] (the profile's canonical layout).
Every tensor is handled through a zero-copy canonical 5-D view; pages are cut per (batch, layer,
head) from token 0 in steps of tokens_per_page, ordered batch, layer, head, token_start.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

from .errors import DataLossError, InvalidArgumentError

DTYPES = ("f32", "f16", "bf16")
_NP_DTYPE = {"f32": np.dtype("<f4"), "f16": np.dtype("<f2"), "bf16": np.dtype("<u2")}
ELEMENT_SIZE = {"f32": 4, "f16": 2, "bf16": 2}

try:  # torch is optional at import time
    import torch as _torch
except ImportError:  # pragma: no cover - depends on the machine
    _torch = None


def torch_available() -> bool:
    return _torch is not None


def is_torch(x: Any) -> bool:
    return _torch is not None and isinstance(x, _torch.Tensor)


def check_dtype(name: str, what: str = "dtype") -> str:
    if name not in DTYPES:
        raise InvalidArgumentError(f"{what} must be one of f32, f16, bf16, got {name!r}")
    return name


# ---- element conversions (vectorised; round to nearest even, NaN stays a quiet NaN)

def f32_to_bf16(a) -> np.ndarray:
    """float32 array -> bf16 bit patterns (uint16), as core/half.cc FloatToBf16."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    out = ((u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)).astype(np.uint16)
    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    if nan.any():
        out[nan] = ((u[nan] >> np.uint32(16)) | np.uint32(0x40)).astype(np.uint16)
    return out


def bf16_to_f32(b) -> np.ndarray:
    """bf16 bit patterns (uint16) -> float32 (exact)."""
    return (np.asarray(b, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def convert(a: np.ndarray, src: str, dst: str) -> np.ndarray:
    """Values of `a` (in the numpy representation of `src`) in the representation of `dst`."""
    if src == dst:
        return a
    f = bf16_to_f32(a) if src == "bf16" else a.astype(np.float32)
    if dst == "f32":
        return f
    if dst == "f16":
        with np.errstate(over="ignore"):
            return f.astype(np.float16)
    return f32_to_bf16(f)


# ---- input tensors

def as_numpy(x: Any) -> tuple[np.ndarray, str]:
    """(numpy view, dtype name) of a numpy array, torch tensor or buffer; zero-copy where possible.

    torch tensors on another device are copied to the CPU first; tensors needing grad are detached.
    """
    if is_torch(x):
        t = x.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        if t.dtype == _torch.bfloat16:
            return t.view(_torch.int16).numpy().view(np.uint16), "bf16"
        if t.dtype == _torch.float16:
            return t.numpy(), "f16"
        if t.dtype == _torch.float32:
            return t.numpy(), "f32"
        raise InvalidArgumentError(f"tensor dtype {t.dtype} is not supported (float32, float16, bfloat16)")
    a = x if isinstance(x, np.ndarray) else np.asarray(x if hasattr(x, "__array__") else memoryview(x))
    if a.dtype.name == "bfloat16":
        return a.view(np.uint16), "bf16"
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    kind = {"float32": "f32", "float16": "f16", "uint16": "bf16"}.get(a.dtype.name)
    if kind is None:
        raise InvalidArgumentError(
            f"array dtype {a.dtype} is not supported (float32, float16, or uint16 holding bf16 bits)")
    return a, kind


def to_output(a: np.ndarray, dtype: str, like: str):
    """numpy result (dtype's numpy representation) as 'numpy' or 'torch'."""
    if like == "numpy":
        return a
    if like != "torch":
        raise InvalidArgumentError(f"like must be 'numpy' or 'torch', got {like!r}")
    if _torch is None:
        raise InvalidArgumentError("like='torch' needs PyTorch (Debian python3-torch)")
    if dtype == "bf16":
        return _torch.from_numpy(a.view(np.int16)).view(_torch.bfloat16)
    return _torch.from_numpy(a)


# ---- layouts

LAYOUTS = {2: "td", 3: "thd", 4: "lhtd", 5: "blhtd"}


def canonical_view(a: np.ndarray, layout: str = "auto") -> np.ndarray:
    """Zero-copy [batch, layers, heads, tokens, head_dim] view of `a`."""
    if layout == "auto":
        if a.ndim not in LAYOUTS:
            raise InvalidArgumentError(
                f"rank {a.ndim} tensor; expected [tokens, head_dim], [tokens, heads, head_dim], "
                "[layers, heads, tokens, head_dim] or [batch, layers, heads, tokens, head_dim]")
        layout = LAYOUTS[a.ndim]
    if len(layout) != a.ndim or set(layout) - set("blhtd") or "t" not in layout or "d" not in layout:
        raise InvalidArgumentError(f"layout {layout!r} does not describe a rank-{a.ndim} tensor "
                                   "(letters b, l, h, t, d; t and d required)")
    if any(s == 0 for s in a.shape):
        raise InvalidArgumentError(f"tensor of shape {tuple(a.shape)} has an empty dimension")
    v = a
    for axis in "blh":
        if axis not in layout:
            v = v[np.newaxis]
            layout = axis + layout
    return v.transpose([layout.index(c) for c in "blhtd"])


@dataclass(frozen=True)
class PageGrid:
    """The page grid of a canonical view under a profile."""
    batch: int
    layers: int
    heads: int
    tokens: int
    head_dim: int
    tokens_per_page: int

    @property
    def pages_per_sequence(self) -> int:
        return -(-self.tokens // self.tokens_per_page)

    @property
    def page_count(self) -> int:
        return self.batch * self.layers * self.heads * self.pages_per_sequence

    def plan(self) -> list[tuple[int, int, int, int, int]]:
        """(batch, layer, head, token_start, token_count) in stream order."""
        tpp, T = self.tokens_per_page, self.tokens
        return [(b, l, h, t, min(tpp, T - t))
                for b in range(self.batch) for l in range(self.layers) for h in range(self.heads)
                for t in range(0, T, tpp)]

    def index(self, b: int, l: int, h: int, t: int) -> int:
        return ((b * self.layers + l) * self.heads + h) * self.pages_per_sequence + t // self.tokens_per_page


def grid_for(view_shape, profile_shape: dict, tokens_per_page: int, name: str = "tensor") -> PageGrid:
    """The grid of a canonical view, checked against the profile like the CLI does (InvalidArgument)."""
    B, L, H, T, D = (int(s) for s in view_shape)
    s = profile_shape
    if D != s["head_dim"]:
        raise InvalidArgumentError(f"{name}: head_dim {D} != the profile's head_dim {s['head_dim']}")
    if B > s["batch"]:
        raise InvalidArgumentError(f"{name}: batch {B} > the profile's batch {s['batch']}")
    if L > s["layers"]:
        raise InvalidArgumentError(f"{name}: {L} layers > the profile's {s['layers']}")
    if H > s["kv_heads"]:
        raise InvalidArgumentError(f"{name}: {H} heads > the profile's kv_heads {s['kv_heads']}")
    if T > s["tokens"]:
        raise InvalidArgumentError(f"{name}: {T} tokens > the profile's {s['tokens']}")
    if T != s["tokens"] and T % tokens_per_page != 0:
        raise InvalidArgumentError(
            f"{name}: {T} tokens is neither the profile's {s['tokens']} nor a multiple of its "
            f"tokens_per_page {tokens_per_page} (pages must sit on the page grid)")
    return PageGrid(B, L, H, T, D, tokens_per_page)


class PageSource:
    """Bytes of each page of a canonical view, in the page dtype. Converts the whole tensor once
    (vectorised, C-contiguous) when the dtype differs; otherwise copies each page once."""

    def __init__(self, view: np.ndarray, src_dtype: str, page_dtype: str):
        if src_dtype != page_dtype:
            view = np.ascontiguousarray(convert(view, src_dtype, page_dtype))
        self._view = view

    def page(self, b: int, l: int, h: int, t0: int, n: int) -> bytes:
        return self._view[b, l, h, t0:t0 + n].tobytes()


class Assembler:
    """Places decoded pages into an output tensor through its canonical view; every page of the
    grid must arrive exactly once (DataLoss naming the page otherwise)."""

    def __init__(self, grid: PageGrid, out: np.ndarray, out_view: np.ndarray, dtype: str):
        self.grid, self.out, self._view, self.dtype = grid, out, out_view, dtype
        self._seen = np.zeros(grid.page_count, dtype=bool)
        self._added = 0
        self._np = _NP_DTYPE[dtype]

    def add(self, c, data: bytes) -> None:
        g = self.grid
        b, l, h, t0, n = c
        where = f"page (batch {b}, layer {l}, head {h}, tokens {t0}+{n})"
        if (b >= g.batch or l >= g.layers or h >= g.heads or t0 >= g.tokens or t0 % g.tokens_per_page
                or n != min(g.tokens_per_page, g.tokens - t0)):
            raise DataLossError(f"{where} does not fit the tensor's page grid")
        want = n * g.head_dim * self._np.itemsize
        if len(data) != want:
            raise DataLossError(f"{where}: {len(data)} bytes, expected {want}")
        i = g.index(b, l, h, t0)
        if self._seen[i]:
            raise DataLossError(f"{where} appears twice")
        self._seen[i] = True
        self._added += 1
        self._view[b, l, h, t0:t0 + n] = np.frombuffer(data, dtype=self._np).reshape(n, g.head_dim)

    def finish(self) -> np.ndarray:
        if self._added != self.grid.page_count:
            raise DataLossError(f"got {self._added} of the {self.grid.page_count} pages of the tensor")
        return self.out


def empty_output(shape: Iterable[int], layout: str, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    out = np.empty(tuple(shape), dtype=_NP_DTYPE[dtype])
    return out, canonical_view(out, layout)


def np_dtype(dtype: str) -> np.dtype:
    return _NP_DTYPE[dtype]
