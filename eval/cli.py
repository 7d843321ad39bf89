"""The `fedllm eval` and `fedllm compare` subcommands (registered by fedllm/cli.py)."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_eval(args: argparse.Namespace) -> int:
    from fedllm.eval.harness import EvalSettings, evaluate_run

    settings = EvalSettings(
        max_examples=args.max_examples,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        references=args.references,
        tasks=tuple(args.tasks),
        leakage=not args.no_leakage,
    )
    evaluate_run(args.target, recipe=args.recipe, out_dir=args.out, settings=settings)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from fedllm.eval.compare import compare_runs

    out = compare_runs([Path(r) for r in args.runs], out_dir=Path(args.out))
    print(out.joinpath("compare.md").read_text())
    return 0


def add_eval_commands(sub) -> None:
    """Add `eval` and `compare` to the fedllm argument parser."""
    ev = sub.add_parser("eval", help="task quality and leakage of a finished run")
    ev.add_argument("target", help="a run directory, or a PEFT adapter folder (with --recipe)")
    ev.add_argument("--recipe", help="recipe YAML (default: the run directory's recipe.yaml)")
    ev.add_argument("--out", help="output folder (default: TARGET/eval)")
    ev.add_argument("--max-examples", type=int, default=64, help="per client and task")
    ev.add_argument("--batch-size", type=int, default=16)
    ev.add_argument("--max-new-tokens", type=int, default=32)
    ev.add_argument("--references", type=int, help="reference secrets per canary (default: recipe)")
    ev.add_argument(
        "--tasks",
        nargs="+",
        default=["held_out", "define", "domain", "choose"],
        choices=["held_out", "define", "domain", "choose"],
    )
    ev.add_argument("--no-leakage", action="store_true", help="task quality only")
    ev.set_defaults(fn=cmd_eval)

    cmp = sub.add_parser("compare", help="one table and side-by-side plots for several runs")
    cmp.add_argument("runs", nargs="+", help="run directories (each with eval/report.json)")
    cmp.add_argument("--out", default="compare", help="output folder (default: ./compare)")
    cmp.set_defaults(fn=cmd_compare)
