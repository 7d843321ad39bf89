"""The recipe schema: `RunConfig`, the whole recipe, typed, frozen and validated at construction.

Its sections, with their field-level rules, live in the `schema_*` modules beside this one (model
and LoRA, data, federation, weak devices, privacy, output) on the `Strict` base of
`schema_common`; checks that span sections (aggregator options, features, privacy with secure
aggregation, ...) live in `fedllm.recipe.checks`, which `RunConfig` calls.
"""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, field_validator, model_validator

from fedllm.recipe.checks import cross_check
from fedllm.recipe.schema_common import Strict
from fedllm.recipe.schema_constrained import (
    AdaptiveConfig,
    CompressionConfig,
    DeviceProfile,
    PruningConfig,
)
from fedllm.recipe.schema_data import DataConfig
from fedllm.recipe.schema_federation import AggregatorConfig, FederationConfig, SimulationConfig
from fedllm.recipe.schema_model import LoraConfig, ModelConfig, RankRule
from fedllm.recipe.schema_output import OutputConfig
from fedllm.recipe.schema_privacy import PrivacyConfig
from fedllm.recipe.yaml_io import dump_yaml

NAME_CHARS = "A-Za-z0-9._-"  # a run name's characters (it names a folder), as a regex class
# settings only the server uses: where it writes, how it simulates, what it reports
SERVER_ONLY = frozenset({"name", "output_dir", "simulation", "output"})


def _sha256(parts: dict[str, Any]) -> str:
    """The SHA-256 of plain data, as its sorted YAML."""
    return hashlib.sha256(yaml.safe_dump(parts, sort_keys=True).encode()).hexdigest()


def _safe_name(name: str) -> str:
    """`name` as a folder name: other characters as '-', none at the ends ('run' if none left)."""
    return re.sub(f"[^{NAME_CHARS}]+", "-", name).strip("-.") or "run"


class RunConfig(Strict):
    """One federated fine-tuning run: everything a recipe says."""

    name: str = Field("run", description="the run's folder in output_dir: letters, digits, . _ -")
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
        "(e.g. fedprox: {mu: 0.01}; {}, true or nothing: its defaults; false: off, so an override "
        "features.fedprox=false turns off a recipe's feature); see `fedllm.features`",
    )
    output: OutputConfig = Field(
        default_factory=OutputConfig,
        description="snapshots, the best round's adapter and experiment trackers",
    )

    @field_validator("features", mode="before")
    @classmethod
    def _false_turns_a_feature_off(cls, v: Any) -> Any:
        """`fedprox: false` leaves fedprox out: overrides merge into the recipe and cannot delete
        a key, so this is how `features.fedprox=false` turns off a feature the recipe has."""
        if not isinstance(v, dict):
            return v
        for n, o in v.items():  # `fedprox: 0.01` read as "Input should be a valid dictionary"
            if not isinstance(o, dict | bool) and o is not None:
                raise ValueError(
                    f"features.{n} takes its options as a mapping (e.g. features.{n}: "
                    f"{{<option>: {o!r}}}; `fedllm methods` lists each feature's options), or "
                    f"true / false to turn it on with its defaults or off; got {o!r}"
                )
        # and `true` is "on, with its defaults", as `{}`
        return {n: {} if o is True else o for n, o in v.items() if o is not False}

    @field_validator("name")
    @classmethod
    def _name_is_a_folder_in_output_dir(cls, v: str) -> str:
        """Refuse '.', '..' (and any name of only dots): the run folder would not be inside
        output_dir, and --overwrite would delete output_dir or its parent."""
        if not v:
            raise ValueError("the run name is empty; it names the run's folder (e.g. tiny-2)")
        if bad := "".join(dict.fromkeys(re.sub(f"[{NAME_CHARS}]", "", v))):
            raise ValueError(
                f"{v!r} is not a run name: it names the run's folder, so only letters, digits, "
                f"'.', '_' and '-' (not {bad!r}; e.g. {_safe_name(v)!r})"
            )
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
        """Where this run writes: `output_dir/name`."""
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
        """A short hash of what must match between server and clients and what a resumed run
        keeps (model, LoRA, data, seed and the whole privacy section, SecAgg+ and budget
        included).

        `budget=False` leaves out `privacy.epsilon_budget`: a checkpoint may be resumed under a
        new budget (the ledger keeps what was spent), though a node pinning the hash refuses it.
        """
        return _sha256(self.pinned(budget=budget))[:12]

    def recipe_hash(self, *, budget: bool = True) -> str:
        """What a node pins (`recipe-hash`, 64 hex digits): the whole recipe except the settings
        only the server uses (`SERVER_ONLY`: where it writes, how it simulates, what it reports),
        so every setting that decides what a node trains, how often and what it sends (rounds,
        clients per round, local steps, weighting, features...) is agreed to. It covered only
        `pinned()` before stop 48, and 4 → 40 clients per round and 3 → 300 rounds under
        client-level DP kept it while the planned ε went from 8.1 to 1739 (h106)."""
        parts = self.model_dump(exclude=set(SERVER_ONLY), mode="json")
        if not budget:
            parts["privacy"].pop("epsilon_budget")
        return _sha256(parts)

    def pinned(self, *, budget: bool = True) -> dict[str, Any]:
        """The sections `fingerprint` hashes, as plain data (what a resumed run must keep)."""
        parts = self.model_dump(include={"model", "lora", "data", "seed", "privacy"}, mode="json")
        if not budget:
            parts["privacy"].pop("epsilon_budget")
        return parts

    def to_yaml(self) -> str:
        """The whole resolved recipe as YAML, defaults included (a run's recipe.yaml)."""
        return dump_yaml(self.model_dump(mode="json"))
