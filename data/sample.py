"""A deterministic random subset of examples, shared by every loader's `max_examples`."""

from __future__ import annotations

import random
from typing import TypeVar

T = TypeVar("T")


def sample_examples(examples: list[T], *, max_examples: int | None, seed: int) -> list[T]:
    """Keep `max_examples` examples chosen by `seed`, in their original order (all when None)."""
    if max_examples is None:
        return examples
    if isinstance(max_examples, bool) or not isinstance(max_examples, int) or max_examples < 1:
        raise ValueError(f"max_examples must be a positive integer or None, got {max_examples!r}")
    if max_examples >= len(examples):
        return examples
    keep = sorted(random.Random(seed).sample(range(len(examples)), max_examples))
    return [examples[i] for i in keep]
