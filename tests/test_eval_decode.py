"""fedllm.eval.decode: shared-head greedy decoding gives the same tokens as plain greedy generation,
each row cut at its own budget."""

from pathlib import Path

from fedllm.data import load_wordnet
from fedllm.eval.generate import end_token_ids
from fedllm.model.loading import build_tiny_model, load_base_model


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
