"""The `fedllm eval` and `fedllm compare` subcommands (registered by fedllm/cli.py)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedllm.eval.task import EvalTask


def cmd_eval(args: argparse.Namespace) -> int:
    """`fedllm eval`: settings from the flags, then the harness on the run or adapter folder."""
    from fedllm.eval.harness import EvalSettings, evaluate_run

    extra = file_tasks(args.mc_file or [])  # read and checked before any model loads
    settings = EvalSettings(
        max_examples=args.max_examples,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        references=args.references,
        tasks=tuple(args.tasks) if args.tasks else (() if extra else None),
        leakage=not args.no_leakage,
        mia_non_members=args.mia_non_members,
        mia_members_per_non_member=args.mia_members_per_non_member,
        bootstrap=args.bootstrap,
        precision=args.precision,
    )
    evaluate_run(
        args.target, recipe=args.recipe, out_dir=args.out, settings=settings, extra_tasks=extra
    )
    return 0


def file_tasks(paths: list[str]) -> dict[str, type[EvalTask]]:
    """`--mc-file` tasks by name (`mc_<file name>`); two files of one name are an error."""
    from fedllm.eval.tasks.multiple_choice import file_task

    out: dict[str, type[EvalTask]] = {}
    source: dict[str, str] = {}
    for path in paths:
        task = file_task(path)
        if task.name in out:
            raise ValueError(
                f"--mc-file {path} and --mc-file {source[task.name]} both make the task "
                f"{task.name!r}; rename one of the files"
            )
        out[task.name], source[task.name] = task, path
    return out


def cmd_compare(args: argparse.Namespace) -> int:
    """`fedllm compare`: compare.md, .json and .png of the runs' eval reports; prints compare.md."""
    from fedllm.eval.compare import compare_runs

    out = compare_runs([Path(r) for r in args.runs], out_dir=Path(args.out))
    print(out.joinpath("compare.md").read_text())
    return 0


class ListTasks(argparse.Action):
    """`--list-tasks`: print every discovered eval task and exit (like --version, no target)."""

    def __init__(self, option_strings: list[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest=dest, default=argparse.SUPPRESS, nargs=0, help=help)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        from fedllm.eval.registry import available_tasks

        tasks = available_tasks()
        width = max((len(name) for name in tasks), default=0)
        for name, cls in tasks.items():
            print(f"{name:<{width}}  {cls.describe()['about']}")
        parser.exit()


def add_eval_commands(sub: argparse._SubParsersAction) -> None:
    """Add `eval` and `compare` to the fedllm argument parser."""
    ev = sub.add_parser("eval", help="task quality and leakage of a finished run")
    ev.add_argument("target", help="a run directory, or a PEFT adapter folder (with --recipe)")
    ev.add_argument("--recipe", help="recipe YAML (default: the run directory's recipe.yaml)")
    ev.add_argument(
        "--out", help="output folder (default: RUN/eval; ADAPTER-eval beside an adapter folder)"
    )
    ev.add_argument("--max-examples", type=int, default=64, help="per client and task")
    ev.add_argument("--batch-size", type=int, default=16)
    ev.add_argument("--max-new-tokens", type=int, default=32)
    ev.add_argument("--references", type=int, help="reference secrets per canary (default: recipe)")
    ev.add_argument(
        "--tasks",
        nargs="+",
        metavar="TASK",
        help="quality tasks to run (default: every task; see --list-tasks)",
    )
    ev.add_argument(
        "--mc-file",
        action="append",
        metavar="FILE",
        help="an outside multiple-choice file (JSONL rows question/choices/answer, MMLU's "
        "layout) asked as the task mc_<file name>; repeatable; only these tasks unless --tasks "
        "names others too",
    )
    ev.add_argument("--list-tasks", action=ListTasks, help="list the eval tasks and exit")
    ev.add_argument("--no-leakage", action="store_true", help="task quality only")
    ev.add_argument(
        "--mia-non-members",
        type=int,
        metavar="N",
        help="MIA non-members per client, from its held-out split (default: all of it)",
    )
    ev.add_argument(
        "--mia-members-per-non-member",
        type=int,
        default=2,
        metavar="K",
        help="training examples matched (same domain, nearest length) to each non-member",
    )
    ev.add_argument(
        "--bootstrap",
        type=int,
        default=1000,
        metavar="B",
        help="bootstrap resamples for the MIA intervals (0: no intervals)",
    )
    ev.add_argument(
        "--precision",
        default="auto",
        help="eval forwards: 'auto' (bf16 autocast where the device runs it natively, as in "
        "training), 'bf16' or 'fp32' (invalid values are refused with the valid ones)",
    )
    ev.set_defaults(fn=cmd_eval)

    cmp = sub.add_parser("compare", help="one table and side-by-side plots for several runs")
    cmp.add_argument("runs", nargs="+", help="run directories (each with eval/report.json)")
    cmp.add_argument("--out", default="compare", help="output folder (default: ./compare)")
    cmp.set_defaults(fn=cmd_compare)
