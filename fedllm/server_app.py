"""The Flower ServerApp: the round loop with checkpoints, metrics, progress and the final adapter.

Flower's `Strategy.start` always begins at round 1 and keeps nothing on disk, so this loop drives
the same four strategy calls itself, to checkpoint after each finished round and resume from it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message
from flwr.serverapp import Grid, ServerApp

from fedllm import secagg
from fedllm.adapters import save_peft_adapter
from fedllm.checkpoint import load_checkpoint, save_checkpoint
from fedllm.config import RunConfig
from fedllm.deploy import factors_digest
from fedllm.metrics import MetricsLog, final_table, plot_held_out, table_markdown
from fedllm.privacy.server import ServerPrivacy
from fedllm.shards import adapter_shapes, base_model_dir
from fedllm.strategy import LoraStrategy

log = logging.getLogger("fedllm.server")


def say(text: str) -> None:
    """Progress for the person watching (stdout, flushed: Ray and pipes buffer otherwise)."""
    print(f"[fedllm] {text}", flush=True)


def wait_for_nodes(grid: Grid, wanted: int, *, timeout: float) -> int:
    """Wait (bounded) until `wanted` nodes are connected; returns how many are."""
    deadline = time.monotonic() + timeout
    while (n := len(list(grid.get_node_ids()))) < wanted and time.monotonic() < deadline:
        time.sleep(1.0)
    return n


def exchange(
    grid: Grid,
    messages: list[Message],
    *,
    timeout: float,
    label: str,
    describe: Callable[[Message], str] | None = None,
) -> list[Message]:
    """Push `messages`, then pull replies until all are in or `timeout` passes, reporting each one.

    The same as `grid.send_and_receive`, but the person watching sees clients finish one by one.
    """
    pending = set(grid.push_messages(messages))
    replies: list[Message] = []
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for reply in grid.pull_messages(pending):
            pending.discard(reply.metadata.reply_to_message_id)
            replies.append(reply)
            if reply.has_error():
                detail = f"failed: {reply.error.reason}"
            else:
                detail = describe(reply) if describe else "done"
            say(f"{label}: client {len(replies)}/{len(messages)} {detail}")
        if pending:
            time.sleep(0.2)
    return replies


def describe_train(reply: Message) -> str:
    """One line about a training reply: partition, rank, loss first → last, time."""
    m = reply.content["metrics"]
    return (
        f"(partition {int(m['partition-id'])}, rank {int(m['rank'])}): loss "
        f"{float(m['train-loss-first']):.3f} -> {float(m['train-loss-last']):.3f} "
        f"in {int(m['steps'])} steps, {float(m['train-seconds']):.0f}s"
    )


def evaluate_round(strategy: LoraStrategy, grid: Grid, server_round: int, timeout: float) -> dict:
    """Federated evaluation of the current global adapter; returns the server row."""
    messages = list(
        strategy.configure_evaluate(server_round, strategy.global_record(), ConfigRecord(), grid)
    )
    replies = exchange(
        grid,
        messages,
        timeout=timeout,
        label=f"round {server_round} eval",
        describe=lambda r: (
            f"(partition {int(r.content['metrics']['partition-id'])}): held-out loss "
            f"{float(r.content['metrics']['held-out-loss']):.4f}"
        ),
    )
    summary = strategy.aggregate_evaluate(server_round, replies)
    row = {"kind": "server", "round": server_round, "phase": "evaluate"}
    if summary is not None:
        row["held_out_loss"] = float(summary["held-out-loss"])
        row["eval_tokens"] = int(summary["tokens"])
    return row


def run_server(grid: Grid, cfg: RunConfig, *, resume: bool = False) -> Path:
    """Run (or resume) the federation described by `cfg`; returns the run directory."""
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics = MetricsLog(run_dir)
    strategy = LoraStrategy(cfg, shapes=adapter_shapes(cfg))
    privacy = ServerPrivacy(cfg, client_dp=strategy.client_dp)  # ε ledger and budget
    timeout = cfg.federation.round_timeout
    start = 1
    state = load_checkpoint(run_dir) if resume else None
    if state is not None:
        if state["fingerprint"] != cfg.fingerprint():
            raise ValueError(
                f"checkpoint in {run_dir} was made by another recipe "
                "(model/lora/data/seed differ); "
                "use a new name= or drop --resume"
            )
        strategy.load_state_dict(state["strategy"])
        privacy.load_state_dict(state.get("privacy"))
        start = state["round"] + 1
        metrics.truncate_after(state["round"])
        say(f"resuming {cfg.name} after round {state['round']} of {cfg.federation.rounds}")
    else:
        metrics.path.write_text("")
    n = wait_for_nodes(grid, cfg.data.num_clients, timeout=min(timeout, 600))
    say(
        f"{n} client nodes connected; aggregator {cfg.aggregator.name}; ranks "
        f"{[cfg.client_rank(i) for i in range(cfg.data.num_clients)]}"
    )

    if start == 1:
        t0 = time.perf_counter()
        row = evaluate_round(strategy, grid, 0, timeout)
        if "held_out_loss" not in row:
            raise RuntimeError(
                "no client could evaluate the base model; see the client errors above"
            )
        metrics.write([{"kind": "eval", **r} for r in strategy.round_rows] + [row])
        say(
            f"round 0 (base model): held-out loss {row.get('held_out_loss', float('nan')):.4f} "
            f"[{time.perf_counter() - t0:.0f}s]"
        )
        save_checkpoint(run_dir, _state(strategy, cfg, 0, privacy))

    for rnd in range(start, cfg.federation.rounds + 1):
        if (stop := privacy.budget_stop(strategy, rnd, grid)) is not None:
            say(stop)
            metrics.write([{"kind": "stop", "round": rnd - 1, "reason": stop}])
            break
        t0 = time.perf_counter()
        label = f"round {rnd}/{cfg.federation.rounds} train"
        if cfg.privacy.secure_aggregation.enabled:  # SecAgg+: four exchanges, only sums seen
            say(f"{label}: SecAgg+ from global {factors_digest(strategy.global_)}")
            sampled, replies, summary = secagg.train_round(strategy, grid, rnd)
            for i, reply in enumerate(replies, 1):
                say(f"{label}: client {i}/{sampled} {describe_train(reply)} (masked)")
        else:
            messages = list(
                strategy.configure_train(rnd, strategy.global_record(), ConfigRecord(), grid)
            )
            sampled = len(messages)
            say(
                f"round {rnd}/{cfg.federation.rounds}: training {sampled} clients "
                f"from global {factors_digest(strategy.global_)}"
            )
            replies = exchange(
                grid, messages, timeout=timeout, label=label, describe=describe_train
            )
            _, summary = strategy.aggregate_train(rnd, replies)
        privacy.record_round(replies, sampled=sampled)
        train_rows = [{"kind": "client", **r} for r in strategy.round_rows]
        ok = [r for r in train_rows if r["status"] == "ok"]
        if replies and all(m.has_error() for m in replies):
            raise RuntimeError(
                f"round {rnd}: every client failed (first error: {replies[0].error.reason}); "
                f"rounds up to {rnd - 1} are checkpointed in {run_dir}, fix and use --resume"
            )
        if len(replies) < sampled:
            say(
                f"round {rnd}: {sampled - len(replies)} of {sampled} clients did not "
                f"reply within {timeout:.0f}s"
            )
        agg_seconds = time.perf_counter() - t0
        eval_row = evaluate_round(strategy, grid, rnd, timeout)
        server_row = {
            **eval_row,
            "phase": "round",
            "clients_ok": len(ok),
            "clients_failed": len(train_rows) - len(ok),
            "clients_sampled": sampled,
            "train_loss": float(summary["train-loss"]) if summary else None,
            "bytes_sent": sum(r["bytes_sent"] for r in ok),
            "bytes_received": sum(r["bytes_received"] for r in ok),
            "seconds": time.perf_counter() - t0,
            "train_seconds": agg_seconds,
        }
        privacy.annotate(train_rows, server_row)
        metrics.write(
            train_rows + [{"kind": "eval", **r} for r in strategy.round_rows] + [server_row]
        )
        save_checkpoint(run_dir, _state(strategy, cfg, rnd, privacy))
        losses = " ".join(f"c{r['partition']}:{r['train_loss']:.3f}" for r in ok)
        say(
            f"round {rnd}/{cfg.federation.rounds}: {len(ok)}/{sampled} clients ok, "
            f"train loss {losses}; held-out {server_row.get('held_out_loss', float('nan')):.4f} "
            f"[{server_row['seconds']:.0f}s]{privacy.progress()}"
        )

    return finish(cfg, strategy, metrics)


def _state(strategy: LoraStrategy, cfg: RunConfig, rnd: int, privacy: ServerPrivacy) -> dict:
    return {
        "round": rnd,
        "fingerprint": cfg.fingerprint(),
        "strategy": strategy.state_dict(),
        "privacy": privacy.state_dict(),
    }


def save_client_adapters(cfg: RunConfig, strategy: LoraStrategy) -> None:
    """Each client's latest accepted update as a PEFT adapter: what an honest-but-curious server
    holds (`client_adapters/<partition>/`, with the round of each in `index.json`)."""
    folder = cfg.run_dir / "client_adapters"
    index = {}
    for pid, (rnd, factors) in sorted(strategy.client_updates.items()):
        save_peft_adapter(
            folder / str(pid),
            factors,
            base_model=str(base_model_dir(cfg)),
            target_modules=cfg.lora.target_modules,
            dropout=cfg.lora.dropout,
        )
        index[str(pid)] = {"round": rnd, "rank": max(f.rank for f in factors.values())}
    if index:
        (folder / "index.json").write_text(json.dumps(index, indent=2))


def finish(cfg: RunConfig, strategy: LoraStrategy, metrics: MetricsLog) -> Path:
    """Save the global adapter in PEFT format, the plot, and the base-vs-federated table."""
    run_dir = cfg.run_dir
    save_peft_adapter(
        run_dir / "final_adapter",
        strategy.global_,
        base_model=str(base_model_dir(cfg)),
        target_modules=cfg.lora.target_modules,
        dropout=cfg.lora.dropout,
    )
    save_client_adapters(cfg, strategy)
    rows = metrics.read()
    plot_held_out(rows, run_dir / "held_out_loss.png", title=f"{cfg.name}: held-out loss")
    last = max((r["round"] for r in rows if r.get("kind") == "server"), default=0)
    table = final_table(rows, last)  # a privacy budget may have stopped the run early
    (run_dir / "final_eval.json").write_text(json.dumps(table, indent=2))
    md = table_markdown(table)
    (run_dir / "final_eval.md").write_text(f"# {cfg.name}: base vs federated adapter\n\n{md}\n")
    say(f"finished: adapter in {run_dir / 'final_adapter'}\n{md}")
    return run_dir


def make_server_app(cfg: RunConfig, *, resume: bool = False) -> ServerApp:
    """A ServerApp bound to a recipe."""
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        run_server(grid, cfg, resume=resume)

    return app
