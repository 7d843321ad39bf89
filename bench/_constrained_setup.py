"""The constrained bench's settings, arms and device profiles (bench/constrained.py), shared with
its report (bench/_constrained_report.py)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from fedllm.recipe import RunConfig, load_recipe

RESULTS = Path(__file__).parent / "results" / "constrained.md"
ROWS = RESULTS.with_name("constrained-rows.jsonl")  # every (seed, setting) run, over invocations
BANDIT = {"ranks": [4, 32], "pruning": [0.0, 0.5]}
BANDIT_Q = {"ranks": [32], "pruning": [0.0, 0.5], "quantization": ["none", "4bit"]}
FIXED = {"r32": (32, 0.0, None), "r4-p50": (4, 0.5, None), "r32-4bit": (32, 0.0, "4bit")}
ADAPTIVE = {"bandit": BANDIT, "bandit-server": {**BANDIT, "reward": "server"}, "bandit-q": BANDIT_Q}
SETTINGS = [*ADAPTIVE, *FIXED]
BANDIT_ARMS = [
    (r, p, None if q == "none" else q)
    for b in ADAPTIVE.values()
    for r in b["ranks"]
    for p in b["pruning"]
    for q in b.get("quantization", ["none"])
]
ARMS = sorted({*BANDIT_ARMS, *FIXED.values()}, key=lambda a: (a[0], a[1], a[2] or ""))
# the server evaluates on its own global test set, so quality does not depend on the devices
EVALUATION = ["data.test_set={fraction: 0.1}", "federation.evaluate_clients=none"]
PROFILES = ("fast", "slow", "small")
CAL_STEPS = 3
MIB = 2**20


def arm_name(rank: int, pruning: float, quant: str | None) -> str:
    return f"r{rank}/p{pruning:g}" + (f"/{quant}" if quant else "")


def profiles(n: int) -> list[str]:
    """The profile of each of `n` clients (fast, slow, small, fast, ...)."""
    return [PROFILES[i % len(PROFILES)] for i in range(n)]


def devices(n: int, *, slowdown: float, budget_mib: float | None) -> list[dict]:
    spec = {
        "fast": {"threads": 2},
        "slow": {"threads": 1, "slowdown": slowdown},
        "small": {"threads": 1, "memory_mb": budget_mib},
    }
    return [{"name": p, "clients": 1, **spec[p]} for p in profiles(n)]


def recipe(
    base: list[str],
    args: argparse.Namespace,
    *,
    name: str,
    setting: str,
    extra: Sequence[str] = (),
) -> RunConfig:
    """The setting's recipe: the bench's base overrides, its arms, then `extra`."""
    over = [*base, f"name={name}"]
    if setting in ADAPTIVE:
        over += ["lora.tiers=null", "lora.ranks=4", f"adaptive={json.dumps(ADAPTIVE[setting])}"]
    else:
        rank, pruning, quant = FIXED[setting]
        n = load_recipe(args.recipe, base).data.num_clients
        tier = {"name": setting, "rank": rank, "clients": n, "pruning": pruning}
        tier |= {"quantization": quant} if quant else {}
        over += ["lora.ranks=null", f"lora.tiers={json.dumps([tier])}"]
    return load_recipe(args.recipe, [*over, *extra])
