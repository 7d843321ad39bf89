"""The recipes that ship inside the package (`fedllm.recipes`, the checkout's `recipes/` folder),
found by name, so `fedllm run quickstart` works after a plain `pip install fedllm`."""

from __future__ import annotations

import re
from importlib.resources import as_file, files
from pathlib import Path

from fedllm.recipe.checks import ConfigError
from fedllm.suggest import did_you_mean

SUFFIX = ".yaml"


def shipped_folder() -> Path:
    """The folder holding the shipped recipes (the installed package data, or the checkout's)."""
    with as_file(files("fedllm.recipes")) as folder:  # a real folder for both install kinds
        return Path(folder)


def shipped_recipes() -> dict[str, Path]:
    """Every shipped recipe by name (the file name without `.yaml`), sorted."""
    return {p.stem: p for p in sorted(shipped_folder().glob(f"*{SUFFIX}"))}


def summary(path: Path, *, width: int = 80) -> str:
    """A recipe's one-line description: the first sentence of its leading `#` comment block
    (up to a `Run:` line), cut to `width` characters."""
    lines = []
    for line in path.read_text().splitlines():
        text = line.lstrip("#").strip()
        if not line.startswith("#") or not text or text.startswith("Run:"):
            break
        lines.append(text)
    sentence = re.split(r"(?<=\.)\s", " ".join(lines), maxsplit=1)[0]
    return sentence if len(sentence) <= width else sentence[: width - 1].rstrip() + "…"


def shipped_name(value: str) -> str | None:
    """The shipped recipe `value` names, if any: `quickstart`, `quickstart.yaml`, or the
    checkout-relative `recipes/quickstart.yaml` (the same file once installed)."""
    path = Path(value)
    if path.is_absolute() or len(path.parts) > 2:
        return None
    if len(path.parts) == 2 and (path.parts[0] != "recipes" or path.suffix != SUFFIX):
        return None
    stem = path.name.removesuffix(SUFFIX)
    return stem if stem in shipped_recipes() else None


def resolve_recipe(value: str | Path) -> Path:
    """The recipe file `value` means: an existing file, else a shipped recipe's name."""
    path = Path(value).expanduser()
    if path.is_file():
        return path
    name = shipped_name(str(value))
    if name is not None:
        return shipped_recipes()[name]
    if path.is_dir():
        raise ConfigError(f"recipe {path} is a folder; give a YAML file (e.g. {path}/*.yaml)")
    hint = (
        f"; if it is an override, write key=value (e.g. {value}=2)"
        if looks_like_key(str(value))
        else did_you_mean(path.name.removesuffix(SUFFIX), shipped_recipes())
    )
    raise ConfigError(
        f"recipe file {value} not found, and it is not a shipped recipe{hint}; shipped "
        f"recipes: {', '.join(shipped_recipes())} (`fedllm recipes` lists them)"
    )


def looks_like_key(value: str) -> bool:
    """Whether a command-line word that is no file reads as a recipe key left without its value
    (`federation.rounds`), not a recipe path."""
    path = Path(value).expanduser()
    dotted = "." in value and "/" not in value and not value.endswith((".yaml", ".yml"))
    return dotted and not path.exists() and shipped_name(value) is None
