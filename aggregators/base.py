"""LoRA factors, aggregation results and the registry of aggregation methods by name.

Every method is a pure function of one module's client factors; it never mutates its inputs.
Methods are found by `discover` (every module of the package, plus `fedllm.aggregators` entry
points) on the first lookup, and a recipe's options are checked against the method's signature by
`check_options`.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import inspect
import math
import numbers
import pkgutil
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from fedllm.suggest import did_you_mean


@dataclass(frozen=True)
class Factors:
    """One LoRA update ΔW = scaling·B@A; B (d×r) and A (r×k) are laid out as peft's lora_B/A."""

    B: torch.Tensor
    A: torch.Tensor
    scaling: float

    def __post_init__(self) -> None:
        B, A = self.B, self.A
        if not isinstance(B, torch.Tensor) or not isinstance(A, torch.Tensor):
            raise TypeError(f"B and A must be tensors, got {type(B).__name__}, {type(A).__name__}")
        if B.ndim != 2 or A.ndim != 2:
            raise ValueError(f"B and A must be 2-D, got B {tuple(B.shape)} and A {tuple(A.shape)}")
        if B.shape[1] != A.shape[0]:
            raise ValueError(
                f"rank mismatch: B {tuple(B.shape)} has {B.shape[1]} columns "
                f"but A {tuple(A.shape)} has {A.shape[0]} rows"
            )
        if not (B.is_floating_point() and A.is_floating_point()) or B.dtype != A.dtype:
            raise ValueError(f"B and A must share one floating dtype, got {B.dtype} and {A.dtype}")
        _check_scaling(self.scaling)

    @property
    def rank(self) -> int:
        """The LoRA rank r (columns of B, rows of A)."""
        return self.B.shape[1]

    @property
    def shape(self) -> tuple[int, int]:
        """The shape (d, k) of the update ΔW."""
        return (self.B.shape[0], self.A.shape[1])

    def delta(self) -> torch.Tensor:
        """The dense d×k update scaling·B@A in float64: for tests and the dense baseline only."""
        return self.scaling * (self.B.double() @ self.A.double())

    def pad(self, rank: int) -> Factors:
        """Zero-pad to `rank` (≥ self.rank) columns of B and rows of A; ΔW is unchanged."""
        _check_rank(rank)
        if rank < self.rank:
            raise ValueError(f"cannot pad rank {self.rank} down to {rank}; use truncate")
        extra = rank - self.rank
        B = torch.cat([self.B, self.B.new_zeros(self.B.shape[0], extra)], dim=1)
        A = torch.cat([self.A, self.A.new_zeros(extra, self.A.shape[1])], dim=0)
        return Factors(B, A, self.scaling)

    def truncate(self, rank: int, scaling: float | None = None) -> Factors:
        """Keep the first `rank` components under a new scaling (default: the same).

        B is rescaled by self.scaling/scaling so the kept part's ΔW is unchanged; rank > self.rank
        zero-pads. On SVD-ordered factors this is the best rank-`rank` approximation.
        """
        _check_rank(rank)
        scaling = self.scaling if scaling is None else _check_scaling(scaling)
        kept = min(rank, self.rank)
        head = Factors(self.B[:, :kept] * (self.scaling / scaling), self.A[:kept], scaling)
        return head.pad(rank)


@dataclass(frozen=True)
class Aggregate:
    """The server's result for one module: global factors, plus state for the next round."""

    global_: Factors
    state: dict[str, torch.Tensor] = field(default_factory=dict)


class AggregatorFn(Protocol):
    """Signature shared by every registered method (one adapted module per call)."""

    def __call__(
        self,
        updates: Sequence[Factors],
        weights: Sequence[float],
        *,
        global_rank: int | None = None,
        state: Mapping[str, torch.Tensor] | None = None,
        seed: int = 0,
        **options: Any,
    ) -> Aggregate: ...


@dataclass(frozen=True)
class RoundSpec:
    """How a method's global state travels each round; the Flower strategy and client read it.

    Default (all False) is adapter state: clients start from the global factors cut to their rank
    and send back their whole adapter.
    """

    merge: bool = False  # global_ is a delta merged into the base; clients start a fresh LoRA
    freeze_A: bool = False  # clients train B only; A stays as the server sent it (shared seed)
    local_B: bool = False  # clients keep B across rounds and exchange A only
    # aggregator.options read by clients (sent in the round config), never by the aggregation
    client_options: tuple[str, ...] = ()


ADAPTER_STATE = RoundSpec()


class UnknownAggregatorError(KeyError, ValueError):
    """Raised by `get` for a name that is not registered (catchable as KeyError or ValueError)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


_REGISTRY: dict[str, AggregatorFn] = {}
_ROUNDS: dict[str, RoundSpec] = {}


def register(
    name: str, *, rounds: RoundSpec = ADAPTER_STATE
) -> Callable[[AggregatorFn], AggregatorFn]:
    """Decorator registering a method under `name` (taken only once) with its round semantics."""

    def decorate(fn: AggregatorFn) -> AggregatorFn:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"aggregator {name!r} is already registered")
        _REGISTRY[name] = fn
        _ROUNDS[name] = rounds
        return fn

    return decorate


def round_spec(name: str) -> RoundSpec:
    """The round semantics of the method registered as `name` (unknown names raise like `get`)."""
    get(name)
    return _ROUNDS[name]


def get(name: str) -> AggregatorFn:
    """The method registered as `name`; an unknown name raises, listing names and a close match."""
    _discover_once()
    try:
        return _REGISTRY[name]
    except KeyError:
        pass
    close = difflib.get_close_matches(name, _REGISTRY, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise UnknownAggregatorError(
        f"unknown aggregator {name!r}; available: {', '.join(available())}.{hint}"
    )


def available() -> list[str]:
    """Registered method names, sorted."""
    _discover_once()
    return sorted(_REGISTRY)


ENTRY_POINT_GROUP = "fedllm.aggregators"
_LOADED_ENTRY_POINTS: set[tuple[str, str]] = set()


def discover(package: str, path: Iterable[str], *, group: str = ENTRY_POINT_GROUP) -> list[str]:
    """Import `package`'s public modules and each `group` entry point once: a method is one file.

    Modules named `_x` are skipped. An entry point names a module (or object) whose import runs
    `@register`; one that fails to load is skipped with a warning rather than breaking every
    command. Returns the names this call registered, sorted.
    """
    before = set(_REGISTRY)
    for info in pkgutil.iter_modules(list(path)):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")
    for ep in importlib.metadata.entry_points(group=group):
        key = (ep.name, ep.value)
        if key in _LOADED_ENTRY_POINTS:
            continue
        _LOADED_ENTRY_POINTS.add(key)
        try:
            ep.load()
        except Exception as err:  # a broken plugin must not take the built-in methods down
            warnings.warn(
                f"aggregator entry point {ep.name!r} ({ep.value}) failed to load and was skipped: "
                f"{type(err).__name__}: {err}",
                RuntimeWarning,
                stacklevel=2,
            )
    return sorted(set(_REGISTRY) - before)


_discovery = "pending"  # -> "running" -> "done"


def _discover_once() -> None:
    """Run `discover` over this package on the first lookup (at import it could cycle: below)."""
    # Not at package import: a module of the folder or a plugin's entry point may import code
    # that imports this package (a plugin's client feature imports fedllm.features, which
    # imports .base) while it is still half-initialised.
    global _discovery
    if _discovery != "pending":  # done, or a lookup from a module being discovered
        return
    _discovery = "running"
    try:
        package = importlib.import_module(__package__)
        discover(package.__name__, package.__path__)
    except BaseException:
        _discovery = "pending"  # fail again on the next lookup rather than with methods missing
        raise
    _discovery = "done"


# the arguments every method gets from the strategy, never from aggregator.options
_NOT_OPTIONS = frozenset({"updates", "weights", "global_rank", "state", "seed"})


def option_names(name: str) -> list[str]:
    """The `aggregator.options` keys the method `name` takes (its own and its clients')."""
    return sorted(_option_defaults(name))


def _option_defaults(name: str) -> dict[str, Any]:
    """Option -> default (Parameter.empty if required; None for client options) of `name`."""
    fn = get(name)
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # no introspectable signature: only client options known
        params = []
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    skip = {p.name for p in positional[:2]} | _NOT_OPTIONS  # updates, weights by position
    out = {
        p.name: p.default
        for p in params
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in skip
    }
    for option in round_spec(name).client_options:
        out.setdefault(option, None)
    return out


def _type_problem(default: Any, value: Any) -> str | None:
    """The expected type if `value` is obviously not of `default`'s scalar type, else None."""
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "a bool (true/false)"
    real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if isinstance(default, int):
        return None if real and isinstance(value, numbers.Integral) else "an int"
    if isinstance(default, float):
        return None if real else "a float"
    if isinstance(default, str):
        return None if isinstance(value, str) else "a str"
    return None


def check_options(name: str, options: Mapping[str, Any]) -> None:
    """Bind `aggregator.options` to the method's signature so a typo fails before any training.

    Valid keys are the keyword parameters (other than updates, weights, global_rank, state, seed)
    and the method's RoundSpec.client_options. Raises ValueError naming each unknown key (with a
    close match), required key left unset, or value obviously not of its default's type.
    """
    defaults = _option_defaults(name)
    valid = sorted(defaults)
    problems: list[str] = []
    for key, value in options.items():
        dotted = f"aggregator.options.{key}"
        if key not in defaults:
            hint = did_you_mean(str(key), valid)
            listed = f"valid: {', '.join(valid)}" if valid else f"{name!r} takes no options"
            problems.append(f"{dotted}: unknown option of {name!r}{hint}; {listed}")
            continue
        expected = _type_problem(defaults[key], value)
        if expected is not None:
            problems.append(
                f"{dotted}: {name!r} expects {expected} (default {defaults[key]!r}), "
                f"got {type(value).__name__} {value!r}"
            )
    for key, default in defaults.items():
        if default is inspect.Parameter.empty and key not in options:
            problems.append(f"aggregator.options.{key}: required by {name!r} but not set")
    if problems:
        raise ValueError("; ".join(problems))


def normalized_weights(updates: Sequence[Factors], weights: Sequence[float]) -> list[float]:
    """Check one round's updates agree on (d, k) and return the weights scaled to sum to 1."""
    if len(updates) == 0:
        raise ValueError("no updates to aggregate")
    if len(weights) != len(updates):
        raise ValueError(f"got {len(updates)} updates but {len(weights)} weights")
    shapes = {u.shape for u in updates}
    if len(shapes) != 1:
        raise ValueError(f"updates disagree on the module shape (d, k): {sorted(shapes)}")
    values = [float(w) for w in weights]
    if any(not math.isfinite(w) or w < 0 for w in values):
        raise ValueError(f"weights must be finite and non-negative, got {values}")
    total = math.fsum(values)
    if total <= 0:
        raise ValueError(f"weights must not all be zero, got {values}")
    return [w / total for w in values]


def padded_mean(
    updates: Sequence[Factors], p: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σpᵢsᵢ·pad(Bᵢ), Σpᵢ·pad(Aᵢ)) in float64, padded to the largest rank; p used as given."""
    width = max(u.rank for u in updates)
    (d, k), device = updates[0].shape, updates[0].B.device
    B = torch.zeros(d, width, dtype=torch.float64, device=device)
    A = torch.zeros(width, k, dtype=torch.float64, device=device)
    for pi, u in zip(p, updates, strict=True):
        B[:, : u.rank].add_(u.B, alpha=pi * u.scaling)  # accumulates into our own buffers only
        A[: u.rank].add_(u.A, alpha=pi)
    return B, A


def reject_options(method: str, options: Mapping[str, Any]) -> None:
    """Raise TypeError naming options a method does not take (so a typo is not silently ignored)."""
    if options:
        raise TypeError(f"aggregator {method!r} got unexpected options: {sorted(options)}")


def carried_factors(
    state: Mapping[str, torch.Tensor] | None,
    shape: tuple[int, int],
    *,
    keys: tuple[str, str],
    method: str,
    what: str,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The (B d×c, A c×k) pair a stateful method carries across rounds under `keys`, checked
    against the module `shape`; None if `state` is empty (the first round)."""
    if not state:
        return None
    if set(state) != set(keys):
        raise ValueError(f"{method} state needs exactly keys {keys}, got {sorted(state)}")
    B, A = state[keys[0]], state[keys[1]]
    Factors(B, A, 1.0)  # validates 2-D, matching rank and dtype
    if (B.shape[0], A.shape[1]) != shape:
        raise ValueError(f"{what} is {B.shape[0]}×{A.shape[1]} but the module is {shape}")
    return B, A


def _check_scaling(scaling: float) -> float:
    if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real):
        raise ValueError(f"scaling must be a real number, got {scaling!r}")
    if not (math.isfinite(scaling) and scaling > 0):
        raise ValueError(f"scaling must be finite and > 0, got {scaling!r}")
    return scaling


def _check_rank(rank: int) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ValueError(f"rank must be a non-negative int, got {rank!r}")
