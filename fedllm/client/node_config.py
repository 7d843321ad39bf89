"""What a deployed SuperNode knows about itself: its node config, its own data, its base model.

A SuperNode is started with `--node-config` (see `fedllm node`), whose keys are:
- `partition-id` (required): this node's identity in the federation and, without `data-path`, which
  partition of the recipe's data source it holds (rebuilt deterministically, as in simulation);
- `data-path`: a local JSON/JSONL/CSV/Parquet file or saved `datasets` folder holding this node's
  whole private dataset (split into train/held-out with the recipe's `data.held_out`);
- `rank`: the LoRA rank this node trains at (default: the recipe's rank for its partition);
- `model`: the base model this node has; a run of a recipe on another base is refused;
- `recipe-hash`: pin the recipe hash this organisation agreed to (`RunConfig.recipe_hash`: the
  whole recipe but name, output_dir, simulation and output); other runs are refused;
- `require-secagg` (true/false): train only in runs with `privacy.secure_aggregation.enabled`;
- `max-epsilon`: train only under DP whose target ε / budget is at most this, and never past it by
  this node's own ε ledger (`privacy.mode: sample` or `client`), kept in its context state;
- `min-noise`: train only with a DP-SGD σ (sample) or client-level noise on one update as the
  server sees it (client: z, or z/√m with `noise_at: client`) of at least this.
The last three are enforced by `fedllm.privacy.node_guard` before any training.
- `warm-worker`: the folder of this node's warm worker (`fedllm.deploy.warm`, set by `fedllm node`).
- `personal-dir` (`fedllm node --personal-dir`): the folder where this node keeps its personal
  adapter and node state (`fedllm.features.personal`, `fedllm.features.node_state`; default:
  `<run_dir>/clients/<partition-id>` of the recipe's output_dir on this machine).
- `threads`, `slowdown`, `memory-mb`: this node's emulated device (torch threads, local steps this
  many times slower, memory budget in MiB), over its entry in the recipe's `devices`, which must be
  set (`fedllm.constrained.devices`).
Errors raised here reach the server as the client's error reply and leave it out of the round
(in a private run, a refusal by this node's settings as it is, any other error as its type only).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from fedllm.errors import NodeRefusal
from fedllm.privacy.node_guard import NodeRules, check_recipe
from fedllm.recipe import RunConfig, build_config, load_yaml

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from fedllm.data.shards import ProcessCache, Shard

NODE_KEYS = (
    "partition-id",
    "num-partitions",
    "data-path",
    "rank",
    "model",
    "recipe-hash",
    "require-secagg",
    "max-epsilon",
    "min-noise",
    "warm-worker",
    "personal-dir",
    "threads",
    "slowdown",
    "memory-mb",
)
DEVICE_KEYS = ("threads", "slowdown", "memory-mb")  # emulation: fedllm.constrained.devices


def recipe_from_run_config(run_config: Mapping[str, object]) -> RunConfig:
    """The recipe the submitter resolved and sent as the run config's `recipe` (YAML text)."""

    text = run_config.get("recipe")
    if not isinstance(text, str) or not text.strip():
        raise ValueError(
            "run config has no 'recipe': submit runs with `fedllm run RECIPE --federation CONN`, "
            "which sends the resolved recipe YAML"
        )
    return build_config(load_yaml(text), source="run config 'recipe'")


def check_app_source(paths: list[str] | None = None) -> None:
    """Refuse to run when Flower put a run's app on sys.path that is not fedllm's own (files
    besides pyproject/README, or other components): a node runs only its installed fedllm.

    Flower's stock `flwr-clientapp` installs the run's FAB under $FLWR_HOME/apps and puts it first
    on sys.path; fedllm's own ClientApp process (`fedllm node`) never does, and checks the FAB
    before anything is imported (`fedllm.deploy.app_check.check_fab`).
    """
    from fedllm.deploy.app_check import check_app_dir
    from fedllm.deploy.flower_env import flwr_home

    apps = (flwr_home() / "apps").resolve()
    for entry in sys.path if paths is None else paths:
        folder = Path(entry or ".").resolve()
        if folder.is_dir() and folder.is_relative_to(apps) and folder != apps:
            check_app_dir(folder)


def check_node(cfg: RunConfig, node_config: Mapping[str, object]) -> None:
    """Refuse a run whose app, base model or recipe differs from what this node was set up for,
    or whose recipe breaks its privacy rules: for every message, evaluation and query too (h106:
    the rules were checked in training only, so a node with require-secagg or max-epsilon still
    evaluated a recipe without them and sent its held-out loss and error texts in the clear)."""
    check_app_source()
    unknown = sorted(set(node_config) - set(NODE_KEYS))
    if unknown:
        raise NodeRefusal(f"unknown node config key(s) {unknown}; valid: {', '.join(NODE_KEYS)}")
    emulated = [k for k in DEVICE_KEYS if k in node_config]
    if emulated and cfg.devices is None:
        raise NodeRefusal(
            f"node config {', '.join(emulated)} emulate a device, which the run's recipe does not "
            "turn on: give it a `devices` section (e.g. devices=[{clients: N}]) or drop the keys"
        )
    model = node_config.get("model")
    if model is not None and str(model) != cfg.model.name:
        raise NodeRefusal(
            f"base model mismatch: the run uses model.name={cfg.model.name!r} but this node "
            f"holds {model!r} (node config model=...)"
        )
    check_recipe(cfg, NodeRules.from_node_config(node_config))
    pinned = node_config.get("recipe-hash")
    if pinned is not None and len(str(pinned)) != len(cfg.recipe_hash()):
        raise NodeRefusal(
            f"node config recipe-hash={pinned!s:.20}: give the whole 64-digit hash "
            "`fedllm validate RECIPE` prints (a 12-digit fingerprint can be matched by a search "
            "over seeds for a weaker recipe)"
        )
    if pinned is not None and str(pinned) != cfg.recipe_hash():
        raise NodeRefusal(
            f"recipe hash mismatch: the run's recipe has hash {cfg.recipe_hash()} but this "
            f"node only accepts {pinned} (node config recipe-hash=...; `fedllm validate RECIPE` "
            "prints a recipe's hash as the run from that folder would send it)"
        )


def local_recipe(cfg: RunConfig, node_config: Mapping[str, object]) -> tuple[RunConfig, int]:
    """(recipe, partition) that `load_shard` should read for this node's own data.

    With `data-path`, the node's file is a one-client federation of its own; otherwise the node
    holds partition `partition-id` of the recipe's source.
    """
    pid = int(node_config["partition-id"]) if "partition-id" in node_config else None
    path = node_config.get("data-path")
    if path is None:
        if pid is None:
            raise ValueError("node config has no 'partition-id'; start the SuperNode with one")
        return cfg, pid
    folder = Path(str(path)).expanduser()
    if not folder.exists():
        raise FileNotFoundError(
            f"node config data-path={path!r}: no such file or folder on this node "
            "(valid: a JSON/JSONL/CSV/Parquet file or a saved datasets folder)"
        )
    if folder.is_file() and folder.stat().st_size == 0:
        raise ValueError(f"node config data-path={path!r}: the file is empty (no examples)")
    data = cfg.data.model_copy(
        update={
            "source": str(folder.resolve()),
            "num_clients": 1,
            "partitioner": "iid",
            "test_set": None,  # the server's test set comes from the recipe's source, not here
        }
    )
    return cfg.model_copy(update={"data": data}), 0


def node_shard(
    cfg: RunConfig,
    node_config: Mapping[str, object],
    *,
    tokenizer: PreTrainedTokenizerBase,
    cache: ProcessCache | None = None,
) -> Shard:
    """This node's private shard (kept by `cache` across messages), with errors that name the
    node config key and the file."""
    from fedllm.data.shards import load_shard

    local, part = local_recipe(cfg, node_config)
    try:
        return load_shard(local, part, tokenizer=tokenizer, cache=cache)
    except ValueError as err:
        where = node_config.get("data-path", f"partition {node_config.get('partition-id')}")
        raise ValueError(f"this node's data ({where}) cannot be used: {err}") from err
