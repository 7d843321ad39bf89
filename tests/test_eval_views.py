"""Eval views: storing linear weights in autocast's dtype changes no number; a quantized base's
train mode scores with dropout off."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from fedllm.eval.views import Views, cast_linear_weights


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def test_cast_linear_weights_gives_autocasts_numbers_and_keeps_tied_embeddings():
    base = tiny_llama()
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # a non-zero adapter
    ids = torch.randint(5, 300, (3, 9))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = model(input_ids=ids).logits
        cast_linear_weights(model, torch.bfloat16)
        after = model(input_ids=ids).logits
    assert torch.equal(before, after)
    q = base.model.layers[0].self_attn.q_proj
    assert q.base_layer.weight.dtype == torch.bfloat16
    assert q.lora_A["default"].weight.dtype == torch.bfloat16
    embeddings = base.get_input_embeddings().weight
    assert embeddings.dtype == torch.float32 and base.lm_head.weight is embeddings


def test_a_quantized_bases_train_mode_scores_with_the_adapters_dropout_off():
    """4-bit LoRA needs train mode at eval (views.py); an adapter trained with lora.dropout 0.3
    kept that dropout active there, and two scorings of one text differed (audit h84)."""
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.3)
    model = get_peft_model(tiny_llama(), config)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    ids = torch.randint(5, 300, (2, 9))
    Views.set_mode(SimpleNamespace(model=model, train_mode=True))
    assert model.training  # what 4-bit LoRA needs
    with torch.no_grad():
        first, second = model(input_ids=ids).logits, model(input_ids=ids).logits
    assert torch.equal(first, second)
    model.train(True)  # the old mode: dropout on, the same text scored twice differs
    with torch.no_grad():
        assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_an_adapter_that_cannot_load_is_named_not_a_hub_error_or_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    """h111: an adapter folder without its weights failed in a hub lookup ("Repo id must be in
    the form ..."), a truncated weights file in a SafetensorError traceback."""
    import fedllm.eval.views as views

    adapter = tmp_path / "adapter"
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(adapter)
    weights = adapter / "adapter_model.safetensors"
    if damage == "missing":
        weights.unlink()
    else:
        weights.write_bytes(weights.read_bytes()[:-100])
    monkeypatch.setattr(views, "adapter_base_dir", lambda folder: tmp_path)
    monkeypatch.setattr(views, "load_base_model", lambda *a, **k: (tiny_llama(), None))
    with pytest.raises(ValueError, match=f"cannot load the adapter in {adapter} .*copy it again"):
        Views(adapter, precision="fp32")
