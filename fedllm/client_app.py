"""The Flower ClientApp: local LoRA training and held-out evaluation on one private shard.

Each message rebuilds this client's shard from the recipe (deterministic), reuses the base model
loaded once per process, attaches a LoRA adapter at this client's rank, starts it from the global
factors it received and replies with its factors and metrics. Only adapter tensors and metrics
leave the client.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from peft import PeftModel

from fedllm import constrained_client as constrained
from fedllm import hetlora_client, rounds, secagg
from fedllm.adapters import attach_lora, from_record, read_factors, write_factors
from fedllm.aggregators import Factors
from fedllm.config import RunConfig
from fedllm.node import node_shard
from fedllm.privacy.client import privatize_reply, train_private
from fedllm.shards import cached_base_model
from fedllm.train import evaluate_nll, num_local_steps, train_local

log = logging.getLogger("fedllm.client")


def partition_of(context: Context) -> int:
    """This node's partition id (set by the simulation engine or a SuperNode's --node-config)."""
    if "partition-id" not in context.node_config:
        raise ValueError("node config has no 'partition-id'; start the SuperNode with one")
    return int(context.node_config["partition-id"])


def check_recipe(cfg: RunConfig, config: ConfigRecord) -> None:
    """Refuse to train for a server running another base model, adapter layout or data split."""
    theirs = str(config.get("recipe-hash", ""))
    if theirs and theirs != cfg.fingerprint():
        raise ValueError(
            f"recipe mismatch: server runs recipe {theirs}, this client {cfg.fingerprint()} "
            "(model, lora, data and seed must match)"
        )


@contextmanager
def lora_on_base(
    cfg: RunConfig, *, rank: int, scaling: float, merged: dict[str, Factors] | None = None
) -> Iterator[tuple[PeftModel, object]]:
    """The cached base (plus a `merged` delta) with a fresh LoRA of this rank; both undone after."""
    base, tokenizer = cached_base_model(cfg)
    with rounds.merged_into(base, merged or {}):
        model = attach_lora(
            base,
            rank=rank,
            alpha=scaling * rank,
            dropout=cfg.lora.dropout,
            target_modules=cfg.lora.target_modules,
        )
        try:
            yield model, tokenizer
        finally:
            model.unload()


def train(cfg: RunConfig, msg: Message, context: Context) -> Message:
    """One round of local training, started from the global factors in `msg`.

    A SecAgg+ round (fedllm.secagg) arrives in FitIns form and replies in FitRes form, which
    `secagg.mod` masks before anything leaves the client.
    """
    if secagg.FITINS in msg.content.config_records:
        return Message(secagg.client_reply(cfg, msg.content, context, train_content), reply_to=msg)
    return Message(train_content(cfg, msg.content, context), reply_to=msg)


def train_content(cfg: RunConfig, content: RecordDict, context: Context) -> RecordDict:
    """`train` on a message's content: {global, config} in, {update, metrics} out."""
    config = content["config"]
    check_recipe(cfg, config)
    pid = partition_of(context)
    plan = constrained.client_plan(cfg, pid, config, context.node_config)  # rank, pruning, quant
    prune = hetlora_client.options_of(config)  # HetLoRA rank self-pruning (off unless sent)
    plan = hetlora_client.planned(plan, context.state)  # at the rank this node pruned to, if any
    rank = plan.rank
    server_round = int(config["server-round"])
    spec = rounds.spec_of(config)
    received = content["global"]
    global_scaling = float(config["global-scaling"])
    global_factors = (
        None if spec.local_B else constrained.decode_global(cfg, received, global_scaling)
    )
    merged = global_factors if spec.merge else None
    seed = cfg.seed * 100_003 + server_round * 1009 + pid
    # kept: the ids a pruned base keeps (fedllm.pruning); {} for a whole base
    with constrained.constrained_lora(cfg, plan, context.node_config, merged=merged) as (
        model,
        tokenizer,
        shard,
        kept,
    ):
        start = constrained.start_from(cfg, plan, global_factors, kept)
        if spec.merge:  # the delta is in the base: train a fresh LoRA on top
            rounds.fresh_adapter(model, seed=seed)
        elif spec.local_B:  # the shared A with this node's own B
            write_factors(model, rounds.personal(model, received, context))
        else:
            write_factors(model, start)
        if spec.freeze_A:
            rounds.freeze_A(model)
        fed = cfg.federation
        steps = num_local_steps(
            len(shard.train),
            batch_size=fed.batch_size,
            local_steps=fed.local_steps,
            local_epochs=fed.local_epochs,
        )
        dp_metrics: dict[str, float | int] = {}
        if cfg.privacy.mode == "sample":  # DP-SGD on the LoRA parameters (fedllm.privacy)
            private = train_private(
                cfg, model, shard.train, steps=steps, pad_id=tokenizer.pad_token_id, partition=pid
            )
            result, dp_metrics = private.train, private.metrics()
        else:
            result = train_local(
                model,
                shard.train,
                steps=steps,
                batch_size=fed.batch_size,
                pad_id=tokenizer.pad_token_id,
                optimizer=fed.optimizer,
                lr=fed.lr,
                weight_decay=fed.weight_decay,
                schedule=fed.schedule,
                warmup_steps=fed.warmup_steps,
                max_grad_norm=fed.max_grad_norm,
                seed=seed,
                regularizer=hetlora_client.regularizer(model, prune, rank),
            )
        # client-level DP with noise_at=client: clip to S and noise here (else unchanged)
        factors, clip_metrics = privatize_reply(
            cfg, read_factors(model), start, freeze_a=spec.freeze_A
        )
        dp_metrics.update(clip_metrics)
        factors, start, rank, tail = hetlora_client.prune_reply(
            factors, start, prune, context.state, rank=rank, scaling=cfg.client_scaling
        )  # HetLoRA: maybe cut to a smaller rank; sent and remembered from now on
        dp_metrics.update(tail)
        if spec.local_B:
            rounds.keep_local_B(context, factors)
        reply = constrained.build_reply(
            cfg, factors, spec=spec, start=start, kept=kept, state=context.state
        )  # update (+ kept-index map), in the recipe's wire dtype / top-k
    log.info(
        "client %d round %d: rank %d, %d steps, loss %.4f -> %.4f",
        pid,
        server_round,
        rank,
        result.steps,
        result.loss_first,
        result.loss_last,
    )
    metrics = MetricRecord(
        {
            "num-examples": len(shard.train),
            "partition-id": pid,
            "rank": rank,
            "scaling": cfg.client_scaling(rank),
            "train-loss": result.loss_mean,
            "train-loss-first": result.loss_first,
            "train-loss-last": result.loss_last,
            "steps": result.steps,
            "train-seconds": result.seconds,
            "bytes-received": received.count_bytes(),
            "bytes-sent": sum(r.count_bytes() for r in reply.values()),
            "pruning": plan.pruning,
            **dp_metrics,
        }
    )
    return RecordDict({**reply, "metrics": metrics})


def evaluate(cfg: RunConfig, msg: Message, context: Context) -> Message:
    """Held-out NLL of the global adapter on this client's held-out split."""
    config = msg.content["config"]
    check_recipe(cfg, config)
    pid = partition_of(context)
    record: ArrayRecord = msg.content["global"]
    spec = rounds.spec_of(config)
    if spec.local_B:  # personalised: the shared A with this node's own B, at its own rank
        rank = int(context.node_config.get("rank", cfg.client_rank(pid)))
        scaling = cfg.client_scaling(rank)
    else:
        scaling = float(config["global-scaling"])
        global_factors = from_record(record, scaling)
        rank = max((f.rank for f in global_factors.values()), default=1)
    with lora_on_base(cfg, rank=rank, scaling=scaling) as (model, tokenizer):
        shard = node_shard(cfg, context.node_config, tokenizer)
        if spec.local_B:
            global_factors = rounds.personal(model, record, context)
        write_factors(model, global_factors)
        # No-grad forwards in eval mode would flip 4-bit layers to an inference kernel on some
        # CPUs (see platform notes); dropout is the only other difference, so stay in train mode
        # for quantized bases.
        model.train(cfg.model.quantization != "none")
        nll, tokens = evaluate_nll(
            model,
            shard.held_out,
            batch_size=cfg.federation.eval_batch_size,
            pad_id=tokenizer.pad_token_id,
        )
        model.train()
    metrics = MetricRecord(
        {
            "partition-id": pid,
            "nll-sum": nll,
            "tokens": tokens,
            "num-examples": len(shard.held_out),
            "held-out-loss": nll / max(tokens, 1),
        }
    )
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


def make_client_app(cfg: RunConfig) -> ClientApp:
    """A ClientApp bound to a recipe (the simulation passes it by value to every worker)."""
    app = ClientApp()

    @app.train(mods=[secagg.mod])  # passes through unless the round is a SecAgg+ one
    def _train(msg: Message, context: Context) -> Message:
        return train(cfg, msg, context)

    @app.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        return evaluate(cfg, msg, context)

    return app
