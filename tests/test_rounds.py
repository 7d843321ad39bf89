"""Round semantics on the client and the wire: merge/restore, fresh LoRA, frozen A, local B."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

from fedllm.aggregators import Factors, RoundSpec, round_spec
from fedllm.client.round import revive, start_adapter
from fedllm.features.squeeze_intune import widen
from fedllm.model import wire as rounds
from fedllm.model.adapters import attach_lora, read_factors, write_factors
from fedllm.model.loading import load_base_model
from fedllm.model.tiny import build_tiny_model
from fedllm.recipe import load_recipe

TEXTS = [f"word {i} means the thing number {i} in a list of {i % 7} things" for i in range(200)]
Q = "model.layers.0.self_attn.q_proj"
V = "model.layers.1.self_attn.v_proj"
TARGETS = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny"), texts=TEXTS, vocab_size=300)


def test_spec_travels_in_the_config() -> None:
    for name in ("flora", "ffa", "fedsa", "svd"):
        spec = round_spec(name)
        assert rounds.spec_of(ConfigRecord(rounds.spec_config(spec))) == spec
    assert rounds.spec_of(ConfigRecord({})) == RoundSpec()


def test_merge_adds_the_delta_and_restores_the_exact_weights(tiny_dir: Path) -> None:
    base, _ = load_base_model(tiny_dir)
    before = base.get_submodule(Q).weight.detach().clone()
    g = torch.Generator().manual_seed(0)
    delta = {Q: Factors(torch.randn(64, 3, generator=g), torch.randn(3, 64, generator=g), 0.5)}
    with rounds.merged_into(base, delta):
        inside = base.get_submodule(Q).weight.detach().clone()
    torch.testing.assert_close(
        inside.double() - before.double(), delta[Q].delta(), atol=1e-5, rtol=0
    )
    assert torch.equal(base.get_submodule(Q).weight, before)  # bit-exact, not W + Δ − Δ
    with pytest.raises(ValueError, match="cannot merge"):
        with rounds.merged_into(base, {Q: Factors(torch.zeros(5, 1), torch.zeros(1, 64), 1.0)}):
            pass
    assert torch.equal(base.get_submodule(Q).weight, before)


def test_fresh_adapter_is_peft_like_and_seeded(tiny_dir: Path) -> None:
    base, _ = load_base_model(tiny_dir)
    model = attach_lora(base, rank=4, alpha=8.0, dropout=0.0, target_modules=TARGETS)
    rounds.fresh_adapter(model, seed=7)
    first = read_factors(model)
    rounds.fresh_adapter(model, seed=7)
    again = read_factors(model)
    assert all(not f.B.any() for f in first.values())
    assert torch.equal(first[Q].A, again[Q].A)
    assert first[Q].A.abs().max() <= 1 / 64**0.5  # kaiming-uniform bound 1/√in
    model.unload()


def test_freeze_a_leaves_only_b_trainable(tiny_dir: Path) -> None:
    base, _ = load_base_model(tiny_dir)
    model = attach_lora(base, rank=2, alpha=4.0, dropout=0.0, target_modules=TARGETS)
    assert rounds.freeze_A(model) == 4  # 2 layers × (q, v)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_B." in n for n in trainable)
    model.unload()


def test_a_only_records_and_replies() -> None:
    f = {Q: Factors(torch.ones(64, 2), torch.full((2, 64), 3.0), 2.0)}
    record = rounds.outgoing(f, round_spec("fedsa"))
    assert set(record.keys()) == {f"{Q}.lora_A"}
    back = rounds.read_update(record, scaling=2.0, spec=round_spec("fedsa"), shapes={Q: (64, 64)})
    assert not back[Q].B.any() and back[Q].B.shape == (64, 2) and torch.equal(back[Q].A, f[Q].A)
    assert set(rounds.outgoing(f, round_spec("svd")).keys()) == {f"{Q}.lora_A", f"{Q}.lora_B"}
    with pytest.raises(ValueError, match="unknown module"):
        rounds.read_update(record, scaling=2.0, spec=round_spec("fedsa"), shapes={V: (32, 64)})
    with pytest.raises(ValueError, match=r"only '<module>\.lora_A'"):
        rounds.a_only(rounds.outgoing(f, round_spec("svd")))


def test_local_b_persists_in_the_context_and_pairs_with_the_shared_a(tiny_dir: Path) -> None:
    base, _ = load_base_model(tiny_dir)
    model = attach_lora(base, rank=2, alpha=4.0, dropout=0.0, target_modules=["q_proj"])
    context = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})
    shared = ArrayRecord({f"{Q}.lora_A": torch.arange(4 * 64.0).reshape(4, 64)})
    start = rounds.personal(model, shared, state=context.state)  # first round: no B yet
    assert not start[Q].B.any() and torch.equal(start[Q].A, torch.arange(2 * 64.0).reshape(2, 64))
    assert start[Q].scaling == 2.0
    mine = {Q: Factors(torch.full((64, 2), 0.25), start[Q].A, 2.0)}
    rounds.keep_local_B(context.state, mine)
    later = rounds.personal(model, shared, state=context.state)
    assert torch.equal(later[Q].B, mine[Q].B)
    write_factors(model, later)
    torch.testing.assert_close(read_factors(model)[Q].delta(), mine[Q].delta())
    model.unload()


def test_merge_methods_refuse_a_quantized_base_at_validation() -> None:
    from fedllm.recipe import ConfigError, build_config

    with pytest.raises(ConfigError, match=r"model\.quantization: none"):
        build_config({"aggregator": {"name": "flora"}, "model": {"quantization": "4bit"}})
    build_config({"aggregator": {"name": "svd"}, "model": {"quantization": "4bit"}})


def rank8_client_rank4_global(tiny_dir: Path) -> tuple:
    """(tiny recipe, a rank-8 LoRA model, its module shapes, a random rank-4 global)."""
    cfg = load_recipe(str(Path(__file__).parents[1] / "recipes" / "tiny.yaml"))
    base, _ = load_base_model(tiny_dir)
    model = attach_lora(base, rank=8, alpha=16.0, dropout=0.0, target_modules=TARGETS)
    shapes = {m: f.shape for m, f in read_factors(model).items()}
    g = torch.Generator().manual_seed(0)
    glob = {
        m: Factors(torch.randn(d, 4, generator=g), torch.randn(4, k, generator=g), 1.0)
        for m, (d, k) in shapes.items()
    }
    return cfg, model, shapes, glob


@pytest.mark.parametrize(
    ("spec", "revived"), [(RoundSpec(), True), (RoundSpec(freeze_A=True), False)]
)
def test_a_lower_rank_global_starts_its_padded_components_afresh(
    tiny_dir: Path, spec: RoundSpec, revived: bool, caplog: pytest.LogCaptureFixture
) -> None:
    # a rank-8 client given a rank-4 global (global_rank below its rank, or a round that sampled
    # only rank-4 clients): the padding would never train; ffa's A must stay the server's
    cfg, model, shapes, glob = rank8_client_rank4_global(tiny_dir)
    plan = SimpleNamespace(rank=8)
    rnd = SimpleNamespace(cfg=cfg, plan=plan, spec=spec, seed=7, partition=1, server_round=2)
    with caplog.at_level("INFO", logger="fedllm.client"):
        start = start_adapter(model, ArrayRecord(), global_factors=glob, rnd=rnd, features=[])
    live = read_factors(model)
    for m in shapes:
        assert ((live[m].A[4:] != 0).all().item()) is revived
        torch.testing.assert_close(live[m].delta(), glob[m].delta(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(start[m].A, live[m].A)  # the start the features see
    assert ("started them afresh" in caplog.text) is revived
    model.unload()


def test_no_revival_where_the_server_reads_a_change_from_what_it_sent(tiny_dir: Path) -> None:
    # h96: a top-k delta or client-level DP's clipped change is measured against the factors
    # the server sent: revived rows were lost in the top-k rebuild and spent DP's clip budget
    cfg, model, shapes, glob = rank8_client_rank4_global(tiny_dir)
    rnd = SimpleNamespace(
        cfg=cfg, plan=SimpleNamespace(rank=8), spec=RoundSpec(), seed=7, partition=1, server_round=2
    )
    delta = SimpleNamespace(start=lambda f, r: dict(f), sent_start=lambda: True)
    start = start_adapter(model, ArrayRecord(), global_factors=glob, rnd=rnd, features=[delta])
    assert all((start[m].A[4:] == 0).all() for m in shapes)
    model.unload()


def test_revived_rows_are_not_squeeze_intunes_fresh_rows() -> None:
    # h96: both drew from Generator(rnd.seed): identical rows, duplicate components
    f = Factors(torch.zeros(6, 2), torch.zeros(2, 5), 1.0)
    wide = widen(
        Factors(torch.ones(6, 2), torch.ones(2, 5), 1.0),
        4,
        generator=torch.Generator().manual_seed(7),
    )
    rnd = SimpleNamespace(seed=7, partition=0, server_round=1, plan=SimpleNamespace(rank=4))
    revived = revive({"m": f.pad(4)}, rnd)["m"]
    assert not torch.equal(revived.A[:2].double(), wide.A[2:4].double())


def test_a_rank_the_server_asks_above_the_recipes_largest_is_refused() -> None:
    """h106: a server's config rank beat the node's and was capped only by the module's shape
    in training and not at all by personal tuning at evaluation (10⁸: out of memory)."""
    from flwr.app import ConfigRecord

    from fedllm.client.round import base_plan

    cfg = load_recipe(str(Path(__file__).parents[1] / "recipes" / "tiny.yaml"))
    top = cfg.max_rank
    assert base_plan(cfg, 0, config=ConfigRecord({"rank": top}), node_config={}).rank == top
    with pytest.raises(ValueError, match=rf"server asked rank 100000000, above .* {top}"):
        base_plan(cfg, 0, config=ConfigRecord({"rank": 10**8}), node_config={})
