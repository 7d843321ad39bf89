"""Where features are found: every module of the feature folders, and third-party entry points.

A feature registers itself with `@register` when its module is imported; `discover` imports the
folders below (and the `fedllm.features` entry-point group) so that adding a feature is one new
file, with no import list to edit.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING

from pydantic import BaseModel, ValidationError

from fedllm.features.base import Feature
from fedllm.features.types import EVAL_ROW_KEYS, ROW_KEYS
from fedllm.plugins import load_entry_points
from fedllm.suggest import did_you_mean

if TYPE_CHECKING:
    from fedllm.recipe.schema import RunConfig

# packages whose modules may define features: the feature folder (with the client parts of
# aggregators that have one), constrained clients, privacy mechanisms
HOMES = ("fedllm.features", "fedllm.constrained", "fedllm.privacy")
GROUP = "fedllm.features"

_FEATURES: dict[str, type[Feature]] = {}


def register(cls: type[Feature]) -> type[Feature]:
    """Class decorator: make `cls` (with a unique `name`) a feature the round loops may call."""
    if not cls.name:
        raise ValueError(f"feature class {cls.__qualname__} has no name")
    taken = sorted(k for k in cls.reply_metrics if k.replace("-", "_") in ROW_KEYS)
    if taken:  # its row value would overwrite the core column of that name
        raise ValueError(f"feature {cls.name!r}: reply_metrics {taken} name core columns of a row")
    taken = sorted(k for k in cls.eval_metrics if k.replace("-", "_") in EVAL_ROW_KEYS)
    if taken:  # as above, in the eval row and the server row
        raise ValueError(f"feature {cls.name!r}: eval_metrics {taken} name core columns of a row")
    known = _FEATURES.get(cls.name)
    if known is not None and _where(known) != _where(cls):  # the same module imported again: fine
        raise ValueError(f"feature {cls.name!r} is already registered by {_where(known)}")
    _FEATURES[cls.name] = cls
    return cls


def _where(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def discover() -> dict[str, type[Feature]]:
    """Import every module of the feature homes and the entry points; returns name -> class.

    An entry point that fails to load (or registers a name taken by another class) is skipped
    with a warning naming it: a broken plugin must not stop recipes that do not use it."""
    for home in HOMES:
        package = importlib.import_module(home)
        for info in pkgutil.iter_modules(package.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{home}.{info.name}")
    for _ in load_entry_points(GROUP, kind="feature", registries=(_FEATURES,)):
        pass  # loading the module ran its @register_feature
    return dict(_FEATURES)


def available() -> list[str]:
    """Names of every feature found, sorted."""
    return sorted(discover())


def feature_class(name: str) -> type[Feature]:
    """The feature registered as `name`; an unknown name raises with a close match."""
    found = discover()
    if name in found:
        return found[name]
    hint = did_you_mean(name, found)
    raise ValueError(f"unknown feature {name!r}{hint}; available: {', '.join(sorted(found))}")


def active(cfg: RunConfig) -> list[type[Feature]]:
    """The feature classes the recipe turns on, in hook order (by `order`, then name)."""
    found = discover().values()
    return sorted((c for c in found if c.enabled(cfg)), key=lambda c: (c.order, c.name))


def check(cfg: RunConfig) -> None:
    """The `features` section (names and options), then every feature's own recipe checks
    (enabled or not: a feature may refuse a combination), all of whose refusals are reported."""
    found = discover()
    modes = sorted(c.privacy_mode for c in found.values() if c.privacy_mode is not None)
    if cfg.privacy.mode != "none" and cfg.privacy.mode not in modes:
        hint = did_you_mean(cfg.privacy.mode, modes)
        valid = ", ".join(["none", *modes])
        raise ValueError(
            f"privacy.mode: unknown DP mechanism {cfg.privacy.mode!r}{hint}; valid: {valid}"
        )
    for name in cfg.features:
        cls = found.get(name)
        if cls is None or cls.Options is None:
            own = sorted(n for n, c in found.items() if c.Options is not None)
            hint = did_you_mean(name, own)
            raise ValueError(f"features.{name}: unknown feature{hint}; valid: {', '.join(own)}")
        try:
            cls.parse_options(cfg)
        except ValidationError as err:
            raise ValueError(option_error(name, cls.Options, err=err)) from None
        unknown_option(name, cls.Options, given=cfg.features[name])
    problems = []  # every feature's refusal at once: fixing one should not uncover the next
    for cls in sorted(found.values(), key=lambda c: (c.order, c.name)):
        try:
            cls.check(cfg)
        except ValueError as err:
            problems.append(str(err))
    if problems:
        raise ValueError("\n  ".join(problems))
    check_trainer(cfg, active(cfg))


def unknown_option(name: str, options: type[BaseModel], *, given: object) -> None:
    """Refuse a key of `features.<name>` its Options model does not have, even when the model
    ignores extra keys (a plugin's model without `extra="forbid"`): a typo is never dropped."""
    if not isinstance(given, dict):
        return
    fields = options.model_fields
    valid = sorted(set(fields) | {f.alias for f in fields.values() if f.alias})
    for key in given:
        if key not in valid:
            raise ValueError(_unknown(name, str(key), last=str(key), valid=valid))


def check_trainer(cfg: RunConfig, classes: list[type[Feature]]) -> None:
    """Refuse a feature that adds to the plain local steps (a loss term, stages) beside one that
    replaces them: its hook would never run, and the run would silently train without it."""
    trainers = [c.name for c in classes if c.replaces_trainer]
    adds = [c.name for c in classes if not c.replaces_trainer and c.adds_to_steps(cfg)]
    if trainers and adds:
        raise ValueError(
            f"features: {', '.join(map(repr, adds))} add(s) to the plain local steps (a loss "
            f"term or training stages), but {trainers[0]!r} trains with its own trainer, which "
            "runs neither; drop one of them (or change privacy.mode if it is a DP mechanism)"
        )


def client_mods() -> list:
    """The Flower mods of every feature found (each passes messages not its own through)."""
    found = sorted(discover().values(), key=lambda c: (c.order, c.name))
    return [c.client_mod for c in found if c.client_mod is not None]


def build(cfg: RunConfig) -> list[Feature]:
    """Fresh instances of the active features (per round on a client, per run on the server)."""
    return [cls(cfg) for cls in active(cfg)]


def option_error(name: str, options: type[BaseModel], *, err: ValidationError) -> str:
    """`features.<name>.<key>: ...` for a bad option: an unknown one with a did-you-mean and the
    valid options, a bad value with what was given."""
    e = err.errors()[0]
    key = ".".join(str(p) for p in e["loc"])
    if e["type"] == "extra_forbidden":
        return _unknown(name, key, last=str(e["loc"][-1]), valid=sorted(options.model_fields))
    return f"features.{name}.{key}: {e['msg']} (got {e.get('input')!r})"


def _unknown(name: str, key: str, *, last: str, valid: list[str]) -> str:
    """`features.<name>.<key>: unknown option` with a did-you-mean for `last` and the valid keys."""
    hint, listed = did_you_mean(last, valid), ", ".join(valid)
    return f"features.{name}.{key}: unknown option{hint}; valid: {listed}"
