"""The registry: names, duplicates, round semantics, discovery of modules and entry points,
and `check_options` against each method's signature."""

from __future__ import annotations

import importlib
import importlib.metadata
import math
import pkgutil
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from fedllm import aggregators
from fedllm.aggregators import Aggregate, Factors, available, get, register, registry
from fedllm.aggregators.base import ADAPTER_STATE, RoundSpec
from fedllm.aggregators.registry import resolved_options
from fedllm.features.hetlora_prune import PruneOptions, parse_options
from fedllm.features.prelort_nested import nested_option
from fedllm.features.sdflora_local import local_fraction


@pytest.fixture(autouse=True)
def discovered() -> None:
    """Discover the built-in methods before a test swaps the registry for its own dict."""
    available()


def test_registry_lists_built_in_methods() -> None:
    names = available()
    assert {"fedit", "svd"} <= set(names)
    assert names == sorted(names)


def test_unknown_name_lists_available_and_suggests() -> None:
    with pytest.raises(KeyError) as info:
        get("fedti")
    message = str(info.value)
    assert "'fedti'" in message and "fedit, " in message and "svd" in message
    assert "Did you mean 'fedit'?" in message
    with pytest.raises(ValueError, match="available"):
        get("nothing-like-it")


def test_register_and_duplicate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_REGISTRY", {})

    @register("mine")
    def mine(updates, weights, **kwargs):  # type: ignore[no-untyped-def]
        return Aggregate(updates[0])

    assert get("mine") is mine and available() == ["mine"]
    with pytest.raises(ValueError, match="already registered"):
        register("mine")(lambda updates, weights, **kw: None)


def test_every_method_declares_its_round_semantics(monkeypatch: pytest.MonkeyPatch) -> None:
    specs = {name: registry.round_spec(name) for name in available()}
    assert specs["flora"].merge and specs["ffa"].freeze_A and specs["fedsa"].local_B
    # adapter state on the wire (hetlora also declares client-side options)
    plain = [
        n for n, s in specs.items() if s == replace(ADAPTER_STATE, client_options=s.client_options)
    ]
    assert specs["hetlora"].client_options and not specs["svd"].client_options
    assert {"fedit", "svd", "squeeze", "flexlora", "lorafair", "hetlora", "rblora"} <= set(plain)
    with pytest.raises(KeyError, match="Did you mean 'flora'"):
        registry.round_spec("florra")
    monkeypatch.setattr(registry, "_REGISTRY", {})
    monkeypatch.setattr(registry, "_ROUNDS", {})
    register("mine", rounds=RoundSpec(merge=True))(lambda updates, weights, **kw: None)
    assert registry.round_spec("mine").merge


# -- discovery: a method is one file (or an installed package's entry point) ---------------------


def test_importing_the_package_discovers_nothing_until_the_first_lookup() -> None:
    code = (
        "import sys; import fedllm.aggregators as a; "
        "before = 'fedllm.aggregators.fedit' in sys.modules; names = a.available(); "
        "print(before, 'fedit' in names, 'fedllm.aggregators.screen' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True", "True"]


def test_every_public_module_of_the_package_is_imported_and_registers() -> None:
    modules = {m.name for m in pkgutil.iter_modules(aggregators.__path__)}
    assert {"base", "linalg", "registry", "screen"} <= modules  # not methods: harmless
    assert all(f"fedllm.aggregators.{m}" in sys.modules for m in modules if not m.startswith("_"))
    built_in = {"fedit", "fedsa", "ffa", "flexlora", "flora", "hetlora", "lorafair", "rblora"}
    assert built_in | {"squeeze", "svd"} <= set(available())


@pytest.fixture
def isolated_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A registry copy and no installed entry points; the test's `zz_` modules dropped after."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_ROUNDS", dict(registry._ROUNDS))
    real = importlib.metadata.entry_points

    def none_of_ours(**kw: object) -> object:  # other libraries' (fsspec via peft) still load
        return [] if str(kw.get("group", "")).startswith("fedllm.") else real(**kw)

    monkeypatch.setattr(importlib.metadata, "entry_points", none_of_ours)
    yield
    for name in [m for m in sys.modules if m.rpartition(".")[2].startswith(("zz_", "_zz_"))]:
        del sys.modules[name]
    for name in [a for a in vars(aggregators) if a.startswith(("zz_", "_zz_"))]:
        delattr(aggregators, name)


DROPPED_IN = """
from fedllm.aggregators import Aggregate, RoundSpec, register


@register("dropin_test", rounds=RoundSpec(freeze_A=True))
def dropin(updates, weights, *, global_rank=None, state=None, seed=0, knob=1.0, **options):
    return Aggregate(updates[0])
"""


@pytest.mark.usefixtures("isolated_registry")
def test_a_module_dropped_into_the_package_folder_registers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "zz_dropin_method.py").write_text(DROPPED_IN)
    (tmp_path / "zz_dropin_helper.py").write_text("VALUE = 1\n")  # not a method: harmless
    (tmp_path / "_zz_private.py").write_text("raise RuntimeError('private: never imported')\n")
    monkeypatch.setattr(aggregators, "__path__", [*aggregators.__path__, str(tmp_path)])
    importlib.invalidate_caches()

    assert registry.discover("fedllm.aggregators", aggregators.__path__) == ["dropin_test"]
    assert get("dropin_test").__name__ == "dropin" and registry.round_spec("dropin_test").freeze_A
    assert "fedllm.aggregators.zz_dropin_helper" in sys.modules
    assert "fedllm.aggregators._zz_private" not in sys.modules
    registry.check_options("dropin_test", {"knob": 2})  # options bound to the new signature
    with pytest.raises(ValueError, match="did you mean 'knob'"):
        registry.check_options("dropin_test", {"knbo": 2})
    # a recipe naming it validates as `fedllm validate` does, its options checked by signature
    from fedllm.recipe import ConfigError, build_config

    build_config({"aggregator": {"name": "dropin_test", "options": {"knob": 2}}})
    with pytest.raises(ConfigError, match="did you mean 'knob'"):
        build_config({"aggregator": {"name": "dropin_test", "options": {"knbo": 2}}})
    # already imported: a second pass registers nothing new (and does not raise on re-import)
    assert registry.discover("fedllm.aggregators", aggregators.__path__) == []


class CountingEntryPoint:
    """Stands in for importlib.metadata.EntryPoint, counting loads."""

    def __init__(self, name: str, value: str, load: Callable[[], object]) -> None:
        self.name, self.value, self.group = name, value, "fedllm.aggregators"
        self._load, self.loads = load, 0

    def load(self) -> object:
        self.loads += 1
        return self._load()


@pytest.mark.usefixtures("isolated_registry")
def test_an_entry_point_listed_twice_loads_once(monkeypatch: pytest.MonkeyPatch) -> None:
    def plugin() -> object:
        return register("plugin_test")(lambda updates, weights, **options: Aggregate(updates[0]))

    ep = CountingEntryPoint("plugin_test", "thirdparty.methods:plugin", plugin)
    groups: list[str | None] = []

    def entry_points(*, group: str | None = None) -> list[CountingEntryPoint]:
        groups.append(group)
        return [ep, ep]  # the same entry point seen twice (e.g. two copies on sys.path)

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    assert registry.discover("fedllm.aggregators", []) == ["plugin_test"]
    assert ep.loads == 1 and groups == ["fedllm.aggregators"]
    assert "plugin_test" in available()


@pytest.mark.usefixtures("isolated_registry")
def test_a_real_entry_point_naming_a_module_registers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "zz_thirdparty_methods.py").write_text(DROPPED_IN)
    monkeypatch.syspath_prepend(str(tmp_path))
    ep = importlib.metadata.EntryPoint(
        name="dropin_test", value="zz_thirdparty_methods", group="fedllm.aggregators"
    )
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda *, group: [ep])
    assert registry.discover("fedllm.aggregators", []) == ["dropin_test"]
    assert registry.discover("fedllm.aggregators", []) == []  # imported once: nothing new


@pytest.mark.usefixtures("isolated_registry")
def test_a_broken_entry_point_warns_and_the_others_still_load(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken() -> object:
        raise ImportError("No module named 'missing_dependency'")

    def fine() -> object:
        return register("plugin_ok")(lambda updates, weights, **options: Aggregate(updates[0]))

    eps = [
        CountingEntryPoint("bad", "bad.mod", broken),
        CountingEntryPoint("plugin_ok", "ok.mod", fine),
    ]
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda *, group: eps)
    with pytest.warns(
        RuntimeWarning, match=r"aggregator entry point bad = bad.mod .*missing_dependency"
    ):
        assert registry.discover("fedllm.aggregators", []) == ["plugin_ok"]


@pytest.mark.usefixtures("isolated_registry")
def test_an_entry_point_that_registers_then_raises_leaves_nothing_registered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # h109: "skipped" while its method stayed registered and a recipe could name it
    def half() -> object:
        register("half_test")(lambda updates, weights, **options: Aggregate(updates[0]))
        raise RuntimeError("its second module failed")

    monkeypatch.setattr(
        importlib.metadata,
        "entry_points",
        lambda *, group: [CountingEntryPoint("half_test", "h", half)],
    )
    with pytest.warns(RuntimeWarning, match="half_test = h .*failed to load and was skipped"):
        assert registry.discover("fedllm.aggregators", []) == []
    assert "half_test" not in available()
    with pytest.raises(KeyError):
        registry.round_spec("half_test")


@pytest.mark.usefixtures("isolated_registry")
def test_an_entry_point_registering_another_name_is_said(monkeypatch: pytest.MonkeyPatch) -> None:
    def other() -> object:
        return register("bar_test")(lambda updates, weights, **options: Aggregate(updates[0]))

    monkeypatch.setattr(
        importlib.metadata, "entry_points", lambda *, group: [CountingEntryPoint("foo", "f", other)]
    )
    with pytest.warns(RuntimeWarning, match=r"foo = f .*registered 'bar_test', not 'foo'"):
        assert registry.discover("fedllm.aggregators", []) == ["bar_test"]


# -- check_options: aggregator.options bound to the method's signature ---------------------------


def test_check_options_names_a_typo_with_a_close_match_and_the_valid_keys() -> None:
    with pytest.raises(ValueError) as info:
        registry.check_options("squeeze", {"oversampel": 4})
    assert str(info.value) == (
        "aggregator.options.oversampel: unknown option of 'squeeze' (did you mean 'oversample'?); "
        "valid: correction, gauge, lam, method, oversample, power_iters, residual_rank, row_norm"
    )


def test_check_options_on_a_method_without_options() -> None:
    with pytest.raises(ValueError, match=r"^aggregator.options.metod: .*'fedit' takes no options$"):
        registry.check_options("fedit", {"metod": "exact"})
    registry.check_options("fedit", {})


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("squeeze", {"method": "exact", "oversample": 4, "correction": False, "lam": 0.5}),
        ("squeeze", {"residual_rank": 4}),  # default None, annotated: an int >= 0 or None
        ("squeeze", {"residual_rank": None, "gauge": "rows", "row_norm": 1}),
        ("svd", {"power_iters": 0}),
        ("lorafair", {"lam": 1, "solver": "iterative", "steps": 10, "lr": 0.1}),  # int for float
        ("ffa", {"atol": 0}),
        ("hetlora", {"prune_lambda": 0.05, "prune_gamma": 0.25, "min_rank": 2}),  # client options
    ],
)
def test_check_options_accepts_a_methods_options(name: str, options: dict[str, Any]) -> None:
    registry.check_options(name, options)


def test_check_options_suggests_client_options() -> None:
    with pytest.raises(ValueError) as info:
        registry.check_options("hetlora", {"min_rnk": 2})
    assert str(info.value) == (
        "aggregator.options.min_rnk: unknown option of 'hetlora' (did you mean 'min_rank'?); "
        "valid: min_rank, prune_gamma, prune_lambda"
    )


@pytest.mark.parametrize(
    ("name", "key", "value", "expected"),
    [
        ("squeeze", "oversample", "8", "an int"),
        ("squeeze", "oversample", 8.5, "an int"),
        ("squeeze", "oversample", True, "an int"),  # a bool is not an int
        ("squeeze", "correction", 1, "a bool"),
        ("squeeze", "correction", "yes", "a bool"),
        ("lorafair", "lam", "0.1", "a float"),
        ("lorafair", "lam", False, "a float"),
        ("svd", "method", 3, "'auto', 'exact', 'rsvd' or 'dense'"),
        ("svd", "method", None, "'auto', 'exact', 'rsvd' or 'dense'"),
    ],
)
def test_check_options_rejects_an_obviously_wrong_type(
    name: str, key: str, value: object, expected: str
) -> None:
    pattern = (
        rf"^aggregator\.options\.{key}: '{name}' expects {expected}.*got {type(value).__name__}"
    )
    with pytest.raises(ValueError, match=pattern):
        registry.check_options(name, {key: value})


@pytest.mark.parametrize(
    ("name", "options", "expected"),
    [  # what used to pass `fedllm validate` and fail only at the first aggregation
        ("squeeze", {"gauge": "bogus"}, "gauge: 'squeeze' expects 'balanced' or 'rows'"),
        ("squeeze", {"oversample": -5}, "oversample: 'squeeze' expects a value greater than or"),
        ("squeeze", {"residual_rank": -1}, "residual_rank: 'squeeze' expects a value greater"),
        ("squeeze", {"row_norm": math.inf}, "row_norm: 'squeeze' expects a finite number"),
        ("squeeze", {"lam": -0.1}, "lam: 'squeeze' expects a value greater than or equal to 0"),
        ("lorafair", {"solver": "gd"}, "solver: 'lorafair' expects 'closed' or 'iterative'"),
        ("lorafair", {"lr": 0}, "lr: 'lorafair' expects a value greater than 0"),
        ("sdflora", {"method": "svd"}, "method: 'sdflora' expects 'auto', 'exact', 'rsvd' or"),
        ("ffa", {"atol": -1e-3}, "atol: 'ffa' expects a value greater than or equal to 0"),
    ],
)
def test_check_options_refuses_a_value_outside_the_annotation(
    name: str, options: dict[str, Any], expected: str
) -> None:
    with pytest.raises(ValueError, match=f"^aggregator\\.options\\.{re.escape(expected)}"):
        registry.check_options(name, options)


def test_the_annotation_and_the_method_agree_on_what_is_valid() -> None:
    """The method refuses at round time what check_options refuses at load time."""
    u = Factors(torch.ones(3, 2), torch.ones(2, 4), 1.0)
    cases = [
        ({"gauge": "bogus"}, "gauge: 'squeeze' expects 'balanced' or 'rows'", "gauge must be one"),
        (
            {"residual_rank": -1},
            "residual_rank: 'squeeze' expects a value greater than or equal",
            "residual_rank must be >= 0",
        ),
        (
            {"row_norm": math.inf},
            "row_norm: 'squeeze' expects a finite number",
            "row_norm must be a finite number > 0",
        ),
    ]
    for options, at_load, at_round in cases:
        with pytest.raises(ValueError, match=re.escape(at_load)):
            registry.check_options("squeeze", options)
        with pytest.raises(ValueError, match=re.escape(at_round)):
            get("squeeze")([u, u], [1.0, 1.0], **options)


def test_check_options_names_every_problem_at_once() -> None:
    with pytest.raises(ValueError) as info:
        registry.check_options("svd", {"oversample": "8", "power_iter": 1})
    message = str(info.value)
    assert "aggregator.options.oversample: 'svd' expects an int" in message
    assert "aggregator.options.power_iter: unknown option of 'svd'" in message


def test_check_options_binds_third_party_signatures(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_ROUNDS", dict(registry._ROUNDS))

    @register("needs_tau", rounds=RoundSpec(client_options=("local_mu",)))
    def needs_tau(updates, weights, global_rank=None, state=None, seed=0, *, tau, mix=0.5):  # type: ignore[no-untyped-def]
        return Aggregate(updates[0])

    registry.check_options("needs_tau", {"tau": 2.0, "mix": 1, "local_mu": "anything"})
    with pytest.raises(ValueError, match=r"mix: 'needs_tau' expects a float \(default 0.5\)"):
        registry.check_options("needs_tau", {"tau": 2.0, "mix": "half"})  # unannotated: default
    with pytest.raises(ValueError, match=r"^aggregator.options.tau: required by 'needs_tau'"):
        registry.check_options("needs_tau", {"mix": 0.1})
    with pytest.raises(ValueError, match=r"valid: local_mu, mix, tau$"):
        registry.check_options("needs_tau", {"seed": 1, "tau": 1.0})  # seed comes from the recipe


def test_check_options_of_an_unknown_method_raises_like_get() -> None:
    with pytest.raises(KeyError, match="Did you mean 'squeeze'"):
        registry.check_options("squeez", {})


@pytest.mark.parametrize(
    "signature",
    [
        "def bad(updates, weights, *, k=1)",  # no global_rank/state/seed: the strategy passes them
        "def bad(updates, weights, global_rank, state, /, seed=0)",  # positional only
        "def bad(updates, *, global_rank=None, state=None, seed=0)",  # no weights
    ],
)
@pytest.mark.usefixtures("isolated_registry")
def test_a_method_that_cannot_take_the_strategys_arguments_is_refused_at_register(
    signature: str,
) -> None:
    namespace: dict[str, Any] = {}
    exec(f"{signature}:\n    return None", namespace)
    with pytest.raises(TypeError, match=r"aggregator 'bad_sig'.*must take \(updates, weights"):
        register("bad_sig")(namespace["bad"])
    assert "bad_sig" not in available()


@pytest.mark.usefixtures("isolated_registry")
def test_a_method_taking_every_keyword_by_kwargs_registers() -> None:
    register("kw_only_sig")(lambda updates, weights, **kw: Aggregate(updates[0]))
    assert "kw_only_sig" in available()


def test_client_defaults_are_what_the_clients_apply() -> None:
    """The record of a run (resolved_options) shows a client option at the value the client
    feature uses when the recipe leaves it unset."""
    hetlora = resolved_options("hetlora", {})
    assert PruneOptions(**{k: hetlora[k] for k in PruneOptions.__dataclass_fields__}) == (
        parse_options({})
    )
    assert resolved_options("prelort", {})["nested"] is nested_option({})
    assert resolved_options("sdflora", {})["local_fraction"] == local_fraction({})
    assert resolved_options("sdflora", {"local_fraction": 0.25})["local_fraction"] == 0.25


def test_client_defaults_must_name_client_options() -> None:
    with pytest.raises(ValueError, match=r"client_defaults \['mu'\] not in client_options"):
        register("stray_default", rounds=RoundSpec(client_defaults={"mu": 0.1}))(get("svd"))
