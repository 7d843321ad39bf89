"""The Flower ClientApp: local LoRA training and held-out evaluation on one private shard.

Each message takes this client's shard (built from the recipe, deterministic) and the base model
from the app's `ProcessCache` (built and loaded once per process), attaches a LoRA adapter at
this client's rank, starts it from the global factors it received and replies with its factors
and metrics. Optional capabilities (DP-SGD, pruning, compression, FedProx, ...) are features
(`fedllm.features`): the round's steps (`fedllm.client.round`) call their hooks in order and
know none of them by name. Only adapter tensors and metrics leave the client.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Iterator
from contextlib import contextmanager

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedllm.aggregators.base import Factors
from fedllm.client.node_config import node_shard
from fedllm.client.round import (
    check_recipe,
    client_round,
    local_steps,
    lora_model,
    partition_of,
    read_global,
    start_adapter,
)
from fedllm.client.train import evaluate_nll
from fedllm.data.shards import ProcessCache
from fedllm.errors import NodeRefusal
from fedllm.features import registry
from fedllm.features.base import allowed_metrics
from fedllm.features.types import ClientUpdate
from fedllm.model import packing, wire
from fedllm.model.adapters import attach_lora, from_record, read_factors, write_factors
from fedllm.model.base import cached_base_at
from fedllm.model.loading import scoring_mode
from fedllm.recipe.checks import ConfigError
from fedllm.recipe.schema import RunConfig

log = logging.getLogger("fedllm.client")


def train(
    cfg: RunConfig, msg: Message, *, context: Context, cache: ProcessCache | None = None
) -> Message:
    """One round of local training, started from the global factors in `msg`.

    A feature may take the message in its own form (SecAgg+ rounds arrive as FitIns and reply
    as FitRes, which its mod masks before anything leaves the client).
    """
    run = functools.partial(train_content, cache=cache)
    received = packing.unpack(msg.content)  # packed arrays from a ClientApp without the mod
    for cls in registry.active(cfg):
        content = cls.wrap_train(cfg, received, context=context, train=run)
        if content is not None:
            return Message(content, reply_to=msg)
    return Message(run(cfg, received, context=context), reply_to=msg)


def train_content(
    cfg: RunConfig, content: RecordDict, *, context: Context, cache: ProcessCache | None = None
) -> RecordDict:
    """`train` on a message's content: {global, config} in, {update, metrics} out."""
    config = content["config"]
    check_recipe(cfg, config)
    features = registry.build(cfg)
    rnd = client_round(cfg, config, context=context)
    for f in features:
        rnd.plan = f.plan(rnd.plan, rnd)
    received = content["global"]
    global_factors = None if rnd.spec.local_B else read_global(received, rnd, features=features)
    folded = [f.fold(global_factors or {}, rnd) for f in features]  # e.g. Fed-PLoRA's modules
    merged = wire.stacked(global_factors if rnd.spec.merge else {}, *folded)
    with lora_model(rnd, features, merged=merged or None, cache=cache) as model:
        start = start_adapter(
            model, received, global_factors=global_factors, rnd=rnd, features=features
        )
        result = local_steps(model, rnd, features=features)
        live = read_factors(model)  # on the model's device; what follows works on the CPU
        trained = {m: Factors(f.B.cpu(), f.A.cpu(), f.scaling) for m, f in live.items()}
        if rnd.plan.lora_alpha is not None:  # the server reads a reply at the recipe's α/r
            trained = {
                m: t.truncate(t.rank, cfg.client_scaling(t.rank)) for m, t in trained.items()
            }
        update = ClientUpdate(trained, start, rnd.plan.rank)
        for f in features:
            update = f.post_process(update, rnd)
        if rnd.spec.local_B:
            wire.keep_local_B(rnd.state, update.factors)
        arrays = {"update": wire.outgoing(update.factors, rnd.spec)}
        for f in features:
            arrays = f.reply(arrays, update, rnd=rnd)
    log.info(
        "client %d round %d: rank %d, %d steps, loss %.4f -> %.4f",
        rnd.partition,
        rnd.server_round,
        update.rank,
        result.steps,
        result.loss_first,
        result.loss_last,
    )
    metrics = MetricRecord(
        {
            "num-examples": len(rnd.shard.train),
            "partition-id": rnd.partition,
            "rank": update.rank,
            "scaling": cfg.client_scaling(update.rank),
            "train-loss": result.loss_mean,
            "train-loss-first": result.loss_first,
            "train-loss-last": result.loss_last,
            "steps": result.steps,
            "train-seconds": result.seconds,
            "bytes-received": received.count_bytes(),
            "bytes-sent": sum(r.count_bytes() for r in arrays.values()),
            "pruning": rnd.plan.pruning,
            **{k: v for f in features for k, v in f.metrics().items()},
        }
    )
    return RecordDict({**arrays, "metrics": MetricRecord(allowed_metrics(metrics, features))})


def evaluate(
    cfg: RunConfig, msg: Message, *, context: Context, cache: ProcessCache | None = None
) -> Message:
    """Held-out NLL of the global adapter (as this client's features personalise it: fedsa's own
    B, sdflora's local module) on this client's held-out split."""
    content = packing.unpack(msg.content)  # packed arrays from a ClientApp without the mod
    config = content["config"]
    check_recipe(cfg, config)
    pid = partition_of(context)
    record: ArrayRecord = content["global"]
    spec = wire.spec_of(config)
    rnd = client_round(cfg, config, context=context)
    scaling = float(config["global-scaling"])
    # the global adapter as each active feature personalises it (sdflora: + its local module;
    # under local_B the personal adapter feature gives a resumed node its B back first)
    global_factors = {} if spec.local_B else from_record(record, scaling)
    features = registry.build(cfg)
    for f in features:
        global_factors = f.personalise(global_factors, rnd)
    if spec.local_B:  # personalised: the shared A with this node's own B, at its own rank
        rank = int(context.node_config.get("rank", cfg.client_rank(pid)))
        scaling = cfg.client_scaling(rank)
    else:
        rank = max((f.rank for f in global_factors.values()), default=1)
        if global_factors:  # a feature may have moved them to this client's scaling (sdflora)
            scaling = next(iter(global_factors.values())).scaling
    quant = rnd.plan.quantization  # the recipe's, unless a feature (a device tier) has its own
    for f in features:
        quant = f.eval_precision(quant, rnd)
    rnd.plan = dataclasses.replace(rnd.plan, quantization=quant)  # what `evaluated` hooks hold
    base, tokenizer = cached_base_at(cfg, quant, cache=cache)
    model = attach_lora(
        base,
        rank=rank,
        alpha=scaling * rank,
        dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
    )
    try:
        shard = node_shard(cfg, context.node_config, tokenizer=tokenizer, cache=cache)
        if spec.local_B:
            global_factors = wire.personal(model, record, state=context.state)
        write_factors(model, global_factors)
        scoring_mode(model, quantized=quant is not None)  # dropout off
        nll, tokens = evaluate_nll(
            model,
            shard.held_out,
            batch_size=cfg.federation.eval_batch_size,
            pad_id=tokenizer.pad_token_id,
            share_head=cfg.federation.share_head,
        )
        model.train()
    finally:
        model.unload()
    rnd.tokenizer, rnd.shard, rnd.cache = tokenizer, shard, cache
    scored = dict(global_factors)  # what was scored (under local_B: the node's own B)
    extra: dict[str, float] = {}
    for f in features:
        try:
            extra |= f.evaluated(scored, rnd)
        except Exception:  # e.g. out of memory while tuning: the client keeps its score
            log.exception("client %d: features.%s failed after the evaluation", pid, f.name)
    metrics = MetricRecord(
        {
            "partition-id": pid,
            "nll-sum": nll,
            "tokens": tokens,
            "num-examples": len(shard.held_out),
            "held-out-loss": nll / max(tokens, 1),
            **extra,
        }
    )
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


def introduce(msg: Message, context: Context) -> Message:
    """The answer to the server's query: the partition this node holds, by which the server
    seats it in samples and panels (`fedllm.server.seats`); nothing is loaded or read."""
    return Message(wire.who_answer(partition_of(context)), reply_to=msg)


@contextmanager
def quiet_failure(cfg: RunConfig, what: str) -> Iterator[None]:
    """In a private run, a failure leaves the client as its exception's type only: its text (a
    loader's error quotes a training row, a shard check names n) stays in the node's log. Flower
    sends the raised error's text and traceback to the server, outside every guarantee. A
    recipe error or a node's refusal by its own rules names no data and goes as it is."""
    if not cfg.privacy.private:
        yield
        return
    try:
        yield
    except (ConfigError, NodeRefusal):
        raise
    except Exception as err:
        log.exception("%s failed (the server is told only the error's type)", what)
        raise RuntimeError(
            f"client {what} failed ({type(err).__name__}); a private run sends no error text: "
            "the node's log has it"
        ) from None


def make_client_app(cfg: RunConfig, *, cache: ProcessCache | None = None) -> ClientApp:
    """A ClientApp bound to a recipe (the simulation passes it by value to every worker), holding
    `cache` (a new one by default): the base loaded and each shard tokenized once per process."""
    app = ClientApp()
    cache = cache if cache is not None else ProcessCache()

    @app.train(mods=[packing.mod, *registry.client_mods()])  # arrays packed; e.g. SecAgg+
    def _train(msg: Message, context: Context) -> Message:
        with quiet_failure(cfg, "training"):
            return train(cfg, msg, context=context, cache=cache)

    @app.evaluate(mods=[packing.mod])
    def _evaluate(msg: Message, context: Context) -> Message:
        with quiet_failure(cfg, "evaluation"):
            return evaluate(cfg, msg, context=context, cache=cache)

    app.query()(introduce)
    return app
