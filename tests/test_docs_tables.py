"""The docs' tables name what the code has: the `fold` hook, Fed-PLoRA's reply metric, every
module of `fedllm/` in the architecture's tree."""

from __future__ import annotations

import re
from pathlib import Path

from fedllm.features.base import Feature
from fedllm.features.fedplora_fold import METRIC, FedPLoRAFold

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def hook_table() -> dict[str, str]:
    """hook name -> its side, from the hook table of docs/architecture.md."""
    out: dict[str, str] = {}
    for line in (DOCS / "architecture.md").read_text().splitlines():
        if m := re.match(r"^\| (client|server) \| ([^|]+) \|", line):
            out |= {name: m.group(1) for name in re.findall(r"`(\w+)`", m.group(2))}
    return out


def test_the_hook_table_lists_fold_as_a_client_hook_of_feature() -> None:
    assert callable(Feature.fold) and "fold" in vars(FedPLoRAFold)
    assert hook_table()["fold"] == "client"


def test_every_hook_fedplora_overrides_is_in_the_hook_table() -> None:
    # the recipe-side classmethods (described above the table) and class attributes
    recipe_side = {"enabled", "check", "prepare", "parse_options", "name", "order"}
    recipe_side |= {"own_adapter_shape"}
    overridden = {
        n
        for n in vars(FedPLoRAFold)
        if n in vars(Feature) and not n.startswith("_") and n not in recipe_side
    }
    assert overridden == {
        "plan",
        "fold",
        "start",
        "metrics",
        "before_round",
        "download",
        "receive",
        "release",
    }
    assert overridden <= set(hook_table())


def test_the_disclosure_table_has_fedplora_draw_public_without_privacy() -> None:
    rows = [
        [c.strip() for c in line.split("|")[1:-1]]
        for line in (DOCS / "privacy.md").read_text().splitlines()
        if line.startswith(f"| train | {METRIC} |")
    ]
    assert rows == [["train", "fedplora-draw", "public", "—", "—", "—"]]


def test_every_module_of_fedllm_has_its_line_in_the_architecture_tree() -> None:
    text = (DOCS / "architecture.md").read_text()
    tree = text.split("## The tree, one line per module", 1)[1].split("```")[1]
    listed = set(re.findall(r"^\s+(\w+\.py)\s", tree, flags=re.MULTILINE))
    modules = {p.name for p in (ROOT / "fedllm").rglob("*.py") if p.name != "__init__.py"}
    assert modules - listed == set(), "add a line for each to docs/architecture.md"
