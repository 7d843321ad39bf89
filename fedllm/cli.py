"""`fedllm` command line: run a recipe in Flower's simulation engine, validate, prepare models."""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

import yaml

from fedllm.recipe import ConfigError, RunConfig, build_config, load_recipe
from fedllm.server.checkpoint import CHECKPOINT, PREVIOUS, has_checkpoint, read_checkpoint
from fedllm.server.metrics import METRICS


def absolute_paths(cfg: RunConfig) -> RunConfig:
    """Pin relative paths to this directory: simulation workers may start elsewhere."""
    data = cfg.data
    source = data.source
    if Path(source).expanduser().exists():
        source = str(Path(source).expanduser().resolve())
    return cfg.model_copy(
        update={
            "output_dir": str(Path(cfg.output_dir).expanduser().resolve()),
            "data": data.model_copy(update={"source": source}),
        }
    )


def prepare(cfg: RunConfig) -> None:
    """Everything that can fail before a round starts: base model, rank fit, every client's data."""
    from fedllm.features import registry
    from fedllm.model.base import adapter_shapes, check_ranks
    from fedllm.preflight import check_data
    from fedllm.server.trackers import check_trackers

    shapes = adapter_shapes(cfg)
    check_ranks(cfg, shapes)
    data = check_data(cfg)
    print(f"[fedllm] {data.line(cfg)}; {len(shapes)} adapted modules", flush=True)
    for feature in registry.active(cfg):  # e.g. pruned ranks fit, DP fits every shard
        feature.prepare(cfg, shapes=shapes)
    check_trackers(cfg)  # output.trackers installed here (the server logs to them)


def start_run(cfg: RunConfig, *, resume: bool, overwrite: bool, local: bool = True) -> Path:
    """Ready the run directory (resume / overwrite rules), check everything that can fail before
    round 1 and save the resolved recipe; `fedllm run` and the Flower App (`flwr run .`) both."""
    run_dir = cfg.run_dir
    if resume:
        if local:  # a SuperLink's ServerApp may keep its run folder elsewhere
            check_resumable(run_dir, cfg)
    elif has_checkpoint(run_dir):
        if not overwrite:
            raise ConfigError(
                f"{run_dir} already holds a run; pass --resume to continue it, --overwrite to "
                f"start again, or name=<new name>"
            )
        remove_run_dir(run_dir, Path(cfg.output_dir))
    run_dir.mkdir(parents=True, exist_ok=True)
    prepare(cfg)
    (run_dir / "recipe.yaml").write_text(cfg.to_yaml())
    return run_dir


def cmd_run(args: argparse.Namespace) -> int:
    cfg = absolute_paths(load_recipe(args.recipe, args.overrides))
    run_dir = start_run(
        cfg, resume=args.resume, overwrite=args.overwrite, local=not args.federation
    )
    if args.federation:
        from fedllm.deploy.federation import submit

        return submit(cfg, args.federation, resume=args.resume)

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


RUN_FILES = (CHECKPOINT, PREVIOUS, "recipe.yaml", METRICS)  # any of these: a fedllm run folder


def check_resumable(run_dir: Path, cfg: RunConfig | None = None) -> None:
    """Refuse --resume without a readable checkpoint (it would silently restart from round 0) or
    with a recipe other than the checkpoint's, before anything is prepared or written."""
    if not has_checkpoint(run_dir):
        where = run_dir if run_dir.is_dir() else f"{run_dir} (which does not exist)"
        raise ConfigError(
            f"--resume: no {CHECKPOINT} in {where}, so there is no finished round to continue "
            "from; drop --resume to start this run from round 0 (or check output_dir= and name=)"
        )
    found = read_checkpoint(run_dir)  # CheckpointError naming the file and --overwrite
    saved = found[0].get("fingerprint") if found else None
    if cfg is not None and saved is not None and saved != cfg.fingerprint(budget=False):
        raise ConfigError(
            f"--resume: {found[1]} was made by another recipe{recipe_changes(run_dir, cfg)}; "
            f"resume with the one it was made with ({run_dir / 'recipe.yaml'}), or start a new "
            "run with name=<new name> or --overwrite"
        )


def recipe_changes(run_dir: Path, cfg: RunConfig, *, most: int = 5) -> str:
    """': key is X there and Y now, ...' between the run's saved recipe and `cfg`, over what the
    checkpoint's fingerprint covers; '' if the saved recipe cannot be read."""
    try:
        then = build_config(yaml.safe_load((run_dir / "recipe.yaml").read_text()) or {})
    except (OSError, yaml.YAMLError, ConfigError):
        return ""
    changes = [
        f"{key} is {old!r} there and {new!r} now"
        for key, old, new in differences(then.pinned(budget=False), cfg.pinned(budget=False))
    ]
    more = f"; and {len(changes) - most} more" if len(changes) > most else ""
    shown = "; ".join(changes[:most]) + more
    return f": {shown}" if changes else ""


def differences(a: object, b: object, prefix: str = "") -> list[tuple[str, object, object]]:
    """(dotted key, a's value, b's value) wherever two nested dicts differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in [*a, *(k for k in b if k not in a)]:
            out += differences(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [(prefix.rstrip("."), a, b)]


def remove_run_dir(run_dir: Path, output_dir: Path) -> None:
    """`--overwrite`: delete `run_dir`, only if it is a fedllm run folder inside `output_dir`."""
    target, root = run_dir.resolve(), output_dir.resolve()
    if run_dir.is_symlink():
        raise ConfigError(
            f"--overwrite: refusing to delete {run_dir}: it is a symbolic link (to {target}), "
            "and --overwrite deletes only a real run folder; remove it by hand or use a new name="
        )
    if target == root or not target.is_relative_to(root):
        raise ConfigError(
            f"--overwrite: refusing to delete {run_dir}: it resolves to {target}, which is not a "
            f"folder inside output_dir {root}; remove it by hand or use a new name="
        )
    if not target.is_dir() or not any((target / f).is_file() for f in RUN_FILES):
        raise ConfigError(
            f"--overwrite: refusing to delete {run_dir}: it does not look like a fedllm run "
            f"(none of {', '.join(RUN_FILES)} in it); remove it by hand or use a new name="
        )
    shutil.rmtree(target)


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
    overrides += args.overrides  # --set KEY=VALUE, kept as an alias
    if not args.config_only:
        from fedllm.preflight import check_machine
    failed = 0
    for path in recipes:
        try:
            cfg = load_recipe(path, overrides)
            data = None if args.config_only else check_machine(absolute_paths(cfg))
        except (ConfigError, FileNotFoundError, ValueError) as err:
            print(f"fedllm: error: {err}", file=sys.stderr)
            failed += 1
            continue
        print(
            f"ok  {path}: {cfg.name}, {cfg.data.num_clients} clients, "
            f"aggregator {cfg.aggregator.name}"
        )
        if data is not None:
            print(f"    {data.line(cfg)}")
    return 2 if failed else 0


def cmd_prepare(args: argparse.Namespace) -> int:
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
        base_name=args.base_name,
        dtype=args.dtype,
    )
    what = "merged model" if args.merge else "adapter"
    print(f"[fedllm] {what} written to {out} (model card: {out / 'README.md'})", flush=True)
    return 0


def add_export_command(sub) -> None:
    """`fedllm export RUN_DIR OUT [--merge] [--client N | --round K]`."""
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
    exp.add_argument("--round", type=int, metavar="K", help="the snapshot of round K")
    exp.add_argument(
        "--base-name",
        metavar="PATH_OR_HUB_ID",
        help="set base_model_name_or_path to your copy of the base (adapter export)",
    )
    exp.add_argument("--dtype", help="weights of the merged model (default: the recipe's dtype)")
    exp.set_defaults(fn=cmd_export)


def build_parser() -> argparse.ArgumentParser:
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


if __name__ == "__main__":
    sys.exit(main())
