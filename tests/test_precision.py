"""Mixed precision (`federation.precision`): bf16 autocast with fp32 master LoRA weights, in
plain steps, evaluation, DP-SGD (Opacus per-example gradients) and on a 4-bit base (the
AVX512-BF16 kernel trap), and how it sits with `model.dtype` (storage of the frozen base)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from fedllm.client.precision import (
    autocast_dtype,
    bf16_supported,
    check_precision,
)
from fedllm.client.train import evaluate_nll, train_local
from fedllm.data import collate
from fedllm.data.shards import load_shard
from fedllm.model.adapters import attach_lora
from fedllm.model.base import cached_base_model, prepare_base_model
from fedllm.model.loading import load_base_model
from fedllm.privacy.dpsgd import PrivateSteps
from fedllm.recipe import ConfigError, load_recipe

RECIPE = str(Path(__file__).parents[1] / "recipes" / "tiny.yaml")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("precision")
    cfg = load_recipe(RECIPE, [f"output_dir={out}", "data.max_examples=300"])
    base, tok = cached_base_model(cfg)
    shard = load_shard(cfg, 0, tokenizer=tok)
    return cfg, base, tok, shard


def lora_on(base: torch.nn.Module, seed: int = 0):
    torch.manual_seed(seed)
    model = attach_lora(base, rank=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)
    return model


@pytest.fixture
def lora(tiny) -> Iterator:
    model = lora_on(tiny[1])
    yield model
    model.unload()


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def restore(model, state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in state:
                p.copy_(state[n])


def test_autocast_dtype_by_precision() -> None:
    assert autocast_dtype("fp32", device=CPU) is None
    assert autocast_dtype("bf16", device=CPU) is torch.bfloat16
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert bf16_supported(CPU) == native
    assert autocast_dtype("auto", device=CPU) is (torch.bfloat16 if native else None)
    with pytest.raises(ValueError, match="precision='fp16'; valid: fp32, bf16, auto"):
        autocast_dtype("fp16", device=CPU)


def test_bf16_step_runs_in_bf16_and_keeps_fp32_masters(tiny, lora) -> None:
    """The base's matmuls run in bf16, the LoRA weights and the update stay fp32, and one SGD
    step lands close to the fp32 step (same examples, same start)."""
    _, base, tok, shard = tiny
    q = base.model.layers[0].self_attn.q_proj.base_layer
    seen: list[torch.dtype] = []
    hook = q.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    start = trainable(lora)
    kw = dict(steps=1, batch_size=8, pad_id=tok.pad_token_id, optimizer="sgd", lr=1.0, seed=5)
    try:
        r32 = train_local(lora, shard.train, precision="fp32", max_grad_norm=None, **kw)
        d32 = {n: p - start[n] for n, p in trainable(lora).items()}
        restore(lora, start)
        r16 = train_local(lora, shard.train, precision="bf16", max_grad_norm=None, **kw)
        d16 = {n: p - start[n] for n, p in trainable(lora).items()}
    finally:
        hook.remove()
    assert seen == [torch.float32, torch.bfloat16]
    assert all(p.dtype == torch.float32 for p in lora.parameters() if p.requires_grad)
    assert r16.loss_first == pytest.approx(r32.loss_first, rel=1e-2)
    flat32 = torch.cat([d.flatten() for d in d32.values()])
    flat16 = torch.cat([d.flatten() for d in d16.values()])
    assert flat16.dtype == torch.float32 and flat16.abs().max() > 0
    assert torch.nn.functional.cosine_similarity(flat16, flat32, dim=0) > 0.99
    assert (flat16 - flat32).norm() / flat32.norm() < 0.05


def test_bf16_training_lowers_the_loss_like_fp32(tiny, lora) -> None:
    _, _, tok, shard = tiny
    start = trainable(lora)
    kw = dict(steps=12, batch_size=8, pad_id=tok.pad_token_id, lr=5e-3, seed=2)
    r32 = train_local(lora, shard.train, precision="fp32", **kw)
    restore(lora, start)
    r16 = train_local(lora, shard.train, precision="bf16", **kw)
    assert r16.loss_last < r16.loss_first
    assert r16.loss_last == pytest.approx(r32.loss_last, rel=1e-2)


def test_evaluation_in_bf16_is_close_to_fp32(tiny, lora) -> None:
    _, _, tok, shard = tiny
    kw = dict(batch_size=16, pad_id=tok.pad_token_id)
    nll32, n32 = evaluate_nll(lora, shard.held_out, precision="fp32", **kw)
    nll16, n16 = evaluate_nll(lora, shard.held_out, precision="bf16", **kw)
    assert n16 == n32 > 0
    assert nll16 / n16 == pytest.approx(nll32 / n32, rel=5e-3)


def test_bfloat16_storage_with_fp32_compute_keeps_fp32_lora(tiny) -> None:
    """model.dtype=bfloat16 stores the frozen base in bf16; LoRA weights stay fp32 and train."""
    cfg, _, tok, shard = tiny
    folder = prepare_base_model(cfg)
    base, _ = load_base_model(folder, dtype="bfloat16")
    model = lora_on(base)
    assert {p.dtype for p in base.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    for precision in ("fp32", "bf16"):
        before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
        r = train_local(
            model, shard.train, steps=3, batch_size=8, pad_id=tok.pad_token_id, precision=precision
        )
        assert torch.isfinite(torch.tensor(r.loss_last))
        after = [p for p in model.parameters() if p.requires_grad]
        assert {p.dtype for p in after} == {torch.float32}, precision
        assert max(float((a - b).abs().max()) for a, b in zip(after, before, strict=True)) > 0


def test_bf16_over_a_float16_base_is_refused(tiny) -> None:
    cfg, _, tok, shard = tiny
    base, _ = load_base_model(prepare_base_model(cfg), dtype="float16")
    model = lora_on(base)
    with pytest.raises(ValueError, match=r"federation\.precision='bf16'.*model\.dtype='float16'"):
        train_local(
            model, shard.train, steps=1, batch_size=4, pad_id=tok.pad_token_id, precision="bf16"
        )


def test_dp_sgd_under_bf16_autocast_updates_in_fp32(tiny, lora) -> None:
    """Opacus's per-example gradients come out bf16 under autocast; they are cast to fp32 before
    clipping and noise. σ = 0 and no clipping: the update is the mean gradient, close to fp32."""
    _, _, tok, shard = tiny
    batch = collate(shard.train[:4], pad_id=tok.pad_token_id)
    start = trainable(lora)
    deltas = {}
    for amp in (None, torch.bfloat16):
        restore(lora, start)
        params = [p for p in lora.parameters() if p.requires_grad]
        private = PrivateSteps(
            lora,
            torch.optim.SGD(params, lr=1.0),
            noise_multiplier=0.0,
            max_grad_norm=1e6,
            expected_batch_size=4,
            generator=torch.Generator().manual_seed(0),
            amp=amp,
        )
        try:
            loss, clipped = private.step(batch)
        finally:
            private.close()
        assert clipped == 0 and loss is not None
        deltas[amp] = torch.cat([(p - start[n]).flatten() for n, p in trainable(lora).items()])
    d32, d16 = deltas[None], deltas[torch.bfloat16]
    assert d16.dtype == torch.float32 and d16.abs().max() > 0
    assert (d16 - d32).norm() / d32.norm() < 0.05


def test_dp_sgd_runs_with_the_recipes_precision(tmp_path) -> None:
    from fedllm.privacy.sample_level import train_private

    cfg = load_recipe(
        str(Path(RECIPE).with_name("dp.yaml")),
        [
            f"output_dir={tmp_path}",
            "model.name=tiny",
            "data.max_examples=300",
            "federation.precision=bf16",
            "federation.local_steps=2",
        ],
    )
    base, tok = cached_base_model(cfg)
    shard = load_shard(cfg, 0, tokenizer=tok)
    model = lora_on(base)
    try:
        out = train_private(
            cfg, model, examples=shard.train, steps=2, pad_id=tok.pad_token_id, partition=0
        )
    finally:
        model.unload()
    assert out.train.steps == 2 and out.noise_multiplier > 0


def test_4bit_base_trains_under_bf16_after_an_evaluation(tiny) -> None:
    """The AVX512-BF16 trap: a no-grad eval-mode forward flips Linear4bit to an inference kernel
    and LoRA gradients become zero. bf16 autocast must not bring it back: after evaluating (in
    train mode, as the ClientApp does for quantized bases), LoRA A still moves."""
    bnb = pytest.importorskip("bitsandbytes")
    cfg, _, tok, shard = tiny
    base, _ = load_base_model(prepare_base_model(cfg), quantization="4bit")
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in base.modules())
    model = lora_on(base)
    kw = dict(batch_size=8, pad_id=tok.pad_token_id)
    model.train()
    evaluate_nll(model, shard.held_out, precision="bf16", **kw)
    before = trainable(model)
    train_local(model, shard.train, steps=2, precision="bf16", lr=1e-2, **kw)
    moved = {n: float((p - before[n]).abs().max()) for n, p in trainable(model).items()}
    assert all(v > 0 for n, v in moved.items() if "lora_A" in n), moved


def test_precision_is_a_checked_recipe_key() -> None:
    assert load_recipe(RECIPE, []).federation.precision == "fp32"
    assert load_recipe(RECIPE, ["federation.precision=auto"]).federation.precision == "auto"
    with pytest.raises(ConfigError, match=r"federation\.precision"):
        load_recipe(RECIPE, ["federation.precision=fp16"])


def test_auto_is_the_default_and_stays_fp32_over_a_float16_base() -> None:
    quickstart = str(Path(__file__).parents[1] / "recipes" / "quickstart.yaml")
    assert load_recipe(quickstart, []).federation.precision == "auto"
    cpu = torch.device("cpu")
    half = torch.nn.Linear(4, 4).half().requires_grad_(False)
    full = torch.nn.Linear(4, 4).requires_grad_(False)
    if bf16_supported(cpu):
        assert autocast_dtype("auto", device=cpu, model=full) == torch.bfloat16
    else:
        assert autocast_dtype("auto", device=cpu, model=full) is None
    assert (
        autocast_dtype("auto", device=cpu, model=half) is None
    )  # bf16 would round every weight again
    assert (
        autocast_dtype("bf16", device=cpu, model=half) == torch.bfloat16
    )  # and check_precision refuses it
    with pytest.raises(ValueError, match="float16 base"):
        check_precision(half, torch.bfloat16)
