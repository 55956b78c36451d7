"""KvOffloader: offload a sequence's KV blocks to the service and restore them, keyed by the
caller's block hashes (as prefix caches key blocks), with the streams' receipts.

A block is `block_size` consecutive tokens of one sequence, for every layer and KV head, keys and
values. It is stored as the page frames of those tokens (keys with the key profile, values with
the value profile); the frames carry their coordinates (layer, head, token_start), so a block can be
restored into any cache slot, and into either layout:
  - Hugging Face `past_key_values`: per layer a (K, V) pair of [batch, kv_heads, tokens, head_dim];
    block j of sequence `batch_index` covers tokens [j*block_size, (j+1)*block_size);
  - vLLM-style paged: per layer one tensor [num_blocks, 2, block_size, kv_heads, head_dim]
    (index 1: 0 keys, 1 values); the sequence's block table lists its block ids in order.
Profiles: one with role "key" and one with role "value", layers/kv_heads/head_dim of the cache, the
cache's dtype, tokens >= the longest sequence, and tokens_per_page dividing block_size.

Restore decodes every stored frame in one DecompressPages stream (to the cache's dtype) and writes
each page's bytes unchanged into place, so the restored values are bit-for-bit those of
Client.decompress_pages on the same frames.

Store: any MutableMapping hash -> StoredBlock (default: a dict in memory). Thread safety: one
offloader per thread, or a thread-safe store; the Client may be shared.
"""
from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass, field
from typing import Hashable, MutableMapping, Optional, Sequence, Union

import numpy as np

from ._common import CancelToken
from .errors import DataLossError, InvalidArgumentError, NotFoundError
from .tensors import PageSource, as_numpy, is_torch, np_dtype
from .types import ProfileInfo, Receipt


@dataclass(frozen=True)
class StoredBlock:
    """What an offloaded block keeps: its position in the sequence and its frames."""
    position: int  # block index in the sequence (token_start = position * block_size)
    block_size: int
    layers: int
    kv_heads: int
    head_dim: int
    key_frames: tuple
    value_frames: tuple
    key_receipt_id: str
    value_receipt_id: str

    @property
    def frame_bytes(self) -> int:
        return sum(len(f) for f in self.key_frames) + sum(len(f) for f in self.value_frames)


@dataclass
class OffloadResult:
    offloaded: list = field(default_factory=list)  # hashes stored by this call
    skipped: list = field(default_factory=list)    # hashes already in the store (not sent again)
    key_receipt: Optional[Receipt] = None
    value_receipt: Optional[Receipt] = None
    raw_bytes: int = 0
    frame_bytes: int = 0

    @property
    def compression_ratio(self) -> float:
        return self.raw_bytes / self.frame_bytes if self.frame_bytes else 0.0


@dataclass
class RestoreResult:
    restored: list = field(default_factory=list)
    pages: int = 0
    raw_bytes: int = 0
    frame_bytes: int = 0
    receipt: Optional[Receipt] = None  # the DecompressPages receipt, when the server sends one


class _Writer:
    """Writes page bytes into a cache tensor (numpy or torch, any device) at [index] + a token span."""

    def __init__(self, t):
        self.t = t
        # CPU torch tensors are written through their shared numpy view; others by torch copies.
        self.torch = is_torch(t) and t.device.type != "cpu"
        if self.torch:
            import torch
            self.dtype = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}.get(t.dtype)
            if self.dtype is None:
                raise InvalidArgumentError(f"cache dtype {t.dtype} is not supported (float32, float16, bfloat16)")
        else:
            self.arr, self.dtype = as_numpy(t)

    def put(self, index: tuple, data: bytes, n: int, d: int):
        a = np.frombuffer(data, dtype=np_dtype(self.dtype)).reshape(n, d)
        if self.torch:
            import torch
            a = a.copy()  # torch tensors need writable memory
            src = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16) if self.dtype == "bf16" else torch.from_numpy(a)
            self.t[index] = src.to(self.t.device)
        else:
            self.arr[index] = a


class KvOffloader:
    def __init__(self, client, key_profile: Union[str, ProfileInfo], value_profile: Union[str, ProfileInfo],
                 store: Optional[MutableMapping] = None, *, window: Optional[int] = None,
                 timeout: Optional[float] = None):
        self.client = client
        self.key_profile = client._profile(key_profile)
        self.value_profile = client._profile(value_profile)
        if self.key_profile.role != "key" or self.value_profile.role != "value":
            raise InvalidArgumentError("key_profile must have role 'key' and value_profile role 'value'")
        ks, vs = self.key_profile.shape, self.value_profile.shape
        for f in ("layers", "kv_heads", "head_dim", "dtype"):
            if ks[f] != vs[f]:
                raise InvalidArgumentError(f"key and value profiles differ in {f}: {ks[f]} vs {vs[f]}")
        if self.key_profile.tokens_per_page != self.value_profile.tokens_per_page:
            raise InvalidArgumentError("key and value profiles differ in tokens_per_page")
        self.store = {} if store is None else store
        self.window, self.timeout = window, timeout

    # ---- shared core: blocks given as per-block page sources

    def _check_block_size(self, block_size: int):
        tpp = self.key_profile.tokens_per_page
        if block_size % tpp:
            raise InvalidArgumentError(f"block_size {block_size} is not a multiple of the profiles' tokens_per_page {tpp}")

    def _offload(self, blocks, layers, heads, head_dim, block_size, src_dtype, label, cancel) -> OffloadResult:
        """blocks: list of (hash, position, key_view, value_view) with views [layers, heads, block_size, head_dim]."""
        kp, vp = self.key_profile, self.value_profile
        ks = kp.shape
        if head_dim != ks["head_dim"] or layers > ks["layers"] or heads > ks["kv_heads"]:
            raise InvalidArgumentError(
                f"cache of {layers} layers x {heads} heads x head_dim {head_dim} does not fit the profiles "
                f"({ks['layers']} x {ks['kv_heads']} x {ks['head_dim']})")
        self._check_block_size(block_size)
        result = OffloadResult()
        todo, seen = [], set()
        for h, pos, kview, vview in blocks:
            if h in self.store or h in seen:
                result.skipped.append(h)
                continue
            if (pos + 1) * block_size > ks["tokens"]:
                raise InvalidArgumentError(f"block {h!r} at position {pos} ends at token {(pos + 1) * block_size}, "
                                           f"past the profiles' {ks['tokens']} tokens")
            seen.add(h)
            todo.append((h, pos, kview, vview))
        if not todo:
            return result
        tpp = kp.tokens_per_page
        per_block = [(l, hd, s) for l in range(layers) for hd in range(heads) for s in range(0, block_size, tpp)]
        pages = {"key": [], "value": []}
        for _, pos, kview, vview in todo:
            ksrc = PageSource(kview, src_dtype, kp.dtype)
            vsrc = PageSource(vview, src_dtype, vp.dtype)
            for l, hd, s in per_block:
                coords = (0, l, hd, pos * block_size + s, tpp)
                pages["key"].append((coords, ksrc.page(0, l, hd, s, tpp)))
                pages["value"].append((coords, vsrc.page(0, l, hd, s, tpp)))
        # Keys and values go to different profiles: two streams, run at once.
        with concurrent.futures.ThreadPoolExecutor(2) as ex:
            fk = ex.submit(self.client.compress_pages, kp.digest, pages["key"], kp.dtype, label=label,
                           window=self.window, timeout=self.timeout, cancel=cancel)
            fv = ex.submit(self.client.compress_pages, vp.digest, pages["value"], vp.dtype, label=label,
                           window=self.window, timeout=self.timeout, cancel=cancel)
            rk, rv = fk.result(), fv.result()
        n = len(per_block)
        for i, (h, pos, _, _) in enumerate(todo):
            self.store[h] = StoredBlock(pos, block_size, layers, heads, head_dim,
                                        tuple(rk.frames[i * n:(i + 1) * n]), tuple(rv.frames[i * n:(i + 1) * n]),
                                        rk.receipt.receipt_id, rv.receipt.receipt_id)
            result.offloaded.append(h)
        result.key_receipt, result.value_receipt = rk.receipt, rv.receipt
        result.raw_bytes = sum(len(d) for _, d in pages["key"]) + sum(len(d) for _, d in pages["value"])
        result.frame_bytes = sum(len(f) for f in rk.frames) + sum(len(f) for f in rv.frames)
        return result

    def _restore(self, hashes, dtype, place, cancel) -> RestoreResult:
        """Decodes every frame of the blocks in one stream; place(block_i, role, coords, data)."""
        blocks = []
        for h in hashes:
            try:
                blocks.append(self.store[h])
            except KeyError:
                raise NotFoundError(f"block {h!r} was not offloaded (not in the store)", method="restore") from None
        tpp = self.key_profile.tokens_per_page
        for h, b in zip(hashes, blocks):
            want = b.layers * b.kv_heads * (b.block_size // tpp)
            if len(b.key_frames) != want or len(b.value_frames) != want:
                raise DataLossError(f"block {h!r}: {len(b.key_frames)} key and {len(b.value_frames)} value frames, "
                                    f"expected {want} each")
        frames, where = [], []
        for i, b in enumerate(blocks):
            for role, fs in ((0, b.key_frames), (1, b.value_frames)):
                for f in fs:
                    frames.append(f)
                    where.append((i, role))
        result = RestoreResult(restored=list(hashes))
        if not frames:
            return result
        r = self.client.decompress_pages(frames, dtype, window=self.window, timeout=self.timeout, cancel=cancel)
        seen = set()
        for (i, role), c, data, digest in zip(where, r.coordinates, r.data, r.profile_digests):
            # Each block's frames are checked to cover it exactly: the right count (above), every page
            # inside the block (place) and no page twice (here).
            if (i, role, c) in seen:
                raise DataLossError(f"block {hashes[i]!r}: page {c} appears twice")
            seen.add((i, role, c))
            want = self.key_profile.digest if role == 0 else self.value_profile.digest
            if digest != want:
                raise DataLossError(f"block {hashes[i]!r}: a {'key' if role == 0 else 'value'} frame belongs to "
                                    f"profile {digest}, not {want}")
            place(i, role, c, data)
            result.raw_bytes += len(data)
        result.pages = len(frames)
        result.frame_bytes = sum(len(f) for f in frames)
        result.receipt = r.receipt
        return result

    @staticmethod
    def _check_page(b: StoredBlock, h, c, layers, heads):
        bt, l, hd, t0, n = c
        start = b.position * b.block_size
        if bt != 0 or l >= layers or hd >= heads or not start <= t0 < start + b.block_size or t0 + n > start + b.block_size:
            raise DataLossError(f"block {h!r}: page (layer {l}, head {hd}, tokens {t0}+{n}) lies outside the "
                                f"block (tokens {start}..{start + b.block_size}) or the cache")
        return l, hd, t0 - start, n

    # ---- vLLM-style paged caches

    def offload_paged(self, kv_caches: Sequence, block_ids: Sequence[int], block_hashes: Sequence[Hashable], *,
                      first_position: int = 0, label: str = "", cancel: Optional[CancelToken] = None) -> OffloadResult:
        """Offloads blocks of one sequence from per-layer caches [num_blocks, 2, block_size, kv_heads,
        head_dim]. block_ids[i] holds the sequence's block at position first_position + i, stored
        under block_hashes[i]; blocks whose hash is already stored are skipped."""
        if len(block_ids) != len(block_hashes):
            raise InvalidArgumentError(f"{len(block_ids)} block ids but {len(block_hashes)} hashes")
        arrs = [as_numpy(c) for c in kv_caches]
        if not arrs:
            raise InvalidArgumentError("no layers in kv_caches")
        shape0, dt = arrs[0][0].shape, arrs[0][1]
        if len(shape0) != 5 or shape0[1] != 2:
            raise InvalidArgumentError(f"paged cache of shape {tuple(shape0)}; expected "
                                       "[num_blocks, 2, block_size, kv_heads, head_dim]")
        for a, d in arrs:
            if a.shape != shape0 or d != dt:
                raise InvalidArgumentError("every layer's cache must have the same shape and dtype")
        nb, _, bs, H, D = shape0
        blocks = []
        for i, (bid, h) in enumerate(zip(block_ids, block_hashes)):
            if not 0 <= bid < nb:
                raise InvalidArgumentError(f"block id {bid} outside [0, {nb})")
            # [layers, heads, block_size, head_dim] views (stacked per block: one small copy)
            k = np.stack([a[bid, 0].transpose(1, 0, 2) for a, _ in arrs])
            v = np.stack([a[bid, 1].transpose(1, 0, 2) for a, _ in arrs])
            blocks.append((h, first_position + i, k[np.newaxis], v[np.newaxis]))
        return self._offload(blocks, len(arrs), H, D, bs, dt, label, cancel)

    def restore_paged(self, kv_caches: Sequence, block_ids: Sequence[int], block_hashes: Sequence[Hashable], *,
                      cancel: Optional[CancelToken] = None) -> RestoreResult:
        """Writes the stored blocks block_hashes[i] into block_ids[i] of the per-layer caches, in place."""
        if len(block_ids) != len(block_hashes):
            raise InvalidArgumentError(f"{len(block_ids)} block ids but {len(block_hashes)} hashes")
        writers = [_Writer(c) for c in kv_caches]
        shape = tuple(kv_caches[0].shape)
        nb, _, bs, H, D = shape
        for bid in block_ids:
            if not 0 <= bid < nb:
                raise InvalidArgumentError(f"block id {bid} outside [0, {nb})")
        stored = [self.store.get(h) for h in block_hashes]
        for h, b in zip(block_hashes, stored):
            if b is not None and (b.block_size, b.layers, b.kv_heads, b.head_dim) != (bs, len(writers), H, D):
                raise InvalidArgumentError(
                    f"block {h!r} holds {b.layers} layers x {b.kv_heads} heads x {b.block_size} tokens x head_dim "
                    f"{b.head_dim}; the cache has {len(writers)} x {H} x {bs} x {D}")

        def place(i, role, c, data):
            l, hd, off, n = self._check_page(stored[i], block_hashes[i], c, len(writers), H)
            writers[l].put((block_ids[i], role, slice(off, off + n), hd), data, n, D)
        return self._restore(list(block_hashes), writers[0].dtype, place, cancel)

    # ---- Hugging Face past_key_values

    def offload_hf(self, past_key_values: Sequence, block_hashes: Sequence[Hashable], *, batch_index: int = 0,
                   block_size: Optional[int] = None, label: str = "",
                   cancel: Optional[CancelToken] = None) -> OffloadResult:
        """Offloads the full blocks of sequence `batch_index` of a per-layer (K, V) cache, K and V
        [batch, kv_heads, tokens, head_dim]. block_hashes[j] names tokens [j*bs, (j+1)*bs) where bs
        is block_size (default: the profiles' tokens_per_page); a partial tail is not offloaded."""
        bs = block_size or self.key_profile.tokens_per_page
        layers = [(as_numpy(k), as_numpy(v)) for k, v in past_key_values]
        if not layers:
            raise InvalidArgumentError("past_key_values has no layers")
        (k0, dt), _ = layers[0]
        if k0.ndim != 4:
            raise InvalidArgumentError(f"K of shape {tuple(k0.shape)}; expected [batch, kv_heads, tokens, head_dim]")
        B, H, T, D = k0.shape
        for (k, kd), (v, vd) in layers:
            if k.shape != k0.shape or v.shape != k0.shape or kd != dt or vd != dt:
                raise InvalidArgumentError("every layer's K and V must have the same shape and dtype")
        if not 0 <= batch_index < B:
            raise InvalidArgumentError(f"batch_index {batch_index} outside [0, {B})")
        if len(block_hashes) != T // bs:
            raise InvalidArgumentError(f"{T} tokens hold {T // bs} full blocks of {bs}, "
                                       f"but {len(block_hashes)} hashes were given")
        blocks = []
        for j, h in enumerate(block_hashes):
            sl = slice(j * bs, (j + 1) * bs)
            k = np.stack([kk[batch_index, :, sl] for (kk, _), _ in layers])
            v = np.stack([vv[batch_index, :, sl] for _, (vv, _) in layers])
            blocks.append((h, j, k[np.newaxis], v[np.newaxis]))
        return self._offload(blocks, len(layers), H, D, bs, dt, label, cancel)

    def restore_hf(self, block_hashes: Sequence[Hashable], *, dtype: Optional[str] = None, like: str = "torch",
                   cancel: Optional[CancelToken] = None):
        """A new per-layer ((K, V), ...) cache [1, kv_heads, len(block_hashes)*block_size, head_dim]
        holding the blocks in the given order (block j at tokens j*block_size, wherever it was
        offloaded from). Returns (past_key_values, RestoreResult)."""
        from .tensors import to_output
        stored = []
        for h in block_hashes:
            if h not in self.store:
                raise NotFoundError(f"block {h!r} was not offloaded (not in the store)", method="restore")
            stored.append(self.store[h])
        if not stored:
            raise InvalidArgumentError("no block hashes to restore")
        b0 = stored[0]
        for h, b in zip(block_hashes, stored):
            if (b.block_size, b.layers, b.kv_heads, b.head_dim) != (b0.block_size, b0.layers, b0.kv_heads, b0.head_dim):
                raise InvalidArgumentError(f"block {h!r} has another geometry than block {block_hashes[0]!r}")
        dt = dtype or self.key_profile.dtype
        bs, L, H, D = b0.block_size, b0.layers, b0.kv_heads, b0.head_dim
        out = [(np.empty((1, H, len(stored) * bs, D), np_dtype(dt)), np.empty((1, H, len(stored) * bs, D), np_dtype(dt)))
               for _ in range(L)]

        def place(i, role, c, data):
            l, hd, off, n = self._check_page(stored[i], block_hashes[i], c, L, H)
            t0 = i * bs + off
            out[l][role][0, hd, t0:t0 + n] = np.frombuffer(data, dtype=np_dtype(dt)).reshape(n, D)
        result = self._restore(list(block_hashes), dt, place, cancel)
        return tuple((to_output(k, dt, like), to_output(v, dt, like)) for k, v in out), result
