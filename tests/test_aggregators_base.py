"""Factors, Aggregate, weight normalisation, the aggregator registry, discovery and options."""

from __future__ import annotations

import importlib
import importlib.metadata
import math
import pkgutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from fedllm import aggregators
from fedllm.aggregators import Aggregate, Factors, available, base, get, register


@pytest.fixture(autouse=True)
def discovered() -> None:
    """Discover the built-in methods before a test swaps the registry for its own dict."""
    available()


def t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def test_factors_rejects_non_2d_with_shapes_in_message() -> None:
    with pytest.raises(ValueError, match=r"B \(3,\) and A \(1, 4\)"):
        Factors(torch.zeros(3), torch.zeros(1, 4), 1.0)


def test_factors_rejects_rank_mismatch_naming_both_shapes() -> None:
    with pytest.raises(ValueError, match=r"B \(3, 2\).*A \(3, 4\)"):
        Factors(torch.zeros(3, 2), torch.zeros(3, 4), 1.0)


@pytest.mark.parametrize("scaling", [0.0, -1.0, math.inf, math.nan])
def test_factors_rejects_bad_scaling(scaling: float) -> None:
    with pytest.raises(ValueError, match="scaling"):
        Factors(torch.zeros(3, 2), torch.zeros(2, 4), scaling)


def test_factors_rejects_mixed_dtypes() -> None:
    with pytest.raises(ValueError, match="dtype"):
        Factors(torch.zeros(3, 2), torch.zeros(2, 4, dtype=torch.float64), 1.0)


def test_rank_shape_and_delta() -> None:
    f = Factors(t([[1.0], [2.0]]), t([[3.0, 4.0, 5.0]]), 0.5)
    assert f.rank == 1
    assert f.shape == (2, 3)
    # 0.5 * [1, 2]ᵀ [3, 4, 5]
    expected = t([[1.5, 2.0, 2.5], [3.0, 4.0, 5.0]])
    assert f.delta().dtype == torch.float64
    assert torch.equal(f.delta(), expected)


def test_truncate_keeps_the_kept_parts_delta_under_a_new_scaling() -> None:
    f = Factors(t([[1.0, 2.0], [3.0, 4.0]]), t([[5.0, 6.0], [7.0, 8.0]]), 2.0)
    head = f.truncate(1, 4.0)
    # B rescaled by 2/4: [[0.5], [1.5]].
    # ΔW of the kept part: 2·[1, 3]ᵀ[5, 6] = [[10, 12], [30, 36]].
    assert torch.equal(head.B, t([[0.5], [1.5]]))
    assert torch.equal(head.A, t([[5.0, 6.0]]))
    assert head.scaling == 4.0
    assert torch.equal(head.delta(), t([[10.0, 12.0], [30.0, 36.0]]))


def test_truncate_above_rank_zero_pads_and_keeps_delta() -> None:
    f = Factors(t([[1.0, 2.0], [3.0, 4.0]]), t([[5.0, 6.0], [7.0, 8.0]]), 2.0)
    big = f.truncate(3)
    assert big.rank == 3 and big.scaling == 2.0
    assert torch.equal(big.B[:, 2], torch.zeros(2, dtype=torch.float64))
    assert torch.equal(big.A[2], torch.zeros(2, dtype=torch.float64))
    # 2·B@A = 2·[[19, 22], [43, 50]]
    assert torch.equal(big.delta(), t([[38.0, 44.0], [86.0, 100.0]]))


def test_truncate_and_pad_never_alias_or_mutate_the_input() -> None:
    f = Factors(t([[1.0, 2.0]]), t([[3.0], [4.0]]), 1.0)
    for g in (f.truncate(2), f.truncate(1), f.pad(2), f.pad(4)):
        g.B.add_(100.0)
        g.A.add_(100.0)
    assert torch.equal(f.B, t([[1.0, 2.0]])) and torch.equal(f.A, t([[3.0], [4.0]]))


def test_pad_refuses_to_shrink() -> None:
    with pytest.raises(ValueError, match="truncate"):
        Factors(torch.zeros(3, 2), torch.zeros(2, 4), 1.0).pad(1)


def test_aggregate_state_defaults_to_a_fresh_empty_dict() -> None:
    f = Factors(torch.zeros(3, 2), torch.zeros(2, 4), 1.0)
    a, b = Aggregate(f), Aggregate(f)
    assert a.state == {} and a.state is not b.state


def test_normalized_weights_sum_to_one() -> None:
    f = Factors(torch.zeros(3, 2), torch.zeros(2, 4), 1.0)
    assert base.normalized_weights([f, f], [1, 3]) == [0.25, 0.75]


@pytest.mark.parametrize(
    ("weights", "message"),
    [([1.0, -1.0], "non-negative"), ([0.0, 0.0], "all be zero"), ([1.0], "2 updates but 1")],
)
def test_normalized_weights_rejects(weights: list[float], message: str) -> None:
    f = Factors(torch.zeros(3, 2), torch.zeros(2, 4), 1.0)
    with pytest.raises(ValueError, match=message):
        base.normalized_weights([f, f], weights)


def test_normalized_weights_rejects_mixed_module_shapes() -> None:
    f = Factors(torch.zeros(3, 2), torch.zeros(2, 4), 1.0)
    g = Factors(torch.zeros(3, 2), torch.zeros(2, 5), 1.0)
    with pytest.raises(ValueError, match="module shape"):
        base.normalized_weights([f, g], [1.0, 1.0])


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
    monkeypatch.setattr(base, "_REGISTRY", {})

    @register("mine")
    def mine(updates, weights, **kwargs):  # type: ignore[no-untyped-def]
        return Aggregate(updates[0])

    assert get("mine") is mine and available() == ["mine"]
    with pytest.raises(ValueError, match="already registered"):
        register("mine")(lambda updates, weights, **kw: None)


def test_reject_options_names_them() -> None:
    with pytest.raises(TypeError, match=r"\['metod'\]"):
        get("fedit")([Factors(torch.zeros(3, 2), torch.zeros(2, 4), 1.0)], [1.0], metod="exact")


def test_every_method_declares_its_round_semantics(monkeypatch: pytest.MonkeyPatch) -> None:
    specs = {name: base.round_spec(name) for name in available()}
    assert specs["flora"].merge and specs["ffa"].freeze_A and specs["fedsa"].local_B
    # adapter state on the wire (hetlora also declares client-side options)
    plain = [
        n
        for n, s in specs.items()
        if s == replace(base.ADAPTER_STATE, client_options=s.client_options)
    ]
    assert specs["hetlora"].client_options and not specs["svd"].client_options
    assert {"fedit", "svd", "squeeze", "flexlora", "lorafair", "hetlora", "rblora"} <= set(plain)
    with pytest.raises(KeyError, match="Did you mean 'flora'"):
        base.round_spec("florra")
    monkeypatch.setattr(base, "_REGISTRY", {})
    monkeypatch.setattr(base, "_ROUNDS", {})
    register("mine", rounds=base.RoundSpec(merge=True))(lambda updates, weights, **kw: None)
    assert base.round_spec("mine").merge


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
    assert {"base", "linalg", "screen"} <= modules  # not methods: harmless
    assert all(f"fedllm.aggregators.{m}" in sys.modules for m in modules if not m.startswith("_"))
    built_in = {"fedit", "fedsa", "ffa", "flexlora", "flora", "hetlora", "lorafair", "rblora"}
    assert built_in | {"squeeze", "svd"} <= set(available())


@pytest.fixture
def isolated_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A registry copy and no installed entry points; the test's `zz_` modules dropped after."""
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    monkeypatch.setattr(base, "_ROUNDS", dict(base._ROUNDS))
    monkeypatch.setattr(base, "_LOADED_ENTRY_POINTS", set())
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

    assert base.discover("fedllm.aggregators", aggregators.__path__) == ["dropin_test"]
    assert get("dropin_test").__name__ == "dropin" and base.round_spec("dropin_test").freeze_A
    assert "fedllm.aggregators.zz_dropin_helper" in sys.modules
    assert "fedllm.aggregators._zz_private" not in sys.modules
    base.check_options("dropin_test", {"knob": 2})  # options bound to the new signature
    with pytest.raises(ValueError, match="did you mean 'knob'"):
        base.check_options("dropin_test", {"knbo": 2})
    # a recipe naming it validates as `fedllm validate` does, its options checked by signature
    from fedllm.recipe import ConfigError, build_config

    build_config({"aggregator": {"name": "dropin_test", "options": {"knob": 2}}})
    with pytest.raises(ConfigError, match="did you mean 'knob'"):
        build_config({"aggregator": {"name": "dropin_test", "options": {"knbo": 2}}})
    # already imported: a second pass registers nothing new (and does not raise on re-import)
    assert base.discover("fedllm.aggregators", aggregators.__path__) == []


class CountingEntryPoint:
    """Stands in for importlib.metadata.EntryPoint, counting loads."""

    def __init__(self, name: str, value: str, load: Callable[[], object]) -> None:
        self.name, self.value, self.group = name, value, "fedllm.aggregators"
        self._load, self.loads = load, 0

    def load(self) -> object:
        self.loads += 1
        return self._load()


@pytest.mark.usefixtures("isolated_registry")
def test_entry_points_register_and_load_once(monkeypatch: pytest.MonkeyPatch) -> None:
    def plugin() -> object:
        return register("plugin_test")(lambda updates, weights, **options: Aggregate(updates[0]))

    ep = CountingEntryPoint("plugin_test", "thirdparty.methods:plugin", plugin)
    groups: list[str | None] = []

    def entry_points(*, group: str | None = None) -> list[CountingEntryPoint]:
        groups.append(group)
        return [ep, ep]  # the same entry point seen twice (e.g. two copies on sys.path)

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    assert base.discover("fedllm.aggregators", []) == ["plugin_test"]
    assert base.discover("fedllm.aggregators", []) == []
    assert ep.loads == 1 and groups == ["fedllm.aggregators", "fedllm.aggregators"]
    assert "plugin_test" in available()


@pytest.mark.usefixtures("isolated_registry")
def test_a_real_entry_point_naming_a_module_registers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "zz_thirdparty_methods.py").write_text(DROPPED_IN)
    monkeypatch.syspath_prepend(str(tmp_path))
    ep = importlib.metadata.EntryPoint(
        name="dropin", value="zz_thirdparty_methods", group="fedllm.aggregators"
    )
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda *, group: [ep])
    assert base.discover("fedllm.aggregators", []) == ["dropin_test"]


@pytest.mark.usefixtures("isolated_registry")
def test_a_broken_entry_point_warns_and_the_others_still_load(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken() -> object:
        raise ImportError("No module named 'missing_dependency'")

    def fine() -> object:
        return register("plugin_ok")(lambda updates, weights, **options: Aggregate(updates[0]))

    eps = [CountingEntryPoint("bad", "bad.mod", broken), CountingEntryPoint("ok", "ok.mod", fine)]
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda *, group: eps)
    with pytest.warns(RuntimeWarning, match=r"'bad' \(bad.mod\).*missing_dependency"):
        assert base.discover("fedllm.aggregators", []) == ["plugin_ok"]


# -- check_options: aggregator.options bound to the method's signature ---------------------------


def test_check_options_names_a_typo_with_a_close_match_and_the_valid_keys() -> None:
    with pytest.raises(ValueError) as info:
        base.check_options("squeeze", {"oversampel": 4})
    assert str(info.value) == (
        "aggregator.options.oversampel: unknown option of 'squeeze' (did you mean 'oversample'?); "
        "valid: correction, gauge, lam, method, oversample, power_iters, residual_rank, row_norm"
    )


def test_check_options_on_a_method_without_options() -> None:
    with pytest.raises(ValueError, match=r"^aggregator.options.metod: .*'fedit' takes no options$"):
        base.check_options("fedit", {"metod": "exact"})
    base.check_options("fedit", {})


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("squeeze", {"method": "exact", "oversample": 4, "correction": False, "lam": 0.5}),
        ("squeeze", {"residual_rank": 4}),  # default None: any value (the method checks it)
        ("svd", {"power_iters": 0}),
        ("lorafair", {"lam": 1, "solver": "gd", "steps": 10, "lr": 0.1}),  # int where float
        ("ffa", {"atol": 0}),
        ("hetlora", {"prune_lambda": 0.05, "prune_gamma": 0.25, "min_rank": 2}),  # client options
    ],
)
def test_check_options_accepts_a_methods_options(name: str, options: dict[str, Any]) -> None:
    base.check_options(name, options)


def test_check_options_suggests_client_options() -> None:
    with pytest.raises(ValueError) as info:
        base.check_options("hetlora", {"min_rnk": 2})
    assert str(info.value) == (
        "aggregator.options.min_rnk: unknown option of 'hetlora' (did you mean 'min_rank'?); "
        "valid: min_rank, prune_gamma, prune_lambda"
    )


@pytest.mark.parametrize(
    ("name", "key", "value", "expected"),
    [
        ("squeeze", "oversample", "8", "an int"),
        ("squeeze", "oversample", 8.0, "an int"),
        ("squeeze", "oversample", True, "an int"),  # a bool is not an int
        ("squeeze", "correction", 1, "a bool"),
        ("squeeze", "correction", "yes", "a bool"),
        ("lorafair", "lam", "0.1", "a float"),
        ("lorafair", "lam", False, "a float"),
        ("svd", "method", 3, "a str"),
        ("svd", "method", None, "a str"),
    ],
)
def test_check_options_rejects_an_obviously_wrong_type(
    name: str, key: str, value: object, expected: str
) -> None:
    pattern = (
        rf"^aggregator\.options\.{key}: '{name}' expects {expected}.*got {type(value).__name__}"
    )
    with pytest.raises(ValueError, match=pattern):
        base.check_options(name, {key: value})


def test_check_options_names_every_problem_at_once() -> None:
    with pytest.raises(ValueError) as info:
        base.check_options("svd", {"oversample": "8", "power_iter": 1})
    message = str(info.value)
    assert "aggregator.options.oversample: 'svd' expects an int" in message
    assert "aggregator.options.power_iter: unknown option of 'svd'" in message


def test_check_options_binds_third_party_signatures(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    monkeypatch.setattr(base, "_ROUNDS", dict(base._ROUNDS))

    @register("needs_tau", rounds=base.RoundSpec(client_options=("local_mu",)))
    def needs_tau(updates, weights, global_rank=None, state=None, seed=0, *, tau, mix=0.5):  # type: ignore[no-untyped-def]
        return Aggregate(updates[0])

    base.check_options("needs_tau", {"tau": 2.0, "mix": 1, "local_mu": "anything"})
    with pytest.raises(ValueError, match=r"^aggregator.options.tau: required by 'needs_tau'"):
        base.check_options("needs_tau", {"mix": 0.1})
    with pytest.raises(ValueError, match=r"valid: local_mu, mix, tau$"):
        base.check_options("needs_tau", {"seed": 1, "tau": 1.0})  # seed comes from the recipe


def test_check_options_of_an_unknown_method_raises_like_get() -> None:
    with pytest.raises(KeyError, match="Did you mean 'squeeze'"):
        base.check_options("squeez", {})
