"""`fedllm methods`: every registered aggregator, feature and eval task is listed with its
options, and a plugin's are marked as such."""

from __future__ import annotations

import pytest

from fedllm.aggregators import available
from fedllm.cli import main
from fedllm.eval.registry import available_tasks
from fedllm.features import registry
from fedllm.methods_cmd import origin


def test_every_method_feature_and_task_is_listed(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    words = {line.split()[0] for line in out.splitlines() if line.startswith("  ") and line.split()}
    assert set(available()) <= words
    with_options = {n for n, c in registry.discover().items() if c.Options is not None}
    assert with_options <= words
    assert set(available_tasks()) <= words
    assert "gauge='rows'" in out and "mu=0.01" in out  # options with their defaults
    assert "dp_sgd" in out.split("turned on by their own recipe sections or keys:")[1]


def test_a_plugins_method_is_marked_with_its_module() -> None:
    assert origin("fedllm.aggregators.svd") == ""
    assert origin("my_lab.clipped") == "  (plugin: my_lab.clipped)"
