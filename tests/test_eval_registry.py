"""Eval task registry: a task dropped into fedllm/eval/tasks/ or installed through the
`fedllm.eval_tasks` entry point group is run and reported with no other edit; unknown names fail
naming the valid ones."""

import importlib
import importlib.metadata
import json
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

import fedllm.eval.tasks as task_folder
from fedllm.cli import main
from fedllm.data import load_wordnet
from fedllm.eval import harness
from fedllm.eval.registry import ENTRY_POINT_GROUP, available_tasks, get_task, select_tasks
from fedllm.eval.task import EvalTask, register_task
from fedllm.eval.tasks.define import DefineWords
from fedllm.model.loading import load_base_model
from fedllm.model.tiny import build_tiny_model
from fedllm.recipe import build_config

BUILT_IN = ["choose", "define", "domain", "held_out", "multiple_choice"]

# A complete new task, exactly as a newcomer would save it as fedllm/eval/tasks/<file>.py.
TASK_FILE = '''
"""Task: mean prompt length in characters (needs no model, so the test checks the plumbing)."""

import math

from fedllm.eval.task import EvalTask, Metric, register_task


@register_task("{name}")
class PromptChars(EvalTask):
    """Mean prompt length in characters."""

    metrics = (Metric("chars", "mean prompt chars", 1),)

    def __init__(self, examples):
        self.prompts = [ex["prompt"] for ex in examples]

    @classmethod
    def build(cls, examples, setup):
        return cls(examples)

    def __len__(self):
        return len(self.prompts)

    def get_example(self, i):
        return {{"prompt": self.prompts[i]}}

    def evaluate(self, model, *, batch_size):
        chars = sum(map(len, self.prompts)) / len(self) if self.prompts else math.nan
        return {{"examples": len(self), "chars": chars}}
'''


def drop_module(folder: Path, module: str, text: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{module}.py").write_text(text)
    importlib.invalidate_caches()


@pytest.fixture
def dropped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """`prompt_chars.py` placed in the tasks folder (a second folder on the package's path)."""
    drop_module(tmp_path / "tasks", "prompt_chars", TASK_FILE.format(name="prompt_chars"))
    monkeypatch.setattr(task_folder, "__path__", [*task_folder.__path__, str(tmp_path / "tasks")])
    yield "prompt_chars"
    sys.modules.pop("fedllm.eval.tasks.prompt_chars", None)
    vars(task_folder).pop("prompt_chars", None)  # the import set it on the package


@contextmanager
def plugin(monkeypatch: pytest.MonkeyPatch, folder: Path, *, name: str, value: str):
    """An installed package `fedllm_demo_plugin` that declares one fedllm.eval_tasks entry point."""
    drop_module(folder, "fedllm_demo_plugin", TASK_FILE.format(name=name))
    monkeypatch.syspath_prepend(str(folder))
    real = importlib.metadata.entry_points
    point = importlib.metadata.EntryPoint(name=name, value=value, group=ENTRY_POINT_GROUP)

    def entry_points(**selection):
        return [point] if selection.get("group") == ENTRY_POINT_GROUP else real(**selection)

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    try:
        yield
    finally:
        sys.modules.pop("fedllm_demo_plugin", None)


def test_built_in_tasks_are_found_in_the_folder() -> None:
    tasks = available_tasks()
    assert list(tasks) == BUILT_IN
    assert get_task("define") is DefineWords
    assert all(issubclass(cls, EvalTask) and cls.metrics for cls in tasks.values())
    assert list(select_tasks(["held_out", "choose"])) == ["held_out", "choose"]


def test_a_dropped_in_task_is_listed_by_the_registry_and_the_cli(dropped: str, capsys) -> None:
    assert list(available_tasks()) == sorted([*BUILT_IN, dropped])
    assert get_task(dropped).__name__ == "PromptChars"
    with pytest.raises(SystemExit) as done:
        main(["eval", "--list-tasks"])
    assert done.value.code == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == sorted([*BUILT_IN, dropped])


@pytest.mark.parametrize("value", ["fedllm_demo_plugin:PromptChars", "fedllm_demo_plugin"])
def test_an_entry_point_task_is_found(monkeypatch, tmp_path: Path, value: str) -> None:
    with plugin(monkeypatch, tmp_path, name="plugin_chars", value=value):
        assert "plugin_chars" in available_tasks()
        assert get_task("plugin_chars").__module__ == "fedllm_demo_plugin"


def test_a_plugin_task_with_a_taken_name_is_skipped_with_a_warning(monkeypatch, tmp_path) -> None:
    with plugin(monkeypatch, tmp_path, name="define", value="fedllm_demo_plugin"):
        with pytest.warns(RuntimeWarning, match="eval task 'define' of fedllm_demo_plugin"):
            tasks = available_tasks()
    assert tasks["define"] is DefineWords and list(tasks) == BUILT_IN


def test_unknown_task_names_the_valid_ones(tmp_path: Path, capsys) -> None:
    with pytest.raises(ValueError, match="did you mean 'define'") as err:
        get_task("defin")
    assert "available: choose, define, domain, held_out, multiple_choice" in str(err.value)
    assert main(["eval", str(tmp_path), "--tasks", "held_out", "choos"]) == 2
    message = capsys.readouterr().err
    assert "unknown eval task 'choos'" in message
    assert "choose, define, domain, held_out, multiple_choice" in message


def test_register_task_checks_what_it_names() -> None:
    with pytest.raises(ValueError, match="lower-case"):
        register_task("Has Space")
    with pytest.raises(TypeError, match="EvalTask subclass"):
        register_task("plain")(dict)

    class NoMetrics(EvalTask):  # abstract methods do not matter to the check
        metrics = ()

    with pytest.raises(TypeError, match="must list its metrics"):
        register_task("no_metrics")(NoMetrics)


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A run folder with a recipe and a placeholder adapter; every view is the tiny base model."""
    cfg = build_config(
        {
            "name": "r",
            "output_dir": str(tmp_path / "runs"),
            "model": {"name": "tiny"},
            "data": {
                "source": "wordnet",
                "pos": ["noun"],
                "max_examples": 40,
                "num_clients": 2,
                "held_out": 0.2,
                "max_length": 32,
            },
        }
    )
    (cfg.run_dir / "final_adapter").mkdir(parents=True)
    (cfg.run_dir / "final_adapter" / "adapter_config.json").write_text("{}")
    # whole files (the harness checks them first); Views below never loads them
    save_file({"x": torch.zeros(1)}, cfg.run_dir / "final_adapter" / "adapter_model.safetensors")
    (cfg.run_dir / "recipe.yaml").write_text(
        yaml.safe_dump(cfg.model_dump(mode="json", exclude_unset=True))
    )
    texts = [f"{e['prompt']} {e['response']}" for e in load_wordnet(pos=("noun",), max_examples=40)]
    model_dir = Path(build_tiny_model(tmp_path / "model", texts=texts, vocab_size=320))

    class BaseOnlyViews:
        """Stands in for Views: no adapters to load, the base model under every view name."""

        def __init__(self, adapter: Path, **options) -> None:
            self.model, self.tokenizer = load_base_model(model_dir)
            self.model.eval()
            self.names = ["base", "global"]
            self.compute = "fp32"  # what the harness reports as the forwards' precision

        @contextmanager
        def use(self, view: str):
            yield self.model

    monkeypatch.setattr(harness, "Views", BaseOnlyViews)
    return cfg.run_dir


def test_harness_and_report_run_a_dropped_in_task(run_dir: Path, dropped: str) -> None:
    args = ["--no-leakage", "--max-examples", "4", "--batch-size", "8", "--max-new-tokens", "2"]
    assert main(["eval", str(run_dir), *args]) == 0
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    assert report["settings"]["tasks"] == sorted([*BUILT_IN, dropped])
    assert report["tasks"][dropped]["metrics"][0]["key"] == "chars"
    per_client = report["quality"]["global"]["clients"]
    assert set(per_client) == {"0", "1"} and all(dropped in c for c in per_client.values())
    combined = report["quality"]["global"]["global"][dropped]
    assert combined["examples"] == sum(c[dropped]["examples"] for c in per_client.values())
    md = (run_dir / "eval" / "report.md").read_text()
    assert f"{dropped} mean prompt chars" in md and "held_out loss" in md
    assert (run_dir / "eval" / "quality.png").is_file()


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("fedllm_no_such_plugin", "failed to load.*No module named"),
        ("fedllm_demo_plugin:TASK_NAME_CONSTANT", "neither a module nor an EvalTask"),
    ],
)
def test_a_broken_entry_point_warns_and_the_built_in_tasks_still_run(
    monkeypatch, tmp_path: Path, value: str, why: str
) -> None:
    with plugin(monkeypatch, tmp_path, name="broken", value=value):
        sys.modules["fedllm_demo_plugin"] = type(sys)("fedllm_demo_plugin")
        sys.modules["fedllm_demo_plugin"].TASK_NAME_CONSTANT = "not a task"  # type: ignore[attr-defined]
        with pytest.warns(RuntimeWarning, match=f"entry point broken = {value}.*{why}"):
            assert list(available_tasks()) == BUILT_IN
