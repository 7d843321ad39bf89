"""The recipe schema: typed, frozen, validated at construction, built from YAML.

Unknown keys are rejected by name (with a did-you-mean); wrong types and out-of-range values
name the key and what would be valid. `key=value` command-line overrides apply before validation.
"""

from __future__ import annotations

import difflib
import hashlib
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A recipe that cannot run, with every problem named by its dotted key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


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
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    quantization: Literal["none", "4bit", "8bit"] = "none"
    tiny: TinyModelConfig = TinyModelConfig()

    @field_validator("name")
    @classmethod
    def _local_folder_exists(cls, v: str) -> str:
        return _must_exist(v, "local model folder")


class TierConfig(_Strict):
    """A device tier: `clients` partitions of this tier train LoRA at `rank`.

    Constrained tiers may prune their frozen base (`pruning` ratio, see `fedllm.pruning`) and
    load it quantized (`quantization`; default: the model's setting).
    """

    name: str
    rank: int = Field(gt=0)
    clients: int = Field(gt=0)
    pruning: float = Field(0.0, description="fraction of MLP channels and query heads removed")
    quantization: Literal["none", "4bit", "8bit"] | None = None

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
    references: int = Field(1000, ge=10, description="reference secrets sampled for exposure")

    @field_validator("repeats")
    @classmethod
    def _positive_repeats(cls, v: list[int]) -> list[int]:
        if any(k < 1 for k in v):
            raise ValueError(f"every repeat count must be >= 1, got {v}")
        return v


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
    warmup_steps: int = Field(0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    eval_batch_size: int = Field(16, ge=1)
    round_timeout: float = Field(3600.0, gt=0, description="seconds to wait for replies per round")
    max_rejected_norm_ratio: float = Field(
        100.0, gt=1, description="replies whose norm exceeds this times the median are rejected"
    )

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
    """How pruned tiers choose what to remove from their base (see `fedllm.pruning`)."""

    importance: Literal["wanda", "magnitude"] = "wanda"
    calibration_batches: int = Field(4, ge=1, description="local batches for Wanda input norms")
    parts: list[Literal["mlp", "heads"]] = Field(
        default_factory=lambda: ["mlp", "heads"], min_length=1
    )


class AdaptiveConfig(_Strict):
    """Per-client (rank, pruning) chosen online by a bandit over ranks × pruning (see bandit.py)."""

    algorithm: Literal["ucb", "exp3"] = "ucb"
    ranks: list[int] = Field(min_length=1)
    pruning: list[float] = Field(default_factory=lambda: [0.0], min_length=1)
    exploration: float = Field(1.0, gt=0, description="UCB bonus c, or EXP3 gamma in (0, 1]")
    time_weight: float = Field(1.0, ge=0, description="reward = loss gain / seconds^time_weight")

    @model_validator(mode="after")
    def _arms(self) -> AdaptiveConfig:
        if any(r <= 0 for r in self.ranks):
            raise ValueError(f"ranks must be > 0, got {self.ranks}")
        if any(not 0 <= p < 1 for p in self.pruning):
            raise ValueError(f"pruning ratios must be in [0, 1), got {self.pruning}")
        if self.algorithm == "exp3" and self.exploration > 1:
            raise ValueError(f"exp3 exploration must be in (0, 1], got {self.exploration}")
        return self


class CompressionConfig(_Strict):
    """Training messages in a smaller dtype, optionally top-k sparsified (see compress.py)."""

    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    topk: float | None = Field(None, gt=0, le=1, description="fraction of update entries sent")


class SimulationConfig(_Strict):
    """Resources of the Flower simulation engine (Ray) on this machine."""

    num_cpus_per_client: float = Field(2.0, gt=0)
    num_gpus_per_client: float = Field(0.0, ge=0)


class SecureAggregationConfig(_Strict):
    """Flower's SecAgg+ for training rounds (see `fedllm.secagg`): the server sees only sums.

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

    mode: Literal["none", "sample", "client"] = "none"
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
        }[self.mode]
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
    compression: CompressionConfig = CompressionConfig()
    privacy: PrivacyConfig = PrivacyConfig()

    @model_validator(mode="after")
    def _cross_checks(self) -> RunConfig:
        n = self.data.num_clients
        per_round = self.federation.clients_per_round
        if per_round is not None and per_round > n:
            raise ValueError(
                f"federation.clients_per_round ({per_round}) exceeds data.num_clients ({n})"
            )
        tiers = self.lora.tiers
        if tiers is not None and sum(t.clients for t in tiers) != n:
            total = sum(t.clients for t in tiers)
            raise ValueError(f"lora.tiers cover {total} clients but data.num_clients is {n}")
        canaries = self.data.canaries
        if canaries is not None and any(not 0 <= c < n for c in canaries.clients):
            raise ValueError(
                f"data.canaries.clients {canaries.clients} must be partition ids in [0, {n})"
            )
        if tiers is None and self.lora.ranks is None:
            raise ValueError("set lora.ranks or lora.tiers")
        from fedllm.aggregators import available, round_spec

        if self.aggregator.name not in available():
            raise ValueError(_unknown("aggregator.name", self.aggregator.name, available()))
        if round_spec(self.aggregator.name).merge and self.model.quantization != "none":
            raise ValueError(
                f"aggregator.name: {self.aggregator.name!r} merges each round's aggregate into the "
                f"base weights, which needs model.quantization: none "
                f"(got {self.model.quantization!r})"
            )
        _check_client_dp(self)
        _check_constrained(self)
        from fedllm.hetlora_client import check_recipe as _check_hetlora

        _check_hetlora(self)  # HetLoRA's client-side rank self-pruning options
        _check_secure_aggregation(self)
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

    def client_scaling(self, rank: int) -> float:
        """peft's LoRA scaling α/r for a client of this rank."""
        return self.lora.alpha / rank

    def fingerprint(self) -> str:
        """A short hash of what must match between server and clients (model, LoRA, data)."""
        parts = self.model_dump(include={"model", "lora", "data", "seed"}, mode="json")
        if self.privacy.mode != "none":  # clients must train with the server's DP settings
            parts["privacy"] = self.privacy.model_dump(
                exclude={"epsilon_budget", "secure_aggregation"}, mode="json"
            )
        return hashlib.sha256(yaml.safe_dump(parts, sort_keys=True).encode()).hexdigest()[:12]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _check_client_dp(cfg: RunConfig) -> None:
    """Client-level DP needs uniform weights, adapter-state rounds and δ below 1/clients."""
    if cfg.privacy.mode != "client":
        return
    from fedllm.aggregators import round_spec

    if cfg.aggregator.weighting != "uniform":
        raise ValueError(
            "privacy.mode='client' needs aggregator.weighting='uniform': example-count weights "
            "reveal each client's data size and break the S/m sensitivity bound"
        )
    spec = round_spec(cfg.aggregator.name)
    if spec.merge or spec.local_B:
        raise ValueError(
            f"privacy.mode='client' cannot wrap aggregator.name={cfg.aggregator.name!r}: "
            "it needs clients that send their whole adapter (not a merged or A-only update)"
        )
    n = cfg.data.num_clients
    if cfg.privacy.delta >= 1 / n:
        raise ValueError(
            f"privacy.delta={cfg.privacy.delta:g} must be below 1/data.num_clients = 1/{n} "
            "for client-level DP (a client is the unit of privacy)"
        )


def _check_constrained(cfg: RunConfig) -> None:
    """Pruned bases and compressed messages need clients that start from the global adapter."""
    from fedllm.aggregators import round_spec

    spec = round_spec(cfg.aggregator.name)
    if not (spec.merge or spec.local_B):
        return
    used = [t.name for t in cfg.lora.tiers or [] if t.pruning > 0]
    what = f"pruning (tiers {used})" if used else None
    if cfg.adaptive is not None:
        what = "adaptive (rank, pruning)"
    if cfg.compression.dtype != "float32" or cfg.compression.topk is not None:
        what = "compression.dtype/topk"
    if what:
        raise ValueError(
            f"{what} needs clients that start from the global factors; aggregator "
            f"{cfg.aggregator.name!r} merges a delta into the base or keeps B locally, so use an "
            "adapter-state aggregator (svd, squeeze, fedit, hetlora, lorafair, ffa, ...) "
            "or drop the pruning/compression"
        )


def _check_secure_aggregation(cfg: RunConfig) -> None:
    """SecAgg+ needs an aggregator that works from sums and no per-client server-side step."""
    sa = cfg.privacy.secure_aggregation
    if not sa.enabled:
        return
    from fedllm.secagg import MODES, MODULUS

    key = "privacy.secure_aggregation"
    if cfg.aggregator.name not in MODES:
        raise ValueError(
            f"{key}: aggregator.name={cfg.aggregator.name!r} needs each client's update; the "
            "server only sees sums under SecAgg+, so use ffa (exact), fedit, or svd (dense upload)"
        )
    if cfg.privacy.mode == "client":
        raise ValueError(
            f"{key}: privacy.mode='client' clips and noises each update on the server, which "
            "never sees one under SecAgg+; use privacy.mode 'sample' or 'none'"
        )
    if cfg.adaptive is not None or any(t.pruning > 0 for t in cfg.lora.tiers or []):
        raise ValueError(f"{key}: pruned tiers and adaptive (rank, pruning) are not supported")
    if cfg.compression.dtype != "float32" or cfg.compression.topk is not None:
        raise ValueError(f"{key}: compression does not apply (masked vectors are integers)")
    n = cfg.federation.clients_per_round or cfg.data.num_clients
    if n < 2:
        raise ValueError(f"{key}: SecAgg+ needs at least 2 clients per round, got {n}")
    if sa.quantization_range * n >= MODULUS:
        raise ValueError(
            f"{key}.quantization_range ({sa.quantization_range}) × {n} clients must stay below "
            f"2**32 (the masks' modulus), or the sum overflows; use at most {MODULUS // n - 1}"
        )


def _unknown(key: str, value: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(value, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{key}: unknown value {value!r}{hint}; valid: {', '.join(sorted(valid))}"


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid recipe {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            parent = _model_at(e["loc"][:-1])
            valid = sorted(parent.model_fields) if parent else []
            close = difflib.get_close_matches(str(e["loc"][-1]), valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            lines.append(f"  {key}: unknown key{hint}; valid keys here: {', '.join(valid)}")
        elif e["type"] == "value_error":
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"  {msg}" if key == "(top level)" else f"  {key}: {msg}")
        else:
            got = e.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"  {key}: {e['msg']}{shown}")
    return "\n".join(lines)


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model class at a dotted location of the schema, for listing valid keys."""
    model: type[BaseModel] = RunConfig
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        else:
            return None
    return model


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ["federation.rounds=2", "lora.ranks=[4,8]"] into a nested dict; values are YAML."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"override {item!r} is not of the form key=value (e.g. federation.rounds=2)"
            )
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r} has an empty key part")
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override of {part!r}")
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "options":
            out[k] = _merge(out[k], v)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


def build_config(data: dict[str, Any], *, source: str = "<dict>") -> RunConfig:
    """Validate a recipe dict into a RunConfig, or raise ConfigError naming every bad key."""
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML recipe, apply `key=value` overrides, validate."""
    path = Path(path)
    if not path.is_file():
        shipped = sorted(p.name for p in (Path(__file__).parents[1] / "recipes").glob("*.yaml"))
        raise ConfigError(f"recipe file {path} not found; shipped recipes: {', '.join(shipped)}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"recipe {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping of keys, got {type(data).__name__}")
    data = _merge(data, parse_overrides(overrides or []))
    return build_config(data, source=str(path))
