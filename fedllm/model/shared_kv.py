"""Attention that reads the keys/values every row of a batch shares from one copy (Hydragen).

When every row starts with the same tokens (a chat template's system turn, a canary's prompt
before its 1,000 reference secrets), those tokens run once as a one-row forward; the rows then
run only their own tokens. Repeating the one-row cache over the rows copies its keys/values into
every row on every layer, and on a CPU those copies (and their casts) cost more than the
attention itself. Here the rows' queries meet the shared keys as one matrix product per key
head, (rows × queries) × shared, and the two softmax halves are joined exactly: the scores of
both key sets are concatenated before one softmax, so the result equals attention over the
concatenated keys/values to float rounding, and gradients flow back into the shared ones
(summed over the rows) when training.

    kv = prefix_kv(model, head_ids)
    with attending_shared(model):
        logits = model(input_ids=rest, attention_mask=rest_mask, position_ids=..., shared_kv=kv)

`rest_mask` covers the rows' own tokens (and any per-row cache passed as `past_key_values`); the
shared tokens are never masked. Hydragen: Juravsky et al., arXiv 2402.05099.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicLayer
from transformers.masking_utils import AttentionMaskInterface, eager_mask

NAME = "fedllm_shared_kv"
SharedKV = Sequence[tuple[torch.Tensor, torch.Tensor]]  # per layer: (1, kv heads, S, head dim)


def shared_kv(cache: Cache | None) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Per-layer (keys, values) of a one-row cache; None when it has none to share (no cache,
    or layers other than plain full-attention ones: sliding windows, quantized caches)."""
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        return None
    if any(getattr(layer, "keys", None) is None for layer in layers):
        return None
    kv = [(layer.keys, layer.values) for layer in layers]
    return kv if all(k.shape[0] == 1 for k, _ in kv) else None


def prefix_kv(
    model: torch.nn.Module, token_ids: Sequence[int]
) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Run `token_ids` once as a one-row forward; its keys/values for every row to share (None:
    the model keeps no reusable cache, e.g. gradient checkpointing in train mode)."""
    device = next(model.parameters()).device
    ids = torch.as_tensor([list(token_ids)], dtype=torch.long, device=device)
    return shared_kv(model(input_ids=ids, use_cache=True, logits_to_keep=1).past_key_values)


def _per_key_head(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(rows, heads, T, n) -> (kv heads, rows × group × T, n): one matrix per key head."""
    rows, heads, t, n = x.shape
    group = heads // kv_heads
    return x.view(rows, kv_heads, group, t, n).transpose(0, 1).reshape(kv_heads, -1, n)


def _per_row(x: torch.Tensor, *, rows: int, heads: int) -> torch.Tensor:
    """The inverse of `_per_key_head`: (kv heads, rows × group × T, n) -> (rows, heads, T, n)."""
    kv_heads, _, n = x.shape
    x = x.view(kv_heads, rows, heads // kv_heads, -1, n).transpose(0, 1)
    return x.reshape(rows, heads, -1, n)


def shared_kv_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    scaling: float,
    dropout: float = 0.0,
    shared_kv: SharedKV | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention of the rows' queries over [shared keys, their own keys] (transformers'
    attention-function signature; `attention_mask` is the additive mask of the own keys)."""
    if shared_kv is None:
        raise ValueError(f"attention {NAME!r} needs shared_kv=... in the model call")
    if kwargs.get("softcap") or kwargs.get("sliding_window"):
        raise NotImplementedError(f"attention {NAME!r} has no logit soft-capping or window")
    rows, heads, _, _ = query.shape
    kv_heads = key.shape[1]
    shared_k, shared_v = shared_kv[module.layer_idx]
    s = shared_k.shape[-2]
    q = _per_key_head(query, kv_heads)
    scores_shared = (
        _per_row(q @ shared_k[0].transpose(-1, -2), rows=rows, heads=heads).float() * scaling
    )
    own_k = key.repeat_interleave(heads // kv_heads, dim=1)
    own_v = value.repeat_interleave(heads // kv_heads, dim=1)
    scores_own = (query @ own_k.transpose(-1, -2)).float() * scaling
    if attention_mask is not None:
        scores_own = scores_own + attention_mask[..., : own_k.shape[-2]]
    scores = torch.cat([scores_shared, scores_own], dim=-1)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    to_shared = _per_key_head(weights[..., :s], kv_heads) @ shared_v[0]
    # summed in fp32: one rounding, as a single product over the joined keys would have
    out = _per_row(to_shared, rows=rows, heads=heads).float() + (weights[..., s:] @ own_v).float()
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, shared_kv_attention)
AttentionMaskInterface.register(NAME, eager_mask)  # additive masks of the rows' own keys


@contextmanager
def attending_shared(model: torch.nn.Module) -> Iterator[None]:
    """Forwards inside run `shared_kv_attention` (pass `shared_kv=` to each); restored after."""
    config = model.config
    before = config._attn_implementation
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = before
