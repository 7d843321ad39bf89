"""One cell of the quality grid: a federation (the real ServerApp loop and ClientApp on the
in-process grid) or a reference trained in this process (centralised, local-only), read back as
one row: the own-domain held-out loss and the global test-set loss per round.

Own-domain ("personal") loss: token-weighted over every client's own held-out split, as the
server's rows report it (clients evaluate the global adapter; fedsa: each its own B). Test loss:
the recipe's global test set (`data.test_set`, drawn from every domain before partitioning, plus
whole domains no client holds), evaluated by the server with the global adapter.

Both kinds print a line per round (per client and round for local-only). An interrupted
federation resumes from its checkpoint; an interrupted local-only cell from its last finished
client (`<run dir>/local-clients.jsonl`: each client's sums, added exactly as before).
"""

from __future__ import annotations

import functools
import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from peft import PeftModel

from fedllm.aggregators import round_spec
from fedllm.client.round import client_seed
from fedllm.client.schedule import round_steps, schedule_span
from fedllm.client.train import evaluate_nll, train_local
from fedllm.data import tokenize_all
from fedllm.data.shards import ProcessCache, global_test_set, load_shard
from fedllm.deploy.local_grid import run_local
from fedllm.features import registry as features
from fedllm.launch import remove_run_dir
from fedllm.model.adapters import attach_lora
from fedllm.model.base import cached_base_model
from fedllm.recipe import RunConfig
from fedllm.server.checkpoint import load_checkpoint
from fedllm.server.metrics import MetricsLog
from fedllm.server.settings_record import changed_settings, settings_record


def _stale_checkpoint(cfg: RunConfig) -> str | None:
    """Why the cell's checkpoint cannot be resumed by this recipe (a grid that spans sessions
    may meet one a recipe or default since changed), else None."""
    state = load_checkpoint(cfg.run_dir)
    if state is None:
        return "no readable checkpoint"
    if state["fingerprint"] != cfg.fingerprint(budget=False):
        return "its checkpoint was made by another recipe (model, LoRA, data, seed or privacy)"
    saved, now = state.get("settings"), settings_record(cfg, features.build(cfg))
    if saved is None:
        return "its checkpoint predates the settings record (what its rounds ran is unknown)"
    if changed := changed_settings(saved, now, saved_round=max(1, state["round"])):
        return f"its rounds ran with other settings ({', '.join(changed)})"
    return None


def federated(cfg: RunConfig) -> dict:
    """Run (or resume, after an interruption) one federation; its curves, bytes and per-client
    final losses."""
    resume = (cfg.run_dir / "checkpoint.pt").exists()
    if resume and (stale := _stale_checkpoint(cfg)) is not None:  # an older code's recipe
        print(f"[quality] {cfg.run_dir}: {stale}; starting the cell again", flush=True)
        remove_run_dir(cfg.run_dir, Path(cfg.output_dir))
        resume = False
    start = time.perf_counter()
    run_dir, _ = run_local(cfg, resume=resume)
    seconds = time.perf_counter() - start
    rows = MetricsLog(run_dir).read()
    server = {r["round"]: r for r in rows if r.get("kind") == "server" and "round" in r}
    rounds = range(cfg.federation.rounds + 1)
    last = max(r for r in server if r <= cfg.federation.rounds)
    clients = {
        int(r["partition"]): r["held_out_loss"]
        for r in rows
        if r.get("kind") == "eval" and r["round"] == last
    }
    spec = round_spec(cfg.aggregator.name)
    kind = "merge" if spec.merge else "A only, B local" if spec.local_B else "adapter"
    return {
        "semantics": kind + (", A frozen" if spec.freeze_A else ""),
        "personal": [server[r].get("held_out_loss") for r in rounds if r in server],
        "test": [server[r].get("test_loss") for r in rounds if r in server],
        "clients": clients,
        "mb_moved": sum(
            server[r].get("bytes_sent", 0) + server[r].get("bytes_received", 0) for r in server
        )
        / 1e6,
        "seconds": seconds,
        "resumed": resume,
    }


def centralised(cfg: RunConfig) -> dict:
    """One LoRA of the largest client rank on the pooled training data, as many steps per round
    as all clients together."""
    return _reference(cfg, pooled=True)


def local_only(cfg: RunConfig) -> dict:
    """Every client alone on its own shard with the federation's steps: personal loss on its
    own held-out split, test loss = the mean of the clients' losses on the test set, each
    scored with its own adapter (at the first and last round only; None between)."""
    return _reference(cfg, pooled=False)


def _reference(cfg: RunConfig, *, pooled: bool) -> dict:
    start = time.perf_counter()
    cache = ProcessCache()
    base, tok = cached_base_model(cfg, cache=cache)
    shards = [
        load_shard(cfg, pid, tokenizer=tok, cache=cache) for pid in range(cfg.data.num_clients)
    ]
    fmt = {"prompt_format": cfg.data.prompt_format, "max_length": cfg.data.max_length}
    test = tokenize_all(global_test_set(cfg, cache=cache), tok, **fmt)
    fed = cfg.federation
    rounds = range(fed.rounds + 1)
    pad = tok.pad_token_id
    nll = nll_scorer(cfg, pad)

    def lora(rank: int, seed: int) -> PeftModel:
        torch.manual_seed(seed)  # peft draws A from the global generator
        return attach_lora(
            base,
            rank=rank,
            alpha=cfg.client_scaling(rank) * rank,
            dropout=0.0,
            target_modules=cfg.lora.target_modules,
        )

    steps = functools.partial(local_steps, cfg)

    personal: list[list[float]] = [[0.0, 0] for _ in rounds]
    tested: list[list[float]] = [[0.0, 0] for _ in rounds]
    clients: dict[int, float] = {}
    done: dict[int, dict] = {}  # local-only: each client's sums, by partition
    if pooled:
        model = lora(max(cfg.client_rank(p) for p in range(len(shards))), cfg.seed)
        data = [ex for s in shards for ex in s.train]
        per_round = sum(steps(len(s.train)) for s in shards)
        for rnd in rounds:
            if rnd:
                seed = cfg.seed * 7 + rnd
                train_round(cfg, model, data, steps=per_round, rnd=rnd, seed=seed, pad_id=pad)
            for s in shards:
                _add(personal[rnd], nll(model, s.held_out))
            if test:
                _add(tested[rnd], nll(model, test))
            test_note = f", test {ratio(tested[rnd]):.4f}" if test else ""
            _say(f"centralised round {rnd}/{fed.rounds}: own {ratio(personal[rnd]):.4f}{test_note}")
        clients = {s.partition_id: ratio(nll(model, s.held_out)) for s in shards}
        model.unload()
    else:
        # The test set at the start and the end only (8 clients x every round was most of the
        # cell); at round 0 every client's B is 0, so each adapter is the base: scored once.
        done = _finished_clients(cfg.run_dir, cfg.fingerprint())
        at_base = next((d["at_base"] for d in done.values()), None)
        for s in shards:
            pid = s.partition_id
            if pid not in done:
                done[pid] = _local_client(
                    cfg, s, lora, nll, steps, test=test, at_base=at_base, pad_id=pad
                )
                at_base = done[pid]["at_base"]
                _save_client(cfg.run_dir, {**done[pid], "recipe": cfg.fingerprint()})
            for rnd in rounds:
                _add(personal[rnd], done[pid]["personal"][rnd])
                if (tested_at := done[pid]["tested"][rnd]) is not None:
                    _add(tested[rnd], tested_at)
            clients[pid] = done[pid]["final"]
        before = sum(d["seconds"] for d in done.values() if d.get("earlier"))
        start -= before  # the cell's time includes its clients finished before an interruption
    return {
        "semantics": "reference",
        "personal": [ratio(p) for p in personal],
        "test": [ratio(t) if t[1] else None for t in tested] if test else [None for _ in rounds],
        "clients": clients,
        "mb_moved": 0.0,
        "seconds": time.perf_counter() - start,
        "resumed": any(d.get("earlier") for d in done.values()),
    }


def _local_client(
    cfg: RunConfig, shard, lora, nll, steps, *, test: list, at_base, pad_id: int
) -> dict:
    """One client alone on its shard: its held-out sums per round, test sums at the first and
    last round (None between), the final loss and its seconds."""
    t0, fed, pid = time.perf_counter(), cfg.federation, shard.partition_id
    model = lora(cfg.client_rank(pid), cfg.seed * 1009 + pid)
    personal, tested = [], []
    for rnd in range(fed.rounds + 1):
        if rnd:  # the client app's seed for this client and round
            seed = client_seed(cfg, server_round=rnd, partition=pid)
            n = steps(len(shard.train))
            train_round(cfg, model, shard.train, steps=n, rnd=rnd, seed=seed, pad_id=pad_id)
        personal.append(list(nll(model, shard.held_out)))
        if test and rnd == 0:
            at_base = at_base if at_base is not None else list(nll(model, test))
            tested.append(at_base)
        elif test and rnd == fed.rounds:
            tested.append(list(nll(model, test)))
        else:
            tested.append(None)
        _say(
            f"local only client {pid + 1}/{cfg.data.num_clients} round {rnd}/{fed.rounds}: "
            f"own {ratio(personal[-1]):.4f} [{time.perf_counter() - t0:.0f}s]"
        )
    model.unload()
    return {
        "partition": pid,
        "personal": personal,
        "tested": tested,
        "at_base": at_base,
        "final": ratio(personal[-1]),
        "seconds": time.perf_counter() - t0,
    }


def _finished_clients(run_dir: Path, recipe: str) -> dict[int, dict]:
    """Clients a local-only cell of this very recipe (fingerprint) finished before an
    interruption, marked `earlier`; rows of another recipe are ignored."""
    path = run_dir / LOCAL_CLIENTS
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return {r["partition"]: {**r, "earlier": True} for r in rows if r.get("recipe") == recipe}


def _save_client(run_dir: Path, row: dict) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / LOCAL_CLIENTS).open("a") as f:
        f.write(json.dumps(row) + "\n")


LOCAL_CLIENTS = "local-clients.jsonl"


def _say(text: str) -> None:
    print(f"[quality] {text}", flush=True)


def local_steps(cfg: RunConfig, n_examples: int) -> int:
    """A client's local steps per round on `n_examples` training examples (the client app's)."""
    return round_steps(cfg.federation, n_examples)


def train_round(
    cfg: RunConfig, model: PeftModel, data: list, *, steps: int, rnd: int, seed: int, pad_id: int
) -> None:
    """One round of local steps, scheduled as the client app schedules them."""
    fed = cfg.federation
    offset, span = schedule_span(
        scope=fed.schedule_scope, server_round=rnd, rounds=fed.rounds, steps=steps
    )
    train_local(
        model,
        data,
        steps=steps,
        batch_size=fed.batch_size,
        pad_id=pad_id,
        optimizer=fed.optimizer,
        lr=fed.lr,
        weight_decay=fed.weight_decay,
        schedule=fed.schedule,
        warmup_steps=fed.warmup_steps,
        schedule_offset=offset,
        schedule_steps=span,
        accumulation=fed.gradient_accumulation_steps,
        precision=fed.precision,
        max_grad_norm=fed.max_grad_norm,
        seed=seed,
    )


def nll_scorer(cfg: RunConfig, pad_id: int) -> Callable[[PeftModel, list], tuple[float, int]]:
    """model, examples -> (NLL sum, tokens), in eval mode at the recipe's precision and eval batch
    (what the client app reports for its held-out split)."""

    def nll(model: PeftModel, examples: list) -> tuple[float, int]:
        model.eval()
        out = evaluate_nll(
            model,
            examples,
            batch_size=cfg.federation.eval_batch_size,
            pad_id=pad_id,
            precision=cfg.federation.precision,
        )
        model.train()
        return out

    return nll


def _add(total: list[float], part: tuple[float, int]) -> None:
    total[0] += part[0]
    total[1] += part[1]


def ratio(part: Sequence[float]) -> float:
    """Mean NLL per token of an (NLL sum, tokens) pair."""
    return part[0] / max(part[1], 1)


def machine() -> dict:
    """Load average, torch threads and CPU when a cell starts (a shared or slower machine slows
    every row; the grid spans sessions on different machines)."""
    return {"load": round(os.getloadavg()[0], 2), "threads": torch.get_num_threads(), "cpu": _cpu()}


def _cpu() -> str:
    """The CPU's model name (Linux), else what `platform` knows."""
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def run_dir(out: Path, *, regime: str, seed: int, label: str) -> tuple[Path, str]:
    """(output_dir, name) of one cell's run: <out>/<regime>/s<seed>/<label slug>."""
    slug = label.replace(" +", "-").replace(" ", "-").replace("+", "")
    return out / regime / f"s{seed}", slug
