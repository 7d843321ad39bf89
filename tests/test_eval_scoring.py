"""fedllm.eval.scoring: batched scores equal one-at-a-time scores, the model's own loss, and (on
the prefix-sharing path) a plain full forward of each item, with fewer tokens computed."""

from pathlib import Path

import numpy as np
import pytest
import torch

from fedllm.data import collate, load_wordnet, tokenize_all
from fedllm.eval.prompting import prompt_response_item
from fedllm.eval.scoring import nll_and_tokens, score_examples
from fedllm.model.loading import load_base_model
from fedllm.model.tiny import build_tiny_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    examples = load_wordnet(pos=("verb",), max_examples=40, seed=1)
    texts = [f"{e['prompt']} {e['response']}" for e in examples]
    folder = build_tiny_model(tmp_path_factory.mktemp("sc") / "m", texts=texts, vocab_size=320)
    model, tok = load_base_model(Path(folder))
    model.eval()
    return model, tok, tokenize_all(examples[:12], tok, prompt_format="chat", max_length=40)


def test_batched_equals_one_at_a_time(setup) -> None:
    model, tok, items = setup
    batched = score_examples(model, items, batch_size=5, pad_id=tok.pad_token_id, vocab_stats=True)
    single = score_examples(model, items, batch_size=1, pad_id=tok.pad_token_id, vocab_stats=True)
    for b, s, item in zip(batched, single, items, strict=True):
        assert b.token_ids.tolist() == [t for t in item["labels"] if t != -100]
        np.testing.assert_allclose(b.logprobs, s.logprobs, atol=1e-5)
        np.testing.assert_allclose(b.mu, s.mu, atol=1e-5)
        np.testing.assert_allclose(b.sigma, s.sigma, atol=1e-5)
        assert (b.sigma > 0).all() and (b.mu < 0).all()


def test_sum_matches_the_model_loss(setup) -> None:
    model, tok, items = setup
    nll, tokens = nll_and_tokens(
        score_examples(model, items, batch_size=4, pad_id=tok.pad_token_id)
    )
    batch = collate(items, pad_id=tok.pad_token_id)
    with torch.no_grad():
        loss = model(**batch).loss.item()  # mean over all response tokens of the batch
    assert tokens == int((batch["labels"][:, 1:] != -100).sum())
    assert nll / tokens == pytest.approx(loss, rel=1e-4)


def naive_scores(model, item: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The definition, as the scorer did before prefix sharing: one full forward, every position."""
    ids = torch.as_tensor([item["input_ids"]])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits.float()[0, :-1], dim=-1)
    labels = torch.as_tensor(item["labels"][1:])
    rows = (labels != -100).nonzero().squeeze(-1)
    lp = logp[rows]
    p = lp.exp()
    mu = (p * lp).sum(-1)
    sigma = (p * (lp - mu[:, None]).square()).sum(-1).sqrt()
    return lp.gather(-1, labels[rows, None]).squeeze(-1).numpy(), mu.numpy(), sigma.numpy()


class TokenCount:
    """Counts the tokens the model's embedding layer sees (what a scoring path computes)."""

    def __init__(self, model) -> None:
        self.tokens = 0
        self.handle = model.get_input_embeddings().register_forward_hook(self.hook)

    def hook(self, module, args, output) -> None:
        self.tokens += args[0].numel()


def test_shared_prefix_equals_the_full_forward(setup) -> None:
    model, tok, items = setup
    secrets = ["0123", "4567", "8901", "2345", "6789", "1357"]
    canaries = [  # one prompt, many secrets: the prompt is shared
        prompt_response_item(
            tok, f"What is the secret number of account {a}?", response=s, prompt_format="chat"
        )
        for a in ("0-1-0", "0-4-1")
        for s in secrets
    ]
    options = [  # multiple choice: each question's options share its prompt
        prompt_response_item(tok, ex_prompt, response=opt, prompt_format="chat")
        for ex_prompt in ("Define the word 'run' (verb).", "Define the word 'go' (verb).")
        for opt in ("move fast", "travel", "leave quickly", "stop")
    ]
    # (items, most of the full path's tokens the shared path may compute): distinct prompts only
    # share the chat template's head; a canary's secrets and a question's options share a prompt
    for group, ratio in ((items, 0.9), (canaries, 0.25), (options, 0.6), (items + canaries, 0.7)):
        pad = tok.pad_token_id
        count = TokenCount(model)
        shared = score_examples(model, group, batch_size=3, pad_id=pad, vocab_stats=True)
        shared_tokens, count.tokens = count.tokens, 0
        full = score_examples(
            model, group, batch_size=3, pad_id=pad, vocab_stats=True, shared_prefix=False
        )
        count.handle.remove()
        assert shared_tokens < ratio * count.tokens  # the shared path really skips prefixes
        for a, b, item in zip(shared, full, group, strict=True):
            lp, mu, sigma = naive_scores(model, item)
            assert a.token_ids.tolist() == [t for t in item["labels"] if t != -100]
            for s in (a, b):
                np.testing.assert_allclose(s.logprobs, lp, atol=2e-5)
                np.testing.assert_allclose(s.mu, mu, atol=2e-5)
                np.testing.assert_allclose(s.sigma, sigma, atol=2e-5, rtol=1e-4)


def test_items_without_a_shared_prefix_fall_back_to_the_full_path(setup) -> None:
    model, tok, items = setup
    odd = [
        {"input_ids": [7, *items[0]["input_ids"]], "labels": [-100, *items[0]["labels"]]},
        {"input_ids": [8, *items[1]["input_ids"]], "labels": [-100, *items[1]["labels"]]},
    ]
    a = score_examples(model, odd, batch_size=2, pad_id=tok.pad_token_id)
    for s, item in zip(a, odd, strict=True):
        np.testing.assert_allclose(s.logprobs, naive_scores(model, item)[0], atol=2e-5)
    assert score_examples(model, [], batch_size=2, pad_id=tok.pad_token_id) == []


def test_bf16_autocast_scores_agree_with_fp32(setup) -> None:
    """Eval's bf16 precision (fedllm.eval.views): per-token log p within 0.05 nats of fp32 and
    the same ranking of items (but for items within 0.1 nats of each other, which bf16 may swap)
    on a tiny model; the log-softmax itself stays in fp32."""
    model, tok, items = setup
    kw = {"batch_size": 4, "pad_id": tok.pad_token_id, "vocab_stats": True}
    fp32 = score_examples(model, items, **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = score_examples(model, items, **kw)
    for a, b in zip(fp32, bf16, strict=True):
        assert b.logprobs.dtype == np.float64 and a.token_ids.tolist() == b.token_ids.tolist()
        np.testing.assert_allclose(b.logprobs, a.logprobs, atol=0.05)
        np.testing.assert_allclose(b.mu, a.mu, atol=0.05)
        assert np.abs(b.logprobs - a.logprobs).max() > 0  # bf16 really ran
    means = [[s.mean_nll for s in run] for run in (fp32, bf16)]
    assert np.corrcoef(*means)[0, 1] > 0.99
    # the same ranking, except between items fp32 itself puts within bf16's error of each other
    a, b = (np.asarray(m) for m in means)
    apart = np.abs(a[:, None] - a[None, :]) > 0.1
    assert apart.sum() > len(a), "most pairs are far enough apart to be ranked"
    flipped = apart & (np.sign(a[:, None] - a[None, :]) != np.sign(b[:, None] - b[None, :]))
    assert not flipped.any()
