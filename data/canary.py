"""Secret canaries (Carlini et al., "The Secret Sharer") for measuring what a federation leaks.

A canary is a fixed question (`prefix`, with {name} naming this canary) whose answer is a random
secret of `digits` digits; it is inserted `repeats` times into one client's training examples.
Everything is deterministic for (seed, client), so the trainer and the evaluator agree on it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

CANARY_LABEL = "canary"
CANARY_ID_PREFIX = "canary:"


@dataclass(frozen=True)
class Canary:
    """One inserted secret: who holds it, how often, and the example text around it."""

    client: int
    repeats: int
    index: int
    prompt: str
    secret: str

    @property
    def id(self) -> str:
        """The example id, `canary:<client>:<repeats>:<index>`."""
        return f"{CANARY_ID_PREFIX}{self.client}:{self.repeats}:{self.index}"

    def example(self) -> dict[str, str]:
        """The training example (prompt → secret) in the loaders' format."""
        return {
            "prompt": self.prompt,
            "response": self.secret,
            "label": CANARY_LABEL,
            "id": self.id,
        }


def random_secret(rng: random.Random, digits: int) -> str:
    """A secret drawn uniformly from the space of `digits`-digit strings (leading zeros allowed)."""
    if digits < 1:
        raise ValueError(f"digits must be >= 1, got {digits}")
    return "".join(rng.choice("0123456789") for _ in range(digits))


def make_canaries(
    *,
    client: int,
    clients: Sequence[int],
    prefix: str,
    digits: int,
    repeats: Sequence[int],
    per_repeat: int = 1,
    seed: int = 0,
) -> list[Canary]:
    """The canaries of `client` (none unless it is in `clients`): `per_repeat` for each count."""
    if client not in clients:
        return []
    rng = random.Random(f"fedllm-canary:{seed}:{client}")
    out: list[Canary] = []
    for k in repeats:
        for j in range(per_repeat):
            name = f"account {client}-{k}-{j}"
            prompt = prefix.format(name=name) if "{name}" in prefix else f"{prefix} ({name})"
            out.append(Canary(client, k, j, prompt, random_secret(rng, digits)))
    return out


def canary_examples(canaries: Sequence[Canary]) -> list[dict[str, str]]:
    """Each canary's example repeated `repeats` times (to be appended to a client's train split)."""
    return [c.example() for c in canaries for _ in range(c.repeats)]


def is_canary(example: dict) -> bool:
    """Whether an example is an inserted canary (not one of the source's examples)."""
    return str(example.get("id", "")).startswith(CANARY_ID_PREFIX)


def reference_secrets(canary: Canary, *, n: int, digits: int, seed: int = 0) -> list[str]:
    """`n` secrets sampled uniformly from the canary's space (the canary's own excluded)."""
    rng = random.Random(f"fedllm-reference:{seed}:{canary.id}")
    out: list[str] = []
    while len(out) < n:
        s = random_secret(rng, digits)
        if s != canary.secret:
            out.append(s)
    return out
