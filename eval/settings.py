"""How much `fedllm eval` evaluates (`EvalSettings`), apart from the harness that runs it.

Its own module so the leakage pass (fedllm.eval.leakage_run), which the harness imports, can name
the settings it reads without importing the harness back.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedllm.client.precision import PRECISIONS

MIN_REFERENCES = 10  # reference secrets per canary, as the recipe's data.canaries.references


@dataclass(frozen=True)
class EvalSettings:
    """How much to evaluate: examples per client and task, MIA sample, intervals, lengths."""

    max_examples: int = 64  # per client: quality tasks, and extraction from members/non-members
    batch_size: int = 16
    max_new_tokens: int = 32
    references: int | None = None  # reference secrets per canary (None: the recipe's)
    prefix_tokens: int = 2
    suffix_tokens: int = 16
    tasks: tuple[str, ...] | None = None  # None: every available task
    leakage: bool = True
    mia_non_members: int | None = None  # per client, from its held-out split (None: all of it)
    mia_members_per_non_member: int = 2  # matched on domain and length
    bootstrap: int = 1000  # resamples for the MIA intervals (0: none)
    confidence: float = 0.95
    precision: str = "auto"  # forwards under bf16 autocast ("auto": where native) or "fp32"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"--precision: eval setting precision must be one of {', '.join(PRECISIONS)}, "
                f"got {self.precision!r}"
            )
        positive = {
            "max_examples": self.max_examples,
            "batch_size": self.batch_size,
            "max_new_tokens": self.max_new_tokens,
            "mia_members_per_non_member": self.mia_members_per_non_member,
        }
        if self.mia_non_members is not None:
            positive["mia_non_members"] = self.mia_non_members
        for key, value in positive.items():
            if value < 1:
                raise ValueError(f"eval setting {key} must be >= 1, got {value}")
        if self.references is not None and self.references < MIN_REFERENCES:
            raise ValueError(  # as data.canaries.references: a skew-normal fit needs a sample
                f"--references: eval setting references must be >= {MIN_REFERENCES}, "
                f"got {self.references}"
            )
        if self.bootstrap < 0:
            raise ValueError(f"eval setting bootstrap must be >= 0, got {self.bootstrap}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"eval setting confidence must be in (0, 1), got {self.confidence}")
