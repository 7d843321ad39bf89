"""fedllm.privacy.dpsgd: Opacus DP-SGD on the tiny model's LoRA parameters (real Opacus, peft)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from fedllm.data import collate
from fedllm.data.shards import load_shard
from fedllm.model.adapters import attach_lora, read_factors
from fedllm.model.base import cached_base_model
from fedllm.privacy.dpsgd import PrivateSteps, example_losses, train_dp
from fedllm.privacy.plan import SamplePlan
from fedllm.privacy.sample_level import train_private
from fedllm.recipe import load_recipe

RECIPE = str(Path(__file__).parents[1] / "recipes" / "tiny.yaml")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("dp")
    cfg = load_recipe(RECIPE, [f"output_dir={out}", "data.max_examples=300"])
    base, tok = cached_base_model(cfg)
    shard = load_shard(cfg, 0, tokenizer=tok)
    return cfg, base, tok, shard


@pytest.fixture
def lora(tiny) -> Iterator:
    """A fresh rank-4 adapter with B nonzero (so A gets gradients too), removed afterwards."""
    _, base, _, _ = tiny
    model = attach_lora(base, rank=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    yield model
    model.unload()


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def per_example_grads(model, batch) -> list[dict[str, torch.Tensor]]:
    """Each example's gradient by its own plain backward pass (no Opacus)."""
    out = []
    for i in range(batch["input_ids"].shape[0]):
        one = {k: v[i : i + 1] for k, v in batch.items()}
        model.zero_grad(set_to_none=True)
        example_losses(model, one).sum().backward()
        out.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    model.zero_grad(set_to_none=True)
    return out


def test_example_losses_do_not_couple_examples(tiny, lora) -> None:
    _, _, tok, shard = tiny
    batch = collate(shard.train[:4], pad_id=tok.pad_token_id)
    with torch.no_grad():
        together = example_losses(lora, batch)
        alone = torch.cat(
            [example_losses(lora, collate([e], pad_id=tok.pad_token_id)) for e in shard.train[:4]]
        )
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-4)


def test_per_sample_clipping_bounds_each_examples_contribution(tiny, lora) -> None:
    """σ = 0, SGD lr 1: the step is −(1/E)·Σ gᵢ·min(1, C/‖gᵢ‖), not −(1/E)·Σ gᵢ."""
    _, _, tok, shard = tiny
    batch = collate(shard.train[:4], pad_id=tok.pad_token_id)
    grads = per_example_grads(lora, batch)
    norms = [torch.sqrt(sum(g.square().sum() for g in gi.values())) for gi in grads]
    C, E = 0.5 * min(float(n) for n in norms), 4  # every example is clipped
    expected = {
        n: -sum(gi[n] * min(1.0, C / float(ni)) for gi, ni in zip(grads, norms, strict=True)) / E
        for n in grads[0]
    }
    unclipped = {n: -sum(gi[n] for gi in grads) / E for n in grads[0]}
    before = trainable(lora)
    params = [p for p in lora.parameters() if p.requires_grad]
    steps = PrivateSteps(
        lora,
        torch.optim.SGD(params, lr=1.0),
        noise_multiplier=0.0,
        max_grad_norm=C,
        expected_batch_size=E,
        generator=torch.Generator().manual_seed(0),
    )
    try:
        _, clipped = steps.step(batch)
    finally:
        steps.close()
    after = trainable(lora)
    delta = {n: after[n] - before[n] for n in before}
    assert clipped == 4
    for n in delta:
        torch.testing.assert_close(delta[n], expected[n], rtol=1e-3, atol=1e-6)
    size = torch.sqrt(sum(d.square().sum() for d in delta.values()))
    assert float(size) <= 4 * C / E + 1e-6  # each example moved the adapter by at most C/E
    raw = torch.sqrt(sum(d.square().sum() for d in unclipped.values()))
    assert float(raw) > 2 * float(size), "without clipping the step would be much larger"


def test_noise_only_step_has_std_sigma_c_over_batch(tiny, lora) -> None:
    """An empty Poisson batch: no forward pass, the step is pure noise of std σC/E."""
    params = [p for p in lora.parameters() if p.requires_grad]
    before = trainable(lora)
    sigma, C, E = 2.0, 0.5, 4
    steps = PrivateSteps(
        lora,
        torch.optim.SGD(params, lr=1.0),
        noise_multiplier=sigma,
        max_grad_norm=C,
        expected_batch_size=E,
        generator=torch.Generator().manual_seed(1),
    )
    try:
        loss, _ = steps.step(None)
    finally:
        steps.close()
    assert loss is None
    moved = torch.cat([(trainable(lora)[n] - before[n]).flatten() for n in before])
    assert moved.numel() > 1500  # std estimate good to ~2%
    assert abs(float(moved.std()) / (sigma * C / E) - 1) < 0.06
    assert abs(float(moved.mean())) < 0.05 * sigma * C / E * 3


def _batches(monkeypatch: pytest.MonkeyPatch, tiny, *, q: float, steps: int, seed) -> list[list]:
    """The examples of each step's batch (the steps themselves skipped: sampling only)."""
    from fedllm.privacy import dpsgd

    _, base, tok, shard = tiny
    batches: list[list] = []
    monkeypatch.setattr(dpsgd, "collate", lambda items, pad_id: batches.append(items) or items)
    monkeypatch.setattr(dpsgd.PrivateSteps, "step", lambda self, batch: (None, 0))
    plan = SamplePlan(sample_rate=q, steps_per_round=steps, noise_multiplier=1.0, max_grad_norm=1.0)
    model = attach_lora(base, rank=2, alpha=4, dropout=0.0, target_modules=["q_proj"])
    try:
        out = train_dp(
            model, shard.train, plan=plan, steps=steps, pad_id=tok.pad_token_id, seed=seed
        )
    finally:
        model.unload()
    assert out.empty_batches == steps - len(batches)
    return batches


def test_batches_are_poisson_samples_of_the_whole_shard(monkeypatch, tiny) -> None:
    """Each example joins each step with probability q, independently: the accountant's
    assumption. Over 400 steps at q = 0.1 the mean batch is q·n within 4 standard errors,
    the sizes vary, and every example is drawn (a fixed batch would see q·n of them)."""
    n, q, steps = len(tiny[3].train), 0.1, 400
    batches = _batches(monkeypatch, tiny, q=q, steps=steps, seed=3)
    sizes = [len(b) for b in batches] + [0] * (steps - len(batches))
    se = (n * q * (1 - q) / steps) ** 0.5
    assert abs(sum(sizes) / steps - q * n) < 4 * se, (sum(sizes) / steps, q * n)
    assert len(set(sizes)) > 3
    assert len({id(e) for b in batches for e in b}) == n  # P(an example never drawn) = 0.9^400


def test_unseeded_sampling_differs_between_calls(monkeypatch, tiny) -> None:
    """seed=None draws from OS entropy: nobody can re-derive which examples a step used."""
    first = _batches(monkeypatch, tiny, q=0.2, steps=20, seed=None)
    second = _batches(monkeypatch, tiny, q=0.2, steps=20, seed=None)
    assert [[id(e) for e in b] for b in first] != [[id(e) for e in b] for b in second]


def test_frozen_A_mixed_ranks_train_B_only(tiny) -> None:
    _, base, tok, shard = tiny
    plan = SamplePlan(sample_rate=0.05, steps_per_round=3, noise_multiplier=1.0, max_grad_norm=1.0)
    for rank in (2, 8):
        model = attach_lora(base, rank=rank, alpha=16, dropout=0.0, target_modules=["q_proj"])
        try:
            for name, p in model.named_parameters():
                if ".lora_A." in name:
                    p.requires_grad_(False)
            start = read_factors(model)
            out = train_dp(model, shard.train, plan=plan, steps=3, pad_id=tok.pad_token_id, seed=3)
            end = read_factors(model)
        finally:
            model.unload()
        assert out.train.steps == 3 and out.sample_rate == 0.05
        assert out.metrics()["dp-steps"] == 3
        for m in start:
            assert torch.equal(start[m].A, end[m].A), "frozen A must not move (no noise either)"
            assert not torch.equal(start[m].B, end[m].B)
            assert end[m].rank == rank


def test_client_refuses_delta_not_below_one_over_n(tiny, lora) -> None:
    cfg, _, tok, shard = tiny
    n = len(shard.train)
    bad = cfg.model_copy(
        update={
            "privacy": cfg.privacy.model_copy(
                update={"mode": "sample", "noise_multiplier": 1.0, "delta": 1.0 / n}
            )
        }
    )
    with pytest.raises(ValueError, match=rf"privacy.delta=.* below 1/n = 1/{n}"):
        train_private(
            bad, lora, examples=shard.train, steps=1, pad_id=tok.pad_token_id, partition=0
        )
