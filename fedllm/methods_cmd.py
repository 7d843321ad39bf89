"""`fedllm methods`: what this installation can run, as a recipe names it: the registered
aggregators (`aggregator.name`, with their round semantics and options), the features
(`features.<name>`, with their options) and the eval tasks (`fedllm eval --tasks`), each with
where it comes from, so a plugin's methods can be seen to be found (docs/extending.md)."""

from __future__ import annotations

import argparse
from typing import Any

CORE = ("fedllm.",)  # modules of this package; anything else came from a plugin


def origin(module: str, *, short: bool = False) -> str:
    """'' for fedllm's own code, else '  (plugin: <module>)' (`short`: ' (plugin <module>)')."""
    if module.startswith(CORE):
        return ""
    return f" (plugin {module})" if short else f"  (plugin: {module})"


def first_line(doc: str | None) -> str:
    return (doc or "").strip().splitlines()[0] if (doc or "").strip() else ""


def semantics(name: str) -> str:
    """The aggregator's round semantics in a word (docs/aggregators.md's table)."""
    from fedllm.aggregators import round_spec

    spec = round_spec(name)
    flags = [flag for flag in ("merge", "freeze_A", "local_B") if getattr(spec, flag)]
    return ", ".join(flags) or "adapter state"


def options_text(options: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in options.items()) or "(none)"


def feature_options(cls: type) -> dict[str, Any] | None:
    """A feature's options with their defaults (None: it has no `features.<name>` section)."""
    if cls.Options is None:
        return None
    return {k: f.default for k, f in cls.Options.model_fields.items() if not f.is_required()}


def lines() -> list[str]:
    """The listing, one block per kind (the registries import peft: here, not when the command
    line is parsed, which must stay light and leave bitsandbytes hidden)."""
    from fedllm.aggregators import available as aggregators
    from fedllm.aggregators import get, resolved_options
    from fedllm.eval.registry import available_tasks
    from fedllm.features import registry

    out = ["aggregators (aggregator.name; options go in aggregator.options):"]
    names = aggregators()
    width = max(10, *map(len, names))  # a plugin's long name keeps the columns
    for name in names:
        fn = get(name)
        out.append(
            f"  {name:<{width}} {semantics(name)}: {first_line(fn.__doc__)}{origin(fn.__module__)}"
        )
        out.append(f"  {'':<{width}} options: {options_text(resolved_options(name, {}))}")
    found = registry.discover()
    out += ["", "features (features.<name>: {options}, or features.<name>=true):"]
    inner = []
    for name, cls in sorted(found.items()):
        opts = feature_options(cls)
        if opts is None:
            inner.append(name)
            continue
        out.append(f"  {name:<18} {first_line(cls.__doc__)}{origin(cls.__module__)}")
        out.append(f"  {'':<18} options: {options_text(opts)}")
    inner_text = ", ".join(f"{n}{origin(found[n].__module__, short=True)}" for n in inner)
    out.append(f"  turned on by their own recipe sections or keys: {inner_text}")
    out += ["", "eval tasks (fedllm eval --tasks NAME ...):"]
    for name, cls in available_tasks().items():
        out.append(f"  {name:<18} {cls.describe()['about']}{origin(cls.__module__)}")
    return out


def cmd_methods(args: argparse.Namespace) -> int:
    """Print `lines()`."""
    print("\n".join(lines()))
    return 0


def add_methods_command(sub: argparse._SubParsersAction) -> None:
    """`fedllm methods`."""
    methods = sub.add_parser(
        "methods", help="list the aggregators, features and eval tasks this installation has"
    )
    methods.set_defaults(fn=cmd_methods)
