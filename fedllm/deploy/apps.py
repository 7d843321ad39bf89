"""Module-level ServerApp and ClientApp: the Flower App of the checkout (`flwr run .`, simulation
or a SuperLink) and of `fedllm run RECIPE --federation CONN`.

A run config names its recipe either way (`fedllm.deploy.app_config.app_recipe`):
- `flwr run . --run-config "recipe='quickstart' federation.rounds=2"`: a shipped recipe's name,
  `recipes/NAME.yaml` or a file's path, with any recipe key as an override. The ServerApp then
  does what `fedllm run` does before round 1 (`fedllm.launch.start_run`: run-directory rules,
  `prepare`, recipe.yaml); in Flower's simulation it first checks the federation has one
  SuperNode per client.
- `fedllm run RECIPE --federation CONN`: the resolved recipe's YAML text (`recipe`, `resume`),
  after the submitter did those steps.
Both sides rebuild the recipe from the run config. fedllm itself is installed on every machine
beforehand: the FAB carries no code (no run-time dependency installation).

Flower imports this module in the processes it starts for the app (a SuperLink's `flwr-serverapp`,
`flwr run .`'s simulation and its Ray actors), so it hides bitsandbytes before importing peft, as
fedllm's commands do (a quantised base exposes it again). The ServerApp sets its process's
console up as `fedllm run`'s (`fedllm.processes.app_process`), the ClientApp drops peft's
checkpointing notice (`client_app_process`).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from fedllm.processes import (
    app_process,
    client_app_process,
    flower_verbose,
    hide_bitsandbytes,
)

hide_bitsandbytes()  # before peft (imported below): ~4 s and a kernels warning, unless quantising

from fedllm import files  # noqa: E402
from fedllm.client import app as client  # noqa: E402
from fedllm.client.node_config import check_node  # noqa: E402
from fedllm.data.shards import ProcessCache  # noqa: E402
from fedllm.deploy.app_config import app_recipe, is_recipe_text  # noqa: E402
from fedllm.features import registry  # noqa: E402
from fedllm.launch import absolute_paths, remove_run_dir, start_run  # noqa: E402
from fedllm.model import packing  # noqa: E402
from fedllm.privacy.secagg_common import max_weight  # noqa: E402
from fedllm.recipe import ConfigError, RunConfig  # noqa: E402
from fedllm.server.app import run_server  # noqa: E402
from fedllm.server.checkpoint import CHECKPOINT, has_checkpoint  # noqa: E402
from fedllm.server.exchange import say, wait_for_nodes  # noqa: E402

server_app = ServerApp()
client_app = ClientApp()
# the app's own state, like the app objects: a process's base and shards, kept across its
# messages (a warm worker's: loaded, built and tokenized once per run)
cache = ProcessCache()
log = logging.getLogger("fedllm.client")

FLWR_RUN_HINT = (
    'with `flwr run`, give --run-config "resume=true", "overwrite=true" or "name=\'NEW\'"'
)


def simulated_nodes(grid: Grid, *, timeout: float = 120.0) -> int | None:
    """How many SuperNodes Flower's simulation runs (None outside simulation). The simulation
    registers them all at once, just after the ServerApp starts: wait for the count to settle."""
    if not isinstance(grid, InMemoryGrid):
        return None
    n = wait_for_nodes(grid, 1, timeout=timeout)
    while True:
        time.sleep(0.5)
        if n == (n := len(list(grid.get_node_ids()))):
            return n


def check_simulation_size(nodes: int | None, cfg: RunConfig) -> None:
    """Refuse a simulation of `nodes` SuperNodes (None: not a simulation) unless it is the
    recipe's client count (each node holds one partition), naming both ways to agree."""
    n, wanted = nodes, cfg.data.num_clients
    if n is not None and n != wanted:
        raise ConfigError(
            f"this simulation runs {n} SuperNodes but the recipe has data.num_clients={wanted}: "
            f'run `flwr run . --federation-config "num-supernodes={wanted}" ...` (or set it '
            f"once: `flwr federation simulation-config`), or override data.num_clients={n}"
        )


def simulation_notice(cfg: RunConfig) -> str | None:
    """What a recipe's `simulation` section asks that `flwr run .` cannot do (Flower's own
    simulation settings assign each ClientApp's resources, and its Ray), as the commands that
    would; None if it asks nothing beyond the defaults."""
    section = cfg.simulation
    asked = section.model_dump(exclude_defaults=True)
    if not asked:
        return None
    said = ", ".join(f"simulation.{k}={v}" for k, v in asked.items())
    return (
        f"{said}: not applied under `flwr run .`, where Flower's simulation settings give each "
        "ClientApp its resources: `flwr federation simulation-config --client-resources-num-cpus "
        f"{math.ceil(section.num_cpus_per_client)} --client-resources-num-gpus "
        f"{section.num_gpus_per_client:g}` (`fedllm run` applies the section itself"
        + (", and joins a Ray cluster by its ray_address)" if section.ray_address else ")")
    )


def weight_notice(cfg: RunConfig) -> str | None:
    """A deployment's warning when a client's aggregation weight is its own claim, bounded by
    nothing the recipe sets (`weighting: examples` without `data.max_examples` or, under
    SecAgg+, `max_weight`): one node claiming 10¹⁵ examples would make every global its own
    update. None when the recipe bounds it."""
    sa = cfg.privacy.secure_aggregation
    if cfg.aggregator.weighting != "examples" or cfg.data.max_examples is not None:
        return None
    if sa.enabled and sa.max_weight is not None:
        return None
    bound = f"up to SecAgg+'s default {max_weight(cfg):g}" if sa.enabled else "unbounded"
    return (
        "aggregator.weighting=examples with no data.max_examples: each client's weight is the "
        f"example count it claims ({bound}), so one node can make the global its own update; "
        "set data.max_examples (the server refuses claims above it) or aggregator.weighting="
        "uniform where nodes are not trusted (docs/security.md)"
    )


def check_server_run_dir(cfg: RunConfig, *, resume: bool, overwrite: bool) -> None:
    """Refuse to start a submitted run (`fedllm run --federation`) over a checkpointed run of
    the same name in the SuperLink's run directory, which the submitter, on another machine,
    cannot see: a run is never overwritten silently. With --overwrite the old run's folder is
    deleted, as `fedllm run --overwrite` does locally (h107: it was kept, and a private run
    submitted over a plain one kept that run's client_adapters/, best_adapter/ and trackers)."""
    if resume or not has_checkpoint(cfg.run_dir):
        return
    if not overwrite:
        raise ConfigError(
            f"the SuperLink's {cfg.run_dir} already holds a run of this name (its "
            f"{CHECKPOINT}); submit again with --resume to continue it, --overwrite to start "
            "again, or name=<new name>"
        )
    remove_run_dir(cfg.run_dir, Path(cfg.output_dir))


def keep_recipe(cfg: RunConfig, *, resume: bool) -> None:
    """The run's recipe.yaml in the SuperLink's run folder too (the submitter writes its own,
    on its machine): `fedllm eval RUN` reads it where the adapters are. A new run (also one
    submitted with --overwrite) writes it; a resume keeps the one its rounds began with and,
    once its checks pass, adds its own if it differs (`files.keep_resume_recipe`)."""
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    files.keep_recipe(cfg.run_dir, cfg.to_yaml(), resume=resume)  # a resume's own: Run.resume


@server_app.main()
def _serve(grid: Grid, context: Context) -> None:
    app_process(verbose=flower_verbose())  # Flower's lines at WARNING, fedllm's printed once
    run_config = context.run_config
    resume = bool(run_config.get("resume", False))
    overwrite = bool(run_config.get("overwrite", False))
    if is_recipe_text(str(run_config.get("recipe", ""))):  # `fedllm run --federation`
        cfg = app_recipe(run_config)
        check_server_run_dir(cfg, resume=resume, overwrite=overwrite)
        keep_recipe(cfg, resume=resume)
        if notice := weight_notice(cfg):
            say(f"warning: {notice}")
        run_server(grid, cfg, resume=resume, cache=cache)
        return
    cfg = absolute_paths(app_recipe(run_config))
    nodes = simulated_nodes(grid)
    check_simulation_size(nodes, cfg)
    if notice := simulation_notice(cfg):
        say(notice)
    if nodes is None and (notice := weight_notice(cfg)):  # a simulation's clients are its own
        say(f"warning: {notice}")
    try:
        run_dir = start_run(cfg, resume=resume, overwrite=overwrite)
    except ConfigError as err:
        raise ConfigError(f"{err} ({FLWR_RUN_HINT})") from None
    say(f"run directory {run_dir.resolve()}")
    run_server(grid, cfg, resume=resume, cache=cache)


def _recipe(context: Context) -> RunConfig:
    """This node's copy of the run's recipe (paths pinned as on the server).

    The recipe is the server's to name, and a name may be a path on this node's disk: a load
    error goes back to the server as this node's error reply, so it says only that the recipe
    did not load (its text could quote the file, its kind tell whether the path exists); the
    whole error is in this node's own log. The server loaded the same recipe first and shows
    its own error in a simulation."""
    try:
        cfg = app_recipe(context.run_config)
    except Exception as err:  # whatever it is, it stays on this node
        log.error("the run's recipe did not load on this node: %s", err)
        raise ConfigError(
            "the run's recipe did not load on this node (the reason is in the node's log)"
        ) from None
    if is_recipe_text(str(context.run_config.get("recipe", ""))):
        return cfg
    return absolute_paths(cfg)


@client_app.train(mods=[packing.mod, *registry.client_mods()])  # arrays packed; e.g. SecAgg+
def _train(msg: Message, context: Context) -> Message:
    client_app_process(verbose=flower_verbose())
    cfg = _recipe(context)
    with client.quiet_failure(cfg, "training"):  # a private run sends no error text
        check_node(cfg, context.node_config)
        return client.train(cfg, msg, context=context, cache=cache)


@client_app.query()
def _introduce(msg: Message, context: Context) -> Message:
    client_app_process(verbose=flower_verbose())
    cfg = _recipe(context)
    check_node(cfg, context.node_config)  # a node that refuses the run does not answer either
    return client.introduce(msg, context)


@client_app.evaluate(mods=[packing.mod])
def _evaluate(msg: Message, context: Context) -> Message:
    client_app_process(verbose=flower_verbose())
    cfg = _recipe(context)
    with client.quiet_failure(cfg, "evaluation"):
        check_node(cfg, context.node_config)
        return client.evaluate(cfg, msg, context=context, cache=cache)
