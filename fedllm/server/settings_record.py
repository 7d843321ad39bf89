"""The settings a checkpoint keeps beside the recipe fingerprint, so that a resume can say what
changed since its finished rounds.

The fingerprint pins what must match for a resume to make sense (model, LoRA, data, seed,
privacy) and refuses a mismatch; so does the aggregator's name (`aggregator_changed`: the
checkpoint holds that method's state and round semantics). The aggregator's options, the
features' options and the federation's training settings may change on purpose between a run
and its resume (a recipe edit), or without anyone asking (a code default that changed between
versions, as squeeze's gauge did): the run goes on with today's values, and says each one that
differs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from fedllm.aggregators import resolved_options, round_spec
from fedllm.features.base import Feature
from fedllm.recipe.schema import RunConfig

# the budget and the operational knobs: extending a run's rounds is what a resume is for
NOT_RECORDED = ("rounds", "round_timeout", "node_grace", "eval_batch_size")
UNSET = "(not set)"  # a setting one side has and the other does not (a feature added, say)
# the constrained-client sections, each setting as `section.key` (`devices` as one list); not
# `simulation`, which says where clients run, not how they train
SECTIONS = ("pruning", "adaptive", "compression")
VERSION = 2  # 2: SECTIONS and `devices` recorded, client options at their declared defaults
_SINCE_2 = (*(f"{s}." for s in SECTIONS), "devices")


def settings_record(cfg: RunConfig, features: Iterable[Feature]) -> dict[str, Any]:
    """Dotted key -> value as this run trains (defaults included): `aggregator.name`,
    `aggregator.options.*`, `features.<name>.*`, `federation.*`, `pruning.*`, `adaptive.*`,
    `compression.*`, `devices`, and the record's `version` (values a checkpoint can hold)."""
    name = cfg.aggregator.name
    out: dict[str, Any] = {"aggregator.name": name}
    for key, value in resolved_options(name, cfg.aggregator.options).items():
        out[f"aggregator.options.{key}"] = stable(value)
    for feature in features:
        if feature.options is not None:
            for key, value in feature.options.model_dump(mode="json").items():
                out[f"features.{feature.name}.{key}"] = stable(value)
    for key, value in cfg.federation.model_dump(mode="json").items():
        if key not in NOT_RECORDED:
            out[f"federation.{key}"] = stable(value)
    for section in SECTIONS:  # `adaptive` unset (None) records nothing: its keys read UNSET
        config = getattr(cfg, section)
        for key, value in ({} if config is None else config.model_dump(mode="json")).items():
            out[f"{section}.{key}"] = stable(value)
    if cfg.devices is not None:
        out["devices"] = stable([device.model_dump(mode="json") for device in cfg.devices])
    out["version"] = VERSION
    return out


def aggregator_changed(saved: dict[str, Any] | None, cfg: RunConfig) -> str | None:
    """Why a checkpoint cannot resume under `cfg`'s aggregator (its state, e.g. squeeze's
    residual or flora's merged delta, and its round semantics belong to the saved one), or None
    (the same one, or a checkpoint older than the settings record)."""
    old = (saved or {}).get("aggregator.name")
    if old is None or old == cfg.aggregator.name:
        return None
    return (
        f"aggregator.name is {cfg.aggregator.name!r}, but the checkpoint's rounds ran {old!r}, "
        f"whose state it holds; resume with aggregator.name={old}, or start a new run with "
        "name=<new name> (or --overwrite)"
    )


def changed_settings(
    saved: dict[str, Any] | None, now: dict[str, Any], *, saved_round: int
) -> dict[str, list[Any]]:
    """Setting -> [value in the checkpoint's rounds, value now] for each that differs ({} for a
    checkpoint older than the record, or one saved before any round was aggregated)."""
    if saved is None or saved_round == 0 or saved == now:
        return {}
    keys = sorted((set(saved) | set(now)) - {"version"})
    if saved.get("version", 1) < 2:  # an older record: compare only what both recorded
        saved = _client_defaults_filled(saved)
        keys = [k for k in keys if not k.startswith(_SINCE_2)]
    pairs = {key: [saved.get(key, UNSET), now.get(key, UNSET)] for key in keys}
    return {key: pair for key, pair in pairs.items() if pair[0] != pair[1]}


def _client_defaults_filled(saved: dict[str, Any]) -> dict[str, Any]:
    """A version-1 record with each client option it kept as None (unset: the client applied
    its default, undeclared then) at the default the saved aggregator declares now."""
    try:
        spec = round_spec(str(saved.get("aggregator.name")))
    except (KeyError, ValueError):  # an aggregator no longer installed: nothing to fill
        return saved
    prefix = "aggregator.options."
    return {
        key: spec.client_defaults.get(key.removeprefix(prefix), value)
        if value is None
        and key.startswith(prefix)
        and key.removeprefix(prefix) in spec.client_options
        else value
        for key, value in saved.items()
    }


def describe_changes(changes: dict[str, list[Any]], *, saved_round: int) -> list[str]:
    """One progress line per changed setting."""
    return [
        f"resume: {key} was {old!r} in the last attempt (up to round {saved_round}) and is "
        f"{new!r} now (the recipe or a default changed); the run goes on with today's value (set "
        "it in the recipe to keep the old one; metrics.jsonl's resume rows keep each change)"
        for key, (old, new) in changes.items()
    ]


def stable(value: Any) -> Any:
    """A value that reads back equal in another process: scalars as they are (NaN as 'nan'),
    anything else as a repr with no memory address and no hash order."""
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if isinstance(value, (str, int, float, bool, type(None))):
        return value
    if isinstance(value, (set, frozenset)):
        return repr(sorted(value, key=repr))
    text = repr(value)
    return type(value).__name__ if " at 0x" in text else text
