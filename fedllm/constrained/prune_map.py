"""Kept-index maps: pruned LoRA factors <-> full-shape factors, on both sides of the wire.

A pruned client adapts a module whose update ΔW has only the kept rows O (and/or columns I) of the
full module. The server puts its factors back at full shape (zeros elsewhere) and, before any
aggregation method runs, rescales each row o (column k) by the weight of the clients that cover it:

    B'ᵢ[o] = Bᵢ[o] / Σ_{j: o ∈ Oⱼ} p̂ⱼ        (p̂ = the round's normalised weights)

so Σᵢ p̂ᵢ sᵢ B'ᵢ Aᵢ is, coordinate by coordinate, the weighted mean over the clients that trained
that coordinate. Exact when each module is pruned on one side only (rows for q/gate/up, columns for
o/down), which is what `fedllm.constrained.pruning` produces. Coordinates nobody covered stay zero.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord

from fedllm.aggregators import Factors


@dataclass(frozen=True)
class Kept:
    """Sorted kept row (`out`) and column (`in_`) ids of one module's ΔW; None = all kept."""

    out: torch.Tensor | None
    in_: torch.Tensor | None


def restrict(f: Factors, kept: Kept | None) -> Factors:
    """The factors of the kept sub-block: B[O], A[:, I]."""
    if kept is None:
        return f
    B = f.B if kept.out is None else f.B.index_select(0, kept.out)
    A = f.A if kept.in_ is None else f.A.index_select(1, kept.in_)
    return Factors(B, A, f.scaling)


def expand(f: Factors, kept: Kept | None, *, shape: tuple[int, int]) -> Factors:
    """Full-shape factors with the client's rows/columns at the kept ids and zeros elsewhere."""
    if kept is None:
        return f
    d, k = shape
    B, A = f.B, f.A
    if kept.out is not None:
        B = B.new_zeros(d, f.rank).index_copy(0, kept.out, B)
    if kept.in_ is not None:
        A = A.new_zeros(f.rank, k).index_copy(1, kept.in_, A)
    return Factors(B, A, f.scaling)


def fit_start(
    received: Mapping[str, Factors], kept: Mapping[str, Kept], *, rank: int, scaling: float
) -> dict[str, Factors]:
    """What a client starts from: the global factors cut to its kept ids, rank and scaling.

    Full-shape factors are restricted here; factors the server already restricted pass through.
    The server calls the same function to know a client's starting point exactly.
    """
    out = {}
    for module, f in received.items():
        k = kept.get(module)
        if k is not None and not _is_restricted(f, k):
            f = restrict(f, k)
        out[module] = f.truncate(rank, scaling)
    return out


def _is_restricted(f: Factors, k: Kept) -> bool:
    rows_ok = k.out is None or f.B.shape[0] == len(k.out)
    cols_ok = k.in_ is None or f.A.shape[1] == len(k.in_)
    return rows_ok and cols_ok


def check_kept(
    factors: Mapping[str, Factors],
    kept: Mapping[str, Kept],
    *,
    shapes: Mapping[str, tuple[int, int]],
    who: str,
) -> None:
    """Raise ValueError naming `who`, the module and the value when a map does not fit."""
    for module, k in kept.items():
        if module not in shapes:
            raise ValueError(f"{who}: kept-index map names module {module!r}, which is not adapted")
        if module not in factors:
            raise ValueError(f"{who}: kept-index map for {module!r} but no factors for it")
        d, kk = shapes[module]
        f = factors[module]
        for side, idx, full, have in (
            ("out", k.out, d, f.B.shape[0]),
            ("in", k.in_, kk, f.A.shape[1]),
        ):
            if idx is None:
                continue
            if idx.ndim != 1 or idx.dtype not in (torch.int32, torch.int64):
                raise ValueError(f"{who}: {module}.{side} must be a 1-D integer index, got {idx}")
            if len(idx) != have:
                raise ValueError(
                    f"{who}: {module}.{side} keeps {len(idx)} ids but the factors have {have}"
                )
            if len(idx) and (idx.min() < 0 or idx.max() >= full):
                raise ValueError(
                    f"{who}: {module}.{side} ids must be in [0, {full}), got "
                    f"{int(idx.min())}..{int(idx.max())}"
                )
            if len(idx) > 1 and not bool((idx[1:] > idx[:-1]).all()):
                raise ValueError(f"{who}: {module}.{side} ids must be strictly increasing")
    for module, f in factors.items():
        if module in kept or module not in shapes:
            continue  # unknown modules are the screen's business
        if f.shape != tuple(shapes[module]):
            raise ValueError(
                f"{who}: {module} factors have shape {f.shape} but no kept-index map; "
                f"full shape is {tuple(shapes[module])}"
            )


def coverage_weighted(
    updates: Sequence[Mapping[str, Factors]],
    kept: Sequence[Mapping[str, Kept]],
    *,
    weights: Sequence[float],
    shapes: Mapping[str, tuple[int, int]],
) -> list[dict[str, Factors]]:
    """Full-shape, coverage-rescaled factors: feed them to any aggregator with `weights`."""
    total = float(sum(weights))
    if total <= 0 or len(weights) != len(updates) or len(kept) != len(updates):
        raise ValueError(f"{len(updates)} updates, {len(kept)} kept maps, weights {list(weights)}")
    p = [float(w) / total for w in weights]
    out: list[dict[str, Factors]] = [{} for _ in updates]
    for module, (d, k) in shapes.items():
        rows, cols = torch.zeros(d, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)
        pruned_rows = pruned_cols = False
        for pi, km in zip(p, kept, strict=True):
            one = km.get(module)
            pruned_rows |= one is not None and one.out is not None
            pruned_cols |= one is not None and one.in_ is not None
            rows[slice(None) if one is None or one.out is None else one.out] += pi
            cols[slice(None) if one is None or one.in_ is None else one.in_] += pi
        if pruned_rows and pruned_cols:
            raise ValueError(
                f"{module}: clients pruned both its rows and its columns this round; "
                "per-coordinate weights are exact only for one pruned side"
            )
        inv_r = torch.where(rows > 0, 1 / rows.clamp_min(1e-300), 0.0)
        inv_c = torch.where(cols > 0, 1 / cols.clamp_min(1e-300), 0.0)
        for i, (u, km) in enumerate(zip(updates, kept, strict=True)):
            f = expand(u[module], km.get(module), shape=(d, k))
            B = f.B * inv_r.to(f.B.dtype).unsqueeze(1) if pruned_rows else f.B
            A = f.A * inv_c.to(f.A.dtype).unsqueeze(0) if pruned_cols else f.A
            out[i][module] = Factors(B, A, f.scaling)
    return out


FILL_SHARE = 1e-3  # the uncovered-coordinate input's weight, as a share of the clients'


def uncovered_fill(
    updates: Sequence[Mapping[str, Factors]],
    kept: Sequence[Mapping[str, Kept]],
    *,
    weights: Sequence[float],
    global_: Mapping[str, Factors],
) -> tuple[dict[str, Factors], dict[str, Kept], float] | None:
    """(factors, kept map, weight) of one more input for `coverage_weighted` that keeps the
    global's value at the coordinates no reply covers; None when every coordinate is covered.

    Clients send their adapter, not a change to it, so a row every answering client pruned came
    out 0 (h97: a round answered only by pruned clients erased the global there). The extra
    input covers exactly those rows (or columns) with the global's factors, at a weight small
    enough (`FILL_SHARE`) that a factor-wise mean's other factor barely moves; an exact method
    (Σpᵢsᵢ·BᵢAᵢ) gets the global's ΔW there exactly, since coverage divides its weight back out.
    Elsewhere it adds nothing: B zero where it covers no row, A the clients' mean (so that
    fedit's Ā stays theirs)."""
    total = float(sum(weights))
    p = [float(w) / total for w in weights]
    factors: dict[str, Factors] = {}
    maps: dict[str, Kept] = {}
    uncovered_any = False
    for module, g in global_.items():
        d, k = g.shape
        outs = [km.get(module) for km in kept]
        rows_cut = any(o is not None and o.out is not None for o in outs)
        cols_cut = any(o is not None and o.in_ is not None for o in outs)
        full = [expand(u[module], o, shape=(d, k)) for u, o in zip(updates, outs, strict=True)]
        width = max(f.rank for f in full)
        if cols_cut:  # a column-pruned module: fill its uncovered columns
            seen = torch.zeros(k, dtype=torch.bool)
            for o in outs:
                seen[slice(None) if o is None or o.in_ is None else o.in_] = True
            gap = torch.nonzero(~seen).flatten()
            if len(gap):
                uncovered_any = True
                factors[module] = restrict(g, Kept(None, gap))
            else:
                B = sum(
                    pi * f.pad(width).B.double() * f.scaling for pi, f in zip(p, full, strict=True)
                )
                factors[module] = Factors(B.to(g.B.dtype), g.A.new_zeros(width, 0), 1.0)
            maps[module] = Kept(None, gap)
            continue
        seen = torch.zeros(d, dtype=torch.bool)
        for o in outs:
            seen[slice(None) if o is None or o.out is None else o.out] = True
        gap = torch.nonzero(~seen).flatten() if rows_cut else torch.zeros(0, dtype=torch.long)
        if len(gap):
            uncovered_any = True
            factors[module] = restrict(g, Kept(gap, None))
        else:
            A = sum(pi * f.pad(width).A.double() for pi, f in zip(p, full, strict=True))
            factors[module] = Factors(g.B.new_zeros(0, width), A.to(g.A.dtype), 1.0)
        maps[module] = Kept(gap, None)
    if not uncovered_any:
        return None
    return factors, maps, FILL_SHARE * total


def kept_to_record(kept: Mapping[str, Kept]) -> ArrayRecord:
    """The kept-index map as arrays `<module>.out` / `<module>.in` (int32)."""
    arrays = {}
    for module, k in kept.items():
        if k.out is not None:
            arrays[f"{module}.out"] = k.out.to(torch.int32).contiguous()
        if k.in_ is not None:
            arrays[f"{module}.in"] = k.in_.to(torch.int32).contiguous()
    return ArrayRecord(arrays)


def kept_from_record(record: ArrayRecord | None, *, who: str) -> dict[str, Kept]:
    """Parse a kept-index map; an unexpected key raises naming `who`."""
    if record is None:
        return {}
    sides: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in record.to_torch_state_dict().items():
        module, _, side = key.rpartition(".")
        if side not in ("out", "in") or not module:
            raise ValueError(f"{who}: kept-index key {key!r} must end in '.out' or '.in'")
        sides.setdefault(module, {})[side] = value.long()
    return {m: Kept(out=s.get("out"), in_=s.get("in")) for m, s in sides.items()}
