"""Eval tasks, one module per benchmark: every module in this folder is discovered, none listed.

To add one, drop a module here with an `@register_task("name")` EvalTask subclass (see
docs/leakage.md, "Adding an eval task"); third-party packages use the `fedllm.eval_tasks` entry
point group instead.
"""
