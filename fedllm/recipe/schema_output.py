"""The recipe's output section: adapter snapshots, the best round's adapter and the experiment
trackers (options of `fedllm.server.trackers`); not part of the recipe fingerprint."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from fedllm.recipe.schema_common import Strict


class TensorBoardTracker(Strict):
    """`output.trackers.tensorboard`: event files for `tensorboard --logdir`."""

    log_dir: str | None = Field(None, description="default: <run_dir>/tensorboard")


class MlflowTracker(Strict):
    """`output.trackers.mlflow`: one MLflow run per fedllm run (resumed with it)."""

    tracking_uri: str | None = Field(
        None, description="default: sqlite:///<run_dir>/mlflow.db (a local file, no server)"
    )
    experiment: str = "fedllm"
    run_name: str | None = Field(None, description="default: the recipe's name")


class WandbTracker(Strict):
    """`output.trackers.wandb`: a Weights & Biases run, offline unless told otherwise."""

    project: str = "fedllm"
    mode: Literal["offline", "online"] = Field(
        "offline", description="offline: files under <dir>/wandb, upload later with `wandb sync`"
    )
    dir: str | None = Field(None, description="default: <run_dir>")
    entity: str | None = None


TRACKERS = ("tensorboard", "mlflow", "wandb")


class TrackersConfig(Strict):
    """Experiment trackers fed from the metrics writer (none by default); a list of names, or
    names with options: `[tensorboard, mlflow]` or `{mlflow: {experiment: x}}`."""

    tensorboard: TensorBoardTracker | None = None
    mlflow: MlflowTracker | None = None
    wandb: WandbTracker | None = None

    @model_validator(mode="before")
    @classmethod
    def _names(cls, value: Any) -> Any:
        if value is None:
            return {}
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list | tuple):
            unknown = [v for v in value if v not in TRACKERS]
            if unknown:
                raise ValueError(f"unknown tracker(s) {unknown}; valid: {', '.join(TRACKERS)}")
            return {name: {} for name in value}
        if isinstance(value, dict):
            return {k: ({} if v is None else v) for k, v in value.items()}
        return value

    @model_serializer(mode="wrap")
    def _on_only(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """The trackers turned on only: `mlflow: null` in a recipe turns mlflow *on* with its
        defaults, so a saved recipe (run_dir/recipe.yaml) must not write the off ones so."""
        return {k: v for k, v in handler(self).items() if v is not None}

    @property
    def names(self) -> list[str]:
        """The trackers turned on, in a fixed order."""
        return [n for n in TRACKERS if getattr(self, n) is not None]


class OutputConfig(Strict):
    """What a run leaves besides its final adapter: snapshots, the best round's adapter,
    experiment trackers.

    Not part of the recipe fingerprint: a resumed run may change them."""

    snapshot_every: int | None = Field(
        None,
        ge=1,
        description="save the global adapter every k rounds in snapshots/round_<r>/ (off: null)",
    )
    best_by: Literal["auto", "held_out_loss", "held_out_vote", "test_loss", "none"] = Field(
        "auto",
        description="keep the global adapter of the round with the lowest value of this metric "
        "in best_adapter/, beside the last round's final_adapter/: held_out_loss (the clients' "
        "held-out splits, token-weighted), held_out_vote (a round replaces the kept one when most "
        "clients that evaluated both scored it lower on their own split: fewer than half the "
        "panel lying cannot outvote the rest), test_loss (the server's data.test_set), none (off; "
        "null too), or auto: held_out_loss where clients evaluate, else test_loss; none under "
        "fedsa, whose server adapter has no B",
    )

    @field_validator("best_by", mode="before")
    @classmethod
    def _null_is_none(cls, value: Any) -> Any:
        return "none" if value is None else value

    trackers: TrackersConfig = TrackersConfig()
