"""Find eval tasks: every module in fedllm/eval/tasks/ plus the `fedllm.eval_tasks` entry points.

Nothing is kept between calls: each call imports what it finds (Python itself imports a module
once), so a task dropped into the folder or installed as a plugin is there on the next call.
"""

from __future__ import annotations

import importlib
import pkgutil
import warnings
from collections.abc import Iterator, Sequence
from types import ModuleType

from fedllm.eval import tasks as task_folder
from fedllm.eval.task import EvalTask, is_registered
from fedllm.plugins import load_entry_points
from fedllm.suggest import did_you_mean

ENTRY_POINT_GROUP = "fedllm.eval_tasks"


def available_tasks() -> dict[str, type[EvalTask]]:
    """Every task by name, sorted by name; two of fedllm's tasks with one name is an error, a
    plugin's task with a name taken is skipped with a warning."""
    found: dict[str, type[EvalTask]] = {}
    for cls in _folder_tasks():
        other = found.setdefault(cls.name, cls)
        if other is not cls:
            raise ValueError(
                f"two eval tasks are named {cls.name!r}: {_where(other)} and {_where(cls)}"
            )
    for cls in _entry_point_tasks():  # a plugin cannot take a name: skipped, said
        other = found.setdefault(cls.name, cls)
        if other is not cls:
            warnings.warn(
                f"eval task {cls.name!r} of {_where(cls)} is skipped: {_where(other)} has the "
                "name already",
                RuntimeWarning,
                stacklevel=2,
            )
    return dict(sorted(found.items()))


def select_tasks(names: Sequence[str] | None = None) -> dict[str, type[EvalTask]]:
    """The tasks called `names`, in that order (None: every available task)."""
    found = available_tasks()
    if names is None:
        return found
    for name in names:
        if name not in found:
            raise ValueError(_unknown(name, list(found)))
    return {name: found[name] for name in names}


def get_task(name: str) -> type[EvalTask]:
    """The task called `name`; an unknown name raises ValueError naming the valid ones."""
    return select_tasks([name])[name]


def _unknown(name: str, known: list[str]) -> str:
    hint = did_you_mean(name, known)
    return f"unknown eval task {name!r}{hint}; available: {', '.join(known) or 'none'}"


def _folder_tasks() -> Iterator[type[EvalTask]]:
    prefix = task_folder.__name__ + "."
    for info in sorted(pkgutil.iter_modules(task_folder.__path__, prefix), key=lambda m: m.name):
        yield from _defined_in(importlib.import_module(info.name))


def _entry_point_tasks() -> Iterator[type[EvalTask]]:
    """The tasks of each entry point; one that fails to load, or names neither a module nor a
    registered task, is skipped with a warning (a broken plugin must not stop every eval)."""
    for where, target in load_entry_points(ENTRY_POINT_GROUP, kind="eval task"):
        if isinstance(target, ModuleType):
            yield from _defined_in(target)
        elif is_registered(target):
            yield target
        else:
            warnings.warn(
                f"{where} is neither a module nor an EvalTask class decorated with "
                "@register_task; skipped",
                RuntimeWarning,
                stacklevel=2,
            )


def _defined_in(module: ModuleType) -> Iterator[type[EvalTask]]:
    """Registered task classes defined in `module` itself (not ones it imports)."""
    for obj in vars(module).values():
        if is_registered(obj) and obj.__module__ == module.__name__:
            yield obj


def _where(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
