"""The recipe's federation, aggregator and simulation sections: rounds and local optimisation,
the server's aggregation method, and where the Flower simulation engine runs."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from fedllm.recipe.schema_common import Precision, Strict


class FederationConfig(Strict):
    """Rounds, sampling and the clients' local optimisation."""

    rounds: int = Field(3, ge=1)
    clients_per_round: int | None = Field(None, ge=1, description="default: every client")
    local_steps: int | None = Field(20, ge=1)
    local_epochs: float | None = Field(
        None,
        gt=0,
        description="passes over each client's shard per round: ceil(E·ceil(n/batch)/accumulation)"
        " steps (DP-SGD: ceil(E·n/batch) Poisson batches, what its accountant charges)",
    )
    batch_size: int = Field(8, ge=1)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(
        3e-4,
        gt=0,
        description="local step size; 3e-4 is a usual LoRA step for bases of billions of "
        "parameters, the shipped SmolLM2-135M recipes set 0.003 (bench/results/quality.md: "
        "0.001 under-steps the federated methods there)",
    )
    weight_decay: float = Field(0.0, ge=0)
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0, description="local steps of linear warm-up")
    schedule_scope: Literal["federation", "round"] = Field(
        "federation",
        description="'federation': warm-up once and decay across all planned rounds (round r "
        "continues at step (r-1)*steps); 'round': the schedule restarts every round",
    )
    gradient_accumulation_steps: int = Field(
        1, ge=1, description="micro-batches of batch_size per local step (= one bigger batch)"
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in backward: less memory, slower steps"
    )
    precision: Precision = Field(
        "auto",
        description="compute precision of local steps: 'bf16' autocast (LoRA weights and "
        "optimizer stay fp32), 'auto' (bf16 where the device has it natively and the base is "
        "not float16, else fp32; bench/results/quickstart.md: same held-out loss, 0.74x the "
        "round time on SmolLM2), 'fp32'",
    )
    group_by_length: bool = Field(
        False,
        description="draw batches of similar lengths (shuffled pools of 16 batches, each sorted "
        "by length): less padding per step, every example once per epoch; DP-SGD draws its own "
        "Poisson batches and ignores it",
    )
    share_head: bool = Field(
        True,
        description="run the prompt head every row of a batch starts with (the chat template's "
        "system turn) once per batch, its keys/values shared by the rows: the same loss and "
        "gradients to float rounding, fewer tokens per step; DP-SGD's per-example gradients "
        "always run every row in full",
    )
    max_grad_norm: float | None = Field(1.0, gt=0)
    eval_batch_size: int = Field(16, ge=1)
    round_timeout: float = Field(
        3600.0,
        gt=0,
        description="each exchange's deadline in seconds (also the messages' TTL): replies not in "
        "by then are dropped as missed and the round goes on without them",
    )
    node_grace: float = Field(
        0.0,
        ge=0,
        description="seconds each round waits, before sampling, for all num_clients nodes to be "
        "connected (deployments whose nodes restart; simulation nodes are always there)",
    )
    max_rejected_norm_ratio: float | None = Field(
        100.0,
        gt=1,
        description="replies whose norm exceeds this times the median are rejected; null: no "
        "screening by norm (non-finite and wrong-shaped replies are still rejected)",
    )
    evaluate_clients: Literal["all", "none"] | int | float = Field(
        "all",
        description="clients that evaluate each round: all, none, a count or a fraction; the same "
        "seeded panel every round (fedllm.server.evaluation)",
    )

    @field_validator("evaluate_clients", mode="before")
    @classmethod
    def _panel(cls, v: Any) -> Any:
        count = isinstance(v, int) and not isinstance(v, bool) and v >= 1
        fraction = isinstance(v, float) and 0 < v <= 1
        if v not in ("all", "none") and not count and not fraction:
            raise ValueError(
                f"must be 'all', 'none', a count >= 1 or a fraction in (0, 1]; got {v!r}"
            )
        return v

    @model_validator(mode="before")
    @classmethod
    def _epochs_alone(cls, data: Any) -> Any:
        """`local_epochs` given without `local_steps`: the epochs, not the steps' default."""
        if isinstance(data, dict) and data.get("local_epochs") is not None:
            return {"local_steps": None, **data}
        return data

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> FederationConfig:
        steps, epochs = self.local_steps, self.local_epochs
        if steps is None and epochs is None:
            raise ValueError(
                "federation: set local_steps (optimizer steps per round) or local_epochs "
                "(passes over each shard per round); both are null"
            )
        if steps is not None and epochs is not None:
            raise ValueError(
                f"federation: local_steps ({steps}) and local_epochs ({epochs:g}) are both set; "
                "keep one and set the other to null (e.g. federation.local_steps=null)"
            )
        return self

    @model_validator(mode="after")
    def _warmup_ends(self) -> FederationConfig:
        """A warm-up as long as the schedule never reaches `lr`: a mistake, not a plan (known
        here with local_steps; with local_epochs the steps depend on each shard)."""
        if self.local_steps is None or not self.warmup_steps:
            return self
        span = self.local_steps * (self.rounds if self.schedule_scope == "federation" else 1)
        if self.warmup_steps >= span:
            where = (
                f"rounds × local_steps = {self.rounds} × {self.local_steps}"
                if self.schedule_scope == "federation"
                else "local_steps, schedule_scope round"
            )
            raise ValueError(
                f"federation.warmup_steps ({self.warmup_steps}) is not shorter than the schedule's "
                f"{span} steps ({where}), so lr is never reached; use at most {span - 1}"
            )
        return self


class AggregatorConfig(Strict):
    """The server's aggregation method, by registry name, with its options (default svd: at the
    shipped lr 0.003 it beat FedIT on both test sets and squeeze at home, tying it on the test
    set: docs/aggregators.md's short answer)."""

    name: str = "svd"
    weighting: Literal["examples", "uniform"] = "examples"
    global_rank: int | None = Field(None, gt=0)
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _a_name_alone(cls, v: Any) -> Any:
        """`aggregator: svd` is `aggregator: {name: svd}` (the other keys at their defaults)."""
        return {"name": v} if isinstance(v, str) else v


class SimulationConfig(Strict):
    """Resources of the Flower simulation engine (Ray): on this machine, or on an existing Ray
    cluster (`ray_address`) whose nodes run the clients."""

    num_cpus_per_client: float = Field(2.0, gt=0)
    num_gpus_per_client: float = Field(0.0, ge=0)
    ray_address: str | None = Field(
        None,
        description="join this Ray cluster instead of starting Ray here: 'HOST:PORT' of its "
        "head (`ray start --head --port PORT`), 'auto' on one of its machines, or "
        "'ray://HOST:PORT' (Ray Client); every node needs fedllm installed",
    )

    @field_validator("ray_address")
    @classmethod
    def _cluster_address(cls, v: str | None) -> str | None:
        if v is None or v == "auto":
            return v
        host, sep, port = v.removeprefix("ray://").rpartition(":")
        if not (sep and host and port.isdigit() and 0 < int(port) < 65536):
            raise ValueError(
                f"{v!r} is not a Ray cluster address; valid: 'HOST:PORT' (the head's port), "
                "'auto', 'ray://HOST:PORT', or null to start Ray on this machine"
            )
        return v
