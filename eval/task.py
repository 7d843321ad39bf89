"""The one interface every eval task implements, and `register_task`, which names a task.

A task is built from one client's held-out examples (`build`), shows its items (`get_example`),
scores them under one model (`evaluate`) and merges per-client results into the global number
(`combine`). Its `metrics` say what the report shows; the first one is its headline.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, TypeVar

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

_NAME = re.compile(r"[a-z][a-z0-9_]*")


class Metric(NamedTuple):
    """One number a task reports: its key in the result dict, a column label, decimals shown."""

    key: str
    label: str
    digits: int = 3


@dataclass(frozen=True)
class TaskSetup:
    """What the harness hands every task's `build`: the run's tokenizer, prompt format and knobs."""

    tokenizer: PreTrainedTokenizerBase
    prompt_format: str
    max_length: int
    max_new_tokens: int
    seed: int


class EvalTask(ABC):
    """One benchmark on one client's held-out examples; subclass it and add `@register_task`."""

    name: ClassVar[str]
    metrics: ClassVar[tuple[Metric, ...]]
    # a digest of data the task brings itself (an outside file's questions): an interrupted
    # eval's pieces are reused only with the same (`fedllm.eval.partial`)
    inputs_digest: ClassVar[str | None] = None
    # False: the same items for every client (an outside file's questions), so the shared views
    # (base, global) score them once, with the first client, not once per client
    per_client: ClassVar[bool] = True

    @classmethod
    @abstractmethod
    def build(cls, examples: Sequence[dict], setup: TaskSetup) -> EvalTask:
        """The task for `examples` (plain {prompt, response, ...} dicts) under `setup`."""

    @abstractmethod
    def __len__(self) -> int:
        """Number of items the task scores (questions, prompts, tokenized examples)."""

    @abstractmethod
    def get_example(self, i: int) -> dict:
        """Item `i` as the task scores it: lets tests and readers see what is asked."""

    @abstractmethod
    def evaluate(self, model: torch.nn.Module, *, batch_size: int) -> dict[str, Any]:
        """Metrics of `model` on every item, including "examples" (the number scored)."""

    @classmethod
    def combine(cls, results: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """The global number from per-client results: each metric weighted by examples."""
        rows = [r for r in results if r.get("examples")]
        total = sum(r["examples"] for r in rows)
        if not total:
            return {}
        means = {m.key: sum(r[m.key] * r["examples"] for r in rows) / total for m in cls.metrics}
        return {**means, "examples": total}

    @classmethod
    def describe(cls) -> dict[str, Any]:
        """One-line summary and metrics, written into report.json so renderers need no registry."""
        doc = (cls.__doc__ or cls.name).strip().splitlines()[0]
        return {"about": doc, "metrics": [m._asdict() for m in cls.metrics]}

    @classmethod
    def headline(cls, result: dict[str, Any]) -> str:
        """The first metric of `result`, formatted for a progress line."""
        metric = cls.metrics[0]
        return f"{metric.label} {result.get(metric.key, math.nan):.{metric.digits}f}"


T = TypeVar("T", bound=type[EvalTask])


def register_task(name: str) -> Callable[[T], T]:
    """Mark an EvalTask subclass as the task `name`; discovery (fedllm.eval.registry) finds it."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"task name {name!r} must be lower-case letters, digits and '_'")

    def mark(cls: T) -> T:
        if not (isinstance(cls, type) and issubclass(cls, EvalTask)):
            raise TypeError(f"@register_task({name!r}) needs an EvalTask subclass, got {cls!r}")
        if not getattr(cls, "metrics", ()):
            raise TypeError(f"{cls.__qualname__} must list its metrics (the first is its headline)")
        cls.name = name
        return cls

    return mark


def is_registered(obj: object) -> bool:
    """Whether `obj` is an EvalTask class named in its own body (by `register_task`), not a base."""
    return isinstance(obj, type) and issubclass(obj, EvalTask) and "name" in vars(obj)
