"""The recipe's privacy section: differential privacy (DP-SGD or DP-FedAvg) and SecAgg+."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from fedllm.recipe.schema_common import Strict


class SecureAggregationConfig(Strict):
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
        0.67,
        gt=0,
        description="shares needed to unmask (int, or fraction of num_shares); above half",
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


class PrivacyConfig(Strict):
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

    @property
    def private(self) -> bool:
        """Whether the run promises the clients privacy: a DP mechanism or SecAgg+ (what a
        client keeps without noise, or a per-client result, is then outside that promise)."""
        return self.mode != "none" or self.secure_aggregation.enabled

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
