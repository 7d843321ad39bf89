"""The recipe's sections for weak devices (`fedllm.constrained`): pruning, the adaptive bandit,
emulated device profiles and message compression."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from fedllm.recipe.schema_common import BasePrecision, Dtype, Strict


class PruningConfig(Strict):
    """How pruned tiers choose what to remove from their base (see `fedllm.constrained.pruning`)."""

    importance: Literal["wanda", "magnitude"] = "wanda"
    calibration_batches: int = Field(4, ge=1, description="local batches for Wanda input norms")
    parts: list[Literal["mlp", "heads"]] = Field(
        default_factory=lambda: ["mlp", "heads"], min_length=1
    )


class AdaptiveConfig(Strict):
    """Per-client (rank, pruning, base precision) chosen online by a bandit over ranks × pruning ×
    quantization (see bandit.py)."""

    algorithm: Literal["ucb", "exp3"] = "ucb"
    ranks: list[int] = Field(min_length=1)
    pruning: list[float] = Field(default_factory=lambda: [0.0], min_length=1)
    quantization: list[BasePrecision] = Field(
        default_factory=lambda: ["none"],
        min_length=1,
        description="base precisions among the arms ('4bit'/'8bit': bitsandbytes)",
    )
    exploration: float = Field(1.0, gt=0, description="UCB bonus c, or EXP3 gamma in (0, 1]")
    time_weight: float = Field(1.0, ge=0, description="reward = loss gain / seconds^time_weight")
    reward: Literal["client", "server"] = Field(
        "client",
        description="whose loss gain: the client's own training losses (on its own, possibly "
        "pruned, base; as FedSpine), or the server's, scoring each reply's adapter on the full "
        "base over data.test_set (sees what pruned training transfers)",
    )
    reward_examples: int = Field(
        64, ge=1, description="reward=server: test-set examples each adapter is scored on"
    )

    @model_validator(mode="after")
    def _arms(self) -> AdaptiveConfig:
        if any(r <= 0 for r in self.ranks):
            raise ValueError(f"ranks must be > 0, got {self.ranks}")
        if any(not 0 <= p < 1 for p in self.pruning):
            raise ValueError(f"pruning ratios must be in [0, 1), got {self.pruning}")
        if self.algorithm == "exp3" and self.exploration > 1:
            raise ValueError(f"exp3 exploration must be in (0, 1], got {self.exploration}")
        return self


class DeviceProfile(Strict):
    """An emulated device class (see `fedllm.constrained.devices`): `clients` partitions, in
    order as in `lora.tiers`, train with this speed and memory; a SuperNode's node config keys
    `threads`, `slowdown` and `memory-mb` override its entry."""

    name: str = "device"
    clients: int = Field(gt=0)
    threads: int | None = Field(None, ge=1, description="torch threads (default: the process's)")
    slowdown: float = Field(
        1.0, ge=1, description="local steps take this x their measured time (emulated: sleep)"
    )
    memory_mb: float | None = Field(
        None, gt=0, description="MiB budget: a plan whose estimated training needs more is refused"
    )


class CompressionConfig(Strict):
    """Training messages in a smaller dtype, optionally top-k sparsified (see compress.py)."""

    dtype: Dtype = "float32"
    topk: float | None = Field(None, gt=0, le=1, description="fraction of update entries sent")
