"""What `fedllm run` and the Flower App (`flwr run .`) do before round 1: the run directory's
rules (--resume needs this recipe's checkpoint, --overwrite deletes only a run folder), paths
pinned for workers that start elsewhere, and everything that can fail checked first."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from fedllm.files import RECIPE, keep_recipe
from fedllm.recipe import ConfigError, RunConfig, build_config, load_yaml
from fedllm.server.checkpoint import CHECKPOINT, PREVIOUS, has_checkpoint, read_checkpoint
from fedllm.server.metrics import METRICS
from fedllm.server.settings_record import aggregator_changed


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
    from fedllm.data.shards import ProcessCache
    from fedllm.features import registry
    from fedllm.model.base import adapter_shapes, base_model_dir, check_ranks
    from fedllm.preflight import check_data, check_length
    from fedllm.server.trackers import check_trackers

    shapes = adapter_shapes(cfg)
    check_ranks(cfg, shapes)
    cache = ProcessCache()  # the data parsed and partitioned once for both checks
    data = check_data(cfg, cache=cache)
    print(f"[fedllm] {data.line(cfg)}; {len(shapes)} adapted modules", flush=True)
    if cut := check_length(cfg, base_model_dir(cfg), cache=cache):
        print(f"[fedllm] {cut}", flush=True)
    for feature in registry.active(cfg):  # e.g. pruned ranks fit, DP fits every shard
        feature.prepare(cfg, shapes=shapes)
    check_trackers(cfg)  # output.trackers installed here (the server logs to them)


def start_run(cfg: RunConfig, *, resume: bool, overwrite: bool, local: bool = True) -> Path:
    """Ready the run directory (resume / overwrite rules), check everything that can fail before
    round 1 and save the resolved recipe; `fedllm run` and the Flower App (`flwr run .`) both."""
    from fedllm.preflight import check_output_dir

    run_dir = cfg.run_dir
    check_output_dir(cfg)  # a file there: said before anything is deleted or written
    if resume and overwrite:
        raise ConfigError(
            "--resume continues the run in its folder and --overwrite deletes that folder; "
            "pass one of them"
        )
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
    keep_recipe(run_dir, cfg.to_yaml(), resume=resume)  # a resume's own: after its checks
    return run_dir


RUN_FILES = (CHECKPOINT, PREVIOUS, RECIPE, METRICS)  # any of these: a fedllm run folder


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
    done = found[0].get("round", 0) if found else 0
    if cfg is not None and done > cfg.federation.rounds:
        raise ConfigError(
            f"--resume: {found[1]} is after round {done}, but federation.rounds is "
            f"{cfg.federation.rounds}; set federation.rounds to {done} or more to continue it"
        )
    saved = found[0].get("fingerprint") if found else None
    if cfg is not None and saved is not None and saved != cfg.fingerprint(budget=False):
        raise ConfigError(
            f"--resume: {found[1]} was made by another recipe{recipe_changes(run_dir, cfg)}; "
            f"resume with the one it was made with ({run_dir / 'recipe.yaml'}), or start a new "
            "run with name=<new name> or --overwrite"
        )
    if cfg is not None and found and (why := aggregator_changed(found[0].get("settings"), cfg)):
        raise ConfigError(f"--resume: {why}")


def recipe_changes(run_dir: Path, cfg: RunConfig, *, most: int = 5) -> str:
    """': key is X there and Y now, ...' between the run's saved recipe and `cfg`, over what the
    checkpoint's fingerprint covers; '' if the saved recipe cannot be read."""
    try:
        then = build_config(load_yaml((run_dir / "recipe.yaml").read_text()) or {})
    except (OSError, yaml.YAMLError, ConfigError):
        return ""
    changes = [
        f"{key} is {old!r} there and {new!r} now"
        for key, old, new in differences(then.pinned(budget=False), cfg.pinned(budget=False))
    ]
    more = f"; and {len(changes) - most} more" if len(changes) > most else ""
    shown = "; ".join(changes[:most]) + more
    return f": {shown}" if changes else ""


def differences(a: object, b: object, *, prefix: str = "") -> list[tuple[str, object, object]]:
    """(dotted key, a's value, b's value) wherever two nested dicts differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in [*a, *(k for k in b if k not in a)]:
            out += differences(a.get(k), b.get(k), prefix=f"{prefix}{k}.")
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
