"""`output.best_by`: the best round's global adapter in best_adapter/, beside the final one.

Built on test_export's finished tiny run (no federation): the strategy's global factors are set
by hand for each round and the server rows written as the round loop writes them, so which round
is kept follows from the losses written here.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from flwr.app import Context, Message, MessageType
from peft import PeftModel
from test_export import MODULE, make_run, random_factors
from transformers import AutoModelForCausalLM

from fedllm.cli import main
from fedllm.client.app import make_client_app
from fedllm.deploy.local_grid import LocalGrid, server_identity
from fedllm.features.types import RoundResult
from fedllm.files import replace_folder
from fedllm.model import packing
from fedllm.model.adapters import from_record, read_factors
from fedllm.model.card import CARD_JSON, resolve_adapter_base
from fedllm.recipe import load_recipe
from fedllm.server import app
from fedllm.server.app import Run, run_server
from fedllm.server.metrics import MetricsLog
from fedllm.server.outputs import best_line, best_metric, finish, keep_best

RECIPE = "recipes/tiny.yaml"


def _round(cfg, strategy, metrics, rnd: int, **losses: float) -> None:
    """Round `rnd` ends: a new global (seeded by the round), its server row, then keep_best."""
    strategy.global_ = random_factors(strategy.shapes, 4, cfg.client_scaling(4), seed=100 + rnd)
    metrics.write([{"kind": "server", "round": rnd, "phase": "round", **losses}])
    keep_best(cfg, strategy, metrics=metrics, server_round=rnd)


def _kept(run_dir) -> tuple[int, float]:
    card = json.loads((run_dir / "best_adapter" / CARD_JSON).read_text())
    return card["round"], card["metrics"]["held_out_loss"]


def test_the_lowest_held_out_round_is_kept_and_loads_with_stock_peft(tmp_path) -> None:
    cfg, run_dir, strategy, metrics = make_run(tmp_path, "federation.rounds=6")
    metrics.path.write_text("")  # make_run's own rows aside: the rounds below are the run
    for rnd, loss in [(1, 3.0), (2, 2.5), (3, 2.7), (4, 2.5), (5, math.nan), (6, 2.6)]:
        _round(cfg, strategy, metrics, rnd, held_out_loss=loss, test_loss=loss + 1)
        if rnd == 2:
            kept = strategy.global_[MODULE].delta().float()
    # round 4 ties round 2 (the earlier stays); a NaN round is never the best
    assert _kept(run_dir) == (2, 2.5)
    card = json.loads((run_dir / "best_adapter" / CARD_JSON).read_text())
    assert (card["what"], card["metrics"]["test_loss"]) == ("best", 3.5)
    adapter = run_dir / "best_adapter"
    base = AutoModelForCausalLM.from_pretrained(resolve_adapter_base(adapter))
    layer = PeftModel.from_pretrained(base, str(adapter)).get_submodule(
        "base_model.model." + MODULE
    )
    got = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    torch.testing.assert_close(got, kept)  # round 2's ΔW, not the last round's
    line = best_line(cfg, metrics.read())
    assert line == (
        "\nbest round by held_out_loss: 2 (2.5000; the last round's 2.6000), in "
        f"{run_dir / 'best_adapter'}"
    )
    out = tmp_path / "best"
    assert main(["export", str(run_dir), str(out), "--best"]) == 0
    assert json.loads((out / CARD_JSON).read_text())["round"] == 2
    out2 = tmp_path / "r2"  # round 2 has no snapshot: --round 2 finds it in best_adapter/
    assert main(["export", str(run_dir), str(out2), "--round", "2"]) == 0


def test_test_loss_selects_on_the_servers_test_set(tmp_path) -> None:
    cfg, run_dir, strategy, metrics = make_run(
        tmp_path, "output.best_by=test_loss", "data.test_set={fraction: 0.1}"
    )
    metrics.path.write_text("")
    _round(cfg, strategy, metrics, 1, held_out_loss=3.0, test_loss=2.0)
    _round(cfg, strategy, metrics, 2, held_out_loss=2.0, test_loss=2.2)
    assert _kept(run_dir) == (1, 3.0)


def test_off_keeps_none_and_export_best_says_why(tmp_path, capsys) -> None:
    cfg, run_dir, strategy, metrics = make_run(tmp_path, "output.best_by=none")
    _round(cfg, strategy, metrics, 3, held_out_loss=1.0)
    finish(cfg, strategy, metrics=metrics)
    assert not (run_dir / "best_adapter").exists()
    assert main(["export", str(run_dir), str(tmp_path / "o"), "--best"]) != 0
    assert "output.best_by is none" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["output.best_by=test_loss"], "output.best_by: test_loss needs data.test_set"),
        (
            [
                "output.best_by=held_out_loss",
                "federation.evaluate_clients=none",
                "data.test_set={fraction: 0.1}",
            ],
            "output.best_by: held_out_loss needs clients that evaluate",
        ),
        (["output.best_by=held_out_loss", "aggregator.name=fedsa"], "server holds A only"),
        (
            ["output.best_by=lowest"],
            "'auto', 'held_out_loss', 'held_out_vote', 'test_loss' or 'none'",
        ),
        (
            ["output.best_by=held_out_vote", "data.num_clients=2", "lora.ranks=[2,4]"],
            r"held_out_vote needs at least 3 evaluating clients \(of 2, one liar is half",
        ),
        (
            ["output.best_by=held_out_vote", "federation.evaluate_clients=0.5"],
            "held_out_vote compares each client's losses across rounds, so every client must",
        ),
        (
            ["output.best_by=held_out_vote", "privacy.secure_aggregation.enabled=true"],
            "held_out_vote compares each client's losses across rounds, which a private run",
        ),
    ],
)
def test_a_best_by_that_cannot_be_measured_is_refused_naming_the_keys(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_recipe(RECIPE, overrides)
    load_recipe(RECIPE, [*overrides[1:], "output.best_by=null"])  # off: the rest is fine


def test_auto_selects_on_what_the_run_measures() -> None:
    def metric(*overrides: str) -> str | None:
        return best_metric(load_recipe(RECIPE, list(overrides)))

    assert metric() == "held_out_loss"  # clients evaluate by default
    no_panel = ("federation.evaluate_clients=none", "data.test_set={fraction: 0.1}")
    assert metric(*no_panel) == "test_loss"  # a recipe that loaded before best_by still loads
    assert metric("aggregator.name=fedsa") is None  # the server's adapter has no B
    assert metric("output.best_by=none") is None and metric("output.best_by=null") is None


def test_a_round_scored_by_fewer_clients_is_not_compared(tmp_path) -> None:
    cfg, run_dir, strategy, metrics = make_run(tmp_path, "federation.rounds=3")
    metrics.path.write_text("")
    _round(cfg, strategy, metrics, 1, held_out_loss=3.0)
    _round(cfg, strategy, metrics, 2, held_out_loss=1.0, eval_dropped=1)  # one easy client
    assert _kept(run_dir) == (1, 3.0)
    # h99: a client that failed or missed the deadline was not counted, only a dropped reply
    _round(cfg, strategy, metrics, 3, held_out_loss=0.5, eval_failed=1)
    assert _kept(run_dir) == (1, 3.0)


def test_a_resume_that_changes_the_metric_drops_the_other_metrics_pick(tmp_path, capsys) -> None:
    cfg, run_dir, strategy, metrics = make_run(
        tmp_path, "federation.rounds=4", "data.test_set={fraction: 0.1}"
    )
    metrics.path.write_text("")
    _round(cfg, strategy, metrics, 1, held_out_loss=3.0, test_loss=2.0)
    _round(cfg, strategy, metrics, 2, held_out_loss=2.0, test_loss=2.5)
    assert _kept(run_dir) == (2, 2.0)
    Run.save(SimpleNamespace(cfg=cfg, features=[], strategy=strategy), 2)
    by_test = cfg.model_copy(
        update={"output": cfg.output.model_copy(update={"best_by": "test_loss"})}
    )
    Run.resume(SimpleNamespace(cfg=by_test, features=[], strategy=strategy, metrics=metrics))
    said = capsys.readouterr().out
    assert "best_adapter removed (chosen by held_out_loss, output.best_by now test_loss)" in said
    assert not (run_dir / "best_adapter").exists()  # round 1, the best by test loss, is gone
    assert not (run_dir / "best_adapter.prev").exists()  # round 1's by held-out loss too
    _round(by_test, strategy, metrics, 3, held_out_loss=1.0, test_loss=2.4)
    assert not (run_dir / "best_adapter").exists()  # 2.4 is not below round 1's 2.0
    assert best_line(by_test, metrics.read()) == ""  # nothing said of an adapter not kept
    _round(by_test, strategy, metrics, 4, held_out_loss=1.5, test_loss=1.9)
    card = json.loads((run_dir / "best_adapter" / CARD_JSON).read_text())
    assert (card["round"], card["selected_by"], card["metrics"]["test_loss"]) == (
        4,
        "test_loss",
        1.9,
    )


def test_the_round_loop_keeps_the_best_after_the_rounds_checkpoint(
    tmp_path, monkeypatch, capsys
) -> None:
    cfg, run_dir, strategy, metrics = make_run(tmp_path, "federation.rounds=3")
    metrics.path.write_text("")
    calls: list[tuple[str, int]] = []
    losses = {1: 3.0, 2: 2.5, 3: 2.8}  # over-fits in the last round
    run = SimpleNamespace(
        cfg=cfg,
        strategy=strategy,
        metrics=metrics,
        features=[],
        timeout=60.0,
        aggregator_failures=0,
        train=lambda rnd: RoundResult(sampled=2, rows=[], replies=2),
        evaluate=lambda rnd: ({"kind": "server", "round": rnd, "held_out_loss": losses[rnd]}, []),
        save=lambda rnd, **_: calls.append(("save", rnd)),
    )

    def recorded(*args, **kwargs):
        calls.append(("best", kwargs["server_round"]))
        return keep_best(*args, **kwargs)

    monkeypatch.setattr(app, "keep_best", recorded)
    for rnd in (1, 2, 3):
        Run.round(run, rnd)
    assert calls == [(step, rnd) for rnd in (1, 2, 3) for step in ("save", "best")]
    assert _kept(run_dir) == (2, 2.5)
    lines = [x for x in capsys.readouterr().out.splitlines() if "clients ok" in x]
    assert ["(best so far)" in x for x in lines] == [True, True, False]


def test_a_resume_keeps_the_checkpointed_round_a_crash_kept_from_best_adapter(tmp_path) -> None:
    """best_adapter/ is written after the round's checkpoint: a crash between the two leaves the
    earlier best, and the resume puts the checkpointed round there if it is the best."""
    cfg, run_dir, strategy, metrics = make_run(tmp_path, "federation.rounds=3")
    metrics.path.write_text("")
    _round(cfg, strategy, metrics, 1, held_out_loss=3.0)
    strategy.global_ = random_factors(strategy.shapes, 4, cfg.client_scaling(4), seed=102)
    metrics.write([{"kind": "server", "round": 2, "phase": "round", "held_out_loss": 2.0}])
    run = SimpleNamespace(cfg=cfg, features=[], strategy=strategy, metrics=metrics)
    Run.save(run, 2)  # round 2 checkpointed, then the crash: keep_best never ran for it
    assert _kept(run_dir) == (1, 3.0)
    Run.resume(run)
    assert _kept(run_dir) == (2, 2.0)


def test_a_resume_from_the_fallback_checkpoint_keeps_the_best_of_its_rounds(
    tmp_path, capsys
) -> None:
    """checkpoint.pt damaged: the resume falls back to checkpoint.prev.pt (round 1) and reruns
    round 2, so round 2's best_adapter/ goes, and the best before it (best_adapter.prev/,
    round 1's weights) comes back; a crash between the two folders' swap is mended the same
    way."""
    cfg, run_dir, strategy, metrics = make_run(tmp_path, "federation.rounds=3")
    metrics.path.write_text("")
    run = SimpleNamespace(cfg=cfg, features=[], strategy=strategy, metrics=metrics)
    weights = run_dir / "best_adapter" / "adapter_model.safetensors"
    _round(cfg, strategy, metrics, 1, held_out_loss=3.0)
    Run.save(run, 1)
    round_1 = weights.read_bytes()
    _round(cfg, strategy, metrics, 2, held_out_loss=2.8)
    Run.save(run, 2)
    assert _kept(run_dir) == (2, 2.8) and weights.read_bytes() != round_1
    (run_dir / "checkpoint.pt").write_bytes(b"a damaged disk block")
    assert Run.resume(run) == 2  # round 1's checkpoint: round 2 runs again
    assert _kept(run_dir) == (1, 3.0) and weights.read_bytes() == round_1
    assert "round 1 again, the best of the rounds up to 1" in capsys.readouterr().out
    _round(cfg, strategy, metrics, 2, held_out_loss=3.1)  # the rerun is worse: round 1 stays
    assert _kept(run_dir) == (1, 3.0)
    _round(cfg, strategy, metrics, 3, held_out_loss=2.9)
    assert _kept(run_dir) == (3, 2.9)
    # a crash after the old best moved aside, before the new one was in place
    replace_folder(run_dir / "best_adapter", run_dir / "best_adapter.prev")
    Run.save(run, 3)
    assert Run.resume(run) == 4
    assert _kept(run_dir) == (3, 2.9)


def _votes(cfg, strategy, metrics, rnd: int, losses: dict[int, float]) -> None:
    """Round `rnd` ends with these per-client held-out losses (eval rows), then keep_best."""
    strategy.global_ = random_factors(strategy.shapes, 4, cfg.client_scaling(4), seed=100 + rnd)
    rows = [
        {"kind": "eval", "round": rnd, "partition": p, "held_out_loss": v, "tokens": 10}
        for p, v in losses.items()
    ]
    mean = sum(losses.values()) / len(losses)
    metrics.write(
        [*rows, {"kind": "server", "round": rnd, "phase": "round", "held_out_loss": mean}]
    )
    keep_best(cfg, strategy, metrics=metrics, server_round=rnd)


def test_the_vote_keeps_a_round_only_when_most_clients_score_it_lower_on_their_own_split(
    tmp_path,
) -> None:
    """Client 2 lies: 0 in the round it wants, 50 elsewhere. Each client compares its own split
    (domains of different difficulty never mix), and the liar has one vote of three."""
    cfg, run_dir, strategy, metrics = make_run(
        tmp_path,
        "federation.rounds=5",
        "data.num_clients=3",
        "lora.ranks=[2,4,4]",
        "output.best_by=held_out_vote",
    )
    metrics.path.write_text("")

    def kept() -> tuple[int, float]:
        card = json.loads((run_dir / "best_adapter" / CARD_JSON).read_text())
        assert card["selected_by"] == "held_out_vote"
        return card["round"], card["metrics"]["held_out_vote"]

    _votes(cfg, strategy, metrics, 1, {0: 3.0, 1: 4.0, 2: 0.0})  # the first round is kept
    assert kept() == (1, 1.0)
    _votes(cfg, strategy, metrics, 2, {0: 2.9, 1: 3.9, 2: 50.0})  # both honest prefer round 2
    assert kept() == (2, 2 / 3)
    _votes(cfg, strategy, metrics, 3, {0: 3.0, 1: 4.0, 2: 0.0})  # outvoted: the liar alone
    assert kept() == (2, 2 / 3)
    _votes(cfg, strategy, metrics, 4, {0: 2.8, 1: 4.1, 2: 0.0})  # honest split: the liar tips it
    assert kept() == (4, 2 / 3)
    _votes(cfg, strategy, metrics, 5, {0: 2.7, 2: 0.0})  # 1 of the 2 who voted: no majority
    assert kept() == (4, 2 / 3)


def test_without_a_kept_round_the_vote_needs_a_win_against_every_earlier_round() -> None:
    """After a resume removed best_adapter/ (or at the first trained round): round 0 (the base)
    is never kept, and a round is kept only if most clients prefer it to each earlier round."""
    from fedllm.server.outputs import _vote

    def evals(rnd: int, losses: dict[int, float]) -> list[dict]:
        return [
            {"kind": "eval", "round": rnd, "partition": p, "held_out_loss": v}
            for p, v in losses.items()
        ]

    rows = evals(0, {0: 5, 1: 5, 2: 5}) + evals(1, {0: 3, 1: 3, 2: 3})
    rows += evals(2, {0: 4, 1: 4, 2: 2}) + evals(3, {0: 2, 1: 2, 2: 9})
    assert _vote(rows, server_round=0, kept_round=None) is None
    assert _vote(rows, server_round=1, kept_round=None) == 1.0  # no earlier trained round
    assert _vote(rows, server_round=2, kept_round=None) is None  # 2 of 3 prefer round 1
    assert (
        _vote(rows, server_round=3, kept_round=None) == 2 / 3
    )  # beats round 1 (2 of 3) and round 2 (2 of 3)
    assert (
        _vote(rows, server_round=3, kept_round=1) == 2 / 3
        and _vote(rows, server_round=2, kept_round=1) is None
    )
    assert (
        _vote(evals(1, {0: 3.0}), server_round=1, kept_round=None) is None
    )  # one evaluation: nothing to keep
    # h99: a round one client scored can never be kept, so it is no rival: with it one, rounds
    # every client scored lower were refused for the rest of the run
    lone = evals(1, {0: 3.0}) + evals(2, {0: 2.5, 1: 2.0, 2: 2.0})
    assert _vote(lone, server_round=2, kept_round=None) == 1.0


class Liar:
    """The ClientApp, except that node `node` reports, over the most tokens the server accepts
    (data.max_examples × data.max_length), a held-out loss of 0 in round `round` and of 50 in
    every other trained round: replies every check passes (each loss is its nll-sum over its
    tokens)."""

    def __init__(self, app, *, node: int, round: int, tokens: int) -> None:
        self.app, self.node, self.round, self.tokens = app, node, round, tokens

    def __call__(self, msg: Message, context: Context) -> Message:
        reply = self.app(msg, context)
        rnd = packing.unpack(msg.content)["config"]["server-round"]
        lying = msg.metadata.dst_node_id == self.node and rnd > 0
        if msg.metadata.message_type == MessageType.EVALUATE and lying:
            loss = 0.0 if rnd == self.round else 50.0  # its round perfect, every other awful
            reply.content["metrics"].update(
                {"nll-sum": loss * self.tokens, "tokens": self.tokens, "held-out-loss": loss}
            )
        return reply


@pytest.mark.slow
@pytest.mark.parametrize(
    ("best_by", "steered"), [("held_out_loss", True), ("held_out_vote", False)]
)
def test_a_lying_evaluation_picks_the_best_round_under_the_mean_not_under_the_vote(
    tmp_path, best_by: str, steered: bool
) -> None:
    """3 clients, 3 rounds; one client claims a perfect round 1 and awful later ones. The
    token-weighted mean keeps round 1 (the attack docs/security.md lists); the vote keeps the
    round both honest clients score lowest on their own splits."""
    overrides = [f"output_dir={tmp_path}", "name=liar", "data.num_clients=3"]
    overrides += ["data.max_examples=150", "federation.rounds=3", f"output.best_by={best_by}"]
    cfg = load_recipe(RECIPE, overrides)
    grid = LocalGrid(make_client_app(cfg), cfg.data.num_clients)
    liar = min(grid.contexts)
    grid._app = Liar(grid._app, node=liar, round=1, tokens=150 * cfg.data.max_length)
    with server_identity(grid.run.run_id):
        run_dir = run_server(grid, cfg)
    rows = MetricsLog(run_dir).read()
    liars = int(grid.contexts[liar].node_config["partition-id"])
    honest: dict[int, dict[int, float]] = {}  # partition -> round -> its own held-out loss
    for r in rows:
        if r["kind"] == "eval" and r["round"] > 0 and r["partition"] != liars:
            honest.setdefault(r["partition"], {})[r["round"]] = r["held_out_loss"]
    assert len(honest) == 2 and all(sorted(h) == [1, 2, 3] for h in honest.values())
    for h in honest.values():  # both honest clients would keep round 3
        assert h[1] > h[2] > h[3], "the test needs honest clients that improve every round"
    card = json.loads((run_dir / "best_adapter" / CARD_JSON).read_text())
    assert card["selected_by"] == best_by
    assert card["round"] == (1 if steered else 3)


class EvalSpy:
    """The ClientApp, recording the global adapter each evaluation message carried, by round."""

    def __init__(self, app) -> None:
        self.app, self.received = app, {}

    def __call__(self, msg: Message, context: Context) -> Message:
        if msg.metadata.message_type == MessageType.EVALUATE:
            content = packing.unpack(msg.content)
            config = content["config"]
            factors = from_record(content["global"], float(config["global-scaling"]))
            self.received[int(config["server-round"])] = factors
        return self.app(msg, context)


@pytest.mark.slow
def test_a_private_runs_best_adapter_is_a_global_the_panel_received(tmp_path) -> None:
    """The claim in docs/privacy.md: best_adapter/ adds no channel. Under client-level DP, its
    round is the argmin of the held-out totals metrics.jsonl holds, and its ΔW is the global
    every evaluating client already received in that round (a DP release like each round's)."""
    overrides = [f"output_dir={tmp_path}", "name=best-dp", "data.num_clients=3"]
    overrides += ["data.max_examples=150", "federation.rounds=3", "federation.local_steps=2"]
    overrides += ["privacy.mode=client", "privacy.client_noise_multiplier=1.0"]
    overrides += ["aggregator.weighting=uniform", "privacy.delta=1e-3"]
    cfg = load_recipe(RECIPE, overrides)
    spy = EvalSpy(make_client_app(cfg))
    grid = LocalGrid(spy, cfg.data.num_clients)
    with server_identity(grid.run.run_id):
        run_dir = run_server(grid, cfg)
    assert sorted(spy.received) == [0, 1, 2, 3]  # round 0: the base, never kept
    server = [r for r in MetricsLog(run_dir).read() if r["kind"] == "server" and r["round"] > 0]
    totals = {r["round"]: r["held_out_loss"] for r in server}
    argmin = min(sorted(totals), key=totals.__getitem__)  # ties: the earlier round
    kept_round, kept_value = _kept(run_dir)
    assert (kept_round, kept_value) == (argmin, totals[argmin])
    adapter = run_dir / "best_adapter"
    base = AutoModelForCausalLM.from_pretrained(resolve_adapter_base(adapter))
    kept = read_factors(PeftModel.from_pretrained(base, str(adapter)))
    sent = spy.received[kept_round]
    assert kept.keys() == sent.keys()
    for module, factors in kept.items():
        torch.testing.assert_close(factors.delta(), sent[module].delta())
