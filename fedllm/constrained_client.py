"""The client side of constrained training: which (rank, pruning, quantization) this client runs,
its pruned/quantized base with a LoRA adapter, and its (compressed) reply with the kept-index map.

`client_app.train` calls `client_plan`, `constrained_lora` and `build_reply`; nothing else there
needs to know about pruning or compression.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from peft import PeftModel

from fedllm import rounds
from fedllm.adapters import attach_lora
from fedllm.aggregators import Factors, RoundSpec
from fedllm.compress import decode_factors, encode_update
from fedllm.config import RunConfig, TierConfig
from fedllm.data import collate
from fedllm.model import ModelCache, load_base_model, module_shapes
from fedllm.node import node_shard
from fedllm.prune_map import Kept, fit_start, kept_to_record
from fedllm.pruning import check_ratio, prune_model
from fedllm.shards import Shard, base_model_dir, cached_base_model

PRUNED = ModelCache()  # this process's most recent pruned base, like shards.BASE_MODELS


@dataclass(frozen=True)
class ClientPlan:
    """What one client runs this round."""

    partition: int
    rank: int
    pruning: float
    quantization: str | None  # None: full precision


def tier_of(cfg: RunConfig, partition: int) -> TierConfig | None:
    """The recipe tier holding `partition`, if the recipe has tiers."""
    start = 0
    for tier in cfg.lora.tiers or []:
        if partition < start + tier.clients:
            return tier
        start += tier.clients
    return None


def client_plan(
    cfg: RunConfig, partition: int, config: ConfigRecord, node_config: Mapping
) -> ClientPlan:
    """Rank and pruning from the server's message (bandit), else the node config / the tier."""
    tier = tier_of(cfg, partition)
    who = f"client {partition}"
    raw = config.get("rank", node_config.get("rank", cfg.client_rank(partition)))
    try:
        rank = int(raw)
    except (TypeError, ValueError):
        raise ValueError(f"{who}: LoRA rank must be a positive integer, got {raw!r}") from None
    if rank <= 0:
        raise ValueError(f"{who}: LoRA rank must be > 0, got {rank}")
    ratio = config.get("pruning", tier.pruning if tier is not None else 0.0)
    ratio = check_ratio(ratio, who=who)
    quant = (tier and tier.quantization) or cfg.model.quantization
    return ClientPlan(partition, rank, ratio, None if quant == "none" else quant)


def _with_quantization(cfg: RunConfig, quant: str | None) -> RunConfig:
    model = cfg.model.model_copy(update={"quantization": quant or "none"})
    return cfg.model_copy(update={"model": model})


def pruned_base(cfg: RunConfig, plan: ClientPlan, base, tokenizer, shard: Shard):
    """(pruned model, kept map of the adapted modules), built once per process and client."""

    def build():
        size = cfg.federation.batch_size
        n = cfg.pruning.calibration_batches * size
        examples = shard.train[:n]
        batches = [
            collate(examples[i : i + size], pad_id=tokenizer.pad_token_id)
            for i in range(0, len(examples), size)
        ]
        model, kept = prune_model(
            base,
            plan.pruning,
            method=cfg.pruning.importance,
            batches=batches,
            parts=tuple(cfg.pruning.parts),
        )
        if plan.quantization is not None:
            with tempfile.TemporaryDirectory() as tmp:
                model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
                model, _ = load_base_model(
                    tmp, dtype=cfg.model.dtype, quantization=plan.quantization
                )
        targets = tuple(cfg.lora.target_modules)
        adapted = {m: k for m, k in kept.items() if m.rsplit(".", 1)[-1] in targets}
        return model, adapted

    key = (
        str(base_model_dir(cfg)),
        cfg.model.dtype,
        cfg.fingerprint(),
        cfg.pruning.model_dump_json(),
        plan.partition,
        plan.pruning,
        plan.quantization,
    )
    return PRUNED.get(key, build)


def check_rank_fits(model, plan: ClientPlan, targets: list[str]) -> None:
    """A rank above min(out, in) of a (pruned) adapted module names the client and the values."""
    for name, (d, k) in module_shapes(model, targets).items():
        if plan.rank > min(d, k):
            raise ValueError(
                f"client {plan.partition}: rank {plan.rank} does not fit module {name} of shape "
                f"{(d, k)} after pruning {plan.pruning} (valid ranks: 1..{min(d, k)})"
            )


@contextmanager
def constrained_lora(
    cfg: RunConfig,
    plan: ClientPlan,
    node_config: Mapping,
    *,
    merged: Mapping[str, Factors] | None = None,
) -> Iterator[tuple[PeftModel, object, Shard, dict[str, Kept]]]:
    """This client's base (pruned and/or quantized as planned, plus a `merged` delta) with a
    fresh LoRA adapter. Yields (model, tokenizer, shard, kept map); all undone afterwards."""
    source = _with_quantization(cfg, None if plan.pruning > 0 else plan.quantization)
    base, tokenizer = cached_base_model(source)
    shard = node_shard(cfg, node_config, tokenizer)
    kept: dict[str, Kept] = {}
    if plan.pruning > 0:
        base, kept = pruned_base(cfg, plan, base, tokenizer, shard)
    check_rank_fits(base, plan, cfg.lora.target_modules)
    with rounds.merged_into(base, merged or {}):
        model = attach_lora(
            base,
            rank=plan.rank,
            alpha=cfg.lora.alpha,
            dropout=cfg.lora.dropout,
            target_modules=cfg.lora.target_modules,
        )
        try:
            yield model, tokenizer, shard, kept
        finally:
            model.unload()


def decode_global(cfg: RunConfig, record: ArrayRecord, scaling: float) -> dict[str, Factors]:
    """The global factors the server sent, from the recipe's wire dtype."""
    return decode_factors(record, scaling=scaling, dtype=cfg.compression.dtype)


def start_from(
    cfg: RunConfig,
    plan: ClientPlan,
    received: Mapping[str, Factors] | None,
    kept: Mapping[str, Kept],
) -> dict[str, Factors]:
    """What this client starts from: the received factors cut to its kept ids and its rank."""
    scaling = cfg.client_scaling(plan.rank)
    return fit_start(received or {}, kept, rank=plan.rank, scaling=scaling)


def build_reply(
    cfg: RunConfig,
    factors: Mapping[str, Factors],
    *,
    spec: RoundSpec,
    start: Mapping[str, Factors],
    kept: Mapping[str, Kept],
    state: RecordDict | None,
) -> dict[str, ArrayRecord]:
    """The arrays this client sends: its (compressed) update, and its kept map if pruned.

    `start` is what the client started from (`fit_start`); top-k deltas are taken against it.
    """
    if spec.merge or spec.local_B:  # config forbids pruning/compression with these
        return {"update": rounds.outgoing(factors, spec)}
    update = encode_update(
        factors, start, dtype=cfg.compression.dtype, topk=cfg.compression.topk, state=state
    )
    return {"update": update, "kept": kept_to_record(kept)} if kept else {"update": update}


def check_pruned_ranks(cfg: RunConfig, shapes: dict[str, tuple[int, int]]) -> None:
    """Before a run: every tier's (and bandit arm's) rank must fit its pruned modules."""
    from transformers import AutoConfig

    from fedllm.pruning import prune_plan, pruned_module_shapes
    from fedllm.shards import prepare_base_model

    tiers = [tier_of(cfg, p) for p in range(cfg.data.num_clients)]
    plans = [
        (f"client {p}", cfg.client_rank(p), t.pruning if t is not None else 0.0)
        for p, t in enumerate(tiers)
    ]
    if cfg.adaptive is not None:
        plans += [
            (f"adaptive arm (rank {r}, pruning {q})", r, q)
            for r in cfg.adaptive.ranks
            for q in cfg.adaptive.pruning
        ]
    if all(q == 0 for _, _, q in plans):
        return
    config = AutoConfig.from_pretrained(prepare_base_model(cfg))
    for who, rank, ratio in plans:
        plan = prune_plan(config, ratio, parts=tuple(cfg.pruning.parts))
        for name, (d, k) in pruned_module_shapes(shapes, config, plan).items():
            if rank > min(d, k):
                raise ValueError(
                    f"{who}: rank {rank} does not fit module {name} pruned to {(d, k)} at "
                    f"pruning {ratio} (valid ranks: 1..{min(d, k)})"
                )
