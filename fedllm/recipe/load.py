"""Recipes from YAML: read, apply `key=value` overrides, validate into a `RunConfig`.

Unknown keys are rejected by name (with a did-you-mean); wrong types and out-of-range values
name the key and what would be valid. Overrides apply before validation, the same for every
command that takes a recipe.
"""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from fedllm.features import registry as features
from fedllm.recipe.checks import ConfigError
from fedllm.recipe.schema import RunConfig
from fedllm.recipe.shipped import resolve_recipe
from fedllm.recipe.yaml_io import load_yaml
from fedllm.suggest import closest, did_you_mean

# A location part that names a member of a union type (`int`, `list[int]`, `RankRule`,
# `function-after[_ordered(), RankRule]`), not a recipe key.
UNION_MEMBER = re.compile(r"^(int|float|str|bool|none|[\w-]+\[.*\]|[A-Z]\w*)$")


def _form(tag: str) -> str:
    """A union member as a reader knows it: `function-after[_ordered(), RankRule]` is
    `RankRule`."""
    return m.group(1) if (m := re.match(r"^function-[\w-]+\[.*?(\w+)\]$", tag)) else tag


def _shape(form: str) -> str:
    """A union form as a recipe writes it: the model `RankRule` is `{min, max, spacing}`."""
    models = {m.__name__: m for m in _all_models(RunConfig)}
    return "{" + ", ".join(models[form].model_fields) + "}" if form in models else form


def _all_models(model: type[BaseModel]) -> list[type[BaseModel]]:
    """`model` and every section model below it."""
    found = [model]
    for field in model.model_fields.values():
        for sub in _models_in(field.annotation):
            found += [m for m in _all_models(sub) if m not in found]
    return found


def _union_errors(errors: list[dict]) -> list[dict]:
    """The errors of a value none of a union's forms accepts, as a reader wants them: for a
    mapping, the mapping form's own (its keys); else what was given and the valid forms."""
    out: list[dict] = []
    groups: dict[tuple, list[tuple[str, dict]]] = {}
    for e in errors:
        loc = e["loc"]
        # an unknown key is the last part of its location, never a union's form (`Federation`)
        tags = loc[:-1] if e["type"] == "extra_forbidden" else loc
        cut = next(
            (i for i, x in enumerate(tags) if isinstance(x, str) and UNION_MEMBER.match(x)), None
        )
        if cut is None:
            out.append(e)
            continue
        if loc[:cut] not in groups:
            groups[loc[:cut]] = []
            out.append({"union": loc[:cut]})
        groups[loc[:cut]].append((_form(str(loc[cut])), {**e, "loc": loc[:cut] + loc[cut + 1 :]}))
    result = []
    for e in out:
        if "union" not in e:
            result.append(e)
            continue
        members = groups[e["union"]]
        got = members[0][1].get("input")
        if isinstance(got, dict) and (mapping := [m for f, m in members if f[0].isupper()]):
            result += mapping
            continue
        forms = ", ".join(dict.fromkeys(_shape(f) for f, _ in members))
        msg = f"got {got!r}; valid forms: {forms}"
        result.append({"type": "union", "loc": e["union"], "msg": msg, "input": got})
    return result


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid recipe {source}:"]
    errors = _union_errors(err.errors())
    misspelt = _misspelt(errors)
    for e in errors:
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "missing" and tuple(e["loc"]) in misspelt:
            continue  # `rnak` given: "did you mean 'rank'" says it; "rank: required" repeats it
        if e["type"] == "union":
            lines.append(f"  {key}: {e['msg']}")
            continue
        if e["type"] == "extra_forbidden":
            parent = _model_at(e["loc"][:-1])
            valid = sorted(parent.model_fields) if parent else []
            name = str(e["loc"][-1])
            # The same key in another section (`lr` at the top: 'federation.lr', not 'lora';
            # `federation.num_clients`: 'data.num_clients'), unless this section has a very
            # close key (`lora.rank`: 'ranks', not 'lora.tiers.rank'; `data.clients`:
            # 'num_clients'); else this section's closest key.
            hint = did_you_mean(name, valid)
            homes = [h for h in _homes(name, RunConfig) if h != key] or _extension_homes(name)
            very_close = len(e["loc"]) > 1 and did_you_mean(name, valid, cutoff=0.75)
            if homes and not very_close:
                hint = f" (did you mean {' or '.join(repr(h) for h in homes)}?)"
            lines.append(f"  {key}: unknown key{hint}; valid keys here: {', '.join(valid)}")
        elif e["type"] == "model_type":  # a section given a value, or left empty
            got, section = e.get("input"), _model_at(e["loc"])
            keys = ", ".join(section.model_fields) if section else ""
            if got is None:
                lines.append(f"  {key}: is empty; give its keys ({keys}) or delete the line")
                continue
            # `model: tiny` -> `model: {name: tiny}`; a list entry needs more than a name
            named = len(e["loc"]) == 1 and section is not None and "name" in section.model_fields
            hint = (
                f"; did you mean {key}: {{name: {got}}}?" if named and isinstance(got, str) else ""
            )
            lines.append(f"  {key}: is a section of keys ({keys}), got {got!r}{hint}")
        elif e["type"] == "value_error":
            msg = e["msg"].removeprefix("Value error, ")
            named = key == "(top level)" or msg.startswith(f"{key}.")  # it names its own key
            lines.append(f"  {msg}" if named else f"  {key}: {msg}")
        else:
            got = e.get("input")
            shown = "" if isinstance(got, dict) and e["type"] != "list_type" else f" (got {got!r})"
            shown += _shape_hint(e["type"], got)
            if e["type"] == "string_type" and isinstance(got, int | float | bool):
                kind = "true/false" if isinstance(got, bool) else "a number"
                shown += f"; YAML reads it as {kind}: quote it to keep it text"
            lines.append(f"  {key}: {e['msg']}{shown}")
    return "\n".join(lines)


def _misspelt(errors: list[dict[str, Any]]) -> set[tuple[Any, ...]]:
    """Locations of required keys that an unknown key beside them is a close misspelling of."""
    out = set()
    for e in errors:
        if e["type"] != "extra_forbidden":
            continue
        parent = _model_at(e["loc"][:-1])
        name = closest(str(e["loc"][-1]), parent.model_fields if parent else [])
        out |= {(*e["loc"][:-1], name)} if name is not None else set()
    return out


def _shape_hint(kind: str, got: Any) -> str:
    """The form a list or mapping field wants, from what was given (`all-linear` ->
    `[all-linear]`; `[fedprox]` -> `{fedprox: {}}`), '' if none fits."""
    if kind == "list_type" and isinstance(got, str | int | float):
        return f"; write a list, e.g. [{got}]"
    if kind == "list_type" and isinstance(got, dict):
        return f"; write a list, e.g. [{', '.join(map(str, got))}]"
    if kind == "dict_type" and isinstance(got, list) and got and isinstance(got[0], str):
        return f"; write a mapping, e.g. {{{got[0]}: {{}}}}"
    if kind == "dict_type":
        return "; write a mapping, e.g. {key: value}"
    return ""


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The models a field holds: itself, a union's forms, a list's or a dict's values."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _homes(key: str, model: type[BaseModel], *, prefix: str = "", depth: int = 2) -> list[str]:
    """Dotted paths below `model` where `key` is a key (`rounds` -> `federation.rounds`): a key
    written without its section."""
    found: list[str] = []
    for name, field in model.model_fields.items():
        for sub in _models_in(field.annotation)[:1]:
            if key in sub.model_fields:
                found.append(f"{prefix}{name}.{key}")
            elif depth > 1:
                found += _homes(key, sub, prefix=f"{prefix}{name}.", depth=depth - 1)
    return found


def _extension_homes(key: str) -> list[str]:
    """Where `key` goes if a feature or an aggregator takes it: `features.fedprox` (a feature
    written as a section), `features.fedprox.mu`, `aggregator.options.oversample`."""
    from fedllm.aggregators import available
    from fedllm.aggregators.registry import option_names

    found = features.discover()
    homes = [f"features.{key}"] if key in found else []
    homes += [
        f"features.{name}.{key}"
        for name, cls in sorted(found.items())
        if cls.Options is not None and key in cls.Options.model_fields
    ]
    if any(key in option_names(a) for a in available()):  # the chosen one's: checked later
        homes.append(f"aggregator.options.{key}")
    return homes


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model class at a dotted location of the schema, for listing valid keys (a
    list index or a dict key below a field of models is that model: `lora.tiers.0`)."""
    model: type[BaseModel] = RunConfig
    inside: type[BaseModel] | None = None  # the element model of the list/dict just entered
    for part in loc:
        if inside is not None:
            model, inside = inside, None
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        models = _models_in(field.annotation)  # also one form of a union (lora.ranks: RankRule)
        if not models:
            return None
        if typing.get_origin(field.annotation) in (list, dict) or any(
            typing.get_origin(a) in (list, dict) for a in typing.get_args(field.annotation)
        ):
            inside = models[0]
        model = models[0]
    return model


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ["federation.rounds=2", "lora.ranks=[4,8]"] into a nested dict; values are YAML."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"override {item!r} is not of the form key=value (e.g. federation.rounds=2)"
            )
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r} has an empty key part")
        node = tree
        for i, part in enumerate(parts[:-1]):
            if parts[:i] == ["features"] and node.get(part) is True:
                node[part] = {}  # features.x=true, then features.x.<option>=...: x with it
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override of {part!r}")
        value = _override_value(item, raw)
        if parts == ["aggregator"] and isinstance(value, str):
            value = {"name": value}  # the short form, merged with any aggregator.<key> override
        if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
            node[parts[-1]] = _merge(node[parts[-1]], value)  # in either order
        elif value is True and parts[:-1] == ["features"] and isinstance(node.get(parts[-1]), dict):
            continue  # features.x.<option>=..., then features.x=true: on, keeping the option
        else:
            node[parts[-1]] = value
    return tree


def _override_value(item: str, raw: str) -> Any:
    """One override's value as YAML, or a one-line ConfigError naming the override."""
    if not raw.strip():
        return None
    try:
        return load_yaml(raw)
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or "not valid YAML"
        mark = getattr(err, "problem_mark", None)
        where = f" at character {mark.column + 1} of the value" if mark is not None else ""
        raise ConfigError(
            f"override {item!r}: the value is not valid YAML ({problem}{where}); "
            "give a number (2), a word (adamw), a list ([4, 8]) or a mapping "
            "({fraction: 0.1, labels: [a, b]}), with brackets closed, "
            "quoted for the shell ('key={a: 1}')"
        ) from None


def _merge(
    base: dict[str, Any], extra: dict[str, Any], *, path: tuple[str, ...] = ()
) -> dict[str, Any]:
    """`extra` (overrides) into `base` (the recipe): mappings merge key by key, except that an
    empty mapping replaces (`aggregator.options={}` clears the recipe's options), and
    `features.<name>=true` keeps the options the recipe gives that feature."""
    out = dict(base)
    for k, v in extra.items():
        if path == () and k == "aggregator":  # `aggregator: svd` is {name: svd}, then merged
            v = {"name": v} if isinstance(v, str) else v
            out[k] = {"name": out[k]} if isinstance(out.get(k), str) else out.get(k)
        held = out.get(k)
        if (
            isinstance(v, dict)
            and isinstance(held, (int, float, str))
            and not isinstance(held, bool)
        ):
            key = ".".join((*path, k))
            raise ConfigError(
                f"{key} is a value ({held!r} in the recipe), not a section with keys "
                f"({', '.join(map(str, v))}); override it as {key}=<value>"
            )
        if v == {}:
            out[k] = {}
        elif v is True and path == ("features",) and isinstance(out.get(k), dict):
            continue  # on already, with the recipe's options
        elif isinstance(v, dict) and isinstance(out.get(k), dict) and k != "options":
            out[k] = _merge(out[k], v, path=(*path, k))
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


def build_config(data: dict[str, Any], *, source: str = "<dict>") -> RunConfig:
    """Validate a recipe dict into a RunConfig, or raise ConfigError naming every bad key."""
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None
    try:
        features.check(cfg)  # the features' own checks, found by fedllm.features.registry
    except ValueError as err:
        raise ConfigError(f"invalid recipe {source}:\n  {err}") from None
    return cfg


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML recipe (a file, or a shipped recipe's name), apply `key=value` overrides,
    validate."""
    path = resolve_recipe(path)
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"recipe {path} is not UTF-8 text (byte {err.object[err.start]:#x} at position "
            f"{err.start}); save it as UTF-8"
        ) from None
    except yaml.YAMLError as err:
        where = str(err).replace("<unicode string>", str(path))
        raise ConfigError(f"recipe {path} is not valid YAML: {where}") from None
    if data is None:
        raise ConfigError(
            f"recipe {path} is empty; give at least a model and data (`fedllm recipes cp "
            "quickstart` copies one to edit)"
        )
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping of keys, got {type(data).__name__}")
    data = _merge(data, parse_overrides(overrides or []))
    return build_config(data, source=str(path))
