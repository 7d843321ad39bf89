"""Evaluation speed: throughput of the scoring paths, and leakage eval time against training time.

    python bench/eval.py [throughput] [--model smollm2-135m|tiny] [--examples 64] [--batch-size 16]
    # writes bench/results/eval.md
    python bench/eval.py leakage [--tiny] [--recipes R ...] [key=value ...]
    # writes bench/results/eval-leakage.md (eval-leakage-tiny.md with --tiny)

leakage: for each recipe (default recipes/leakage.yaml and recipes/leakage_dp.yaml), `fedllm run`
then `fedllm eval` at the default eval sizes, each a fresh process timed by wall clock (what a
user waits for); the table gives eval ÷ run (target ≤ 0.35), the eval's own phase breakdown,
and `fedllm compare` of the runs (MIA AUC with 95% intervals and the base control). --tiny adds
the tiny-model overrides below so the whole thing takes a few minutes. Run it alone on an idle
machine: ratios from a loaded machine mean little.

throughput (the default):
Scoring = one forward pass over prompt + response with per-token log-probs and the vocabulary
statistics Min-K%++ needs (what held-out loss, membership inference and exposure use).
Generation = greedy decoding of the definition (define task, extraction), left-padded batches.
Both paths run in this process on the same examples; the table reports examples per second and
the ratio batched ÷ one-at-a-time, and checks that both paths give the same numbers/tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from fedllm.processes import hide_bitsandbytes

hide_bitsandbytes()  # as fedllm's commands do: no base here is quantised (peft would import it)

from fedllm.data import load_wordnet, tokenize_all  # noqa: E402
from fedllm.eval.generate import end_token_ids, greedy_generate  # noqa: E402
from fedllm.eval.prompting import prompt_ids  # noqa: E402
from fedllm.eval.scoring import score_examples  # noqa: E402
from fedllm.model.loading import load_base_model, resolve_model_dir  # noqa: E402
from fedllm.model.tiny import build_tiny_model  # noqa: E402

RESULTS = Path(__file__).parent / "results"
OUT = RESULTS / "eval.md"
RECIPES = ["recipes/leakage.yaml", "recipes/leakage_dp.yaml"]
TINY = [  # a few minutes per recipe on 2 cores; the tiny model still memorises the k=16 canaries
    "model.name=tiny",
    "data.max_examples=400",
    "federation.rounds=2",
    "federation.local_steps=10",
    "federation.lr=0.01",
]


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    """(seconds, result) of one call of `fn`."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def machine_note(load0: float) -> str:
    return (
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}, "
        f"load average {load0:.1f} at start and {os.getloadavg()[0]:.1f} at the end"
    )


def throughput(argv: list[str]) -> None:
    """Scoring one at a time, batched in full and with shared prefixes; greedy generation."""
    parser = argparse.ArgumentParser(prog="bench/eval.py throughput")
    parser.add_argument("--model", default="smollm2-135m", help="'smollm2-135m' or 'tiny'")
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--references", type=int, default=200, help="secrets after one canary")
    parser.add_argument("--gen-examples", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)

    from fedllm.data.canary import make_canaries, reference_secrets
    from fedllm.eval.exposure import secret_item

    examples = load_wordnet(max_examples=args.examples, seed=0)
    if args.model == "tiny":
        texts = [f"{e['prompt']} {e['response']}" for e in load_wordnet(max_examples=500)]
        folder = build_tiny_model(Path("/tmp/fedllm-bench-eval-tiny"), texts=texts)
    else:
        folder = resolve_model_dir(args.model)
    model, tok = load_base_model(folder)
    model.eval()
    pad = tok.pad_token_id
    items = tokenize_all(examples, tok, prompt_format="chat", max_length=64)
    canary = make_canaries(
        client=0, clients=[0], prefix="What is the secret number of {name}?", digits=9, repeats=[1]
    )[0]
    secrets = [canary.secret, *reference_secrets(canary, n=args.references, digits=9)]
    secret_items = [
        secret_item(tok, canary.prompt, secret=s, prompt_format="chat") for s in secrets
    ]
    load0 = os.getloadavg()[0]
    # warm-up
    score_examples(model, items, batch_size=args.batch_size, pad_id=pad, vocab_stats=True)
    rows, agree = [], []
    for name, its in (
        ("MIA items (log-probs + vocab stats)", items),
        (f"one canary + {args.references} reference secrets", secret_items),
    ):
        times, diff = _scoring_times(
            model, its, batch_size=args.batch_size, pad_id=pad, vocab_stats=its is items
        )
        rows.append((name, len(its), *times))
        agree.append(diff)

    prompts = [prompt_ids(tok, e["prompt"], prompt_format="chat") for e in examples]
    prompts = prompts[: args.gen_examples]
    kw = {"max_new_tokens": args.new_tokens, "pad_id": pad, "eos_ids": end_token_ids(tok)}
    g_single_t, g_single = timed(lambda: greedy_generate(model, prompts, batch_size=1, **kw))
    g_batch_t, g_batch = timed(
        lambda: greedy_generate(model, prompts, batch_size=args.batch_size, **kw)
    )
    same = sum(a == b for a, b in zip(g_single, g_batch, strict=True))
    g = len(prompts)
    lines = _throughput_head(args, load0)
    for name, count, t1, tf, ts in rows:
        lines.append(
            f"| scoring: {name} | {count} | {count / t1:.2f} | {count / tf:.2f} | "
            f"{count / ts:.2f} | {t1 / ts:.2f}× | {tf / ts:.2f}× |"
        )
    lines.append(
        f"| greedy generation ({args.new_tokens} new tokens) | {g} | {g / g_single_t:.2f} | "
        f"{g / g_batch_t:.2f} | — | — | — |"
    )
    lines += [
        "",
        f"Agreement: max |Δ log p| one at a time vs shared prefixes {max(agree):.2e}; "
        f"{same}/{g} generations token-identical.",
    ]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _scoring_times(
    model: torch.nn.Module, items: list[dict], *, batch_size: int, pad_id: int, vocab_stats: bool
) -> tuple[tuple[float, float, float], float]:
    """Seconds to score `items` one at a time, batched in full and batched with shared prefixes;
    and the largest |Δ log p| between the first and the last."""

    def score(bs: int, shared: bool):
        return lambda: score_examples(
            model,
            items,
            batch_size=bs,
            pad_id=pad_id,
            vocab_stats=vocab_stats,
            shared_prefix=shared,
        )

    t1, one = timed(score(1, False))
    tf, _ = timed(score(batch_size, False))
    ts, shared = timed(score(batch_size, True))
    diff = max(
        float(np.abs(a.logprobs - b.logprobs).max()) for a, b in zip(one, shared, strict=True)
    )
    return (t1, tf, ts), diff


def _throughput_head(args: argparse.Namespace, load0: float) -> list[str]:
    """The throughput report's command, machine and the table's header."""
    return [
        "# Evaluation throughput: one at a time, batched, batched with shared prefixes",
        "",
        f"Command: `python bench/eval.py throughput --model {args.model} --examples "
        f"{args.examples} --references {args.references} --gen-examples {args.gen_examples} "
        f"--batch-size {args.batch_size}`. {machine_note(load0)} (treat absolute times as "
        "rough on a shared machine; the ratios are measured in one run).",
        "",
        f"Model: {args.model}; WordNet definition examples in the chat format (≤ 64 tokens); "
        f"batch size {args.batch_size}. Full batches: every item in full, length-sorted. Shared "
        "prefixes: the chat template's common head once, a shared prompt once per batch, "
        "then each item's rest on copied keys/values (fedllm.eval.scoring).",
        "",
        "| path | items | one at a time (items/s) | batched, full (items/s) | batched, shared "
        "prefixes (items/s) | shared ÷ one at a time | shared ÷ full batched |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]


def leakage(argv: list[str]) -> None:
    """`fedllm run` then `fedllm eval` per recipe, wall-timed; eval ÷ run and the compare table."""
    parser = argparse.ArgumentParser(prog="bench/eval.py leakage")
    parser.add_argument("--recipes", nargs="+", default=RECIPES)
    parser.add_argument("--tiny", action="store_true", help="add the tiny-model overrides")
    parser.add_argument("--runs", help="folder for the runs (default: a temporary folder)")
    parser.add_argument("--eval-args", default="", help="extra `fedllm eval` options, quoted")
    parser.add_argument("--out", help="result file (default bench/results/eval-leakage[-tiny].md)")
    args, overrides = parser.parse_known_args(argv)
    if bad := [o for o in overrides if "=" not in o]:
        parser.error(f"unknown arguments {bad}: recipe overrides are key=value")
    overrides = (TINY if args.tiny else []) + overrides
    out = Path(args.out or RESULTS / f"eval-leakage{'-tiny' if args.tiny else ''}.md")
    runs = Path(args.runs or tempfile.mkdtemp(prefix="fedllm-bench-eval-"))
    fedllm = str(Path(sys.executable).parent / "fedllm")
    load0 = os.getloadavg()[0]
    rows, dirs = [], []
    for recipe in args.recipes:
        name = Path(recipe).stem + ("_tiny" if args.tiny else "")
        run_dir = runs / name
        run_cmd = [fedllm, "run", recipe, f"output_dir={runs}", f"name={name}", *overrides]
        t_run = wall([*run_cmd, "--overwrite"])
        eval_cmd = [fedllm, "eval", str(run_dir), *args.eval_args.split()]
        t_eval = wall(eval_cmd)
        report = json.loads((run_dir / "eval" / "report.json").read_text())
        rows.append((name, t_run, t_eval, report))
        dirs.append(str(run_dir))
    subprocess.run(
        [fedllm, "compare", *dirs, "--out", str(runs / "compare")],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    compare = (runs / "compare" / "compare.md").read_text().split("\n", 2)[2]
    plot = out.with_suffix(".png")  # compare's figure beside the result, which links it
    shutil.copyfile(runs / "compare" / "compare.png", plot)
    compare = compare.replace("](compare.png)", f"]({plot.name})")
    from fedllm.eval.report import timings_brief

    shown = " ".join(overrides)
    lines = [
        "# Leakage evaluation time against the run's own time",
        "",
        f"Command: `python bench/eval.py leakage{' --tiny' if args.tiny else ''} --recipes "
        f"{' '.join(args.recipes)}"
        + (f" --eval-args '{args.eval_args}'" if args.eval_args else "")
        + (f" {' '.join(o for o in overrides if o not in TINY)}" if shown else "")
        + f"`. Overrides: `{shown or 'none'}`. {machine_note(load0)}.",
        "",
        "Each side is a fresh process timed by wall clock: `fedllm run RECIPE` (Ray start-up, "
        "base model, every round and its evaluation) and `fedllm eval RUN` at the default eval "
        "sizes (every quality task, canary exposure, matched MIA with bootstrap intervals, "
        "extraction, in every view). Target: eval ÷ run ≤ 0.35.",
        "",
        "| run | run (s) | eval (s) | eval ÷ run | eval phases (s) |",
        "|---|---:|---:|---:|---|",
    ]
    for name, t_run, t_eval, report in rows:
        lines.append(
            f"| {name} | {t_run:.0f} | {t_eval:.0f} | {t_eval / t_run:.2f} | "
            f"{timings_brief(report.get('timings', {}))} |"
        )
    lines += ["", "`fedllm compare` of the runs:", "", compare.strip(), ""]
    for name, _, _, report in rows:
        control = report["leakage"].get("control", {})
        if control.get("ok") is None:
            verdict = "was not checked (no bootstrap intervals)"
        elif control["ok"]:
            verdict = "contains 0.5 for every score"
        else:
            verdict = f"EXCLUDES 0.5 for {', '.join(control.get('outside', {})) or '?'}"
        lines.append(f"- {name}: the base control's AUC interval {verdict}.")
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def wall(cmd: list[str]) -> float:
    """Run `cmd` to completion (its output to this terminal) and return its wall seconds."""
    print("+", " ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - start


def main() -> None:
    argv = sys.argv[1:]
    if argv and argv[0] == "leakage":
        leakage(argv[1:])
    else:
        throughput(argv[1:] if argv and argv[0] == "throughput" else argv)


if __name__ == "__main__":
    main()
