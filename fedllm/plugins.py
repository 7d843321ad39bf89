"""Installed extensions: load each entry point of a group, and skip a broken one with a warning.

The aggregator, feature and eval-task registries all find third-party code this way, so a
plugin that fails to import is reported the same way everywhere and never stops the built-in
parts (a recipe that does not use the plugin must still run).
"""

from __future__ import annotations

import importlib.metadata
import warnings
from collections.abc import Iterator, MutableMapping, Sequence
from typing import Any


def load_entry_points(
    group: str, *, kind: str, registries: Sequence[MutableMapping[str, Any]] = ()
) -> Iterator[tuple[str, Any]]:
    """(name = value, loaded object) for each entry point of `group`, once per (name, value).

    The same entry point listed twice (two copies of a package on sys.path) loads once; one that
    raises on load is skipped with a RuntimeWarning naming it, its group and the error, and what
    it registered in `registries` before it raised is taken back (skipped means absent). A load
    that registers names none of which is the entry point's own is said: recipes use the
    registered name, not the entry point's.
    """
    seen: set[tuple[str, str]] = set()
    for point in importlib.metadata.entry_points(group=group):
        if (point.name, point.value) in seen:
            continue
        seen.add((point.name, point.value))
        where = f"{kind} entry point {point.name} = {point.value} ({group})"
        before = [dict(r) for r in registries]
        try:
            target = point.load()
        except Exception as err:  # any error of third-party code at import
            for registry, kept in zip(registries, before, strict=True):
                registry.clear()
                registry.update(kept)
            warnings.warn(  # issued here, one place: Python shows each message once, however
                # many times a command reads the registries (h95 saw it twice)
                f"{where} failed to load and was skipped: {type(err).__name__}: {err}",
                RuntimeWarning,
                stacklevel=1,
            )
            continue
        added = sorted(
            {k for r, kept in zip(registries, before, strict=True) for k in r if k not in kept}
        )
        if added and point.name not in added:
            warnings.warn(
                f"{where} registered {', '.join(map(repr, added))}, not {point.name!r}: a recipe "
                "names what was registered",
                RuntimeWarning,
                stacklevel=1,
            )
        yield where, target
