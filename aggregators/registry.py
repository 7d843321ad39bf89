"""The registry of aggregation methods by name: register, look up, discover, check options.

A method is one module of this package with `@register("name")`, or an installed package's
`fedllm.aggregators` entry point: the first lookup (`get`, `available`, `round_spec`) imports
them all through `discover`, so there is no list to edit. A recipe's `aggregator.options` are
checked against the method's signature by `check_options` before any training.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import logging
import numbers
import pkgutil
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from pydantic import TypeAdapter, ValidationError

from fedllm.plugins import load_entry_points
from fedllm.suggest import did_you_mean

from .base import ADAPTER_STATE, AggregatorFn, RoundSpec

log = logging.getLogger(__name__)


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
        known = _REGISTRY.get(name)
        if known is not None and known is not fn:
            where = f"{known.__module__}.{known.__qualname__}"
            raise ValueError(f"aggregator {name!r} is already registered by {where}")
        _check_signature(name, fn)
        stray = sorted(set(rounds.client_defaults) - set(rounds.client_options))
        if stray:
            raise ValueError(f"aggregator {name!r}: client_defaults {stray} not in client_options")
        _REGISTRY[name] = fn
        _ROUNDS[name] = rounds
        return fn

    return decorate


def _check_signature(name: str, fn: Callable[..., Any]) -> None:
    """TypeError unless `fn` takes what the strategy passes every method: the updates and weights
    by position and `global_rank`, `state`, `seed` by keyword (`AggregatorFn`). Found when the
    method registers, not after the first round's clients have trained."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # no introspectable signature: trusted as it is
        return
    kinds = [p.kind for p in params.values()]
    if inspect.Parameter.VAR_KEYWORD in kinds:
        keywords_ok: list[str] = []
    else:
        keywords_ok = [
            k
            for k in STRATEGY_KEYWORDS
            if k not in params or params[k].kind is inspect.Parameter.POSITIONAL_ONLY
        ]
    positional = [
        k
        for k in kinds
        if k in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    if keywords_ok or (len(positional) < 2 and inspect.Parameter.VAR_POSITIONAL not in kinds):
        raise TypeError(
            f"aggregator {name!r}: {getattr(fn, '__qualname__', fn)!r} must take "
            f"(updates, weights, *, global_rank=None, state=None, seed=0, **its options): "
            f"the strategy passes all of them every round"
            + (f"; missing {keywords_ok}" if keywords_ok else "")
        )


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


def discover(package: str, path: Iterable[str], *, group: str = ENTRY_POINT_GROUP) -> list[str]:
    """Import `package`'s public modules and each `group` entry point: a method is one file.

    Modules named `_x` are skipped. An entry point names a module (or object) whose import runs
    `@register`; one that fails to load is skipped with a warning rather than breaking every
    command (`fedllm.plugins`). Returns the names this call registered, sorted.
    """
    before = set(_REGISTRY)
    for info in pkgutil.iter_modules(list(path)):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")
    for _ in load_entry_points(group, kind="aggregator", registries=(_REGISTRY, _ROUNDS)):
        pass  # loading the module ran its @register
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
STRATEGY_KEYWORDS = ("global_rank", "state", "seed")
_NOT_OPTIONS = frozenset({"updates", "weights", *STRATEGY_KEYWORDS})


def option_names(name: str) -> list[str]:
    """The `aggregator.options` keys the method `name` takes (its own and its clients')."""
    return sorted(_option_defaults(name))


def resolved_options(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """Every option of `name` as the method will run it: its defaults under `options`, by key.
    A client option reads the default its RoundSpec declares (None if it declares none)."""
    merged = {k: v for k, v in _option_defaults(name).items() if v is not inspect.Parameter.empty}
    return dict(sorted((merged | dict(options)).items()))


def _option_defaults(name: str) -> dict[str, Any]:
    """Option -> default (Parameter.empty if required; a client option's declared one) of `name`."""
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
    spec = round_spec(name)
    for option in spec.client_options:
        out.setdefault(option, spec.client_defaults.get(option))
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


_SAME_WORDS = {
    "a valid integer": "an int",
    "a valid boolean": "a bool (true/false)",
    "a valid number": "a float",
    "a valid string": "a str",
}


def _annotation_problem(hint: Any, value: Any) -> str | None:
    """What `value` should be if the annotation `hint` refuses it (pydantic, strict: no "8" for
    an int, no bool for a number), else None."""
    try:
        TypeAdapter(hint).validate_python(value, strict=True)
    except ValidationError as err:
        what = err.errors()[0]["msg"].removeprefix("Input should be ")
        what = _SAME_WORDS.get(what, what)  # as `_type_problem` says it
        return f"a value {what}" if what.startswith(("greater", "less")) else what
    except Exception:  # an annotation pydantic cannot build a validator for: not checked
        log.debug("option annotation %r has no validator: unchecked", hint, exc_info=True)
        return None
    return None


def _option_hints(fn: Callable[..., Any]) -> dict[str, Any]:
    """The method's resolved annotations ({} if they cannot be resolved: defaults' types then)."""
    try:
        return typing.get_type_hints(fn, include_extras=True)
    except Exception:  # a name only imported under TYPE_CHECKING, a non-function callable, ...
        log.debug("annotations of %r unresolved: defaults' types only", fn, exc_info=True)
        return {}


def check_options(name: str, options: Mapping[str, Any]) -> None:
    """Bind `aggregator.options` to the method's signature so a typo fails before any training.

    Valid keys are the keyword parameters (other than updates, weights, global_rank, state, seed)
    and the method's RoundSpec.client_options. Raises ValueError naming each unknown key (with a
    close match), required key left unset, and value its annotation refuses (`Literal` words,
    `NonNegativeInt`, ...: base.py) or, unannotated, obviously not of its default's type.
    """
    defaults = _option_defaults(name)
    hints = _option_hints(get(name))
    valid = sorted(defaults)
    problems: list[str] = []
    for key, value in options.items():
        dotted = f"aggregator.options.{key}"
        if key not in defaults:
            hint = did_you_mean(str(key), valid)
            listed = f"valid: {', '.join(valid)}" if valid else f"{name!r} takes no options"
            problems.append(f"{dotted}: unknown option of {name!r}{hint}; {listed}")
            continue
        if hints.get(key, Any) is not Any:
            expected = _annotation_problem(hints[key], value)
        else:
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
