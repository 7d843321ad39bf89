"""fedllm.eval.decode: shared-head greedy decoding gives the same tokens as plain greedy generation,
each row cut at its own budget."""

from pathlib import Path

from fedllm.data import load_wordnet
from fedllm.eval.generate import end_token_ids
from fedllm.model.loading import load_base_model
from fedllm.model.tiny import build_tiny_model


def test_shared_head_decoding_gives_generates_tokens(tmp_path: Path) -> None:
    from fedllm.eval.decode import common_head, greedy_decode
    from fedllm.eval.generate import greedy_generate
    from fedllm.eval.prompting import prompt_ids

    examples = load_wordnet(pos=("noun",), max_examples=40, seed=5)
    texts = [f"{e['prompt']} {e['response']}" for e in examples]
    model, tok = load_base_model(build_tiny_model(tmp_path / "m", texts=texts, vocab_size=320))
    model.eval()
    prompts = [prompt_ids(tok, e["prompt"], prompt_format="chat") for e in examples[:14]]
    assert common_head(prompts) >= 3  # the chat head and "Define the word '"
    assert common_head([[1, 2, 3], [1, 2]]) == 1  # every prompt keeps a token to decode from
    budgets = [1 + i % 7 for i in range(len(prompts))]
    kw = {"pad_id": tok.pad_token_id, "eos_ids": end_token_ids(tok), "batch_size": 4}
    shared = greedy_decode(model, prompts, max_new_tokens=budgets, **kw)
    full = greedy_generate(model, prompts, max_new_tokens=7, **kw)
    for got, want, budget in zip(shared, full, budgets, strict=True):
        assert got == want[:budget]
    assert any(len(g) == b for g, b in zip(shared, budgets, strict=True))


def test_decode_rows_keep_the_prompt_pass_within_the_token_budget() -> None:
    from fedllm.eval.decode import MIN_ROWS, decode_rows

    # width 12 + 4 = 16 tokens, at most 12 - 8 = 4 run per row after the head: 2 * 16 // 4 = 8
    prompts = [[0] * 10, [0] * 12]
    big = 4 * MIN_ROWS
    assert decode_rows(prompts, [4, 4], head=8, batch_size=big) == big * 16 // 4
    # no shared head: the whole prompt runs per row, about batch_size rows (13 // 12)
    assert decode_rows(prompts, [1, 1], head=0, batch_size=big) == big * 13 // 12
    # nor fewer than MIN_ROWS: one-token steps over few rows are overhead-bound
    assert decode_rows(prompts, [4, 4], head=8, batch_size=2) == MIN_ROWS
