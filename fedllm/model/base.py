"""The frozen base model a recipe names: where it lives, building it, loading it (once per
`ProcessCache` that its caller passes down).

Also the adapted modules' shapes (read on the meta device) and the check that every rank fits.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from fedllm.data.shards import ProcessCache, load_all_examples
from fedllm.model.loading import (
    attention_for,
    compute_device,
    load_base_model,
    module_shapes,
    resolve_model_dir,
)
from fedllm.model.tiny import build_tiny_model
from fedllm.recipe import RunConfig

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase


def base_model_dir(cfg: RunConfig) -> Path:
    """Where the frozen base lives: the embedded cache, a local folder, or the run's tiny base."""
    if cfg.model.name == "tiny":
        return (cfg.run_dir / "tiny_base").resolve()
    return resolve_model_dir(cfg.model.name)


def prepare_base_model(cfg: RunConfig, *, cache: ProcessCache | None = None) -> Path:
    """Make sure the base exists on disk (convert the embedded GGUF / build the tiny model, whose
    tokenizer trains on the federation's examples: parsed once per `cache`)."""
    folder = base_model_dir(cfg)
    if cfg.model.name == "tiny":
        texts = [f"{e['prompt']} {e['response']}" for e in load_all_examples(cfg, cache=cache)]
        build_tiny_model(folder, texts=texts, seed=cfg.seed, **cfg.model.tiny.model_dump())
    return folder


def cached_base_model(
    cfg: RunConfig, *, cache: ProcessCache | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer), kept in `cache` and reused across its owner's rounds (loaded afresh
    without one); a new model, dtype or quantization replaces the kept one."""
    quant = None if cfg.model.quantization == "none" else cfg.model.quantization

    # the implementation `model.attention` resolves to here: the only thing of it the model holds
    attention = attention_for(
        cfg.model.attention, device=compute_device(), max_length=cfg.data.max_length
    )

    def load():
        folder = prepare_base_model(cfg, cache=cache)
        return load_base_model(
            folder, dtype=cfg.model.dtype, quantization=quant, attention=attention
        )

    key = (str(base_model_dir(cfg)), cfg.model.dtype, quant, attention)
    return cache.base.get(key, load) if cache is not None else load()


def cached_base_at(
    cfg: RunConfig, quantization: str | None, *, cache: ProcessCache | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """`cached_base_model` at a base precision other than the recipe's ('4bit', '8bit', None:
    full): a client's plan (a device tier, a bandit arm) sets its own."""
    model = cfg.model.model_copy(update={"quantization": quantization or "none"})
    return cached_base_model(cfg.model_copy(update={"model": model}), cache=cache)


def adapter_shapes(
    cfg: RunConfig, *, cache: ProcessCache | None = None
) -> dict[str, tuple[int, int]]:
    """(out, in) of every adapted module, read from the base's config on the meta device."""
    from transformers import AutoConfig

    folder = prepare_base_model(cfg, cache=cache)
    return config_shapes(AutoConfig.from_pretrained(folder), cfg.lora.target_modules)


def config_shapes(
    config: PretrainedConfig, target_modules: list[str]
) -> dict[str, tuple[int, int]]:
    """(out, in) of every module `target_modules` names in the architecture `config`, built on
    the meta device (no weights)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    return module_shapes(model, target_modules)


def check_ranks(cfg: RunConfig, shapes: dict[str, tuple[int, int]]) -> None:
    """Every client's rank must fit every adapted module (rank ≤ min(out, in))."""
    limit = min(min(s) for s in shapes.values())
    module = next(m for m, s in shapes.items() if min(s) == limit)
    for pid in range(cfg.data.num_clients):
        rank = cfg.client_rank(pid)
        if rank > limit:
            key = "lora.tiers" if cfg.lora.tiers else "lora.ranks"
            raise ValueError(
                f"{key}: client {pid} has rank {rank}, larger than module {module} "
                f"{shapes[module]} allows (valid: 1..{limit})"
            )
