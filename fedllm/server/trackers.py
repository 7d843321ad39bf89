"""Experiment trackers fed by the one metrics writer: TensorBoard, MLflow, W&B (offline).

`MetricsLog.write` hands every batch of rows to each sink the recipe names under
`output.trackers`; a sink logs the rows' numbers as scalars at step = round (`server/<key>` for
the round's server row, `client_<p>/<key>` for a client's training and evaluation rows). Each
tracker's package is imported only when the recipe asks for it; a missing one is an error naming
the pip extra. A resumed run continues the same MLflow / W&B run (ids kept in `trackers.json`),
and a round reaches the trackers once its checkpoint is saved, so a repeated round appears once;
`trackers.json` also keeps the last round published, so a resume sends the trackers a
checkpointed round a crash kept from them. Not covered: a resume that falls back to
`checkpoint.prev.pt` reruns a round the trackers already have, and sends it again (TensorBoard and
MLflow then hold both values at that step, metrics.jsonl the rerun's). A resumed W&B offline run
is a second `offline-run-*` folder of the same run id: sync both.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from fedllm.files import write_atomic
from fedllm.recipe.checks import ConfigError
from fedllm.recipe.schema import RunConfig
from fedllm.recipe.schema_output import MlflowTracker, TensorBoardTracker, WandbTracker

log = logging.getLogger(__name__)

EXTRA = "pip install -e '.[trackers]'"  # in the checkout: PyPI's 'fedllm' is another project
PACKAGES = {  # tracker -> (module it needs, pip package)
    "tensorboard": ("tensorboard", "tensorboard"),
    "mlflow": ("mlflow", "mlflow-skinny"),
    "wandb": ("wandb", "wandb"),
}
IDS = "trackers.json"  # the MLflow / W&B run ids of this fedllm run, for --resume
PUBLISHED = "published_round"  # in IDS: the last round the trackers got (-1: none yet)
NOT_METRICS = frozenset({"round", "partition"})


class Sink(Protocol):
    """Where scalars go: `log` one step's scalars, `close` at the end of the run."""

    name: str

    def log(self, scalars: dict[str, float], step: int) -> None:
        """Record one step's scalars (tag -> value) at `step`, the round."""

    def close(self) -> None:
        """Finish the run's logging (flush, mark the tracker's run ended)."""


def check_trackers(cfg: RunConfig) -> None:
    """Refuse a recipe whose trackers are not installed here, before any round runs."""
    for name in cfg.output.trackers.names:
        module, package = PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(
                f"output.trackers: {name} needs the package {package!r}, which is not installed; "
                f"{EXTRA} (or pip install {package}), or drop {name} from output.trackers"
            )


def scalars_by_round(rows: Iterable[dict[str, Any]]) -> dict[int, dict[str, float]]:
    """round -> {tag: value} for the numbers in metrics rows (flags and text left out)."""
    out: dict[int, dict[str, float]] = {}
    for row in rows:
        kind = row.get("kind")
        if kind == "server":
            prefix = "server"
        elif kind in ("client", "eval") and "partition" in row:
            prefix = f"client_{row['partition']}"
        else:
            continue
        step = out.setdefault(int(row["round"]), {})
        for key, value in row.items():
            if key in NOT_METRICS or isinstance(value, bool):
                continue
            if isinstance(value, int | float):
                step[f"{prefix}/{key}"] = float(value)
    return out


class TensorBoardSink:
    """Scalars in TensorBoard event files (`tensorboard --logdir <run_dir>/tensorboard`)."""

    name = "tensorboard"

    def __init__(self, cfg: RunConfig, options: TensorBoardTracker) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(options.log_dir or cfg.run_dir / "tensorboard")
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def log(self, scalars: dict[str, float], step: int) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()  # on disk at once: a crash or a reader mid-run sees every round

    def close(self) -> None:
        self.writer.close()


class MlflowSink:
    """Scalars in an MLflow run; by default a local SQLite store (`mlflow ui --backend-store-uri
    sqlite:///<run_dir>/mlflow.db`). MLflow 3 refuses its old file store unless an environment
    variable is set, which fedllm never does: name a `file:` URI only if you set it yourself."""

    name = "mlflow"

    def __init__(self, cfg: RunConfig, options: MlflowTracker, *, ids: dict[str, str]) -> None:
        from mlflow.tracking import MlflowClient

        db = (cfg.run_dir / "mlflow.db").resolve()
        self.uri = options.tracking_uri or f"sqlite:///{db}"
        self.client = MlflowClient(tracking_uri=self.uri)
        found = self.client.get_experiment_by_name(options.experiment)
        if found is not None:
            experiment = found.experiment_id
        else:
            artifacts = (cfg.run_dir / "mlartifacts").resolve().as_uri()
            experiment = self.client.create_experiment(
                options.experiment, artifact_location=None if options.tracking_uri else artifacts
            )
        if "mlflow" in ids:  # --resume: continue the same run
            self.run_id = ids["mlflow"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            run = self.client.create_run(
                experiment,
                run_name=options.run_name or cfg.name,
                tags={"fedllm.recipe_fingerprint": cfg.fingerprint()},
            )
            self.run_id = run.info.run_id
            self.client.log_batch(self.run_id, params=_params(cfg))
        ids["mlflow"] = self.run_id

    def log(self, scalars: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(tag, value, now, step) for tag, value in scalars.items()]
        for i in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics a batch
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class WandbSink:
    """Scalars in a W&B run, offline by default (`wandb sync <dir>/wandb/offline-run-*`)."""

    name = "wandb"

    def __init__(self, cfg: RunConfig, options: WandbTracker, *, ids: dict[str, str]) -> None:
        import wandb

        folder = Path(options.dir or cfg.run_dir)
        folder.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=options.project,
            entity=options.entity,
            name=cfg.name,
            id=ids.get("wandb"),
            resume="allow" if "wandb" in ids else None,
            dir=str(folder),
            mode=options.mode,
            config=cfg.model_dump(mode="json", exclude={"output_dir"}),
            settings=wandb.Settings(silent=True, console="off"),
        )
        ids["wandb"] = self.run.id

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        import wandb

        self.run.finish()
        if wandb.run is None:  # no other W&B run here: wait until every record is on disk (the
            wandb.teardown()  # atexit hook that would is unreliable under Ray/multiprocessing)


def _params(cfg: RunConfig) -> list:
    """The recipe keys a tracker shows as run parameters (flattened, dotted)."""
    from mlflow.entities import Param

    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            flat[prefix] = value

    walk("", cfg.model_dump(mode="json", exclude={"output_dir", "output"}))
    return [Param(k, str(v)[:500]) for k, v in sorted(flat.items())]


def load_ids(path: Path) -> dict[str, Any]:
    """The trackers' run ids of an earlier attempt ({} if none; a file a crash left half-written
    is a fresh start, not a failed resume: it is written atomically since)."""
    try:
        ids = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        return {}
    return ids if isinstance(ids, dict) else {}


def open_trackers(cfg: RunConfig) -> list[Sink]:
    """The sinks the recipe names (none: an empty list, and nothing imported)."""
    trackers = cfg.output.trackers
    if not trackers.names:
        return []
    check_trackers(cfg)
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    ids_path = cfg.run_dir / IDS
    fresh = not ids_path.is_file()  # a run from before the key has a file: nothing resent
    ids = load_ids(ids_path)
    if fresh:
        ids[PUBLISHED] = -1
    sinks: list[Sink] = []
    if trackers.tensorboard is not None:
        sinks.append(TensorBoardSink(cfg, trackers.tensorboard))
    if trackers.mlflow is not None:
        sinks.append(MlflowSink(cfg, trackers.mlflow, ids=ids))
    if trackers.wandb is not None:
        sinks.append(WandbSink(cfg, trackers.wandb, ids=ids))
    write_atomic(ids_path, json.dumps(ids, indent=2))
    return sinks


def published_round(run_dir: Path) -> int | None:
    """The last round the run's trackers were sent (None: not recorded, e.g. no trackers)."""
    return _published(load_ids(run_dir / IDS))


def _published(ids: dict[str, Any]) -> int | None:
    value = ids.get(PUBLISHED)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def mark_published(run_dir: Path, server_round: int) -> None:
    """Record that the trackers have every round up to `server_round` (atomically)."""
    path = run_dir / IDS
    ids = load_ids(path)  # read once: the ids and the mark
    before = _published(ids)
    ids[PUBLISHED] = server_round if before is None else max(server_round, before)
    write_atomic(path, json.dumps(ids, indent=2))
