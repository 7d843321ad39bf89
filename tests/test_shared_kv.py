"""Shared-prefix attention: rows reading one copy of a head's keys/values equal full forwards."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fedllm.model.shared_kv import NAME, attending_shared, prefix_kv, shared_kv

HEAD, REST, ROWS = 7, 6, 4


def _model(attention: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,  # grouped-query attention: 3 query heads per key head
        max_position_embeddings=128,
    )
    model = LlamaForCausalLM(config)
    model.config._attn_implementation = attention
    return model


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    head = torch.randint(5, 300, (1, HEAD), generator=gen)
    rest = torch.randint(5, 300, (ROWS, REST), generator=gen)
    mask = torch.ones(ROWS, REST, dtype=torch.long)
    mask[1, 4:] = 0  # right padding of different lengths
    mask[3, 2:] = 0
    return head, rest, mask


def _full(model, head, rest, mask) -> torch.Tensor:
    ids = torch.cat([head.expand(ROWS, -1), rest], dim=1)
    full_mask = torch.cat([torch.ones(ROWS, HEAD, dtype=torch.long), mask], dim=1)
    return model(input_ids=ids, attention_mask=full_mask).logits[:, HEAD:]


def _shared(model, head, rest, mask) -> torch.Tensor:
    kv = prefix_kv(model, head[0].tolist())
    assert kv is not None and len(kv) == 2 and kv[0][0].shape[:3] == (1, 2, HEAD)
    positions = (HEAD + torch.arange(REST)).expand(ROWS, -1)
    with attending_shared(model):
        return model(
            input_ids=rest, attention_mask=mask, position_ids=positions, shared_kv=kv
        ).logits


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_logits_equal_full_forward(attention):
    model = _model(attention)
    head, rest, mask = _batch()
    with torch.no_grad():
        full, shared = _full(model, head, rest, mask), _shared(model, head, rest, mask)
    real = mask.bool()
    assert torch.allclose(shared[real], full[real], atol=1e-5)
    assert model.config._attn_implementation == attention  # restored after the block


def test_gradients_flow_into_the_shared_head():
    model = _model("eager")
    head, rest, mask = _batch()
    real = mask.bool()
    grads = []
    for forward in (_full, _shared):
        model.zero_grad()
        forward(model, head, rest, mask)[real].logsumexp(-1).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for full, shared in zip(*grads, strict=True):
        assert torch.allclose(shared, full, rtol=1e-4, atol=1e-5)


def test_rows_with_their_own_cache_and_decode_steps():
    """A per-row cache (a prompt group) before the rows' tokens, then one token at a time."""
    model = _model("eager")
    head, rest, mask = _batch()
    mask[:] = 1
    with torch.no_grad():
        full = _full(model, head, rest, mask)
        kv = shared_kv(model(input_ids=head, use_cache=True).past_key_values)
        with attending_shared(model):
            cache = model(
                input_ids=rest[:, :3],
                attention_mask=mask[:, :3],
                position_ids=(HEAD + torch.arange(3)).expand(ROWS, -1),
                use_cache=True,
                shared_kv=kv,
            ).past_key_values
            for t in range(3, REST):
                step = model(
                    input_ids=rest[:, t : t + 1],
                    attention_mask=mask[:, : t + 1],
                    position_ids=torch.full((ROWS, 1), HEAD + t),
                    past_key_values=cache,
                    use_cache=True,
                    shared_kv=kv,
                )
                cache = step.past_key_values
                assert torch.allclose(step.logits[:, -1], full[:, t], atol=1e-5)
        assert cache.get_seq_length() == REST  # the head stays out of the rows' cache


def test_missing_shared_kv_is_a_clear_error_and_the_attention_is_restored():
    model = _model("eager")
    _, rest, mask = _batch()
    with pytest.raises(ValueError, match="shared_kv"), attending_shared(model):
        assert model.config._attn_implementation == NAME
        model(input_ids=rest, attention_mask=mask)
    assert model.config._attn_implementation == "eager"


def test_nothing_to_share():
    assert shared_kv(None) is None
    model = _model("eager")
    two_rows = torch.randint(5, 300, (2, 3))
    assert shared_kv(model(input_ids=two_rows, use_cache=True).past_key_values) is None


def test_a_bf16_model_without_autocast_runs_in_its_own_dtype():
    model = _model("eager").to(torch.bfloat16)
    head, rest, mask = _batch()
    with torch.no_grad():
        full, shared = _full(model, head, rest, mask), _shared(model, head, rest, mask)
    real = mask.bool()
    assert shared.dtype == torch.bfloat16
    assert (shared[real].float() - full[real].float()).abs().max() < 0.1


def test_sliding_window_caches_are_not_shared():
    from transformers import DynamicCache, MistralConfig

    cache = DynamicCache(config=MistralConfig(sliding_window=16, num_hidden_layers=2))
    assert shared_kv(cache) is None
