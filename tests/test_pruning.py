"""Structured pruning of a small Llama: kept counts, exact slices, Wanda choice, LoRA on top."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config

from fedllm.client.round import check_rank_fits, client_plan
from fedllm.constrained.pruning import check_ratio, prune_model, prune_plan, pruned_module_shapes
from fedllm.features.types import ClientPlan
from fedllm.model.adapters import attach_lora, read_factors
from fedllm.recipe import ConfigError, build_config


def small_llama(seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=48,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).requires_grad_(False).train()


def batches(n: int = 2) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (n, 12), generator=g)
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]


def test_plan_keeps_same_heads_per_kv_group_and_rounds_half_up() -> None:
    config = small_llama().config
    plan = prune_plan(config, 0.5)
    assert (plan.intermediate, plan.heads_per_group, plan.num_heads) == (20, 2, 4)  # 1.5 -> 2
    assert prune_plan(config, 0.3).intermediate == 28  # 40·0.7
    assert prune_plan(config, 0.9, parts=["mlp"]).heads_per_group == 3
    shapes = {"model.layers.0.self_attn.q_proj": (48, 48), "model.layers.0.mlp.down_proj": (48, 40)}
    assert pruned_module_shapes(shapes, config, plan=plan) == {
        "model.layers.0.self_attn.q_proj": (32, 48),
        "model.layers.0.mlp.down_proj": (48, 20),
    }


def test_pruned_weights_are_exact_slices_and_forward_works() -> None:
    model = small_llama()
    pruned, kept = prune_model(model, 0.5, method="wanda", batches=batches())
    assert pruned.config.num_attention_heads == 4 and pruned.config.intermediate_size == 20
    q = kept["model.layers.1.self_attn.q_proj"].out
    assert len(q) == 32 and torch.equal(q, kept["model.layers.1.self_attn.o_proj"].in_)
    heads = sorted({int(i) // 8 for i in q})
    assert [h // 3 for h in heads] == [0, 0, 1, 1], "two query heads kept in each kv group"
    layer, plain = pruned.model.layers[1], model.model.layers[1]
    assert torch.equal(layer.self_attn.q_proj.weight, plain.self_attn.q_proj.weight[q])
    assert torch.equal(layer.self_attn.o_proj.weight, plain.self_attn.o_proj.weight[:, q])
    ch = kept["model.layers.1.mlp.down_proj"].in_
    assert torch.equal(layer.mlp.down_proj.weight, plain.mlp.down_proj.weight[:, ch])
    assert torch.equal(layer.mlp.up_proj.weight, plain.mlp.up_proj.weight[ch])
    assert torch.equal(layer.self_attn.k_proj.weight, plain.self_attn.k_proj.weight)
    ids = batches()[0]["input_ids"]
    assert torch.isfinite(pruned(ids).logits).all()
    assert model.config.intermediate_size == 40, "the original is untouched"


def test_wanda_drops_a_heavy_channel_that_never_fires_magnitude_keeps_it() -> None:
    model = small_llama()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight[:, 3] = 10.0  # the heaviest weights of all...
            layer.mlp.up_proj.weight[3] = 0.0  # ...on a channel whose input is always 0
    _, wanda = prune_model(model, 0.9, method="wanda", batches=batches(), parts=["mlp"])
    _, magnitude = prune_model(model, 0.9, method="magnitude", parts=["mlp"])
    for i in (0, 1):
        assert len(wanda[f"model.layers.{i}.mlp.down_proj"].in_) == 4
        assert 3 in magnitude[f"model.layers.{i}.mlp.down_proj"].in_.tolist()
        assert 3 not in wanda[f"model.layers.{i}.mlp.down_proj"].in_.tolist()


def test_lora_on_the_pruned_model_trains() -> None:
    pruned, _ = prune_model(small_llama(), 0.5, method="magnitude")
    model = attach_lora(pruned, rank=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    ids = batches(4)[0]["input_ids"]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    first = None
    for _ in range(15):
        loss = model(input_ids=ids, labels=ids).loss
        first = first if first is not None else float(loss.detach())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert float(loss.detach()) < first - 0.1
    factors = read_factors(model)
    assert factors["model.layers.0.self_attn.q_proj"].shape == (32, 48)
    model.unload()


def test_bad_ratios_and_ranks_name_the_client_and_value() -> None:
    with pytest.raises(ValueError, match=r"client 3: pruning ratio 1.0 is outside \[0, 1\)"):
        check_ratio(1.0, who="client 3")
    with pytest.raises(ValueError, match=r"client 3: pruning ratio -0.2 is outside"):
        check_ratio(-0.2, who="client 3")
    pruned, _ = prune_model(small_llama(), 0.5, method="magnitude")
    plan = ClientPlan(partition=3, rank=40, pruning=0.5, quantization=None)
    with pytest.raises(ValueError, match=r"client 3: rank 40 does not fit module .*q_proj.*1..32"):
        check_rank_fits(pruned, plan, targets=["q_proj"])


def test_client_plan_reads_tier_and_server_arm_and_rejects_bad_ratio() -> None:
    cfg = build_config(
        {
            "data": {"num_clients": 3},
            "lora": {
                "ranks": None,
                "tiers": [
                    {"name": "gpu", "rank": 8, "clients": 2},
                    {
                        "name": "phone",
                        "rank": 2,
                        "clients": 1,
                        "pruning": 0.5,
                        "quantization": "4bit",
                    },
                ],
            },
        }
    )
    assert client_plan(cfg, 2, config={}, node_config={}) == ClientPlan(2, 2, 0.5, "4bit")
    assert client_plan(cfg, 0, config={}, node_config={}) == ClientPlan(0, 8, 0.0, None)
    assert client_plan(cfg, 0, config={"rank": 4, "pruning": 0.3}, node_config={}) == ClientPlan(
        0, 4, 0.3, None
    )
    with pytest.raises(ValueError, match=r"client 1: pruning ratio 1\.5 is outside"):
        client_plan(cfg, 1, config={"pruning": 1.5}, node_config={})


def test_recipe_rejects_bad_tier_ratio_and_pruning_with_merge_aggregators() -> None:
    tiers = [{"name": "phone", "rank": 2, "clients": 2, "pruning": 1.2}]
    with pytest.raises(ConfigError, match=r"lora.tiers.0.pruning: pruning ratio must be in"):
        build_config({"data": {"num_clients": 2}, "lora": {"ranks": None, "tiers": tiers}})
    tiers[0]["pruning"] = 0.5
    with pytest.raises(ConfigError, match=r"pruning \(tiers \['phone'\]\) needs clients"):
        build_config(
            {
                "data": {"num_clients": 2},
                "lora": {"ranks": None, "tiers": tiers},
                "aggregator": {"name": "flora"},
            }
        )


@pytest.mark.parametrize(
    ("config", "words"),
    [
        (
            LlamaConfig(
                hidden_size=32, num_attention_heads=4, num_key_value_heads=2, mlp_bias=True
            ),
            "a Llama with mlp_bias",
        ),
        (
            LlamaConfig(
                hidden_size=32, num_attention_heads=4, num_key_value_heads=2, attention_bias=True
            ),
            "a Llama with attention_bias",
        ),
    ],
)
def test_a_base_pruning_cannot_rebuild_is_refused_by_name(config, words: str) -> None:
    # h97: a Llama with biases crashed at slicing its bias, a Qwen2/Mistral/Gemma at rebuilding
    with pytest.raises(ValueError, match=words):
        prune_plan(config, 0.5)
    with pytest.raises(ValueError, match="a 'qwen2' model"):
        prune_plan(Qwen2Config(hidden_size=32, num_attention_heads=4, num_key_value_heads=2), 0.5)
