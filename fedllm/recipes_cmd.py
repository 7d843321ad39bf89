"""`fedllm recipes`: list the shipped recipes (`ls`, the default) and copy one to edit (`cp`),
as torchtune's `tune ls` / `tune cp` do, so `pip install` users start from a working recipe."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from fedllm.recipe import ConfigError
from fedllm.recipe.shipped import shipped_name, shipped_recipes, summary
from fedllm.suggest import did_you_mean


def cmd_ls(args: argparse.Namespace) -> int:
    """One line per shipped recipe: its name and the first line of its header comment."""
    recipes = shipped_recipes()
    width = max(map(len, recipes), default=0)
    for name, path in recipes.items():
        print(f"{name:<{width}}  {summary(path)}".rstrip())
    return 0


def copy_recipe(name: str, dest: str | None = None, *, force: bool = False) -> Path:
    """Copy the shipped recipe `name` to `dest` (a file, or a folder; default ./NAME.yaml)."""
    found = shipped_name(name)
    if found is None:
        raise ConfigError(
            f"no shipped recipe named {name!r}{did_you_mean(name, shipped_recipes())}; "
            f"shipped recipes: {', '.join(shipped_recipes())}"
        )
    source = shipped_recipes()[found]
    target = Path(dest).expanduser() if dest else Path(source.name)
    if target.is_dir():
        target = target / source.name
    if target.exists() and not force:
        raise ConfigError(f"{target} already exists; pass --force to replace it")
    if not target.parent.is_dir():
        raise ConfigError(f"cannot copy to {target}: folder {target.parent} does not exist")
    shutil.copyfile(source, target)
    return target


def cmd_cp(args: argparse.Namespace) -> int:
    """`fedllm recipes cp`: copy a shipped recipe (`copy_recipe`) and say how to run it."""
    target = copy_recipe(args.name, args.dest, force=args.force)
    print(f"copied recipe {args.name} to {target}; run it with: fedllm run {target}")
    return 0


def add_recipes_command(sub: argparse._SubParsersAction) -> None:
    """`fedllm recipes [ls]` and `fedllm recipes cp NAME [DEST] [--force]`."""
    recipes = sub.add_parser("recipes", help="list the shipped recipes, or copy one to edit")
    recipes.set_defaults(fn=cmd_ls)
    actions = recipes.add_subparsers(dest="action")
    actions.add_parser("ls", help="list the shipped recipes (the default)").set_defaults(fn=cmd_ls)
    cp = actions.add_parser("cp", help="copy a shipped recipe, e.g. fedllm recipes cp tiny my.yaml")
    cp.add_argument("name", help="a shipped recipe's name (see `fedllm recipes`)")
    cp.add_argument("dest", nargs="?", help="file or folder to copy to (default: ./NAME.yaml)")
    cp.add_argument("--force", action="store_true", help="replace an existing file")
    cp.set_defaults(fn=cmd_cp)
