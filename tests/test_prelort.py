"""prelort: each rank segment averaged over the clients holding it (hand-computed), and the nested
training hooks on a real peft adapter (a forward at truncation t uses the first t components)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, RecordDict
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from fedllm.aggregators import Factors, get, round_spec
from fedllm.aggregators.prelort import segments
from fedllm.client.train import label_nll
from fedllm.features import registry
from fedllm.features.prelort_nested import Draws, PreLortNested, nested, truncations
from fedllm.features.types import ClientPlan, ClientRound, ClientUpdate
from fedllm.model.adapters import attach_lora, live_lora, read_factors, write_factors
from fedllm.recipe import ConfigError, RunConfig, load_recipe

TINY = Path(__file__).parents[1] / "recipes" / "tiny.yaml"


def t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


# 1×1 modules: B is 1×r, A is r×1. Ranks 1, 2, 4 with scalings 4, 2, 1.
C0 = Factors(t([[1.0]]), t([[2.0]]), 4.0)
C1 = Factors(t([[3.0, 5.0]]), t([[1.0], [3.0]]), 2.0)
C2 = Factors(t([[2.0, 4.0, 6.0, 8.0]]), t([[1.0], [1.0], [1.0], [1.0]]), 1.0)


def test_hand_computed_segment_means() -> None:
    g = get("prelort")([C0, C1, C2], [1.0, 1.0, 2.0]).global_  # p = ¼, ¼, ½
    # segment [0,1), everyone: B = ¼·4·1 + ¼·2·3 + ½·1·2 = 3.5, A = ¼·2 + ¼·1 + ½·1 = 1.25
    # segment [1,2), clients 1 and 2 (weight ¾): B = (¼·2·5 + ½·4)/¾ = 6, A = (¼·3 + ½·1)/¾ = 5/3
    # segment [2,4), client 2 alone (weight ½): B = 6, 8 and A = 1, 1
    assert g.scaling == 1.0
    torch.testing.assert_close(g.B, t([[3.5, 6.0, 6.0, 8.0]]))
    torch.testing.assert_close(g.A, t([[1.25], [5.0 / 3.0], [1.0], [1.0]]))
    # zero-padded averaging (FedIT) shrinks the dimensions the rank-1 client lacks
    diluted = get("fedit")([C0, C1, C2], [1.0, 1.0, 2.0]).global_
    torch.testing.assert_close(diluted.B, t([[3.5, 4.5, 3.0, 4.0]]))


def test_equal_ranks_are_plain_fedit_and_global_rank_cuts() -> None:
    other = Factors(t([[1.0, -1.0]]), t([[2.0], [0.5]]), 2.0)
    a = get("prelort")([C1, other], [1.0, 3.0]).global_
    b = get("fedit")([C1, other], [1.0, 3.0]).global_
    torch.testing.assert_close(a.B, b.B)
    torch.testing.assert_close(a.A, b.A)
    cut = get("prelort")([C0, C1, C2], [1.0, 1.0, 2.0], global_rank=2).global_
    torch.testing.assert_close(cut.B, t([[3.5, 6.0]]))
    wide = get("prelort")([C0, C1], [1.0, 1.0], global_rank=3).global_
    assert wide.rank == 3 and not wide.B[:, 2].any() and not wide.A[2].any()


def test_a_dimension_only_a_zero_weight_client_holds_stays_zero() -> None:
    g = get("prelort")([C0, C1], [1.0, 0.0]).global_
    torch.testing.assert_close(g.B, t([[4.0, 0.0]]))  # the column of client 1 has no weight
    assert not g.A[1].any()


def test_segments_are_cut_by_the_distinct_ranks() -> None:
    assert segments([8, 4, 16, 8]) == [(0, 4), (4, 8), (8, 16)]
    assert segments([2]) == [(0, 2)]
    assert round_spec("prelort").client_options == ("nested",)


# -- nested training ------------------------------------------------------------------------------


class OneLinear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = torch.nn.Linear(3, 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q(x)


def rank3() -> tuple[torch.nn.Module, Factors]:
    """OneLinear under a rank-3 LoRA (α = 3: scaling 1) with known, nonzero factors."""
    torch.manual_seed(0)
    model = get_peft_model(OneLinear(), LoraConfig(r=3, lora_alpha=3, target_modules=["q"]))
    g = torch.Generator().manual_seed(2)
    f = Factors(torch.randn(2, 3, generator=g), torch.randn(3, 3, generator=g), 1.0)
    write_factors(model, {"q": f})
    return model, f


def test_a_forward_at_truncation_t_uses_the_first_t_components() -> None:
    model, f = rank3()
    x = torch.randn(4, 3)
    W = model.base_model.model.q.base_layer.weight
    with torch.no_grad():
        full = model(x)
        with nested(model, [1], seed=0) as draws:
            one = model(x)
        after = model(x)
    torch.testing.assert_close(full, x @ (W + f.B @ f.A).T)
    torch.testing.assert_close(one, x @ (W + f.B[:, :1] @ f.A[:1]).T)
    assert draws.drawn == [1]
    torch.testing.assert_close(after, full)  # hooks removed


def test_the_tail_gets_no_gradient_from_a_truncated_pass() -> None:
    model, _ = rank3()
    x = torch.randn(4, 3)
    with nested(model, [2], seed=0):
        model(x).square().sum().backward()
    ((B, A),) = live_lora(model).values()
    assert B.grad[:, :2].abs().sum() > 0 and A.grad[:2].abs().sum() > 0
    assert not B.grad[:, 2].any() and not A.grad[2].any()


def test_draws_are_seeded_and_uniform_over_the_truncations() -> None:
    a, b = Draws([1, 2, 4], seed=5), Draws([1, 2, 4], seed=5)
    for _ in range(300):
        a.draw(None, (), {}), b.draw(None, (), {})
    assert a.drawn == b.drawn
    assert all(60 < a.drawn.count(x) < 140 for x in (1, 2, 4))
    with pytest.raises(ValueError, match=r"truncations must be ranks >= 1, got \[0, 2\]"):
        Draws([0, 2], seed=0)


def recipe(*overrides: str) -> RunConfig:
    return load_recipe(TINY, ["aggregator.name=prelort", "lora.ranks=[2,4,8]", *overrides])


def test_truncations_are_the_federation_ranks_up_to_the_own() -> None:
    cfg = recipe()
    assert truncations(cfg, 8) == [2, 4, 8] and truncations(cfg, 4) == [2, 4]
    assert truncations(cfg, 2) == [2] and truncations(cfg, 3) == [2, 3]


def client_round(cfg: RunConfig, *, nested_on: bool | None) -> ClientRound:
    config = {"server-round": 1} | ({} if nested_on is None else {"option.nested": nested_on})
    return ClientRound(
        cfg=cfg,
        partition=2,
        server_round=1,
        spec=round_spec("prelort"),
        config=ConfigRecord(config),
        node_config={},
        state=RecordDict(),
        seed=9,
        plan=ClientPlan(partition=2, rank=3),
    )


@pytest.mark.parametrize("nested_on", [None, True, False])
def test_the_feature_installs_the_hooks_for_the_local_steps_only(nested_on: bool | None) -> None:
    cfg = recipe()
    model, _ = rank3()
    x = torch.randn(4, 3)
    with torch.no_grad():
        full = model(x)
    feature = PreLortNested(cfg)
    rnd = client_round(cfg, nested_on=nested_on)
    assert feature.train(model, rnd, steps=5) is None  # the plain local steps run under the hooks
    with torch.no_grad():
        outs = [model(x) for _ in range(40)]
    on = nested_on is not False
    # rank 3 in a federation of 2/4/8: truncations {2, 3}, so some passes drop the last component
    assert any(not torch.allclose(o, full) for o in outs) == on
    update = ClientUpdate(read_factors(model), {}, 3)
    assert feature.post_process(update, rnd) is update
    with torch.no_grad():
        torch.testing.assert_close(model(x), full)
    assert ("prelort-truncation-mean" in feature.metrics()) == on
    if on:
        assert 2.0 <= feature.metrics()["prelort-truncation-mean"] <= 3.0


def test_bad_options_are_refused_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"aggregator\.options\.nested"):
        recipe("aggregator.options={nested: 3}")
    with pytest.raises(ConfigError, match=r"aggregator\.options\.nested.*privacy\.mode='sample'"):
        recipe("privacy.mode=sample", "privacy.noise_multiplier=1.0")
    recipe(
        "privacy.mode=sample", "privacy.noise_multiplier=1.0", "aggregator.options={nested: false}"
    )


def test_any_adapter_state_aggregator_can_train_nested() -> None:
    def active(*overrides: str) -> bool:
        cfg = load_recipe(TINY, ["aggregator.name=squeeze", *overrides])
        return PreLortNested in registry.active(cfg)

    assert not active()
    assert active("features.nested_prefix={}")
    assert not active("features.nested_prefix={enabled: false}")
    assert not PreLortNested.enabled(recipe("features.nested_prefix={enabled: false}"))
    with pytest.raises(ConfigError, match=r"features\.nested_prefix.*'flora'"):
        load_recipe(TINY, ["aggregator.name=flora", "features.nested_prefix={}"])
    # under squeeze no option.nested travels: the hooks go in (the default)
    cfg = load_recipe(TINY, ["aggregator.name=squeeze", "features.nested_prefix={}"])
    model, _ = rank3()
    feature = PreLortNested(cfg)
    feature.train(model, client_round(cfg, nested_on=None), steps=1)
    assert feature.handles


def test_a_shared_prompt_head_and_its_rows_run_at_one_truncation() -> None:
    # h98: with share_head (the default) the head's forward and the rows' forward each drew a
    # truncation, so a sample's loss mixed two (draws [2, 8] for one micro-batch)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = attach_lora(
        LlamaForCausalLM(config), rank=8, alpha=16, dropout=0.0, target_modules=["q_proj"]
    )
    ids = torch.randint(5, 60, (3, 12))
    ids[:, :5] = ids[0, :5]  # a 5-token head every row shares
    labels = ids.clone()
    labels[:, :7] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    for seed in range(6):
        seen: list[int | None] = []
        with nested(model, [2, 4, 8], seed=seed) as draws:
            (lora_A,) = [
                m
                for n, m in model.named_modules()
                if n.endswith("0.self_attn.q_proj.lora_A.default")
            ]
            handle = lora_A.register_forward_hook(
                lambda *_, seen=seen, draws=draws: seen.append(draws.current)
            )
            label_nll(model, batch, share_head=True)
            handle.remove()
        assert len(draws.drawn) == 1 and len(seen) == 2 and len(set(seen)) == 1, (draws.drawn, seen)
