"""YAML as recipes read and write it: safe, a repeated key an error, `1e-3` a float, no dates.

Reading (`load_yaml`) follows YAML 1.2 for exponent floats; writing (`dump_yaml`) quotes any
string that reading would take for a float, so a recipe written out reads back the same (a run's
recipe.yaml, the recipe a SuperNode receives, run-config overrides).
"""

from __future__ import annotations

import re
from typing import Any

import yaml

# YAML 1.2 floats: PyYAML (YAML 1.1) reads `1e-3` (no dot) as the string "1e-3", so a learning
# rate written the usual way would be refused, or kept as text where a value is not typed.
EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key twice in one mapping is an error (PyYAML keeps the
    last one, so a second `federation:` section would silently drop the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        """PyYAML's mapping, after refusing a key that appears twice (the error names its lines)."""
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {key!r} appears twice (lines {seen[key]} and {line}); merge them",
                    key_node.start_mark,
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", EXPONENT_FLOAT, list("-+0123456789")
)


# No dates: no recipe key holds one, and `name: 2024-01-01` means the text.
UniqueKeyLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in UniqueKeyLoader.yaml_implicit_resolvers.items()
}


def load_yaml(text: str) -> Any:
    """YAML as recipes read it: safe, a repeated key is an error, `1e-3` is a float."""
    return yaml.load(text, Loader=UniqueKeyLoader)


class RecipeDumper(yaml.SafeDumper):
    """YAML's safe dumper, quoting the strings `load_yaml` would read as floats ("1e5")."""


RecipeDumper.add_implicit_resolver("tag:yaml.org,2002:float", EXPONENT_FLOAT, list("-+0123456789"))


def dump_yaml(data: Any, *, sort_keys: bool = False) -> str:
    """`data` as YAML that `load_yaml` reads back to the same values."""
    return yaml.dump(data, Dumper=RecipeDumper, sort_keys=sort_keys)
