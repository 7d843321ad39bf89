"""Evaluation throughput: batched scoring and batched greedy generation vs one example at a time.

    python bench/eval.py [--model smollm2-135m|tiny] [--examples 64] [--batch-size 16]
    # writes bench/results/eval.md

Scoring = one forward pass over prompt + response with per-token log-probs and the vocabulary
statistics Min-K%++ needs (what held-out loss, membership inference and exposure use).
Generation = greedy decoding of the definition (define task, extraction), left-padded batches.
Both paths run in this process on the same examples; the table reports examples per second and
the ratio batched ÷ one-at-a-time, and checks that both paths give the same numbers/tokens.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from fedllm.data import load_wordnet, tokenize_all
from fedllm.eval.generate import end_token_ids, greedy_generate
from fedllm.eval.prompting import prompt_ids
from fedllm.eval.scoring import score_examples
from fedllm.model.loading import build_tiny_model, load_base_model, resolve_model_dir

OUT = Path(__file__).parent / "results" / "eval.md"


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="'smollm2-135m' or 'tiny'")
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--gen-examples", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()

    examples = load_wordnet(max_examples=args.examples, seed=0)
    if args.model == "tiny":
        texts = [f"{e['prompt']} {e['response']}" for e in load_wordnet(max_examples=500)]
        folder = build_tiny_model(Path("/tmp/fedllm-bench-eval-tiny"), texts=texts)
    else:
        folder = resolve_model_dir(args.model)
    model, tok = load_base_model(folder)
    model.eval()
    items = tokenize_all(examples, tok, prompt_format="chat", max_length=64)
    pad = tok.pad_token_id
    load0 = os.getloadavg()[0]

    def score(bs: int):
        return score_examples(model, items, batch_size=bs, pad_id=pad, vocab_stats=True)

    score(args.batch_size)  # warm-up
    t_single, single = timed(lambda: score(1))
    t_batch, batched = timed(lambda: score(args.batch_size))
    diff = max(
        float(np.abs(a.logprobs - b.logprobs).max()) for a, b in zip(single, batched, strict=True)
    )

    prompts = [prompt_ids(tok, e["prompt"], prompt_format="chat") for e in examples]
    prompts = prompts[: args.gen_examples]
    kw = {"max_new_tokens": args.new_tokens, "pad_id": pad, "eos_ids": end_token_ids(tok)}
    g_single_t, g_single = timed(lambda: greedy_generate(model, prompts, batch_size=1, **kw))
    g_batch_t, g_batch = timed(
        lambda: greedy_generate(model, prompts, batch_size=args.batch_size, **kw)
    )
    same = sum(a == b for a, b in zip(g_single, g_batch, strict=True))

    n, g = len(items), len(prompts)
    rows = [
        ("scoring (log-probs + vocab stats)", n, t_single, t_batch),
        (f"greedy generation ({args.new_tokens} new tokens)", g, g_single_t, g_batch_t),
    ]
    lines = [
        "# Evaluation throughput: batched vs one example at a time",
        "",
        f"Command: `python bench/eval.py --model {args.model} --examples {args.examples} "
        f"--gen-examples {args.gen_examples} --batch-size {args.batch_size}`. "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}, "
        f"load average {load0:.1f} at start and {os.getloadavg()[0]:.1f} at the end "
        "(a shared machine: treat absolute times as rough; the ratio is measured in one run).",
        "",
        f"Model: {args.model}; WordNet definition examples in the chat format (≤ 64 tokens); "
        f"batch size {args.batch_size}, length-sorted batches.",
        "",
        "| path | examples | one at a time (ex/s) | batched (ex/s) | batched ÷ one-at-a-time |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, count, ts, tb in rows:
        lines.append(f"| {name} | {count} | {count / ts:.2f} | {count / tb:.2f} | {ts / tb:.2f}× |")
    lines += [
        "",
        f"Agreement: max |Δ log p| between the two scoring paths {diff:.2e}; "
        f"{same}/{g} generations token-identical.",
    ]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
