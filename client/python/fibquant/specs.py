"""Builds KV profile spec dicts (the spec JSON of docs/format/kv.md section 9, as `fibquant profile
register` reads it) for Client.register_profile."""
from __future__ import annotations

from typing import Optional, Sequence


def kv_profile_spec(
    profile_id: str,
    *,
    role: str,
    layers: int,
    kv_heads: int,
    tokens: int,
    head_dim: int,
    tokens_per_page: int,
    dtype: str = "f16",
    batch: int = 1,
    query_heads: Optional[int] = None,
    attention_kind: Optional[str] = None,
    rope_state: Optional[str] = None,
    axis_policy: str = "per_token",
    block_dim: int = 2,
    codebook_size: int = 256,
    seed: int = 20260526,
    training_samples: Optional[int] = None,
    first_tokens_raw: int = 0,
    last_tokens_raw: int = 0,
    raw_layers: Sequence[int] = (),
    raw_heads: Sequence[int] = (),
    fallback: str = "keep_raw",
    quality_budget: Optional[dict] = None,
) -> dict:
    """A spec dict. Defaults: per_token axis, block_dim 2 x 256 codewords (4 bits/coordinate), keep_raw
    fallback, mha (gqa when query_heads > kv_heads), keys pre_rope, values not_applicable."""
    if role not in ("key", "value"):
        raise ValueError(f"role must be 'key' or 'value', got {role!r}")
    qh = query_heads or kv_heads
    kind = attention_kind or ("mha" if qh == kv_heads else ("mqa" if kv_heads == 1 else "gqa"))
    spec = {
        "profile_id": profile_id,
        "shape": {
            "role": role, "attention_kind": kind, "batch": batch, "layers": layers, "kv_heads": kv_heads,
            "query_heads": qh, "tokens": tokens, "head_dim": head_dim, "dtype": dtype,
            "rope_state": rope_state or ("pre_rope" if role == "key" else "not_applicable"),
        },
        "axis_policy": axis_policy,
        "tokens_per_page": tokens_per_page,
        "protected": {"first_tokens_raw": first_tokens_raw, "last_tokens_raw": last_tokens_raw,
                      "raw_layers": list(raw_layers), "raw_heads": list(raw_heads)},
        "fallback": {"mode": fallback},
    }
    if axis_policy != "raw":
        fq = {"block_dim": block_dim, "codebook_size": codebook_size, "seed": seed}
        if training_samples is not None:
            fq["training_samples"] = training_samples
        spec["fibquant"] = fq
    if quality_budget:
        spec["quality_budget"] = dict(quality_budget)
    return spec
