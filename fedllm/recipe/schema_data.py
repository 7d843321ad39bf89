"""The recipe's data section: where the examples come from, how they are split, the leakage
canaries and the server's global test set."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from fedllm.recipe.schema_common import Strict, must_exist

BUILT_IN_SOURCES = ("wordnet", "fortunes")


def near_built_in(source: str) -> str | None:
    """The built-in source `source` is a typo of (no local path of that name exists), or None:
    such a name would otherwise be tried on the hub. A name with an owner ("jxm/wordnet") is a
    hub dataset's, never a typo."""
    if source in BUILT_IN_SOURCES or "/" in source or Path(source).expanduser().exists():
        return None
    close = difflib.get_close_matches(source.lower(), BUILT_IN_SOURCES, n=1, cutoff=0.75)
    return close[0] if close else None


def describe_source(source: str) -> str:
    """How a run reads `data.source` on this machine: built in, a local path, or the hub."""
    path = Path(source).expanduser()
    if source in BUILT_IN_SOURCES:
        return f"built-in {source!r}"
    if path.exists():
        return f"local {'folder' if path.is_dir() else 'file'} {path.resolve()}"
    return f"Hugging Face hub dataset {source!r} (no local path of that name; needs network)"


class CanaryConfig(Strict):
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


class TestSetConfig(Strict):
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


class DataConfig(Strict):
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
        v = must_exist(v, "local dataset (a JSON/JSONL/CSV/Parquet file or a saved folder)")
        if close := near_built_in(v):
            raise ValueError(
                f"{v!r} is neither a built-in source nor a local path (did you mean {close!r}?); "
                f"valid: {', '.join(map(repr, BUILT_IN_SOURCES))}, a local file or folder, or a "
                "Hugging Face hub dataset name"
            )
        return v
