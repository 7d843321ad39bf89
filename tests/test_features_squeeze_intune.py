"""squeeze_intune: clients train at a higher rank, squeeze to their own rank mid-round (from the
factors) and finish there. Hand-computed squeezes and gauges, the `stage` hook's staged steps
against one uninterrupted run, the squeeze on a real peft adapter of the tiny model, a real
ClientApp round replying at rank r, the recipe checks, and (slow) a 2-client federation."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Context, RecordDict

from fedllm.aggregators import Factors, RoundSpec
from fedllm.client.app import train_content
from fedllm.client.round import local_steps
from fedllm.client.train import evaluate_nll
from fedllm.data.shards import load_shard
from fedllm.features.base import Feature
from fedllm.features.registry import feature_class
from fedllm.features.squeeze_intune import (
    SqueezeInTune,
    squeeze_factors,
    squeeze_step,
    training_rank,
    widen,
)
from fedllm.features.types import ClientPlan, ClientRound
from fedllm.model.adapters import (
    attach_lora,
    from_record,
    live_lora,
    read_factors,
    to_record,
    write_factors,
)
from fedllm.model.base import cached_base_model
from fedllm.recipe import ConfigError, RunConfig, load_recipe

TINY = Path(__file__).parents[1] / "recipes" / "tiny.yaml"
ON = "features.squeeze_intune={}"


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:  # a shared 2-core machine: avoid oversubscription
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def best_rank(delta: torch.Tensor, rank: int) -> torch.Tensor:
    """The dense rank-`rank` truncation (the test's reference; the feature never forms ΔW)."""
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    return U[:, :rank] @ torch.diag(S[:rank]) @ Vh[:rank]


# -- the pure parts ------------------------------------------------------------------------------


def options(**kw):
    return SqueezeInTune.Options(**kw)


def test_training_rank_and_squeeze_step_by_hand() -> None:
    assert training_rank(options(), 4) == 8
    assert training_rank(options(factor=1.5), 3) == 5  # ⌈4.5⌉
    assert training_rank(options(factor=1.1), 10) == 11  # 1.1·10 is 11.000000000000002 in floats
    assert training_rank(options(factor=1.01), 4) == 5  # ⌈4.04⌉: always above r
    assert training_rank(options(train_rank=12), 4) == 12
    assert [squeeze_step(10, f) for f in (0.05, 0.25, 0.5, 0.99)] == [1, 3, 5, 9]
    assert squeeze_step(5, 0.5) == 3  # 2.5 rounds half up
    assert squeeze_step(2, 0.9) == 1 and squeeze_step(1, 0.5) == 1  # 1 step: squeezed after it


# B e₁·3, e₂·2, e₃·1 against A = e₁, e₂, e₃: s·BA has singular values 3, 2, 1 (s = 1)
B3 = t([[3, 0, 0], [0, 2, 0], [0, 0, 1], [0, 0, 0]])
A3 = t([[1, 0, 0, 0, 0], [0, 1, 0, 0, 0], [0, 0, 1, 0, 0]])


def test_squeeze_keeps_the_top_components_from_the_factors() -> None:
    out, kept = squeeze_factors(Factors(B3, A3, 1.0), 2, scaling=0.5)
    assert out.rank == 2 and out.scaling == 0.5
    assert kept == pytest.approx((9 + 4) / (9 + 4 + 1))
    expect = torch.zeros(4, 5, dtype=torch.float64)
    expect[0, 0], expect[1, 1] = 3.0, 2.0
    torch.testing.assert_close(out.delta(), expect, atol=1e-12, rtol=0)
    # the balanced split: A = √S·Vᵀ up to the SVD's signs
    torch.testing.assert_close(out.A.abs(), t([[3**0.5, 0, 0, 0, 0], [0, 2**0.5, 0, 0, 0]]))


def test_the_start_gauge_rotates_to_the_anchor_and_keeps_the_product() -> None:
    anchor = t([[-1, 0, 0, 0, 0], [0, 1, 0, 0, 0]])  # the start's A: first row sign-flipped
    out, _ = squeeze_factors(Factors(B3, A3, 1.0), 2, scaling=1.0, anchor=anchor)
    # Procrustes: Q = diag(-1, 1) (or its sign-consistent equal), A = Q·√S·Vᵀ by hand
    torch.testing.assert_close(out.A, t([[-(3**0.5), 0, 0, 0, 0], [0, 2**0.5, 0, 0, 0]]))
    torch.testing.assert_close(out.B, t([[-(3**0.5), 0], [0, 2**0.5], [0, 0], [0, 0]]))
    # any sign flip / permutation of the trained components gives the same aligned factors
    P = t([[0, -1, 0], [1, 0, 0], [0, 0, -1]])
    flipped, _ = squeeze_factors(Factors(B3 @ P.T, P @ A3, 1.0), 2, scaling=1.0, anchor=anchor)
    torch.testing.assert_close(flipped.A, out.A)
    torch.testing.assert_close(flipped.B, out.B)


def test_squeeze_of_random_factors_is_the_best_truncation_in_both_gauges() -> None:
    g = torch.Generator().manual_seed(0)
    f = Factors(torch.randn(24, 8, generator=g), torch.randn(8, 20, generator=g), 16 / 8)
    anchor = torch.randn(4, 20, generator=g, dtype=torch.float64)
    ref = best_rank(f.delta(), 4)
    for a in (None, anchor):
        out, kept = squeeze_factors(f, 4, scaling=16 / 4, anchor=a)
        assert out.B.dtype == torch.float32 and out.rank == 4
        assert torch.linalg.norm(out.delta() - ref) / torch.linalg.norm(ref) < 1e-5
        S = torch.linalg.svdvals(f.delta())
        assert kept == pytest.approx(float((S[:4] ** 2).sum() / (S**2).sum()), rel=1e-9)
    aligned, _ = squeeze_factors(f, 4, scaling=4.0, anchor=anchor)
    plain, _ = squeeze_factors(f, 4, scaling=4.0)
    assert torch.linalg.norm(aligned.A.double() - anchor) < torch.linalg.norm(
        plain.A.double() - anchor
    )


def test_widen_adds_fresh_directions_that_leave_the_product_unchanged() -> None:
    f = Factors(t([[1.0], [2.0]]), t([[3.0, 4.0, 5.0, 6.0]]), 2.0)
    g = torch.Generator().manual_seed(0)
    w = widen(f, 3, generator=g)
    assert w.rank == 3 and w.scaling == 2.0
    torch.testing.assert_close(w.delta(), f.delta())
    assert torch.equal(w.B[:, 1:], torch.zeros(2, 2, dtype=torch.float64))
    fresh = w.A[1:]
    assert fresh.abs().max() <= 0.5 and fresh.abs().min() > 0  # U(±1/√4)
    assert widen(f, 1, generator=g) is f


# -- the `stage` hook: staged steps are one run ------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("intune")
    cfg = load_recipe(TINY, [f"output_dir={out}", "data.max_examples=300", ON])
    base, tok = cached_base_model(cfg)
    return cfg, base, tok, load_shard(cfg, 0, tokenizer=tok)


def client_round(cfg: RunConfig, tok, shard, rank: int) -> ClientRound:
    return ClientRound(
        cfg=cfg,
        partition=0,
        server_round=1,
        spec=RoundSpec(),
        config=ConfigRecord({}),
        node_config={},
        state=RecordDict(),
        seed=3,
        plan=ClientPlan(partition=0, rank=rank),
        tokenizer=tok,
        shard=shard,
    )


class EveryThree(Feature):
    """Stages of at most 3 steps, touching nothing: the round must be one uninterrupted run."""

    name = "every_three"

    def stage(self, model, rnd, *, done: int, steps: int) -> int:
        return min(3, steps - done)


def lora(base, rank: int, seed: int = 0):
    torch.manual_seed(seed)
    model = attach_lora(base, rank=rank, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj"])
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def test_stages_continue_the_schedule_and_the_data_order(tiny) -> None:
    cfg, base, tok, shard = tiny
    fed = cfg.federation.model_copy(
        update={
            "optimizer": "sgd",
            "schedule": "cosine",
            "warmup_steps": 2,
            "local_steps": 8,
            "lr": 0.5,
        }
    )
    cfg = cfg.model_copy(update={"federation": fed})
    after = []
    for features in ([], [EveryThree(cfg)]):  # 8 steps, or stages 3 + 3 + 2
        model = lora(base, 4)
        try:
            result = local_steps(model, client_round(cfg, tok, shard, 4), features=features)
            assert result.steps == 8
            after.append((read_factors(model), result))  # copies
        finally:
            model.unload()
    (one, r1), (staged, r3) = after
    for m in one:
        torch.testing.assert_close(staged[m].B, one[m].B, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(staged[m].A, one[m].A, rtol=1e-5, atol=1e-7)
    assert r3.loss_first == pytest.approx(r1.loss_first, rel=1e-6)
    assert r3.loss_last == pytest.approx(r1.loss_last, rel=1e-5)
    assert r3.examples == r1.examples == 8 * cfg.federation.batch_size


def test_a_stage_outside_the_steps_left_is_refused_naming_the_feature(tiny) -> None:
    cfg, base, tok, shard = tiny

    class Zero(Feature):
        name = "zero_stage"

        def stage(self, model, rnd, *, done: int, steps: int) -> int:
            return 0

    model = lora(base, 2)
    try:
        with pytest.raises(ValueError, match=r"'zero_stage'.*0 steps at step 0 of 10"):
            local_steps(model, client_round(cfg, tok, shard, 2), features=[Zero(cfg)])
    finally:
        model.unload()


# -- the squeeze on a real peft adapter ----------------------------------------------------------


def test_the_stage_squeezes_the_live_adapter_in_place(tiny) -> None:
    cfg, base, tok, shard = tiny
    feature = SqueezeInTune(cfg)
    rnd = client_round(cfg, tok, shard, 4)
    rnd.plan = feature.plan(rnd.plan, rnd)
    assert rnd.plan.rank == 8
    model = lora(base, 8)
    try:
        start = read_factors(model)
        assert feature.stage(model, rnd, done=0, steps=10) == 5  # rank 8 until step 5
        with torch.no_grad():  # stand-in for 5 steps of training: move every factor
            for B, A in live_lora(model).values():
                B.add_(0.05)
                A.mul_(1.5)
        before = read_factors(model)
        assert feature.stage(model, rnd, done=5, steps=10) == 5  # the rest, at rank 4
        after = read_factors(model)
        assert model.peft_config["default"].r == 4
        for m, f in after.items():
            assert f.rank == 4 and f.scaling == 16 / 4
            ref = best_rank(before[m].delta(), 4)
            assert torch.linalg.norm(f.delta() - ref) / torch.linalg.norm(ref) < 1e-5
            # the start gauge: A as close to the round's start A (first 4 rows) as a rotation gets
            plain, _ = squeeze_factors(before[m], 4, scaling=4.0)
            anchor = start[m].A[:4].double()
            assert (
                torch.linalg.norm(f.A.double() - anchor)
                <= torch.linalg.norm(plain.A.double() - anchor) + 1e-6
            )
        live = live_lora(model)
        assert all(B.requires_grad and A.requires_grad for B, A in live.values())
        assert all(A.shape[0] == 4 for _, A in live.values())
        kept = feature.metrics()
        assert kept["squeeze-rank"] == 8 and kept["squeeze-step"] == 5
        assert 0 < kept["squeeze-kept"] <= 1
    finally:
        model.unload()


def nll(model, examples, tok) -> float:
    total, tokens = evaluate_nll(model, examples, batch_size=16, pad_id=tok.pad_token_id)
    return total / tokens


def test_training_at_the_higher_rank_then_continuing_at_r_reduces_the_loss(tiny) -> None:
    cfg, base, tok, shard = tiny
    probe = shard.train[:48]
    seen: dict[str, float] = {}

    class Watched(SqueezeInTune):
        def stage(self, model, rnd, *, done, steps):
            if done:
                seen["before squeeze"] = nll(model, probe, tok)
            run = super().stage(model, rnd, done=done, steps=steps)
            seen["start" if done == 0 else "squeezed"] = nll(model, probe, tok)
            return run

    feature = Watched(cfg)
    rnd = client_round(cfg, tok, shard, 4)
    rnd.plan = feature.plan(rnd.plan, rnd)
    model = attach_lora(base, rank=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj"])
    try:
        write_factors(model, feature.start(read_factors(model), rnd))
        result = local_steps(model, rnd, features=[feature])
        end = nll(model, probe, tok)
        assert result.steps == 10 and all(f.rank == 4 for f in read_factors(model).values())
    finally:
        model.unload()
    # measured (lr 0.005, random tiny base): 6.262 -> 6.214 at rank 8, 6.214 squeezed, 6.194 at
    # rank 4. The rank-8 steps lower the loss, the squeeze keeps it, the rank-4 steps go on.
    assert seen["before squeeze"] < seen["start"] - 0.02, seen
    assert abs(seen["squeezed"] - seen["before squeeze"]) < 0.005, seen
    assert end < seen["squeezed"] - 0.01, (seen, end)


def test_a_client_app_round_replies_at_its_own_rank(tiny) -> None:
    cfg, base, _, _ = tiny
    rank, scaling = cfg.client_rank(1), cfg.client_scaling(cfg.client_rank(1))  # rank 4
    g = torch.Generator().manual_seed(1)
    global_ = {  # what the server sends a known rank-4 node: the global cut to 4
        m: Factors(torch.randn(d, rank, generator=g) * 0.01, torch.randn(rank, k, generator=g), 4.0)
        for m, (d, k) in {
            f"model.layers.{i}.self_attn.{p}": read_shape(base, i, p)
            for i in range(2)
            for p in ("q_proj", "v_proj")
        }.items()
    }
    content = RecordDict(
        {
            "global": to_record(global_),
            "config": ConfigRecord(
                {"server-round": 1, "global-scaling": scaling, "recipe-hash": cfg.fingerprint()}
            ),
        }
    )
    out = train_content(cfg, content, context=Context(0, 0, {"partition-id": 1}, RecordDict(), {}))
    metrics = out["metrics"]
    assert metrics["rank"] == 4 and metrics["scaling"] == 16 / 4
    assert metrics["squeeze-rank"] == 8 and metrics["squeeze-step"] == 5
    assert 0 < metrics["squeeze-kept"] <= 1 and metrics["steps"] == 10
    update = from_record(out["update"], scaling)
    assert {f.rank for f in update.values()} == {4} and update.keys() == global_.keys()
    assert not any("lora" in n for n, _ in base.named_modules())  # the adapter came off


def read_shape(base, layer: int, proj: str) -> tuple[int, int]:
    w = getattr(base.model.layers[layer].self_attn, proj).weight
    return tuple(w.shape)


# -- the recipe ----------------------------------------------------------------------------------


def recipe(*overrides: str) -> RunConfig:
    return load_recipe(TINY, list(overrides))


def test_found_by_name_with_defaults() -> None:
    assert feature_class("squeeze_intune") is SqueezeInTune
    opts = SqueezeInTune(recipe(ON, "aggregator.name=squeeze")).options
    assert (opts.factor, opts.train_rank, opts.fraction, opts.gauge) == (2.0, None, 0.5, "start")


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("features.squeeze_intune.factor=1", r"features\.squeeze_intune\.factor"),
        ("features.squeeze_intune.factor=0.5", r"features\.squeeze_intune\.factor"),
        ("features.squeeze_intune.fraction=0", r"features\.squeeze_intune\.fraction"),
        ("features.squeeze_intune.fraction=1", r"features\.squeeze_intune\.fraction"),
        ("features.squeeze_intune.gauge=rows", r"features\.squeeze_intune\.gauge"),
        ("features.squeeze_intune.rank=4", r"features\.squeeze_intune\.rank"),
        ("features.squeeze_intune.train_rank=8", r"train_rank=8 must be above.*client 2.*rank 8"),
        (
            "features.squeeze_intune={factor: 3, train_rank: 16}",
            r"features\.squeeze_intune: give factor or train_rank, not both",
        ),
    ],
)
def test_bad_options_are_named(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        recipe(override)


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (("privacy.mode=sample", "privacy.noise_multiplier=1.0"), r"privacy\.mode='sample'"),
        (("adaptive={ranks: [2, 4]}",), r"adaptive"),
        (("features.fedprox.mu=0.1",), r"features\.fedprox"),
        (
            ("aggregator.name=hetlora", "aggregator.options={prune_lambda: 0.1}"),
            r"prune_lambda",
        ),
        (("aggregator.name=ffa",), r"'ffa'"),
        (("aggregator.name=flora",), r"'flora'"),
        (("aggregator.name=fedsa",), r"'fedsa'"),
        (("aggregator.name=fedplora",), r"'fedplora'.*fedplora_fold"),
        (("aggregator.name=prelort",), r"'prelort'.*nested_prefix"),
        (("aggregator.name=sdflora",), r"'sdflora'.*sdflora_local"),
    ],
)
def test_combinations_that_cannot_work_are_refused(overrides, named) -> None:
    with pytest.raises(ConfigError, match=rf"features\.squeeze_intune.*{named}"):
        recipe(ON, *overrides)


def test_adapter_state_aggregators_are_accepted() -> None:
    for name in ("squeeze", "svd", "fedit", "flexlora", "lorafair", "hetlora", "rblora"):
        assert SqueezeInTune in _active(recipe(ON, f"aggregator.name={name}"))
    assert SqueezeInTune not in _active(recipe())


def _active(cfg: RunConfig) -> list[type]:
    from fedllm.features.registry import active

    return active(cfg)


def test_prepare_refuses_a_training_rank_above_a_module() -> None:
    cfg = recipe(ON, "lora.ranks=[2, 4, 16]")
    SqueezeInTune.prepare(cfg, shapes={"q": (64, 64), "v": (32, 64)})  # 32 fits min(32, 64)
    with pytest.raises(ValueError, match=r"client 2 would train at rank 40.*\(32, 64\)"):
        SqueezeInTune.prepare(
            recipe("features.squeeze_intune.factor=2.5", "lora.ranks=[2, 4, 16]"),
            shapes={"q": (64, 64), "v": (32, 64)},
        )


def test_the_shipped_recipe_trains_in_tune_on_squeeze() -> None:
    cfg = load_recipe(Path(__file__).parents[1] / "recipes" / "squeeze_intune.yaml")
    assert cfg.aggregator.name == "squeeze" and SqueezeInTune in _active(cfg)
    assert [training_rank(SqueezeInTune(cfg).options, r) for r in (4, 8, 16, 32)] == [8, 16, 32, 64]
    assert math.isclose(SqueezeInTune(cfg).options.fraction, 0.5)


# -- end to end ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_federation_of_two_in_tune_clients(tmp_path: Path) -> None:
    """Tiny model, 2 clients of ranks 2 and 4, 1 round: each trains at 2r, replies at r."""
    from fedllm.deploy.local_grid import run_local
    from fedllm.server.metrics import MetricsLog

    cfg = load_recipe(
        TINY,
        [
            f"output_dir={tmp_path}",
            "name=intune",
            "data.num_clients=2",
            "data.max_examples=160",
            "lora.ranks=[2,4]",
            "federation.rounds=1",
            "federation.local_steps=6",
            "aggregator.name=squeeze",
            ON,
        ],
    )
    run_dir, _ = run_local(cfg)
    rows = [r for r in MetricsLog(run_dir).read() if r["kind"] == "client"]
    assert sorted((r["status"], r["rank"], r["squeeze_rank"]) for r in rows) == [
        ("ok", 2, 4),
        ("ok", 4, 8),
    ]
    assert all(r["squeeze_step"] == 3 and 0 < r["squeeze_kept"] <= 1 for r in rows)
