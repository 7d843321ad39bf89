"""Local training knobs (fedllm.client.train): gradient accumulation equals a bigger batch,
gradient checkpointing recomputes and matches, and a learning-rate schedule over the whole
federation gives the hand-computed rate at step k of round r, also through the ClientApp."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from flwr.app import ConfigRecord, RecordDict

from fedllm.aggregators import RoundSpec
from fedllm.client.batches import batch_loader, forever, length_grouped_batches
from fedllm.client.round import client_seed, local_steps
from fedllm.client.schedule import (
    epoch_steps,
    lr_factor,
    make_scheduler,
    num_local_steps,
    schedule_span,
)
from fedllm.client.train import (
    evaluate_nll,
    keeps_logits,
    label_nll,
    predicting_positions,
    shared_head,
    token_nll,
    train_local,
)
from fedllm.data import collate
from fedllm.data.shards import load_shard
from fedllm.features.types import ClientPlan, ClientRound
from fedllm.model.adapters import attach_lora
from fedllm.model.base import cached_base_model
from fedllm.recipe import ConfigError, load_recipe

RECIPE = str(Path(__file__).parents[1] / "recipes" / "tiny.yaml")
DP_RECIPE = str(Path(__file__).parents[1] / "recipes" / "dp.yaml")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("knobs")
    cfg = load_recipe(RECIPE, [f"output_dir={out}", "data.max_examples=300"])
    base, tok = cached_base_model(cfg)
    shard = load_shard(cfg, 0, tokenizer=tok)
    return base, tok, shard


def fresh_lora(base: torch.nn.Module, seed: int = 0):
    """A rank-4 adapter, dropout 0, with A and B random (both get gradients), seeded."""
    torch.manual_seed(seed)
    model = attach_lora(base, rank=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model


@pytest.fixture
def lora(tiny) -> Iterator:
    model = fresh_lora(tiny[0])
    yield model
    model.unload()


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def one_step(model, examples, tok, **kw) -> tuple[dict[str, torch.Tensor], float]:
    """The parameter change of one SGD step (lr 1, no clipping) and its reported loss."""
    before = trainable(model)
    result = train_local(
        model,
        examples,
        steps=1,
        pad_id=tok.pad_token_id,
        optimizer="sgd",
        lr=1.0,
        max_grad_norm=None,
        seed=7,
        **kw,
    )
    after = trainable(model)
    with torch.no_grad():  # back to the start for the next run
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(before[n])
    return {n: after[n] - before[n] for n in before}, result.loss_first


# ---------------------------------------------------------------- dropout


def test_dropout_masks_follow_the_seed_not_the_process_rng(tiny) -> None:
    """With LoRA dropout, a client's round used the process's global RNG: the same round gave
    other losses depending on what the process ran before (a resumed run, a reused worker).
    Seeded per round in a forked RNG, it repeats, and the process RNG is left as it was."""
    base, tok, shard = tiny

    def losses(seed: int, *, disturb: int) -> list[float]:
        torch.manual_seed(0)  # the same adapter every time
        model = attach_lora(base, rank=4, alpha=8, dropout=0.5, target_modules=["q_proj"])
        torch.manual_seed(disturb)  # whatever the process drew before this round
        before = torch.get_rng_state()
        try:
            steps: list[float] = []
            train_local(
                model,
                shard.train[:16],
                steps=3,
                batch_size=4,
                pad_id=tok.pad_token_id,
                lr=1e-3,
                seed=seed,
                on_step=lambda done, total, loss: steps.append(loss),
            )
            assert torch.equal(torch.get_rng_state(), before), "the process RNG was drawn from"
            return steps
        finally:
            model.unload()

    assert losses(3, disturb=0) == losses(3, disturb=99)
    assert losses(3, disturb=0) != losses(4, disturb=0)
    assert len(losses(2**62, disturb=0)) == 3, "a large recipe seed must not overflow the RNG"


# ---------------------------------------------------------------- gradient accumulation


def test_accumulating_two_batches_of_4_equals_one_batch_of_8(tiny, lora) -> None:
    _, tok, shard = tiny
    examples = shard.train[:8]
    # the two micro-batches hold different numbers of loss tokens, so a mean of the two
    # micro-batch means would differ from the token mean of the batch of 8
    g = torch.Generator().manual_seed(7)
    order = torch.randperm(8, generator=g).tolist()
    halves = [collate([examples[i] for i in order[h : h + 4]], pad_id=0) for h in (0, 4)]
    counts = [int((b["labels"][:, 1:] != -100).sum()) for b in halves]
    assert counts[0] != counts[1]

    big, loss_big = one_step(lora, examples, tok, batch_size=8)
    acc, loss_acc = one_step(lora, examples, tok, batch_size=4, accumulation=2)
    assert loss_acc == pytest.approx(loss_big, rel=1e-5)
    for name in big:
        assert big[name].abs().max() > 0
        torch.testing.assert_close(acc[name], big[name], rtol=1e-4, atol=1e-6)

    # and it is not the mean of the micro-batch means
    with torch.no_grad():
        means = [float(lora(**b).loss) for b in halves]
    assert abs(sum(means) / 2 - loss_big) > 1e-4


def test_accumulation_counts_examples_and_epochs() -> None:
    # 100 examples, batch 8 × 2 micro-batches = 16 per step: ceil(100 / 16) = 7 steps an epoch
    assert num_local_steps(100, batch_size=8, local_steps=None, local_epochs=1, accumulation=2) == 7
    assert num_local_steps(100, batch_size=8, local_steps=None, local_epochs=1) == 13
    assert num_local_steps(100, batch_size=8, local_steps=5, local_epochs=None, accumulation=4) == 5


@pytest.mark.parametrize(
    ("n", "batch", "accumulation", "epochs", "steps"),
    [(20, 8, 1, 2.0, 6), (12, 8, 1, 3.0, 6), (100, 8, 1, 1.0, 13), (16, 8, 1, 1.5, 3)],
)
def test_whole_epochs_see_every_example_equally_often(
    n: int, batch: int, accumulation: int, epochs: float, steps: int
) -> None:
    # the loader keeps each epoch's short last batch: ceil(E·n/b) steps (5 for 20 examples
    # over 2 epochs of 8) drew 36 examples, some once and some twice
    got = epoch_steps(n, batch_size=batch, local_epochs=epochs, accumulation=accumulation)
    assert got == steps
    examples = [{"input_ids": [i + 1], "labels": [i + 1], "id": i} for i in range(n)]
    batches = forever(batch_loader(examples, batch_size=batch, pad_id=0, seed=3, shuffle=True))
    seen = torch.cat([next(batches)["input_ids"][:, 0] for _ in range(got * accumulation)])
    counts = torch.bincount(seen - 1, minlength=n)
    if float(epochs).is_integer():
        assert counts.tolist() == [int(epochs)] * n
    assert len(seen) >= epochs * n > len(seen) - batch  # never short of the epochs asked


def test_epochs_with_accumulation_round_up_to_whole_steps() -> None:
    # 20 examples, batches of 8: 3 per epoch; 2 micro-batches a step: 2 steps (4 batches, the
    # last one runs into the next pass) where ceil(20 / 16) expected batches gave the same
    assert epoch_steps(20, batch_size=8, local_epochs=1.0, accumulation=2) == 2
    assert epoch_steps(86, batch_size=8, local_epochs=1.0, accumulation=2) == 6
    assert epoch_steps(100, batch_size=8, local_epochs=2.0, accumulation=2) == 13


def test_accumulation_reports_every_micro_batch_example(tiny, lora) -> None:
    _, tok, shard = tiny
    result = train_local(
        lora, shard.train[:20], steps=2, batch_size=4, accumulation=3, pad_id=tok.pad_token_id
    )
    assert result.examples == 2 * 3 * 4


# ---------------------------------------------------------------- gradient checkpointing


def test_gradient_checkpointing_recomputes_and_matches(tiny, lora) -> None:
    base, tok, shard = tiny
    layer = base.model.layers[0].self_attn  # inside the checkpointed forward
    calls = []
    hook = layer.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        plain, loss_plain = one_step(lora, shard.train[:8], tok, batch_size=8)
        n_plain = len(calls)
        ckpt, loss_ckpt = one_step(
            lora, shard.train[:8], tok, batch_size=8, gradient_checkpointing=True
        )
        n_ckpt = len(calls) - n_plain
    finally:
        hook.remove()
    assert (n_plain, n_ckpt) == (1, 2)  # the layer ran again in the backward pass
    assert loss_ckpt == pytest.approx(loss_plain, rel=1e-6)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-7)
    # undone afterwards: the cached base is shared with evaluation and later rounds
    assert not base.is_gradient_checkpointing
    assert not getattr(base, "_require_grads_hooks", [])


def test_gradient_checkpointing_trains_several_steps(tiny, lora) -> None:
    _, tok, shard = tiny
    kw = dict(steps=8, batch_size=8, pad_id=tok.pad_token_id, lr=5e-3, seed=3)
    result = train_local(lora, shard.train, gradient_checkpointing=True, **kw)
    assert result.loss_last < result.loss_first


def test_dp_sgd_refuses_accumulation_and_checkpointing(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"gradient_accumulation_steps=2.*privacy.mode='sample'"):
        load_recipe(
            DP_RECIPE, [f"output_dir={tmp_path}", "federation.gradient_accumulation_steps=2"]
        )
    with pytest.raises(ConfigError, match=r"gradient_checkpointing.*privacy.mode='sample'"):
        load_recipe(DP_RECIPE, [f"output_dir={tmp_path}", "federation.gradient_checkpointing=true"])


# ---------------------------------------------------------------- learning-rate schedule


def cosine(g: int, *, warmup: int, total: int) -> float:
    """By hand: warm-up (g+1)/(w+1), then 0.5·(1 + cos(π·(g−w)/(T−w)))."""
    if g < warmup:
        return (g + 1) / (warmup + 1)
    return 0.5 * (1 + math.cos(math.pi * (g - warmup) / (total - warmup)))


def test_schedule_span_over_the_federation_and_per_round() -> None:
    # 3 rounds of 5 steps: round 2 continues at step 5 of 15; per round it restarts at 0 of 5
    assert schedule_span(scope="federation", server_round=2, rounds=3, steps=5) == (5, 15)
    assert schedule_span(scope="federation", server_round=1, rounds=3, steps=5) == (0, 15)
    assert schedule_span(scope="round", server_round=2, rounds=3, steps=5) == (0, 5)
    with pytest.raises(ValueError, match=r"outside the planned rounds 1\.\.3"):
        schedule_span(scope="federation", server_round=4, rounds=3, steps=5)


def test_lr_at_step_k_of_round_r_by_hand() -> None:
    # lr 0.1, cosine, 2 warm-up steps, 3 rounds × 5 steps: round 2 step k is global step 5 + k
    expected = [0.1 * 0.5 * (1 + math.cos(math.pi * (5 + k - 2) / 13)) for k in range(5)]
    # round 2, step 0: global 5, progress 3/13: 0.1·0.5·(1 + cos(3π/13)) = 0.1·0.5·1.748511
    assert expected[0] == pytest.approx(0.0874255, abs=1e-6)
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.1)
    sched = make_scheduler(opt, schedule="cosine", warmup_steps=2, total_steps=15, offset=5)
    seen = []
    for _ in range(5):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx(expected, rel=1e-9)
    # round 1 warms up: 0.1/3, 0.2/3, then decays from 0.1
    assert [
        0.1 * lr_factor(g, schedule="cosine", warmup_steps=2, total_steps=15) for g in (0, 1, 2)
    ] == pytest.approx([0.1 / 3, 0.2 / 3, 0.1])
    # linear: round 3, step 4 is global 14: 1 − 12/13
    assert lr_factor(14, schedule="linear", warmup_steps=2, total_steps=15) == pytest.approx(1 / 13)


class Unigram(torch.nn.Module):
    """Logits = one trainable vector w at every position: the CE gradient is softmax(w) − e_t
    when every label is token t, so an SGD step's learning rate can be read off exactly."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(vocab))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        return SimpleNamespace(logits=self.w.expand(*input_ids.shape, -1))


def test_the_client_app_decays_the_rate_across_rounds() -> None:
    """ClientApp `local_steps` in round 2 of 3 runs steps 4..7 of a 12-step cosine schedule."""
    cfg = load_recipe(
        RECIPE,
        [
            "federation.rounds=3",
            "federation.local_steps=4",
            "federation.optimizer=sgd",
            "federation.lr=0.5",
            "federation.schedule=cosine",
            "federation.warmup_steps=2",
            "federation.max_grad_norm=null",
        ],
    )
    vocab, t = 5, 3
    example = {"input_ids": [1, 2, 3, 4], "labels": [-100, t, t, t]}

    def run(server_round: int, scope: str) -> torch.Tensor:
        fed = cfg.federation.model_copy(update={"schedule_scope": scope})
        rnd = ClientRound(
            cfg=cfg.model_copy(update={"federation": fed}),
            partition=0,
            server_round=server_round,
            spec=RoundSpec(),
            config=ConfigRecord({}),
            node_config={},
            state=RecordDict(),
            seed=0,
            plan=ClientPlan(partition=0, rank=2),
            tokenizer=SimpleNamespace(pad_token_id=0),
            shard=SimpleNamespace(train=[example] * 8),
        )
        model = Unigram(vocab)
        result = local_steps(model, rnd, features=[])
        assert result.steps == 4
        return model.w.detach()

    def by_hand(first: int, total: int) -> torch.Tensor:
        w, target = torch.zeros(vocab), torch.nn.functional.one_hot(torch.tensor(t), vocab)
        for g in range(first, first + 4):
            w = w - 0.5 * cosine(g, warmup=2, total=total) * (torch.softmax(w, 0) - target)
        return w

    torch.testing.assert_close(run(2, "federation"), by_hand(4, 12), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(run(3, "federation"), by_hand(8, 12), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(run(2, "round"), by_hand(0, 4), rtol=1e-5, atol=1e-6)
    assert (run(2, "federation") - run(2, "round")).abs().max() > 1e-3  # the scope matters


def test_recipe_keys_are_checked(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"federation\.schedule_scope"):
        load_recipe(RECIPE, ["federation.schedule_scope=epoch"])
    with pytest.raises(ConfigError, match=r"federation\.gradient_accumulation_steps"):
        load_recipe(RECIPE, ["federation.gradient_accumulation_steps=0"])
    cfg = load_recipe(RECIPE, [])
    assert cfg.federation.schedule_scope == "federation"
    assert cfg.federation.gradient_accumulation_steps == 1
    assert cfg.federation.gradient_checkpointing is False


# ---------------------------------------------------------------- logits only where labels count


def test_label_nll_runs_the_head_only_where_labels_count_and_matches_the_full_loss(
    tiny, lora
) -> None:
    _, tok, shard = tiny
    batch = collate(shard.train[:8], pad_id=tok.pad_token_id)
    keep = predicting_positions(batch["labels"])
    # position t predicts label t+1; every counted label is predicted from a kept position
    counted = (batch["labels"][:, 1:] != -100).any(dim=0)
    assert keep.tolist() == [t for t in range(len(counted)) if counted[t]]
    assert 0 < len(keep) < batch["labels"].shape[1] - 1  # the prompts predict nothing
    assert keeps_logits(lora)

    def grads(loss_fn) -> tuple[float, dict[str, torch.Tensor]]:
        lora.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        out = {n: p.grad.clone() for n, p in lora.named_parameters() if p.requires_grad}
        lora.zero_grad(set_to_none=True)
        return float(loss), out

    def full() -> torch.Tensor:
        logits = lora(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return token_nll(logits, batch["labels"]).sum()

    part = label_nll(lora, batch)
    assert part.shape == (8, len(keep))
    loss_full, g_full = grads(full)
    loss_kept, g_kept = grads(lambda: label_nll(lora, batch).sum())
    assert loss_kept == pytest.approx(loss_full, rel=1e-6)
    for name in g_full:
        torch.testing.assert_close(g_kept[name], g_full[name], rtol=1e-4, atol=1e-7)


def test_shared_head_stops_at_the_first_difference_and_before_the_first_label() -> None:
    def batch(rows, first_label):
        ids = torch.tensor(rows)
        labels = torch.full_like(ids, -100)
        labels[:, first_label:] = ids[:, first_label:]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    assert shared_head(batch([[1, 2, 3, 4, 5, 6], [1, 2, 9, 4, 5, 6]], 4)) == 2
    # the position that predicts the first label runs with its own row
    assert shared_head(batch([[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 7]], 4)) == 3
    assert shared_head(batch([[1, 2, 3, 4, 5, 6]], 4)) == 0  # one row: nothing to share
    assert shared_head(batch([[7, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6]], 4)) == 0
    # a label at position 0 or 1 leaves no token to share (not a slice from the end)
    assert shared_head(batch([[1, 2, 3, 4, 5, 6], [1, 2, 9, 4, 5, 6]], 0)) == 0
    assert shared_head(batch([[1, 2, 3, 4, 5, 6], [1, 2, 9, 4, 5, 6]], 1)) == 0
    left_padded = batch([[0, 2, 3, 4, 5, 6], [0, 2, 3, 4, 5, 6]], 4)
    left_padded["attention_mask"][:, 0] = 0
    assert shared_head(left_padded) == 0  # a masked token is never shared


def test_shared_head_gives_the_full_batch_loss_and_gradients(tiny, lora) -> None:
    _, tok, shard = tiny
    batch = collate(shard.train[:8], pad_id=tok.pad_token_id)
    head = shared_head(batch)
    assert head >= 4  # the prompt template's shared words

    def grads(share: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        lora.zero_grad(set_to_none=True)
        nll = label_nll(lora, batch, share_head=share)
        nll.sum().backward()
        out = {n: p.grad.clone() for n, p in lora.named_parameters() if p.requires_grad}
        lora.zero_grad(set_to_none=True)
        return nll.detach(), out

    calls = []
    layer = lora.get_base_model().model.layers[0]
    hook = layer.register_forward_pre_hook(
        lambda _, args, kw: calls.append(
            (kw.get("hidden_states", args[0] if args else None)).shape[:2]
        ),
        with_kwargs=True,
    )
    try:
        nll_full, g_full = grads(False)
        calls.clear()
        nll_shared, g_shared = grads(True)
    finally:
        hook.remove()
    width = batch["input_ids"].shape[1]
    assert calls == [(1, head), (8, width - head)]  # the head once, then every row's rest
    torch.testing.assert_close(nll_shared, nll_full, rtol=1e-5, atol=1e-5)
    for name in g_full:  # the head's LoRA gradient comes back summed over the rows
        torch.testing.assert_close(g_shared[name], g_full[name], rtol=1e-4, atol=1e-6)


def test_training_with_a_shared_head_takes_the_same_steps(tiny, lora) -> None:
    _, tok, shard = tiny
    plain, loss_plain = one_step(lora, shard.train[:16], tok, batch_size=8)
    shared, loss_shared = one_step(lora, shard.train[:16], tok, batch_size=8, share_head=True)
    assert loss_shared == pytest.approx(loss_plain, rel=1e-5)
    for name in plain:
        torch.testing.assert_close(shared[name], plain[name], rtol=1e-4, atol=1e-6)
    sums = [
        evaluate_nll(lora, shard.held_out, batch_size=8, pad_id=tok.pad_token_id, share_head=s)
        for s in (False, True)
    ]
    assert sums[1][1] == sums[0][1] and sums[1][0] == pytest.approx(sums[0][0], rel=1e-5)


def test_label_nll_falls_back_to_full_logits_for_a_model_without_logits_to_keep(tiny) -> None:
    base, tok, shard = tiny
    batch = collate(shard.train[:4], pad_id=tok.pad_token_id)

    class Plain(torch.nn.Module):  # a forward that only takes input_ids and attention_mask
        def __init__(self) -> None:
            super().__init__()
            self.inner = base

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)

    plain = Plain()
    assert not keeps_logits(plain)
    with torch.no_grad():
        want = token_nll(plain(batch["input_ids"], batch["attention_mask"]).logits, batch["labels"])
        got = label_nll(plain, batch)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want)


# ---------------------------------------------------------------- batches grouped by length


def test_length_grouped_batches_cover_the_epoch_once_with_near_equal_lengths() -> None:
    lengths = [(7 * i) % 50 + 10 for i in range(200)]  # 10..59, scattered
    batches = length_grouped_batches(lengths, batch_size=8, seed=3, pool=5)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(200))  # each example once
    assert [len(b) for b in batches].count(8) == 25
    pad = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)
    rng = torch.Generator().manual_seed(3)
    plain = torch.randperm(200, generator=rng).view(25, 8).tolist()
    pad_plain = sum(max(lengths[i] for i in b) * 8 - sum(lengths[i] for i in b) for b in plain)
    assert pad < pad_plain / 3  # pools of 40 sorted: a batch spans a fifth of a pool's range
    # another seed is another order; the same seed the same batches
    assert batches == length_grouped_batches(lengths, batch_size=8, seed=3, pool=5)
    assert batches != length_grouped_batches(lengths, batch_size=8, seed=4, pool=5)
    # the batch order is shuffled after grouping: unshuffled, each run of 5 batches would be
    # one pool's, in increasing length
    longest = [max(lengths[i] for i in b) for b in batches]
    runs = [longest[k : k + 5] for k in range(0, 25, 5)]
    assert not all(run == sorted(run) for run in runs), longest


def test_grouped_training_runs_and_evaluation_sums_do_not_depend_on_order(tiny, lora) -> None:
    _, tok, shard = tiny
    result = train_local(
        lora,
        shard.train[:64],
        steps=3,
        batch_size=8,
        pad_id=tok.pad_token_id,
        lr=1e-3,
        group_by_length=True,
        seed=1,
    )
    assert result.steps == 3 and result.examples == 24
    total, tokens = evaluate_nll(lora, shard.train[:20], batch_size=4, pad_id=tok.pad_token_id)
    reverse = list(reversed(shard.train[:20]))
    total_r, tokens_r = evaluate_nll(lora, reverse, batch_size=3, pad_id=tok.pad_token_id)
    assert tokens == tokens_r
    assert total == pytest.approx(total_r, rel=1e-5)


def test_client_seeds_stay_distinct_past_a_thousand_partitions() -> None:
    # seed·100003 + round·1009 + partition made (round 1, partition 1009) and (round 2,
    # partition 0) share a seed (8,919 such pairs over 10 rounds × 2,000 clients)
    cfg = SimpleNamespace(seed=0)
    seeds = {
        client_seed(cfg, server_round=r, partition=p) for r in range(1, 11) for p in range(2000)
    }
    assert len(seeds) == 10 * 2000
    # runs inside the formula's one-to-one range keep the seeds they had before the change
    assert client_seed(SimpleNamespace(seed=3), server_round=2, partition=5) == 3 * 100_003 + 2023
    # also past round 99 (h96: a guard on round·1009 + partition changed them there)
    assert client_seed(cfg, server_round=100, partition=0) == 100 * 1009
    far = client_seed(cfg, server_round=1, partition=1009)
    assert 2**62 <= far < 2**63 and far == client_seed(cfg, server_round=1, partition=1009)
    assert client_seed(SimpleNamespace(seed=1), server_round=1, partition=1009) != far
