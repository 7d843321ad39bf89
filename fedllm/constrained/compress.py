"""Cheaper training messages: factors in fp16/bf16, optionally top-k sparsified with error feedback.

Dense mode sends `<module>.lora_A` / `.lora_B` in the wire dtype (bf16 travels as its raw int16
bits: Flower arrays go through numpy, which has no bfloat16). Top-k mode sends, per tensor, the
`fraction` largest entries of (update − start + residual) as `<name>.idx` (int32) and `<name>.val`;
the client keeps what it did not send (the residual, including rounding error) and adds it next
round (error feedback). The server rebuilds the factors from the start it knows it sent.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from flwr.app import ArrayRecord, RecordDict

from fedllm.aggregators import Factors

WIRE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
RESIDUAL_KEY = "fedllm.topk-residual"


def _to_wire(t: torch.Tensor, dtype: str) -> torch.Tensor:
    out = t.detach().to(WIRE_DTYPES[dtype]).cpu().contiguous()
    return out.view(torch.int16) if dtype == "bfloat16" else out


def _from_wire(t: torch.Tensor, dtype: str, *, key: str) -> torch.Tensor:
    if dtype == "bfloat16":
        if t.dtype != torch.int16:
            raise ValueError(f"{key}: bfloat16 wire arrays travel as int16 bits, got {t.dtype}")
        return t.view(torch.bfloat16).float()
    if t.dtype != WIRE_DTYPES[dtype]:
        raise ValueError(f"{key}: expected {dtype} on the wire, got {t.dtype}")
    return t.float()


def flat(factors: Mapping[str, Factors]) -> dict[str, torch.Tensor]:
    """Factors as `<module>.lora_A` / `.lora_B` tensors."""
    out = {}
    for module, f in factors.items():
        out[f"{module}.lora_A"], out[f"{module}.lora_B"] = f.A, f.B
    return out


def unflat(tensors: Mapping[str, torch.Tensor], scaling: float) -> dict[str, Factors]:
    """The inverse of `flat`; raises ValueError naming an unpaired or unexpected key."""
    out = {}
    for key in tensors:
        if key.endswith(".lora_A"):
            module = key.removesuffix(".lora_A")
            if module + ".lora_B" not in tensors:
                raise ValueError(f"{key} has no matching {module}.lora_B")
            out[module] = Factors(tensors[module + ".lora_B"], tensors[key], scaling)
        elif not key.endswith(".lora_B"):
            raise ValueError(f"unexpected array {key!r}: expected '<module>.lora_A' / '.lora_B'")
    if 2 * len(out) != len(tensors):
        raise ValueError("lora_B arrays without a matching lora_A")
    return out


def encode_factors(factors: Mapping[str, Factors], *, dtype: str = "float32") -> ArrayRecord:
    """Dense factors in the wire dtype."""
    return ArrayRecord({k: _to_wire(v, dtype) for k, v in flat(factors).items()})


def decode_factors(record: ArrayRecord, *, scaling: float, dtype: str = "float32") -> dict:
    """Dense factors (float32) from the wire."""
    tensors = {k: _from_wire(v, dtype, key=k) for k, v in record.to_torch_state_dict().items()}
    return unflat(tensors, scaling)


def topk_encode(
    deltas: Mapping[str, torch.Tensor],
    *,
    fraction: float,
    dtype: str = "float32",
    residual: Mapping[str, torch.Tensor] | None = None,
) -> tuple[ArrayRecord, dict[str, torch.Tensor]]:
    """The top `fraction` entries (by magnitude) of each delta + residual, and the new residual.

    A residual whose names or shapes no longer match (new rank, new pruning) is dropped.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"top-k fraction must be in (0, 1], got {fraction!r}")
    residual = dict(residual or {})
    arrays, new_residual = {}, {}
    for name, delta in deltas.items():
        v = delta.detach().float().clone()
        old = residual.get(name)
        if old is not None and old.shape == v.shape:
            v += old
        k = max(1, math.ceil(fraction * v.numel()))
        idx = torch.topk(v.abs().reshape(-1), k, sorted=False).indices.sort().values
        wire = _to_wire(v.reshape(-1)[idx], dtype)
        sent = torch.zeros(v.numel()).index_copy(0, idx, _from_wire(wire, dtype, key=name))
        new_residual[name] = v - sent.reshape(v.shape)
        arrays[f"{name}.idx"] = idx.to(torch.int32)
        arrays[f"{name}.val"] = wire
    return ArrayRecord(arrays), new_residual


def topk_decode(
    record: ArrayRecord, *, like: Mapping[str, torch.Tensor], dtype: str = "float32"
) -> dict[str, torch.Tensor]:
    """Dense deltas shaped like `like` from a top-k record; bad ids or names raise ValueError."""
    got = record.to_torch_state_dict()
    expected = {f"{n}.{s}" for n in like for s in ("idx", "val")}
    if set(got) != expected:
        odd = sorted(set(got) ^ expected)[:3]
        raise ValueError(f"top-k update keys differ from the expected ones at {odd}")
    out = {}
    for name, ref in like.items():
        idx, val = got[f"{name}.idx"].long(), _from_wire(got[f"{name}.val"], dtype, key=name)
        if idx.ndim != 1 or idx.shape != val.shape:
            raise ValueError(f"{name}: {tuple(idx.shape)} ids for {tuple(val.shape)} values")
        if len(idx) and (idx.min() < 0 or idx.max() >= ref.numel()):
            raise ValueError(f"{name}: top-k ids outside [0, {ref.numel()})")
        out[name] = torch.zeros(ref.numel()).index_copy(0, idx, val).reshape(ref.shape)
    return out


def encode_update(
    trained: Mapping[str, Factors],
    start: Mapping[str, Factors],
    *,
    dtype: str,
    topk: float | None,
    state: RecordDict | None = None,
) -> ArrayRecord:
    """The client's reply arrays; top-k mode reads and writes the residual in `state`."""
    if topk is None:
        return encode_factors(trained, dtype=dtype)
    now, before = flat(trained), flat(start)
    deltas = {k: now[k].float() - before[k].float() for k in now}
    old = state.get(RESIDUAL_KEY) if state is not None else None
    residual = old.to_torch_state_dict() if old is not None else None
    record, residual = topk_encode(deltas, fraction=topk, dtype=dtype, residual=residual)
    if state is not None:
        state[RESIDUAL_KEY] = ArrayRecord(residual)
    return record


def decode_update(
    record: ArrayRecord,
    start: Mapping[str, Factors],
    *,
    scaling: float,
    dtype: str,
    topk: float | None,
) -> dict[str, Factors]:
    """The client's factors (float32): dense from the wire, or start + the sparse delta."""
    if topk is None:
        return decode_factors(record, scaling=scaling, dtype=dtype)
    before = {k: v.float() for k, v in flat(start).items()}
    deltas = topk_decode(record, like=before, dtype=dtype)
    return unflat({k: before[k] + deltas[k] for k in before}, scaling)
