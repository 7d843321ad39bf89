"""The Flower ServerApp: the round loop with checkpoints, metrics, progress and the final adapter.

Flower's `Strategy.start` always begins at round 1 and keeps nothing on disk, so this loop drives
the strategy itself, to checkpoint after each finished round and resume from it. Features are
called at the loop's own hooks (before a round, a round's whole exchange, after it); the loop
knows none of them by name.
"""

from __future__ import annotations

import functools
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedllm.data.shards import ProcessCache
from fedllm.errors import RunFailed, short_reason
from fedllm.features import registry
from fedllm.features.base import Feature
from fedllm.features.types import RoundResult
from fedllm.files import keep_resume_recipe
from fedllm.model.adapters import factors_digest
from fedllm.model.base import adapter_shapes
from fedllm.recipe.schema import RunConfig
from fedllm.server.checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint
from fedllm.server.evaluation import TestSetEvaluator, extra_means
from fedllm.server.exchange import (
    describe_evaluation,
    describe_train,
    exchange,
    say,
    wait_for_nodes,
)
from fedllm.server.metrics import MetricsLog
from fedllm.server.outputs import finish, keep_best, snapshot
from fedllm.server.settings_record import (
    aggregator_changed,
    changed_settings,
    describe_changes,
    settings_record,
)
from fedllm.server.strategy import LoraStrategy
from fedllm.server.trackers import open_trackers

AGGREGATOR_FAILURES = 3  # rounds running whose aggregate raised before the run stops


class Run:
    """One run on the server: recipe, strategy, active features, metrics file, grid."""

    def __init__(self, cfg: RunConfig, grid: Grid, *, cache: ProcessCache | None = None) -> None:
        """`cache`: what this process keeps (the base model the test set is scored on); a run
        in the clients' own process (`run_local`) shares theirs."""
        self.cfg, self.grid = cfg, grid
        self.cache = cache if cache is not None else ProcessCache()
        self.features: list[Feature] = registry.build(cfg)
        for f in self.features:
            f.on_server(cache=self.cache)
        shapes = adapter_shapes(cfg, cache=self.cache)
        self.strategy = LoraStrategy(cfg, shapes=shapes, features=self.features)
        self.metrics = MetricsLog(cfg.run_dir, sinks=open_trackers(cfg))  # + trackers
        self.timeout = cfg.federation.round_timeout
        self.test_set = (
            TestSetEvaluator(cfg, cache=self.cache) if cfg.data.test_set is not None else None
        )
        self.missed: set[int] = set()  # nodes that sent no training reply last round
        self.aggregator_failures = 0  # rounds running whose aggregate raised

    # -- checkpoints -----------------------------------------------------------------------------
    def save(self, server_round: int, *, pending: dict[str, Any] | None = None) -> None:
        """Checkpoint after `server_round`; `pending` marks a round whose clients may be training
        now, so that a crash before its end is still accounted on --resume."""
        features = {f.state_key or f.name: f.state_dict() for f in self.features}
        fingerprint = self.cfg.fingerprint(budget=False)  # a resume may change the ε budget
        state = {"round": server_round, "fingerprint": fingerprint, "pending": pending}
        state["settings"] = settings_record(self.cfg, self.features)
        # a pending round goes into the fallback copy as well: a resume from either charges it
        save_checkpoint(
            self.cfg.run_dir,
            {**state, "strategy": self.strategy.state_dict(), **features},
            as_previous=pending is not None,
        )

    def resume(self) -> int:
        """Load the last checkpoint; returns the first round still to run."""
        state = load_checkpoint(self.cfg.run_dir)
        if state is None:
            raise FileNotFoundError(
                f"--resume: no {CHECKPOINT} in {self.cfg.run_dir} on the server, so there is no "
                "finished round to continue from; drop --resume to start the run from round 0"
            )
        if state["fingerprint"] != self.cfg.fingerprint(budget=False):
            raise ValueError(
                f"checkpoint in {self.cfg.run_dir} was made by another recipe "
                "(model/lora/data/seed/privacy differ); use a new name= or drop --resume"
            )
        if why := aggregator_changed(state.get("settings"), self.cfg):
            raise ValueError(f"--resume: {why}")
        if state["round"] > self.cfg.federation.rounds:  # "after round 4 of 2", finished at once
            raise ValueError(
                f"--resume: the checkpoint is after round {state['round']}, but "
                f"federation.rounds is {self.cfg.federation.rounds}; set it to {state['round']} "
                "or more to continue the run"
            )
        now = settings_record(self.cfg, self.features)
        changes = changed_settings(state.get("settings"), now, saved_round=state["round"])
        keep_resume_recipe(self.cfg.run_dir, self.cfg.to_yaml())  # its checks passed
        for line in describe_changes(changes, saved_round=state["round"]):
            say(line)
        self.strategy.load_state_dict(state["strategy"])
        for f in self.features:
            f.load_state_dict(state.get(f.state_key or f.name))
        if (lost := state.get("pending")) is not None:  # clients trained, the round never ended
            for f in self.features:
                f.lost_round(lost["round"], partitions=lost["partitions"], sampled=lost["sampled"])
            say(f"round {lost['round']} was interrupted after its clients were asked to train")
            self.save(state["round"])  # the charge on disk now, even if this run stops at once
        self.metrics.truncate_after(state["round"])
        if missed := self.metrics.catch_up(state["round"]):  # checkpointed, never published
            say(f"round {', '.join(map(str, missed))} sent to the trackers (a crash kept it)")
        # if a crash cut it
        keep_best(self.cfg, self.strategy, metrics=self.metrics, server_round=state["round"])
        if changes:  # on disk: the next checkpoint keeps only today's settings
            row = {"kind": "resume", "round": state["round"], "changed": changes}
            self.metrics.write([row], publish=False)
        say(
            f"resuming {self.cfg.name} after round {state['round']} of {self.cfg.federation.rounds}"
        )
        return state["round"] + 1

    # -- rounds ----------------------------------------------------------------------------------
    def evaluate(self, server_round: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Evaluation of the current global adapter by the round's client panel and the
        server's own test set: (server row, client eval rows)."""
        s = self.strategy
        messages = list(
            s.configure_evaluate(server_round, s.global_record(), ConfigRecord(), self.grid)
        )
        replies = exchange(
            self.grid,
            messages,
            timeout=self.timeout,
            label=f"round {server_round} eval",
            describe=functools.partial(
                describe_evaluation,
                private=s.private,
                declared=s.eval_metrics,
            ),
        )
        loss, rows, dropped = s.evaluate_round(server_round, replies)
        row: dict[str, Any] = {"kind": "server", "round": server_round, "phase": "evaluate"}
        row["eval_clients"] = len(messages)  # the panel asked (federation.evaluate_clients)
        if dropped:
            row["eval_dropped"] = len(dropped)
        if failed := len(messages) - sum(not m.has_error() for m in replies):
            row["eval_failed"] = failed  # failed or missed the deadline: another mix (h99)
        if loss is not None:
            row["held_out_loss"], row["eval_tokens"] = loss
            row.update(extra_means(rows))  # the features' evaluation metrics
        if self.test_set is not None:  # the server's own global test set, no client involved
            row["test_loss"], row["test_tokens"] = self.test_set.evaluate(s.global_)
        if s.private:  # per-client held-out losses are outside any training guarantee
            return row, []
        return row, [r.to_json() for r in rows]

    def stop_reason(self, server_round: int) -> str | None:
        """Why `server_round` must not run (a feature's budget), or None. Otherwise the round is
        marked pending with the partitions that may train in it (after waiting for restarting
        nodes, so the sample is the one the round will ask)."""
        if (grace := self.cfg.federation.node_grace) > 0:  # a restarting node may rejoin first
            wait_for_nodes(self.grid, self.cfg.data.num_clients, timeout=grace)
        nodes = self.strategy.sample(server_round, self.grid)
        partitions = self.strategy.may_train(nodes)
        for f in self.features:
            if why := f.before_round(server_round, partitions=partitions, sampled=len(nodes)):
                return why
        pending = {"round": server_round, "partitions": partitions, "sampled": len(nodes)}
        self.save(server_round - 1, pending=pending)
        return None

    def train(self, server_round: int) -> RoundResult:
        """One training round: a feature's own exchange (SecAgg+), else the plain one."""
        s, label = self.strategy, f"round {server_round}/{self.cfg.federation.rounds} train"
        for f in self.features:
            result = f.run_round(server_round, strategy=s, grid=self.grid)
            if result is not None:
                return result
        messages = list(
            s.configure_train(server_round, s.global_record(), ConfigRecord(), self.grid)
        )
        say(
            f"round {server_round}/{self.cfg.federation.rounds}: training {len(messages)} "
            f"clients from global {factors_digest(s.global_)}"
        )
        replies = exchange(
            self.grid, messages, timeout=self.timeout, label=label, describe=describe_train
        )
        sent = {m.metadata.dst_node_id for m in messages}
        self.warn_repeat_misses(server_round, sent - {r.metadata.src_node_id for r in replies})
        if replies and len(replies) == len(messages) and all(m.has_error() for m in replies):
            raise RunFailed(
                f"round {server_round}: every client failed (first error: "
                f"{short_reason(replies[0].error.reason)}); rounds up to {server_round - 1} are "
                f"checkpointed in {self.cfg.run_dir}, fix and use --resume"
            )
        return s.train_round(server_round, replies, sampled=len(messages))

    def warn_repeat_misses(self, server_round: int, missed: set[int]) -> None:
        """Name the nodes that sent no training reply two rounds running yet are still
        connected: slow, or a SuperNode stuck one reply behind (docs/deployment.md, Failures)."""
        again = sorted(missed & self.missed & set(self.grid.get_node_ids()))
        self.missed = missed
        if again:
            say(
                f"round {server_round}: node {', '.join(map(str, again))} missed the deadline two "
                "rounds running while connected: slow (raise federation.round_timeout), or a "
                "SuperNode stuck one reply behind (its log shows each `Sending:` right after "
                "the next `Receiving:`): restart it (docs/deployment.md, Failures)"
            )

    def round(self, server_round: int) -> None:
        """Train, evaluate, record, checkpoint and report one round."""
        t0 = time.perf_counter()
        result = self.train(server_round)
        if result.replies < result.sampled:
            say(
                f"round {server_round}: {result.sampled - result.replies} of {result.sampled} "
                f"clients did not reply within {self.timeout:.0f}s"
            )
        train_seconds = time.perf_counter() - t0
        eval_row, eval_rows = self.evaluate(server_round)
        ok = [r.reply for r in result.ok if r.reply is not None]
        server_row = {
            **eval_row,
            "phase": "round",
            "clients_ok": len(result.ok),
            "clients_failed": len(result.rows) - len(result.ok),
            "clients_sampled": result.sampled,
            "train_loss": result.train_loss,
            "bytes_sent": sum(r.bytes_sent for r in ok),
            "bytes_received": sum(r.bytes_received for r in ok),
            "seconds": time.perf_counter() - t0,
            "train_seconds": train_seconds,
        }
        record_features(self.features, result, server_row=server_row)
        rows = [r.to_json() for r in result.rows] + eval_rows + [server_row]
        self.metrics.write(rows, publish=False)
        # the snapshot first: a crash between the two reruns this round and writes it again
        # output.snapshot_every
        snapshot(self.cfg, self.strategy, metrics=self.metrics, server_round=server_round)
        self.save(server_round)
        # after the checkpoint: a crash before it ends is mended by `resume`, which keeps the
        # checkpointed round's adapter if it is the best (an earlier best is never overwritten
        # by a round that will be rerun)
        # output.best_by
        best = keep_best(self.cfg, self.strategy, metrics=self.metrics, server_round=server_round)
        self.metrics.publish(rows)  # to the trackers once the round can no longer be rerun
        losses = " ".join(
            f"c{r.partition}:{r.train_loss:.3f}" for r in ok if r.train_loss is not None
        )
        losses = losses or "not sent (private replies)"
        progress = "".join(f.progress() for f in self.features)
        say(
            f"round {server_round}/{self.cfg.federation.rounds}: {len(ok)}/{result.sampled} "
            f"clients ok, train loss {losses}; held-out "
            f"{server_row.get('held_out_loss', float('nan')):.4f}"
            f"{with_extras(server_row, self.strategy.eval_metrics)}{with_test_loss(server_row)} "
            f"[{server_row['seconds']:.0f}s]{' (best so far)' if best else ''}{progress}"
        )
        self.aggregator_failures = aggregator_failures(
            self.aggregator_failures, result, cfg=self.cfg, server_round=server_round
        )

    def base_round(self) -> None:
        """Round 0: the base model's held-out loss, the reference every round is compared to."""
        t0 = time.perf_counter()
        row, eval_rows = self.evaluate(0)
        if "held_out_loss" not in row and "test_loss" not in row:
            raise RuntimeError(
                "no client could evaluate the base model; see the client errors above"
            )
        row["seconds"] = seconds = time.perf_counter() - t0
        self.metrics.write([*eval_rows, row], publish=False)
        held = row.get("held_out_loss", float("nan"))
        say(f"round 0 (base model): held-out loss {held:.4f}{with_test_loss(row)} [{seconds:.0f}s]")
        self.save(0)
        self.metrics.publish([*eval_rows, row])


def record_features(
    features: Sequence[Feature], result: RoundResult, *, server_row: dict[str, Any]
) -> None:
    """Each feature's `record` (ε, missed nodes...), refusing one that changes or drops a column
    the server wrote: a plugin's bug would otherwise pass its numbers off as the server's."""
    core = dict(server_row)
    for f in features:
        f.record(result, server_row=server_row)
        if changed := sorted(k for k in core if server_row.get(k, core) is not core[k]):
            raise ValueError(
                f"features.{f.name}: record() changed the server row's own columns {changed}; "
                "a feature may only add keys of its own"
            )


def aggregator_failures(
    before: int, result: RoundResult, *, cfg: RunConfig, server_round: int
) -> int:
    """Rounds running whose aggregate raised, with this one; RunFailed (the rounds are
    checkpointed) at `AGGREGATOR_FAILURES`: a refused round keeps a run alive against one bad
    round of updates, but every round refused is a bug in the aggregator or a feature, and
    nothing would train."""
    if result.aggregator_error is None:
        return 0
    if (failures := before + 1) >= AGGREGATOR_FAILURES:
        raise RunFailed(
            f"round {server_round}: the aggregator raised {failures} rounds running "
            f"({result.aggregator_error}), on updates that passed screening: a bug in aggregator "
            f"{cfg.aggregator.name!r} or a feature, not a client (the traceback is in the log "
            f"above); rounds up to {server_round} are checkpointed in {cfg.run_dir} (the "
            "refused ones left the global unchanged), fix and use --resume"
        )
    return failures


def with_extras(row: dict[str, Any], declared: Mapping[str, Any]) -> str:
    """The features' `declared` evaluation metrics in a server row, for a progress line."""
    keys = [k.replace("-", "_") for k in declared]
    return "".join(f", {k.replace('_', ' ')} {row[k]:.4f}" for k in keys if k in row)


def with_test_loss(row: dict[str, Any]) -> str:
    """The server's test-set loss for a progress line, if it has one."""
    return f", test {row['test_loss']:.4f}" if "test_loss" in row else ""


def run_server(
    grid: Grid, cfg: RunConfig, *, resume: bool = False, cache: ProcessCache | None = None
) -> Path:
    """Run (or resume) the federation described by `cfg`; returns the run directory. `cache`:
    the process's own (shared with clients that run in this process)."""
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    run = Run(cfg, grid, cache=cache)
    start = run.resume() if resume else 0  # the first round still to run (0: the base round)
    run.strategy.begin(max(start, 1))
    if start == 0:
        run.metrics.path.write_text("")
    n = wait_for_nodes(grid, cfg.data.num_clients, timeout=min(run.timeout, 600))
    ranks = Counter(cfg.client_rank(i) for i in range(cfg.data.num_clients))
    ranks_text = ", ".join(f"{r} x{c}" for r, c in sorted(ranks.items()))  # not one per client
    say(f"{n} client nodes connected; aggregator {cfg.aggregator.name}; ranks {ranks_text}")
    if start == 0:
        run.base_round()
    for rnd in range(max(start, 1), cfg.federation.rounds + 1):
        if (stop := run.stop_reason(rnd)) is not None:
            say(stop)
            run.metrics.write([{"kind": "stop", "round": rnd - 1, "reason": stop}])
            break
        run.round(rnd)
    return finish(cfg, run.strategy, metrics=run.metrics)


def make_server_app(cfg: RunConfig, *, resume: bool = False) -> ServerApp:
    """A ServerApp bound to a recipe."""
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        run_server(grid, cfg, resume=resume)

    return app
