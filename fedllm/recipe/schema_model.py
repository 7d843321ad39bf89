"""The recipe's model and LoRA sections: the frozen base, device tiers and each client's rank."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from fedllm.recipe.schema_common import BasePrecision, Dtype, Strict, must_exist


class TinyModelConfig(Strict):
    """A small Llama built from config, with a BPE tokenizer trained on the run's own data."""

    vocab_size: int = Field(512, ge=64)
    hidden_size: int = Field(64, ge=8)
    intermediate_size: int = Field(128, ge=8)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int = Field(2, ge=1)
    max_position_embeddings: int = Field(256, ge=16)

    @model_validator(mode="after")
    def _heads_divide(self) -> TinyModelConfig:
        """Attention splits hidden_size into heads of an even size (RoPE rotates pairs) and
        shares each key/value head among a group of query heads: both must divide evenly (else
        building the model or its first forward pass fails)."""
        width, heads = self.hidden_size, self.num_heads
        if width % heads or (width // heads) % 2:
            valid = [d for d in range(1, width + 1) if width % d == 0 and (width // d) % 2 == 0]
            choices = ", ".join(map(str, valid)) or "none (make hidden_size even)"
            raise ValueError(
                f"num_heads: hidden_size ({width}) must split into num_heads ({heads}) heads of "
                f"an even size; valid here: {choices}"
            )
        if heads % self.num_kv_heads:
            valid = [d for d in range(1, heads + 1) if heads % d == 0]
            raise ValueError(
                f"num_kv_heads: num_heads ({heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads}); valid here: {', '.join(map(str, valid))}"
            )
        return self


class ModelConfig(Strict):
    """Which frozen base model the clients adapt."""

    name: str = Field(
        "smollm2-135m",
        description="'smollm2-135m' (embedded), 'tiny' (built from config), a local HF folder, "
        "or a hub id available offline",
    )
    dtype: Dtype = Field(
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
        return must_exist(v, "local model folder")


class TierConfig(Strict):
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


class RankRule(Strict):
    """Ranks spread geometrically (or linearly) from `min` to `max` over the clients."""

    min: int = Field(gt=0)
    max: int = Field(gt=0)
    spacing: Literal["geometric", "linear"] = "geometric"

    @model_validator(mode="after")
    def _ordered(self) -> RankRule:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) must be <= max ({self.max})")
        return self


class LoraConfig(Strict):
    """The LoRA adapters: where they go, how they scale, each client's rank."""

    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    ranks: int | list[int] | RankRule | None = Field(
        8, description="one rank for all, a list cycled over clients, or a rule {min, max, spacing}"
    )
    tiers: list[TierConfig] | None = None

    @model_validator(mode="after")
    def _ranks_or_tiers(self) -> LoraConfig:
        """Tiers give each client its rank; ranks written beside them would be silently unused
        (the default, 8, is let be: a run's recipe.yaml writes every default beside its tiers)."""
        default = type(self).model_fields["ranks"].default
        if self.tiers is not None and self.ranks not in (None, default):
            raise ValueError(
                f"lora.ranks ({self.ranks}) and lora.tiers are both set; tiers give each client "
                "its rank: remove lora.ranks or set it to null (lora.ranks=null)"
            )
        return self

    @field_validator("target_modules", mode="before")
    @classmethod
    def _no_all_linear(cls, v: Any) -> Any:
        """peft's `all-linear` shortcut is not supported: the server needs each module's name."""
        if v == "all-linear" or (isinstance(v, list) and "all-linear" in v):
            raise ValueError(
                "'all-linear' (peft's shortcut) is not supported: list the modules, e.g. "
                "[q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj] for Llama-style "
                "bases such as SmolLM2"
            )
        return v

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
