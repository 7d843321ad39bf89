"""The recipe schema: typed, frozen sections, validated at construction.

Field-level rules live here; checks that span sections (aggregator options, features, privacy
with secure aggregation, ...) live in `fedllm.recipe.checks`, which `RunConfig` calls.
"""

from __future__ import annotations

import hashlib
import math
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from fedllm.recipe.checks import cross_check


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        """`rounds: true` is a mistake, not 1 round: a number field takes no boolean (pydantic's
        lax mode would)."""
        ann = cls.model_fields[info.field_name].annotation
        forms = {ann, *typing.get_args(ann)}
        if isinstance(value, bool) and forms & {int, float} and bool not in forms:
            raise ValueError(f"expected a number, got a boolean ({str(value).lower()})")
        return value


class TinyModelConfig(_Strict):
    """A small Llama built from config, with a BPE tokenizer trained on the run's own data."""

    vocab_size: int = Field(512, ge=64)
    hidden_size: int = Field(64, ge=8)
    intermediate_size: int = Field(128, ge=8)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int = Field(2, ge=1)
    max_position_embeddings: int = Field(256, ge=16)


def _looks_like_path(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~")) or value.endswith(DATA_SUFFIXES)


DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
BasePrecision = Literal["none", "4bit", "8bit"]  # "4bit"/"8bit": bitsandbytes


def _must_exist(value: str, what: str) -> str:
    if _looks_like_path(value) and not Path(value).expanduser().exists():
        raise ValueError(f"{what} {value!r} does not exist")
    return value


class ModelConfig(_Strict):
    """Which frozen base model the clients adapt."""

    name: str = Field(
        "smollm2-135m",
        description="'smollm2-135m' (embedded), 'tiny' (built from config), a local HF folder, "
        "or a hub id available offline",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32",
        description="storage dtype of the frozen base weights (LoRA weights stay float32); "
        "compute precision is federation.precision",
    )
    quantization: BasePrecision = "none"
    attention: Literal["auto", "eager", "sdpa"] = Field(
        "auto",
        description="attention implementation: 'auto' is eager on the CPU for data.max_length "
        "<= 256 (a bf16 LoRA step at 64 tokens in 0.88x sdpa's time; 1.09x at 512) and sdpa "
        "otherwise; 'eager' or 'sdpa' to choose",
    )
    tiny: TinyModelConfig = TinyModelConfig()

    @field_validator("name")
    @classmethod
    def _local_folder_exists(cls, v: str) -> str:
        return _must_exist(v, "local model folder")


class TierConfig(_Strict):
    """A device tier: `clients` partitions of this tier train LoRA at `rank`.

    Constrained tiers may prune their frozen base (`pruning` ratio, see
    `fedllm.constrained.pruning`) and
    load it quantized (`quantization`; default: the model's setting).
    """

    name: str
    rank: int = Field(gt=0)
    clients: int = Field(gt=0)
    pruning: float = Field(0.0, description="fraction of MLP channels and query heads removed")
    quantization: BasePrecision | None = None

    @field_validator("pruning")
    @classmethod
    def _pruning_ratio(cls, v: float) -> float:
        if not 0 <= v < 1:
            raise ValueError(f"pruning ratio must be in [0, 1), got {v}")
        return v


class RankRule(_Strict):
    """Ranks spread geometrically (or linearly) from `min` to `max` over the clients."""

    min: int = Field(gt=0)
    max: int = Field(gt=0)
    spacing: Literal["geometric", "linear"] = "geometric"

    @model_validator(mode="after")
    def _ordered(self) -> RankRule:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) must be <= max ({self.max})")
        return self


class LoraConfig(_Strict):
    """The LoRA adapters: where they go, how they scale, each client's rank."""

    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    ranks: int | list[int] | RankRule | None = Field(
        8, description="one rank for all, a list cycled over clients, or a rule {min, max, spacing}"
    )
    tiers: list[TierConfig] | None = None

    @field_validator("ranks")
    @classmethod
    def _positive(cls, v: Any) -> Any:
        values = [v] if isinstance(v, int) else v if isinstance(v, list) else []
        if isinstance(v, list) and not v:
            raise ValueError("the list of ranks is empty; give at least one rank")
        for r in values:
            if r <= 0:
                raise ValueError(f"every rank must be > 0, got {r}")
        return v


class CanaryConfig(_Strict):
    """Secret canaries inserted into chosen clients' training shards, for measuring leakage.

    Each entry of `repeats` is one distinct canary (per client and per `per_repeat`) inserted
    that many times; its secret is `digits` random digits, asked for by `prefix` ({name} names it).
    """

    prefix: str = "What is the secret number of {name}?"
    digits: int = Field(9, ge=1, le=18)
    repeats: list[int] = Field(default_factory=lambda: [1, 4, 16], min_length=1)
    per_repeat: int = Field(1, ge=1)
    clients: list[int] = Field(default_factory=lambda: [0], min_length=1)
    references: int = Field(
        250,
        ge=10,
        description="reference secrets sampled per canary for exposure (skew-normal fit; "
        "bench/exposure_refs.py shows what fewer or more change)",
    )

    @field_validator("repeats")
    @classmethod
    def _positive_repeats(cls, v: list[int]) -> list[int]:
        if any(k < 1 for k in v):
            raise ValueError(f"every repeat count must be >= 1, got {v}")
        return v


class TestSetConfig(_Strict):
    """A global test set the server evaluates itself with the global adapter: drawn from every
    domain (label) before the clients' partition, so no client holds it (see
    `fedllm.data.partition.hold_out_test`)."""

    fraction: float = Field(0.05, ge=0, lt=1, description="of every label's examples")
    labels: list[str] = Field(
        default_factory=list, description="whole labels (domains) no client holds"
    )
    max_examples: int | None = Field(1000, gt=0, description="a seeded subset of at most this")

    @model_validator(mode="after")
    def _not_empty(self) -> TestSetConfig:
        if self.fraction == 0 and not self.labels:
            raise ValueError("set fraction > 0 or name labels, else the test set is empty")
        return self


class DataConfig(_Strict):
    """Where the examples come from and how they are split over clients."""

    source: str = Field(
        "wordnet", description="'wordnet', 'fortunes', a local file/folder, or a hub name"
    )
    pos: list[Literal["noun", "verb", "adj", "adv"]] = Field(
        default_factory=lambda: ["noun", "verb", "adj", "adv"]
    )
    prompt_field: str = "prompt"
    response_field: str = "response"
    label_field: str | None = None
    max_examples: int | None = Field(None, gt=0)
    prompt_format: Literal["chat", "plain"] = "chat"
    partitioner: Literal["iid", "dirichlet", "domain"] = "domain"
    dirichlet_alpha: float = Field(0.5, gt=0)
    num_clients: int = Field(4, ge=1)
    held_out: float = Field(0.1, gt=0, lt=1)
    max_length: int = Field(64, ge=8)
    canaries: CanaryConfig | None = Field(None, description="leakage canaries (off by default)")
    seed: int | None = Field(
        None,
        description="seed of the data (subset, test set, partition, held-out splits, canaries); "
        "default: the run's seed. Fix it to vary only LoRA init, sampling and order across seeds",
    )
    test_set: TestSetConfig | None = Field(
        None, description="a global test set evaluated by the server (off by default)"
    )

    @field_validator("source")
    @classmethod
    def _local_data_exists(cls, v: str) -> str:
        return _must_exist(v, "local dataset (a JSON/JSONL/CSV/Parquet file or a saved folder)")


class FederationConfig(_Strict):
    """Rounds, sampling and the clients' local optimisation."""

    rounds: int = Field(3, ge=1)
    clients_per_round: int | None = Field(None, ge=1, description="default: every client")
    local_steps: int | None = Field(20, ge=1)
    local_epochs: float | None = Field(None, gt=0)
    batch_size: int = Field(8, ge=1)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(3e-4, gt=0)
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
    precision: Literal["fp32", "bf16", "auto"] = Field(
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
    max_rejected_norm_ratio: float = Field(
        100.0, gt=1, description="replies whose norm exceeds this times the median are rejected"
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

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> FederationConfig:
        if (self.local_steps is None) == (self.local_epochs is None):
            raise ValueError("set exactly one of local_steps and local_epochs (the other to null)")
        return self


class AggregatorConfig(_Strict):
    """The server's aggregation method, by registry name, with its options."""

    name: str = "svd"
    weighting: Literal["examples", "uniform"] = "examples"
    global_rank: int | None = Field(None, gt=0)
    options: dict[str, Any] = Field(default_factory=dict)


class PruningConfig(_Strict):
    """How pruned tiers choose what to remove from their base (see `fedllm.constrained.pruning`)."""

    importance: Literal["wanda", "magnitude"] = "wanda"
    calibration_batches: int = Field(4, ge=1, description="local batches for Wanda input norms")
    parts: list[Literal["mlp", "heads"]] = Field(
        default_factory=lambda: ["mlp", "heads"], min_length=1
    )


class AdaptiveConfig(_Strict):
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


class DeviceProfile(_Strict):
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


class CompressionConfig(_Strict):
    """Training messages in a smaller dtype, optionally top-k sparsified (see compress.py)."""

    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    topk: float | None = Field(None, gt=0, le=1, description="fraction of update entries sent")


class SimulationConfig(_Strict):
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


class SecureAggregationConfig(_Strict):
    """Flower's SecAgg+ for training rounds (see `fedllm.privacy.secagg`): the server sees only
    sums.

    What clients send follows the aggregator: ffa (padded B), fedit (padded B and A) or svd
    (dense sᵢBᵢAᵢ). Shares and threshold are counts (int) or fractions of the sampled clients.
    """

    enabled: bool = False
    num_shares: int | float = Field(
        1.0, gt=0, description="key shares per client (int or fraction)"
    )
    reconstruction_threshold: int | float = Field(
        0.5, gt=0, description="shares needed to unmask (int, or fraction of num_shares)"
    )
    clipping_range: float = Field(8.0, gt=0, description="weighted entries clipped to ±this")
    quantization_range: int = Field(2**24, ge=2, description="integer levels over the clip range")
    max_weight: float | None = Field(
        None, gt=0, description="largest client weight (default: data.max_examples)"
    )

    @model_validator(mode="after")
    def _protocol(self) -> SecureAggregationConfig:
        shares, threshold = self.num_shares, self.reconstruction_threshold
        if isinstance(shares, int) and shares != 1 and shares <= 2:
            raise ValueError(f"num_shares as a count must be > 2 (or a fraction), got {shares}")
        if isinstance(shares, float) and shares > 1:
            raise ValueError(f"num_shares as a fraction must be in (0, 1], got {shares}")
        if isinstance(threshold, float) and threshold > 1:
            raise ValueError(
                f"reconstruction_threshold as a fraction must be <= 1, got {threshold}"
            )
        if isinstance(threshold, int) and isinstance(shares, int) and 1 < shares <= threshold:
            raise ValueError(
                f"reconstruction_threshold ({threshold}) must be below num_shares ({shares})"
            )
        return self


class PrivacyConfig(_Strict):
    """Differential privacy: sample-level DP-SGD on clients, or client-level DP (DP-FedAvg)."""

    mode: str = Field(
        "none",
        description="'none', or a DP mechanism's name: 'sample' (DP-SGD), 'client' (DP-FedAvg), "
        "or any mechanism a module of fedllm/privacy/ registers (Feature.privacy_mode)",
    )
    noise_multiplier: float | None = Field(None, gt=0, description="DP-SGD σ (mode sample)")
    target_epsilon: float | None = Field(
        None, gt=0, description="derive σ (sample) or z (client) for the planned rounds instead"
    )
    delta: float = Field(1e-5, gt=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0, description="per-sample clipping norm C (sample)")
    client_clip: float = Field(1.0, gt=0, description="client update clipping norm S (client)")
    client_noise_multiplier: float | None = Field(None, gt=0, description="z (mode client)")
    noise_at: Literal["server", "client"] = "server"
    accountant: Literal["rdp", "prv"] = "rdp"
    epsilon_budget: float | None = Field(
        None, gt=0, description="stop before the round that would spend more than this ε"
    )
    secure_aggregation: SecureAggregationConfig = SecureAggregationConfig()

    @model_validator(mode="after")
    def _coherent(self) -> PrivacyConfig:
        common = {"mode", "target_epsilon", "delta", "accountant", "epsilon_budget"}
        common |= {"secure_aggregation"}  # any mode
        own = {
            "none": {"mode", "secure_aggregation"},
            "sample": common | {"noise_multiplier", "max_grad_norm"},
            "client": common | {"client_noise_multiplier", "client_clip", "noise_at"},
        }.get(self.mode, set(type(self).model_fields))  # another mechanism checks its own keys
        # only values that differ from the default: a dumped recipe (recipe.yaml) must load back
        defaults = {k: f.default for k, f in type(self).model_fields.items()}
        stray = sorted(
            k for k in self.model_fields_set - own if getattr(self, k) not in (None, defaults[k])
        )
        if stray:
            raise ValueError(
                f"privacy.{stray[0]} does not apply to privacy.mode={self.mode!r} "
                f"(keys for this mode: {', '.join(sorted(own))})"
            )
        sigma = {"sample": "noise_multiplier", "client": "client_noise_multiplier"}.get(self.mode)
        if sigma and (getattr(self, sigma) is None) == (self.target_epsilon is None):
            raise ValueError(
                f"privacy.mode={self.mode!r}: set exactly one of privacy.{sigma} and "
                "privacy.target_epsilon"
            )
        return self


class TensorBoardTracker(_Strict):
    """`output.trackers.tensorboard`: event files for `tensorboard --logdir`."""

    log_dir: str | None = Field(None, description="default: <run_dir>/tensorboard")


class MlflowTracker(_Strict):
    """`output.trackers.mlflow`: one MLflow run per fedllm run (resumed with it)."""

    tracking_uri: str | None = Field(
        None, description="default: sqlite:///<run_dir>/mlflow.db (a local file, no server)"
    )
    experiment: str = "fedllm"
    run_name: str | None = Field(None, description="default: the recipe's name")


class WandbTracker(_Strict):
    """`output.trackers.wandb`: a Weights & Biases run, offline unless told otherwise."""

    project: str = "fedllm"
    mode: Literal["offline", "online"] = Field(
        "offline", description="offline: files under <dir>/wandb, upload later with `wandb sync`"
    )
    dir: str | None = Field(None, description="default: <run_dir>")
    entity: str | None = None


TRACKERS = ("tensorboard", "mlflow", "wandb")


class TrackersConfig(_Strict):
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

    @property
    def names(self) -> list[str]:
        """The trackers turned on, in a fixed order."""
        return [n for n in TRACKERS if getattr(self, n) is not None]


class OutputConfig(_Strict):
    """What a run leaves besides its final adapter: adapter snapshots, experiment trackers.

    Not part of the recipe fingerprint: a resumed run may change them."""

    snapshot_every: int | None = Field(
        None,
        ge=1,
        description="save the global adapter every k rounds in snapshots/round_<r>/ (off: null)",
    )
    trackers: TrackersConfig = TrackersConfig()


class RunConfig(_Strict):
    """One federated fine-tuning run: everything a recipe says."""

    name: str = Field("run", pattern=r"^[A-Za-z0-9._-]+$")
    output_dir: str = "runs"
    seed: int = 0
    model: ModelConfig = ModelConfig()
    lora: LoraConfig = LoraConfig()
    data: DataConfig = DataConfig()
    federation: FederationConfig = FederationConfig()
    aggregator: AggregatorConfig = AggregatorConfig()
    simulation: SimulationConfig = SimulationConfig()
    pruning: PruningConfig = PruningConfig()
    adaptive: AdaptiveConfig | None = Field(None, description="bandit (rank, pruning) per client")
    devices: list[DeviceProfile] | None = Field(
        None, description="emulated device profiles (speed, memory) by partition; off by default"
    )
    compression: CompressionConfig = CompressionConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    features: dict[str, dict[str, Any] | None] = Field(
        default_factory=dict,
        description="feature name -> its options, for features without a section of their own "
        "(e.g. fedprox: {mu: 0.01}); see `fedllm.features`",
    )
    output: OutputConfig = Field(
        default_factory=OutputConfig, description="snapshots and experiment trackers"
    )

    @field_validator("name")
    @classmethod
    def _name_is_a_folder_in_output_dir(cls, v: str) -> str:
        """Refuse '.', '..' (and any name of only dots): the run folder would not be inside
        output_dir, and --overwrite would delete output_dir or its parent."""
        if set(v) == {"."}:
            raise ValueError(
                f"{v!r} is not a run name: a name of only dots points at output_dir or outside "
                "it; use letters, digits, '.', '_' or '-' with at least one character other "
                "than '.' (e.g. tiny-2)"
            )
        return v

    @model_validator(mode="after")
    def _evaluation(self) -> RunConfig:
        panel, n = self.federation.evaluate_clients, self.data.num_clients
        if isinstance(panel, int) and not isinstance(panel, bool) and panel > n:
            raise ValueError(
                f"federation.evaluate_clients ({panel}) exceeds data.num_clients ({n}); "
                "use at most that many, a fraction or 'all'"
            )
        if panel == "none" and self.data.test_set is None:
            raise ValueError(
                "federation.evaluate_clients=none with no data.test_set evaluates nothing; "
                "set data.test_set (the server's own test set) or evaluate some clients"
            )
        return self

    @model_validator(mode="after")
    def _cross_checks(self) -> RunConfig:
        cross_check(self)  # every check that spans sections, in one place (fedllm.recipe.checks)
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def client_rank(self, partition_id: int) -> int:
        """The LoRA rank of the client holding partition `partition_id`."""
        n = self.data.num_clients
        if not 0 <= partition_id < n:
            raise ValueError(f"partition_id {partition_id} outside [0, {n})")
        if self.lora.tiers is not None:
            start = 0
            for tier in self.lora.tiers:
                if partition_id < start + tier.clients:
                    return tier.rank
                start += tier.clients
        ranks = self.lora.ranks
        if isinstance(ranks, int):
            return ranks
        if isinstance(ranks, list):
            return ranks[partition_id % len(ranks)]
        assert isinstance(ranks, RankRule)
        t = partition_id / max(n - 1, 1)
        if ranks.spacing == "linear":
            return round(ranks.min + t * (ranks.max - ranks.min))
        return round(math.exp(math.log(ranks.min) + t * math.log(ranks.max / ranks.min)))

    @property
    def data_seed(self) -> int:
        """The seed every data step uses: `data.seed`, else the run's seed."""
        return self.seed if self.data.seed is None else self.data.seed

    @property
    def max_rank(self) -> int:
        """The largest LoRA rank any client may train at (its recipe rank or a bandit arm)."""
        ranks = [self.client_rank(i) for i in range(self.data.num_clients)]
        return max([*ranks, *(self.adaptive.ranks if self.adaptive is not None else [])])

    def client_scaling(self, rank: int) -> float:
        """peft's LoRA scaling α/r for a client of this rank."""
        return self.lora.alpha / rank

    def fingerprint(self, *, budget: bool = True) -> str:
        """A short hash of what must match between server and clients and what a node pins
        (model, LoRA, data, seed and the whole privacy section, SecAgg+ and budget included).

        `budget=False` leaves out `privacy.epsilon_budget`: a checkpoint may be resumed under a
        new budget (the ledger keeps what was spent), though a node pinning the hash refuses it.
        """
        parts = self.pinned(budget=budget)
        return hashlib.sha256(yaml.safe_dump(parts, sort_keys=True).encode()).hexdigest()[:12]

    def pinned(self, *, budget: bool = True) -> dict[str, Any]:
        """The sections `fingerprint` hashes, as plain data (what a resumed run must keep)."""
        parts = self.model_dump(include={"model", "lora", "data", "seed", "privacy"}, mode="json")
        if not budget:
            parts["privacy"].pop("epsilon_budget")
        return parts

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)
