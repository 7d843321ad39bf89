"""`fedllm` command line: run a recipe in Flower's simulation engine, validate, prepare models."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from fedllm.errors import RunFailed
from fedllm.launch import absolute_paths, prepare, start_run
from fedllm.recipe import ConfigError, load_recipe
from fedllm.recipe.schema_data import describe_source
from fedllm.recipe.shipped import looks_like_key


def cmd_run(args: argparse.Namespace) -> int:
    """`fedllm run`: a simulation here, or (with --federation) a run submitted to a SuperLink."""
    cfg = absolute_paths(load_recipe(args.recipe, args.overrides))
    if args.federation:  # a connection name flwr does not know fails now, not after prepare
        from fedllm.deploy.flower_env import check_connection

        check_connection(args.federation)
    run_dir = start_run(
        cfg, resume=args.resume, overwrite=args.overwrite, local=not args.federation
    )
    if args.federation:
        from fedllm.deploy.submit import submit

        return submit(cfg, args.federation, resume=args.resume, overwrite=args.overwrite)

    from flwr.simulation import run_simulation

    from fedllm.client.app import make_client_app
    from fedllm.preflight import check_gpus
    from fedllm.processes import simulation_ray
    from fedllm.server.app import make_server_app

    sim = cfg.simulation
    cpus = sim.num_cpus_per_client
    if sim.ray_address is None:  # on a cluster its nodes bound a client's CPUs, not this machine
        cpus = min(cpus, float(_cpu_count()))
        check_gpus(sim.num_gpus_per_client)  # (on a cluster its nodes give them)
    with simulation_ray(address=sim.ray_address, verbose=args.verbose, num_cpus_per_client=cpus):
        run_simulation(
            server_app=make_server_app(cfg, resume=args.resume),
            client_app=make_client_app(cfg),
            num_supernodes=cfg.data.num_clients,
            backend_config={
                "client_resources": {"num_cpus": cpus, "num_gpus": sim.num_gpus_per_client}
            },
            verbose_logging=args.verbose,
        )
    if not (run_dir / "final_adapter" / "adapter_config.json").exists():
        print(f"[fedllm] run did not finish: no adapter in {run_dir}", file=sys.stderr)
        return 1
    return 0


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def split_recipes(items: list[str]) -> tuple[list[str], list[str]]:
    """Split arguments into recipes and `key=value` overrides: '=' and not an existing file."""
    recipes: list[str] = []
    overrides: list[str] = []
    for item in items:
        (overrides if "=" in item and not Path(item).is_file() else recipes).append(item)
    return recipes, overrides


def cmd_validate(args: argparse.Namespace) -> int:
    """Check every recipe with the same overrides, then (unless --config-only) what it needs of
    this machine: its data loads and gives every client examples, its trackers are installed,
    its GPUs exist. Report each bad one and exit 2 if any is bad."""
    recipes, overrides = split_recipes(args.items)
    if not recipes:
        raise ConfigError("validate needs at least one recipe path (got only key=value overrides)")
    if bare := [r for r in recipes if looks_like_key(r)]:  # before any recipe is called ok
        key, colon, value = bare[0].partition(":")  # YAML's `key: value` written on the line
        example = f"{key}={value.strip()}" if colon and value.strip() else f"{key}=2"
        raise ConfigError(
            f"{bare[0]!r} is neither a recipe file nor key=value (e.g. {example}); "
            "nothing was validated"
        )
    overrides += args.overrides  # --set KEY=VALUE, kept as an alias
    from fedllm.features.registry import active
    from fedllm.methods_cmd import origin

    if not args.config_only:
        from fedllm.preflight import check_machine
    failed = 0
    for path in recipes:
        try:
            cfg = absolute_paths(load_recipe(path, overrides))  # as `fedllm run` resolves it
            found = [] if args.config_only else check_machine(cfg)
        except (ConfigError, FileNotFoundError, ValueError) as err:
            named = len(recipes) == 1 or str(path) in str(err)
            where = "" if named else f"{path}: "  # which of several recipes failed
            print(f"fedllm: error: {where}{err}", file=sys.stderr)
            failed += 1
            continue
        print(
            f"ok  {path}: {cfg.name}, {cfg.data.num_clients} clients, "
            f"aggregator {cfg.aggregator.name}"
        )
        on = [f"{c.name}{origin(c.__module__, short=True)}" for c in active(cfg)]
        print(f"    data {describe_source(cfg.data.source)}")  # a far typo reads as the hub
        print(f"    features {', '.join(on)}")  # a plugin's, marked: is it found and on?
        print(f"    recipe-hash {cfg.recipe_hash()}")  # what `fedllm node --recipe-hash` pins
        for line in found:
            print(f"    {line}")
    return 2 if failed else 0


def cmd_prepare(args: argparse.Namespace) -> int:
    """`fedllm prepare`: ready the base model and check the ranks and every client's data
    (`launch.prepare`), before any round."""
    cfg = absolute_paths(load_recipe(args.recipe, args.overrides))
    prepare(cfg)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """`fedllm export`: the run's adapter (portable), or merged into its base."""
    from fedllm.export import export

    out = export(
        Path(args.run_dir),
        Path(args.out),
        merge=args.merge,
        client=args.client,
        round=args.round,
        best=args.best,
        base_name=args.base_name,
        dtype=args.dtype,
    )
    what = "merged model" if args.merge else "adapter"
    print(f"[fedllm] {what} written to {out} (model card: {out / 'README.md'})", flush=True)
    return 0


def add_export_command(sub: argparse._SubParsersAction) -> None:
    """`fedllm export RUN_DIR OUT [--merge] [--client N | --round K | --best]`."""
    exp = sub.add_parser(
        "export",
        help="write a run's adapter as a portable PEFT folder, or --merge it into its base",
    )
    exp.add_argument("run_dir", help="a finished run's folder, e.g. runs/quickstart")
    exp.add_argument("out", help="a new (or empty) folder to write")
    exp.add_argument(
        "--merge",
        action="store_true",
        help="a plain Hugging Face model (base + adapter merged, with its tokenizer)",
    )
    exp.add_argument("--client", type=int, metavar="N", help="client N's adapter (default: global)")
    exp.add_argument(
        "--round", type=int, metavar="K", help="round K's adapter (a snapshot, the best, the final)"
    )
    exp.add_argument(
        "--best", action="store_true", help="the best round's adapter (output.best_by)"
    )
    exp.add_argument(
        "--base-name",
        metavar="PATH_OR_HUB_ID",
        help="set base_model_name_or_path to your copy of the base (adapter export)",
    )
    exp.add_argument("--dtype", help="weights of the merged model (default: the recipe's dtype)")
    exp.set_defaults(fn=cmd_export)


def build_parser() -> argparse.ArgumentParser:
    """Every subcommand with its flags (deployment and eval commands add their own)."""
    parser = argparse.ArgumentParser(prog="fedllm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a recipe in Flower's simulation engine")
    run.add_argument("recipe", help="a YAML recipe, or a shipped recipe's name (`fedllm recipes`)")
    run.add_argument("overrides", nargs="*", help="key=value overrides, e.g. federation.rounds=2")
    run.add_argument("--resume", action="store_true", help="continue from the last finished round")
    run.add_argument("--overwrite", action="store_true", help="delete an existing run of this name")
    run.add_argument(
        "--federation",
        metavar="CONNECTION",
        help="submit to a running SuperLink (a connection in $FLWR_HOME/config.toml) instead of "
        "simulating; see docs/deployment.md",
    )
    run.add_argument(
        "-v", "--verbose", action="store_true", help="also Flower's and Ray's own log lines"
    )
    run.set_defaults(fn=cmd_run)

    val = sub.add_parser(
        "validate",
        help="check recipes without running them",
        usage="%(prog)s [-h] [--config-only] [--set KEY=VALUE] RECIPE [RECIPE ...] [KEY=VALUE ...]",
    )
    val.add_argument(
        "items",
        nargs="+",
        metavar="RECIPE|KEY=VALUE",
        help="YAML recipes, and key=value overrides applied to each of them (as for run)",
    )
    val.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an override (same as a positional key=value)",
    )
    val.add_argument(
        "--config-only",
        action="store_true",
        help="check the recipe alone, not its data, trackers and GPUs on this machine (for a "
        "recipe that runs elsewhere, e.g. on SuperNodes with their own data)",
    )
    val.set_defaults(fn=cmd_validate)

    prep = sub.add_parser("prepare", help="convert/build the base model and check the data")
    prep.add_argument("recipe")
    prep.add_argument("overrides", nargs="*")
    prep.set_defaults(fn=cmd_prepare)

    from fedllm.deploy.cli import add_deploy_commands

    add_deploy_commands(sub)
    from fedllm.eval.cli import add_eval_commands

    add_eval_commands(sub)
    add_export_command(sub)
    from fedllm.recipes_cmd import add_recipes_command

    add_recipes_command(sub)
    from fedllm.methods_cmd import add_methods_command

    add_methods_command(sub)
    return parser


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse a command line; `key=value` overrides may come before or after any flag
    (`fedllm run R name=x --overwrite data.source=...`), as a recipe's overrides."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if extra and (stray or not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    """The `fedllm` command: parse, run the subcommand; a known error is one line and exit code
    2 (130 on Ctrl-C)."""
    args = parse(argv)
    logger = logging.getLogger("fedllm")
    if not logger.handlers:  # main() may run more than once in a process (tests, notebooks)
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    from fedllm.processes import command_process

    verbose = getattr(args, "verbose", False)  # Flower's own logs otherwise at WARNING, except
    quiet = not getattr(args, "flower_service", False)  # in a SuperLink/SuperNode: its own log
    try:
        with command_process(verbose=verbose, quiet_flower=quiet):
            return args.fn(args)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"fedllm: error: {err}", file=sys.stderr)
        return 2
    except RunFailed as err:
        print(f"fedllm: error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # a file system's refusal (not a folder, no permission, disk full)
        if verbose:
            raise
        print(f"fedllm: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # finished rounds are checkpointed; reports and exports whole
        print("fedllm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
