"""The feature registry and interface: discovery by folder and entry point, the `features:` recipe
section, which recipes turn which features on, and the base hooks' no-op defaults."""

from __future__ import annotations

import importlib.metadata
import logging
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from pydantic import BaseModel, ConfigDict, Field

import fedllm.features
from fedllm import cli
from fedllm.aggregators import Factors, RoundSpec
from fedllm.data.shards import ProcessCache
from fedllm.features import registry
from fedllm.features.base import Feature
from fedllm.features.types import (
    ClientPlan,
    ClientRound,
    ClientRow,
    ClientUpdate,
    Download,
    RoundResult,
    TrainReply,
)
from fedllm.recipe import ConfigError, build_config, load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
BUILT_IN = {
    "tiers": "fedllm.constrained.tiers",
    "adaptive": "fedllm.constrained.adaptive",
    "pruned_base": "fedllm.constrained.pruned",
    "compression": "fedllm.constrained.compression",
    "hetlora_prune": "fedllm.features.hetlora_prune",
    "dp_sgd": "fedllm.privacy.sample_level",
    "client_dp": "fedllm.privacy.client_level",
    "secagg": "fedllm.privacy.secagg",
    "fedprox": "fedllm.features.fedprox",
    "server_momentum": "fedllm.features.server_momentum",
    "personal_adapter": "fedllm.features.personal",
    "node_guard": "fedllm.privacy.node_guard",
}
BASE = {"data": {"num_clients": 2}, "lora": {"ranks": 2, "alpha": 4}}


ALWAYS = {"node_guard"}  # on for every recipe: the node's own privacy minimums


def recipe_active(cfg) -> list:
    """The feature classes the recipe turns on (without the always-on node guard)."""
    return [c for c in registry.active(cfg) if c.name not in ALWAYS]


def recipe_build(cfg) -> list:
    """Instances of the features the recipe turns on (without the always-on node guard)."""
    return [f for f in registry.build(cfg) if f.name not in ALWAYS]


def test_the_node_guard_is_on_for_every_recipe_and_first() -> None:
    assert registry.active(build_config(BASE))[0].name == "node_guard"


def recipe(**extra: object) -> dict:
    return {**BASE, **extra}


def validate(*args: str) -> int:
    """`fedllm validate ARGS`, leaving the fedllm logger as it was (`cli.main` adds a handler)."""
    logger = logging.getLogger("fedllm")
    handlers, level = list(logger.handlers), logger.level
    try:
        return cli.main(["validate", *args])
    finally:
        logger.handlers[:] = handlers
        logger.setLevel(level)


@pytest.fixture
def clean_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Registrations made by the test go into a copy of the registry, dropped afterwards."""
    monkeypatch.setattr(registry, "_FEATURES", dict(registry.discover()))
    yield


# -- (a) every built-in feature is found ----------------------------------------------------------


def test_available_lists_every_built_in_feature() -> None:
    found = registry.available()
    assert found == sorted(found)
    assert set(BUILT_IN) <= set(found)


@pytest.mark.parametrize("name", sorted(BUILT_IN))
def test_each_built_in_feature_lives_where_the_architecture_says(name: str) -> None:
    cls = registry.feature_class(name)
    assert issubclass(cls, Feature) and cls.name == name
    assert cls.__module__ == BUILT_IN[name]


def test_feature_class_of_an_unknown_name_suggests_a_close_one() -> None:
    with pytest.raises(ValueError, match=r"unknown feature 'fedprx' \(did you mean 'fedprox'\?\)"):
        registry.feature_class("fedprx")


def test_register_refuses_a_nameless_or_second_class(clean_registry: None) -> None:
    class Nameless(Feature):
        pass

    with pytest.raises(ValueError, match="has no name"):
        registry.register(Nameless)

    class Impostor(Feature):
        name = "fedprox"

    with pytest.raises(ValueError, match=r"'fedprox' is already registered by .*fedprox\.FedProx"):
        registry.register(Impostor)

    class FedProx(Feature):  # a plugin's class of the same name must not replace the built-in
        name = "fedprox"

    with pytest.raises(ValueError, match="'fedprox' is already registered"):
        registry.register(FedProx)
    assert registry.discover()["fedprox"].__module__ == "fedllm.features.fedprox"


# -- (b) a new feature dropped in, with nothing else edited ---------------------------------------

DROPIN = "zz_dropin_probe"  # module and feature name; the module is imported from tmp_path
DROPIN_SOURCE = f'''
"""A feature that exists only in a test's temporary folder."""

from pydantic import BaseModel, ConfigDict, Field

from fedllm.features.base import Feature
from fedllm.features.registry import register


class ProbeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    strength: float = Field(0.5, gt=0, le=1)
    label: str = "probe"


@register
class Probe(Feature):
    name = "{DROPIN}"
    order = 60  # between fedprox (50) and server_momentum (80)
    Options = ProbeOptions

    def progress(self) -> str:
        return f"probe {{self.options.strength}}"
'''


@contextmanager
def dropped_in(folder: Path) -> Iterator[str]:
    """A feature module written into `folder`, appended to `fedllm.features.__path__` (and the
    registry copied) while the block runs; all of it undone afterwards."""
    folder.mkdir()
    (folder / f"{DROPIN}.py").write_text(textwrap.dedent(DROPIN_SOURCE))
    (folder / "_zz_private_probe.py").write_text("raise RuntimeError('private: never imported')\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(registry, "_FEATURES", dict(registry.discover()))
        mp.setattr(fedllm.features, "__path__", [*fedllm.features.__path__, str(folder)])
        try:
            yield DROPIN
        finally:
            sys.modules.pop(f"fedllm.features.{DROPIN}", None)
            if hasattr(fedllm.features, DROPIN):
                delattr(fedllm.features, DROPIN)


@pytest.fixture
def dropin(tmp_path: Path) -> Iterator[str]:
    """A feature module dropped into `fedllm.features` for one test."""
    with dropped_in(tmp_path / "more_features") as name:
        yield name


def test_dropped_in_feature_is_discovered(dropin: str) -> None:
    assert dropin not in registry._FEATURES
    assert dropin in registry.available()
    cls = registry.feature_class(dropin)
    assert cls.__module__ == f"fedllm.features.{dropin}" and cls.order == 60
    assert "_zz_private_probe" not in sys.modules and "fedllm.features._zz_private_probe" not in (
        sys.modules
    )


def test_dropped_in_feature_validates_in_a_recipe(dropin: str) -> None:
    cfg = build_config(recipe(features={dropin: {"strength": 0.25}}))
    assert cfg.features == {dropin: {"strength": 0.25}}
    assert [c.name for c in recipe_active(cfg)] == [dropin]
    # named with no options: its defaults
    (probe,) = recipe_build(build_config(recipe(features={dropin: None})))
    assert (probe.options.strength, probe.options.label) == (0.5, "probe")


def test_dropped_in_feature_through_fedllm_validate(
    dropin: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "probe.yaml"
    path.write_text(yaml.safe_dump(recipe(name="probe", features={dropin: {"strength": 1.0}})))
    assert validate(str(path)) == 0
    assert f"ok  {path}: probe, 2 clients" in capsys.readouterr().out
    # an override of its option is checked the same way
    assert validate(str(path), f"features.{dropin}.strength=2.0") == 2
    err = capsys.readouterr().err
    assert f"features.{dropin}.strength: Input should be less than or equal to 1" in err


@pytest.mark.parametrize(
    ("options", "key", "then"),
    [
        ({"strength": 0}, "strength", r"Input should be greater than 0 \(got 0\)"),
        ({"strength": "strong"}, "strength", r".*\(got 'strong'\)"),
        ({"label": 3}, "label", r".*\(got 3\)"),
        (  # unknown option: extra="forbid"
            {"strenght": 0.5},
            "strenght",
            r"unknown option \(did you mean 'strength'\?\); valid: label, strength",
        ),
    ],
)
def test_bad_option_of_a_dropped_in_feature_is_reported_by_key(
    dropin: str, options: dict, key: str, then: str
) -> None:
    with pytest.raises(ConfigError, match=rf"features\.{dropin}\.{key}: {then}"):
        build_config(recipe(features={dropin: options}))


def test_build_instantiates_the_dropped_in_feature_in_order(dropin: str) -> None:
    cfg = build_config(
        recipe(
            features={"server_momentum": {"beta": 0.5}, dropin: {"strength": 0.75}, "fedprox": {}}
        )
    )
    features = recipe_build(cfg)
    assert [f.name for f in features] == ["fedprox", dropin, "server_momentum"]
    assert [f.order for f in features] == [50, 60, 80]
    probe = features[1]
    assert isinstance(probe, Feature) and probe.cfg is cfg
    assert probe.options.strength == 0.75 and probe.progress() == "probe 0.75"
    # fresh instances every time (per round on a client)
    assert recipe_build(cfg)[1] is not probe


def test_no_drop_in_left_behind(tmp_path: Path) -> None:
    """The drop-in is found inside the block, and its registry entry, module and folder are
    gone after it."""
    with dropped_in(tmp_path / "more_features") as name:
        assert name in registry.available()
        build_config(recipe(features={name: {}}))
    assert DROPIN not in registry.available() and f"fedllm.features.{DROPIN}" not in sys.modules
    with pytest.raises(ConfigError, match=rf"features\.{DROPIN}: unknown feature"):
        build_config(recipe(features={DROPIN: {}}))


class EntryPointProbe(Feature):
    """A third-party feature, registered only when its entry point is loaded."""

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)
        level: int = Field(1, ge=1)

    name = "ep_probe"
    order = 45


class FakeEntryPoint:
    name = "ep_probe"
    value = "thirdparty.features:EntryPointProbe"
    group = registry.GROUP

    def __init__(self) -> None:
        self.loads = 0

    def load(self) -> type[Feature]:
        self.loads += 1
        return registry.register(EntryPointProbe)


def test_entry_point_feature_is_found(
    monkeypatch: pytest.MonkeyPatch,
    clean_registry: None,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    point = FakeEntryPoint()
    groups: list[str] = []

    def entry_points(*, group: str) -> list[FakeEntryPoint]:
        groups.append(group)
        return [point] if group == registry.GROUP else []

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    assert "ep_probe" in registry.available()
    assert groups and set(groups) == {"fedllm.features"} and point.loads >= 1
    cfg = build_config(recipe(features={"ep_probe": {"level": 3}, "fedprox": {"mu": 0.1}}))
    assert [f.name for f in recipe_build(cfg)] == ["ep_probe", "fedprox"]  # 45 before 50
    with pytest.raises(ConfigError, match=r"features\.ep_probe\.level: "):
        build_config(recipe(features={"ep_probe": {"level": 0}}))
    path = tmp_path / "ep.yaml"
    path.write_text(yaml.safe_dump(recipe(features={"ep_probe": {"level": 2}})))
    capsys.readouterr()
    assert validate(str(path)) == 0
    # validate says which features are on, and which came from a plugin
    assert f"features node_guard, ep_probe (plugin {__name__})" in capsys.readouterr().out


# -- (c) unknown names in `features:` -------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "close"),
    [("fedprx", "fedprox"), ("server_momentun", "server_momentum"), ("FedProx", "fedprox")],
)
def test_unknown_feature_name_fails_with_a_did_you_mean(name: str, close: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_config(recipe(features={name: {}}))
    message = str(info.value)
    assert f"features.{name}: unknown feature (did you mean '{close}'?)" in message
    assert "valid: fedprox, nested_prefix, personal_adapter, personal_tuning, server_mom" in message


def test_unknown_feature_without_a_close_match_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match=r"features\.quantum_teleport: unknown feature; valid: "):
        build_config(recipe(features={"quantum_teleport": {}}))


@pytest.mark.parametrize("name", ["tiers", "dp_sgd", "compression", "secagg"])
def test_features_with_their_own_section_cannot_be_named_under_features(name: str) -> None:
    # they are turned on by their own keys (lora.tiers, privacy, compression, ...), not here
    with pytest.raises(ConfigError, match=rf"features\.{name}: unknown feature"):
        build_config(recipe(features={name: {}}))


def test_fedllm_validate_reports_an_unknown_feature(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(recipe(features={"fedprx": {"mu": 0.1}})))
    assert validate(str(path)) == 2
    assert "did you mean 'fedprox'?" in capsys.readouterr().err


# -- (d) which recipes turn which features on -----------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("tiny.yaml", []),
        ("quickstart.yaml", []),
        ("svd.yaml", []),
        ("dp.yaml", ["dp_sgd"]),
        ("pruned.yaml", ["tiers", "pruned_base", "compression"]),  # orders 10, 40, 90
        ("fedprox.yaml", ["fedprox"]),
        ("hetlora.yaml", ["hetlora_prune"]),
    ],
)
def test_active_features_of_shipped_recipes(name: str, expected: list[str]) -> None:
    cfg = load_recipe(RECIPES / name)
    assert [c.name for c in recipe_active(cfg)] == expected
    assert [f.name for f in recipe_build(cfg)] == expected


def test_a_plain_recipe_builds_no_feature() -> None:
    assert recipe_build(build_config(BASE)) == []


def test_overrides_turn_features_on() -> None:
    path = RECIPES / "quickstart.yaml"
    cfg = load_recipe(path, ["features.server_momentum={beta: 0.5}", "compression.dtype=float16"])
    assert [c.name for c in recipe_active(cfg)] == ["server_momentum", "compression"]


# -- (e) the base Feature does nothing ------------------------------------------------------------

HOOKS = {
    # recipe
    "enabled",
    "parse_options",
    "check",
    "prepare",
    # client
    "wrap_train",
    "plan",
    "read_global",
    "prepare_base",
    "start",
    "sent_start",
    "personalise",
    "eval_precision",
    "evaluated",
    "regularizers",
    "fold",
    "train",
    "stage",
    "post_process",
    "reply",
    "metrics",
    "reply_keys",
    # server
    "on_server",
    "before_round",
    "run_round",
    "lost_round",
    "assign",
    "download",
    "encode",
    "decode",
    "receive",
    "accepted",
    "release",
    "after_aggregate",
    "record",
    "progress",
    "state_dict",
    "load_state_dict",
    "renumber",
}
ATTRIBUTES = {
    "name",
    "order",
    "Options",
    "state_key",
    "client_mod",
    "privacy_mode",
    "screen_relative",
    "own_adapter_shape",
    "replaces_trainer",
    "reply_metrics",
    "eval_metrics",
    "adds_to_steps",
}


def test_the_hook_list_below_is_complete() -> None:
    public = {n for n in vars(Feature) if not n.startswith("_")}
    assert public == HOOKS | ATTRIBUTES, "a new hook needs a no-op test here"


def test_base_attributes() -> None:
    assert (Feature.name, Feature.order, Feature.Options, Feature.state_key) == ("", 50, None, "")
    assert Feature.client_mod is None
    assert Feature.privacy_mode is None
    assert Feature.screen_relative is True
    assert Feature.own_adapter_shape is False
    assert Feature.replaces_trainer is False
    assert Feature.reply_metrics == {}
    assert Feature.eval_metrics == {}


def factors(rank: int = 2) -> dict[str, Factors]:
    return {"q": Factors(torch.ones(3, rank), torch.ones(rank, 2), 2.0)}


def test_every_hook_of_the_base_feature_is_a_no_op() -> None:
    cfg = build_config(BASE)
    f = Feature(cfg)
    assert f.cfg is cfg and f.options is None
    # recipe
    assert Feature.enabled(cfg) is False
    assert f.reply_keys() is None
    assert f.lost_round(3, partitions=[0, 1], sampled=2) is None
    assert f.renumber({1001: 7}) is None
    assert f.sent_start() is False  # a client may revive dead components
    assert Feature.parse_options(cfg) is None
    assert Feature.check(cfg) is None
    assert Feature.prepare(cfg, shapes={"q": (3, 2)}) is None
    # client
    content = RecordDict({"config": ConfigRecord({"x": 1})})
    calls = []
    assert (
        Feature.wrap_train(cfg, content, context=None, train=lambda *a, **k: calls.append(a))
        is None
    )
    assert calls == [], "wrap_train must not train by itself"
    plan = ClientPlan(partition=1, rank=2)
    state = RecordDict()
    rnd = ClientRound(cfg, 1, 3, RoundSpec(), ConfigRecord({}), {}, state, 0, plan)
    assert f.plan(plan, rnd) is plan
    assert f.read_global(ArrayRecord(), rnd) is None
    assert f.fold(factors(), rnd) == {}
    base = torch.nn.Linear(2, 3)
    weight = base.weight.detach().clone()
    assert f.prepare_base(base, rnd) is base and torch.equal(base.weight, weight)
    start_in = factors()
    started = f.start(start_in, rnd)
    assert started is not start_in and list(started) == list(start_in)  # a copy ...
    assert all(started[m] is start_in[m] for m in start_in)  # ... of the same factors
    own = f.personalise(start_in, rnd)
    assert own is not start_in and all(own[m] is start_in[m] for m in start_in)
    assert f.eval_precision("4bit", rnd) == "4bit" and f.eval_precision(None, rnd) is None
    assert f.evaluated(start_in, rnd) == {}
    assert f.regularizers(base, rnd) == []
    assert f.train(base, rnd, steps=3) is None
    assert f.stage(base, rnd, done=1, steps=3) == 2  # one stage: all the steps left
    update = ClientUpdate(factors(), factors(), 2)
    assert f.post_process(update, rnd) is update
    arrays = {"update": ArrayRecord()}
    assert f.reply(arrays, update, rnd=rnd) is arrays and list(arrays) == ["update"]
    assert f.metrics() == {}
    assert len(state) == 0, "no client hook writes the node's state"
    # server
    cache = ProcessCache()
    assert f.on_server(cache=cache) is None and vars(f) == {"cfg": cfg, "options": None}
    assert f.before_round(1, partitions=[0, 1], sampled=2) is None
    assert f.run_round(1, strategy=object(), grid=object()) is None
    down = Download(2, factors(), {"k": 1})
    assert f.assign(7, down) is down and f.download(7, down) is down
    assert f.encode(7, factors()) is None
    assert f.decode(7, RecordDict(), rank=2) is None
    received = factors()
    reply = TrainReply(0, 2, 10, 1.0, 2.0, 0.5, 5, 0.1, 100, 200)
    assert (
        f.receive(7, RecordDict(), factors=received, reply=reply, shapes={"q": (3, 2)}) is received
    )
    assert f.accepted(7, reply) is None
    inputs, weights = [factors()], [1.0]
    out_inputs, out_weights = f.release([7], inputs, weights=weights, global_=factors(4))
    assert out_inputs is inputs and out_weights is weights
    new = factors()
    assert f.after_aggregate(factors(4), new, server_round=1) is new
    row = ClientRow(1, 7, "ok", reply, 0)
    result = RoundResult(sampled=1, rows=[row], train_loss=1.0, replies=1)
    server_row: dict = {"kind": "server"}
    assert f.record(result, server_row=server_row) is None
    assert server_row == {"kind": "server"} and row.fields == {} and result.rows == [row]
    assert f.progress() == ""
    assert f.state_dict() == {}
    assert f.load_state_dict({"anything": 1}) is None
    assert f.load_state_dict(None) is None


def test_a_subclass_with_options_is_enabled_by_naming_it(clean_registry: None) -> None:
    class Opts(BaseModel):
        model_config = ConfigDict(extra="forbid")
        k: int = 3

    @registry.register
    class Named(Feature):
        name = "zz_named_probe"
        Options = Opts

    off = build_config(BASE)
    on = build_config(recipe(features={"zz_named_probe": {"k": 5}}))
    assert not Named.enabled(off) and Named.enabled(on)
    assert Named(on).options == Opts(k=5)
    assert Named(off).options == Opts(k=3)  # defaults when not named
    # a subclass without options is never enabled by the base rule
    assert not type("Bare", (Feature,), {"name": "zz_bare"}).enabled(on)


# -- DP mechanisms: found by `privacy.mode`, one file each ---------------------------------------

MECHANISM_SOURCE = '''
from fedllm.features.base import Feature
from fedllm.features.registry import register


@register
class LaplaceProbe(Feature):
    """A stand-in DP mechanism: turned on by privacy.mode=laplace_probe."""

    name = "laplace_probe"
    privacy_mode = "laplace_probe"
    state_key = "privacy"
'''


def test_unknown_privacy_mode_names_the_mechanisms() -> None:
    with pytest.raises(
        ConfigError,
        match=r"privacy.mode: unknown DP mechanism 'smaple' "
        r"\(did you mean 'sample'\?\); valid: none, client, sample",
    ):
        build_config(recipe(privacy={"mode": "smaple"}))


def test_a_dropped_in_dp_mechanism_is_enabled_by_its_privacy_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean_registry: None
) -> None:
    import fedllm.privacy

    (tmp_path / "laplace_probe.py").write_text(MECHANISM_SOURCE)
    monkeypatch.setattr(fedllm.privacy, "__path__", [*fedllm.privacy.__path__, str(tmp_path)])
    monkeypatch.delitem(sys.modules, "fedllm.privacy.laplace_probe", raising=False)
    cfg = build_config(recipe(privacy={"mode": "laplace_probe"}))
    assert [c.name for c in recipe_active(cfg)] == ["laplace_probe"]
    assert recipe_active(build_config(recipe())) == []


class BrokenEntryPoint:
    name = "broken_plugin"
    value = "thirdparty.broken:Feature"
    group = registry.GROUP

    def load(self) -> type[Feature]:
        raise ImportError("No module named 'thirdparty'")


def test_a_broken_feature_entry_point_warns_and_every_recipe_still_loads(
    monkeypatch: pytest.MonkeyPatch, clean_registry: None
) -> None:
    points = [BrokenEntryPoint(), FakeEntryPoint()]
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda *, group: points)
    broken = r"feature entry point broken_plugin = .*failed to load.*No module named"
    with pytest.warns(RuntimeWarning, match=broken):
        found = registry.available()
    assert "ep_probe" in found and "fedprox" in found  # the others still load
    build_config(recipe(features={"fedprox": {"mu": 0.1}}))


class LaxOptions(BaseModel):  # a plugin's model that forgot extra="forbid"
    lam: float = 0.1


class LaxTerm(Feature):
    """A plugin feature adding a loss term, with an Options model that ignores extra keys."""

    name = "lax_term"
    Options = LaxOptions

    def regularizers(self, model: torch.nn.Module, rnd: ClientRound) -> list:
        return [lambda: torch.zeros(())]


def test_a_typo_in_a_lax_plugin_options_model_is_still_refused(clean_registry: None) -> None:
    registry.register(LaxTerm)
    build_config(recipe(features={"lax_term": {"lam": 0.5}}))
    with pytest.raises(ConfigError, match=r"features\.lax_term\.lamb: unknown option \(did you "):
        build_config(recipe(features={"lax_term": {"lamb": 5}}))


def test_a_loss_term_beside_a_trainer_that_replaces_the_plain_steps_is_refused(
    clean_registry: None,
) -> None:
    """DP-SGD trains with its own trainer: a plugin's loss term would silently never run."""
    registry.register(LaxTerm)
    private = {"privacy": {"mode": "sample", "target_epsilon": 8.0}}
    refused = r"'lax_term' add\(s\) to the plain local steps.*'dp_sgd'"
    with pytest.raises(ConfigError, match=refused):
        build_config(recipe(features={"lax_term": {}}, **private))
    build_config(recipe(features={"lax_term": {}}))  # alone: fine
    build_config(recipe(**private))  # DP-SGD alone: fine


def test_a_feature_whose_loss_term_is_off_may_run_beside_dp_sgd() -> None:
    """hetlora_prune is on with every hetlora recipe, but adds its term only when pruning is."""
    private = ["privacy.mode=sample", "privacy.noise_multiplier=1"]
    load_recipe(RECIPES / "hetlora.yaml", private)  # prune_lambda 0: no term, nothing lost
    with pytest.raises(ConfigError, match="prune_lambda > 0"):
        load_recipe(RECIPES / "hetlora.yaml", [*private, "aggregator.options.prune_lambda=0.1"])


def test_a_reply_metric_may_not_take_a_core_column_of_the_row(clean_registry: None) -> None:
    class Clobber(Feature):
        name = "clobber"
        reply_metrics = {"train-loss": float}  # noqa: RUF012

    with pytest.raises(ValueError, match=r"\['train-loss'\] name core columns"):
        registry.register(Clobber)


def test_an_evaluation_metric_may_not_take_a_column_of_the_eval_or_server_row(
    clean_registry: None,
) -> None:
    class Clobber(Feature):
        name = "clobber"
        eval_metrics = {"partition": int, "tuned-loss": float}  # noqa: RUF012

    with pytest.raises(ValueError, match=r"eval_metrics \['partition'\] name core columns"):
        registry.register(Clobber)
