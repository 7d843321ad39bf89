"""The checkout as a Flower App: `flwr run . --run-config "recipe=... key=value"`.

Fast: the declared run config is the one generated from the schema (pyproject.toml kept in step),
a `--run-config` string goes through Flower's own parsing and key check into the recipe, and the
FAB Flower builds from the checkout is fedllm's code-free wrapper. Slow: one real `flwr run .` in
Flower's simulation runtime on the tiny recipe.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import zipfile
from io import BytesIO
from pathlib import Path

import click
import pytest
import tomli
import yaml
from flwr.cli.build import build_fab_from_files
from flwr.common.config import flatten_dict, fuse_dicts, parse_config_args
from pydantic import BaseModel

import fedllm.aggregators.registry as aggregator_registry
import fedllm.features.registry as feature_registry
from fedllm.aggregators import available
from fedllm.aggregators.registry import _option_defaults
from fedllm.deploy.app_check import check_fab
from fedllm.deploy.app_config import (
    APP_KEYS,
    FROM_RECIPE,
    app_recipe,
    config_table,
    declared_table,
    main,
    recipe_keys,
)
from fedllm.deploy.apps import (
    check_server_run_dir,
    check_simulation_size,
    keep_recipe,
    simulation_notice,
    weight_notice,
)
from fedllm.deploy.flower_env import flwr_env
from fedllm.deploy.submit import write_run_config
from fedllm.features.base import Feature
from fedllm.features.registry import discover
from fedllm.recipe import ConfigError, load_recipe

ROOT = Path(__file__).parents[1]
PYPROJECT = ROOT / "pyproject.toml"
TINY = ROOT / "recipes" / "tiny.yaml"


def declared() -> dict:
    """The app's run config as Flower reads it from pyproject.toml (flattened, dotted keys)."""
    app = tomli.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]
    return flatten_dict(app["config"])


def run_config(text: str) -> dict:
    """What the app receives for `flwr run . --run-config TEXT`: Flower's parsing of TEXT, its
    check that every key is declared, and the declared values for the rest."""
    return fuse_dicts(declared(), parse_config_args([text]), check_keys=True)


def test_pyproject_declares_every_recipe_key_as_generated() -> None:
    """After a schema change: regenerate with `python -m fedllm.deploy.app_config`."""
    assert declared_table() == config_table()
    assert main(["--check"]) == 0
    config = declared()
    assert set(config) == set(APP_KEYS) | set(recipe_keys())
    assert {k: config[k] for k in APP_KEYS} == {"recipe": "", "resume": False, "overwrite": False}
    assert all(config[k] == FROM_RECIPE for k in recipe_keys())


def test_recipe_keys_are_every_schema_key_and_section() -> None:
    keys = recipe_keys()
    for key in ("name", "federation.rounds", "model.tiny.hidden_size", "data.canaries.digits"):
        assert key in keys
    assert "privacy.secure_aggregation.enabled" in keys  # two sections deep
    # a section is a key too (a whole YAML mapping), declared before its own keys
    for section in ("model", "privacy.secure_aggregation", "data.test_set", "output.trackers"):
        assert section in keys
        assert keys.index(section) < min(
            i for i, k in enumerate(keys) if k.startswith(section + ".")
        )
    # a value that may be a list or a mapping is one key, given as a YAML string
    assert {"lora.ranks", "lora.tiers", "aggregator.options", "features"} <= set(keys)
    # ... and the keys of its mapping form (a rank rule), but not a list's items
    assert {"lora.ranks.min", "lora.ranks.max", "lora.ranks.spacing"} <= set(keys)
    assert not [k for k in keys if k.startswith(("lora.tiers.", "devices.", "data.pos."))]


def test_registry_options_are_keys() -> None:
    """Every option of every registered aggregator, every feature and its options: from the
    registries, so a new aggregator or feature needs only the table regenerated."""
    keys = set(recipe_keys())
    for name in available():
        for option in _option_defaults(name):
            assert f"aggregator.options.{option}" in keys, (name, option)
    own = {n: c for n, c in discover().items() if c.Options is not None}
    assert "fedprox" in own
    for name, cls in own.items():
        assert f"features.{name}" in keys
        assert {f"features.{name}.{o}" for o in cls.Options.model_fields} <= keys
    assert not [k for k in keys if k.startswith("features.") and k.split(".")[1] not in own]


def test_a_new_aggregator_or_feature_of_fedllm_appears_in_the_table(monkeypatch) -> None:
    def knobbed(updates, weights, *, knob: int = 3, **_: object):  # pragma: no cover
        raise NotImplementedError

    class Options(BaseModel):
        strength: float = 1.0

    class Knobbed(Feature):
        name = "knobbed_feature"

    monkeypatch.setattr(Knobbed, "Options", Options)
    knobbed.__module__ = "fedllm.aggregators.knobbed"  # new files of fedllm's own folders
    Knobbed.__module__ = "fedllm.features.knobbed"
    monkeypatch.setitem(aggregator_registry._REGISTRY, "knobbed", knobbed)
    monkeypatch.setitem(aggregator_registry._ROUNDS, "knobbed", aggregator_registry.RoundSpec())
    monkeypatch.setitem(feature_registry._FEATURES, "knobbed_feature", Knobbed)
    table = config_table()
    for key in ("aggregator.options.knob", "features.knobbed_feature.strength"):
        assert f'"{key}" = "{FROM_RECIPE}"' in table
    assert table != declared_table()  # the checked-in table would be reported stale


def test_stale_table_is_reported_and_regenerated(tmp_path: Path, capsys) -> None:
    text = PYPROJECT.read_text()
    table = declared_table()
    stale = table.replace('"federation.rounds" = "<recipe>"\n', "")
    assert stale != table
    copy = tmp_path / "pyproject.toml"
    copy.write_text(text.replace(table, stale))
    assert main(["--check", str(copy)]) == 1
    assert main([str(copy)]) == 0
    assert "regenerated" in capsys.readouterr().out
    assert declared_table(copy) == config_table()
    assert copy.read_text() == text.replace(table, config_table())  # the rest untouched


def test_run_config_overrides_the_named_recipe() -> None:
    cfg = app_recipe(
        run_config(
            "recipe='recipes/tiny.yaml' federation.rounds=5 lora.ranks='[8, 16]' "
            "federation.lr=1e-05 data.max_examples='null' name='flwr-x' "
            "privacy.secure_aggregation.enabled=false"
        )
    )
    assert cfg.federation.rounds == 5
    assert cfg.lora.ranks == [8, 16]
    assert cfg.federation.lr == 1e-05  # a TOML float reaches the recipe unchanged
    assert cfg.data.max_examples is None
    assert cfg.name == "flwr-x"
    # everything not given is the recipe's own value, not the schema default
    tiny = load_recipe(TINY)
    assert (
        cfg.model == tiny.model and cfg.federation.local_steps == tiny.federation.local_steps == 10
    )
    assert cfg.data.num_clients == 3 and cfg.data.max_length == 48  # tiny.yaml's (defaults: 4, 64)
    # by name, the same recipe
    assert app_recipe(run_config("recipe='tiny'")) == tiny


# the spellings an audit found Flower refused ("not present in the main dictionary")
AUDITED = {
    "output.trackers='[tensorboard]'": lambda c: c.output.trackers.names == ["tensorboard"],
    "data.test_set='{fraction: 0.1, labels: [noun.food]}'": lambda c: (
        c.data.test_set is not None
        and (c.data.test_set.fraction, c.data.test_set.labels) == (0.1, ["noun.food"])
        and c.data.test_set.max_examples == 1000  # the schema default
    ),
    "aggregator.options.oversample=16": lambda c: c.aggregator.options == {"oversample": 16},
    "features.fedprox.mu=0.01": lambda c: c.features == {"fedprox": {"mu": 0.01}},
}


@pytest.mark.parametrize("given", AUDITED)
def test_audited_spellings_pass_flower_and_reach_the_recipe(given: str) -> None:
    cfg = app_recipe(run_config(f"recipe='tiny' {given}"))  # run_config: Flower's own key check
    assert AUDITED[given](cfg)
    assert cfg.model_dump(exclude={"output", "data", "aggregator", "features"}) == load_recipe(
        TINY
    ).model_dump(exclude={"output", "data", "aggregator", "features"})


def test_audited_spellings_together_and_their_other_forms() -> None:
    cfg = app_recipe(run_config(" ".join(["recipe='tiny'", *AUDITED])))
    assert all(check(cfg) for check in AUDITED.values())
    assert "fedprox" in [f.name for f in feature_registry.active(cfg)]
    cfg = app_recipe(
        run_config(
            "recipe='tiny' output.trackers.mlflow.experiment='x' data.test_set.fraction=0.2 "
            "aggregator.options='{oversample: 8, power_iters: 3}' features.server_momentum='{}' "
            "features.fedprox='{mu: 0.1}' output.trackers.tensorboard='{}'"
        )
    )
    assert cfg.output.trackers.names == ["tensorboard", "mlflow"]
    assert cfg.output.trackers.mlflow is not None and cfg.output.trackers.mlflow.experiment == "x"
    assert cfg.data.test_set is not None and cfg.data.test_set.fraction == 0.2
    assert cfg.aggregator.options == {"oversample": 8, "power_iters": 3}
    assert cfg.features == {"server_momentum": {}, "fedprox": {"mu": 0.1}}  # '{}': the defaults
    cfg = app_recipe(run_config("recipe='recipes/fedprox.yaml' features.fedprox.mu=0.5"))
    assert cfg.features == {"fedprox": {"mu": 0.5}}
    cfg = app_recipe(run_config("recipe='tiny' lora.ranks.min=2 lora.ranks.max=8 adaptive='null'"))
    assert [cfg.client_rank(i) for i in range(3)] == [2, 4, 8] and cfg.adaptive is None


def test_a_section_and_its_keys_combine_from_a_run_config_file(tmp_path: Path) -> None:
    """A TOML file may give a section and its own keys (a `--run-config` string may not): the
    keys refine the section's mapping, whatever their order."""
    file = tmp_path / "rc.toml"
    file.write_text(
        "recipe = 'tiny'\n"
        "\"data.test_set.labels\" = '[noun.food]'\n"
        "\"data.test_set\" = '{fraction: 0.1, labels: [noun.animal]}'\n"
        "\"aggregator.options\" = '{oversample: 8, power_iters: 3}'\n"
        '"aggregator.options.oversample" = 4\n'
    )
    cfg = app_recipe(fuse_dicts(declared(), parse_config_args([str(file)]), check_keys=True))
    assert cfg.data.test_set is not None
    assert (cfg.data.test_set.fraction, cfg.data.test_set.labels) == (0.1, ["noun.food"])
    assert cfg.aggregator.options == {"oversample": 4, "power_iters": 3}
    with pytest.raises(click.ClickException):  # TOML: a key is a value or a table, not both
        parse_config_args(["recipe='tiny' data.test_set='{fraction: 0.1}' data.test_set.labels=1"])


def test_flower_refuses_undeclared_keys_and_lists() -> None:
    with pytest.raises(ValueError, match="rouns"):
        run_config("recipe='tiny' federation.rouns=2")
    with pytest.raises(ValueError, match="not present"):  # an option no aggregator has
        run_config("recipe='tiny' aggregator.options.oversampel=2")
    with pytest.raises(ValueError, match="needs to be of type"):  # a TOML list: quote it
        run_config("recipe='tiny' lora.ranks=[8,16]")


def test_bad_values_name_the_recipe_key() -> None:
    with pytest.raises(ConfigError, match=r"federation\.rounds"):
        app_recipe(run_config("recipe='tiny' federation.rounds=0"))
    with pytest.raises(ConfigError, match=r"recipe='quickstart'.*shipped recipes: .*tiny"):
        app_recipe(run_config("federation.rounds=2"))
    with pytest.raises(ConfigError, match="not a shipped recipe"):
        app_recipe(run_config("recipe='recipes/nope.yaml'"))


def test_recipe_sent_as_yaml_by_fedllm_run_federation(tmp_path: Path) -> None:
    """`fedllm run R --federation C` sends the resolved recipe as text; the same apps read it."""
    cfg = load_recipe(TINY, ["federation.rounds=4"])
    sent = parse_config_args([str(write_run_config(tmp_path / "rc.toml", cfg, resume=False))])
    assert app_recipe(fuse_dicts(declared(), sent)) == cfg
    with pytest.raises(ConfigError, match="not to a recipe sent as YAML text"):
        app_recipe({**fuse_dicts(declared(), sent), "federation.rounds": 2})


def test_flwr_run_names_the_simulation_settings_it_cannot_apply() -> None:
    """Under `flwr run .` Flower's simulation assigns each ClientApp's resources: a recipe's
    `simulation` section is named with the Flower command that would apply it, not dropped."""
    assert simulation_notice(load_recipe(TINY)) is None
    cfg = load_recipe(TINY, ["simulation.num_gpus_per_client=0.5"])
    notice = simulation_notice(cfg)
    assert notice is not None and notice.startswith("simulation.num_gpus_per_client=0.5: not ")
    assert "--client-resources-num-cpus 2 --client-resources-num-gpus 0.5" in notice


def test_a_deployment_warns_when_a_clients_weight_is_its_own_unbounded_claim() -> None:
    """Under example weighting with no data.max_examples one node's claim sets the global (h93):
    the deployment's server says so, naming the settings that bound it; bounded, it is quiet."""
    assert weight_notice(load_recipe(TINY)) is None  # tiny caps data.max_examples
    open_ = load_recipe(TINY, ["data.max_examples=null"])
    notice = weight_notice(open_)
    assert notice is not None
    assert "data.max_examples" in notice and "aggregator.weighting=uniform" in notice
    uniform = load_recipe(TINY, ["data.max_examples=null", "aggregator.weighting=uniform"])
    assert weight_notice(uniform) is None
    secagg = ["data.max_examples=null", "privacy.secure_aggregation.enabled=true"]
    notice = weight_notice(load_recipe(TINY, secagg))
    assert notice is not None and "up to SecAgg+'s default 100000" in notice
    bounded = [*secagg, "privacy.secure_aggregation.max_weight=500"]
    assert weight_notice(load_recipe(TINY, bounded)) is None


def test_a_submitted_run_never_overwrites_the_superlinks_checkpointed_run(tmp_path: Path) -> None:
    """On separate machines the submitter cannot see the SuperLink's run folder: the ServerApp
    itself refuses to start over a checkpoint unless the submitter said --resume or --overwrite
    (both travel in the run config); --overwrite deletes the old run's folder there."""
    from fedllm.server.checkpoint import save_checkpoint

    cfg = load_recipe(TINY, [f"output_dir={tmp_path}", "name=r"])
    check_server_run_dir(cfg, resume=False, overwrite=False)  # nothing there yet
    cfg.run_dir.mkdir(parents=True)
    save_checkpoint(cfg.run_dir, {"round": 2})
    with pytest.raises(ConfigError, match=r"already holds a run of this name.*--resume.*--overw"):
        check_server_run_dir(cfg, resume=False, overwrite=False)
    check_server_run_dir(cfg, resume=True, overwrite=False)
    stale = cfg.run_dir / "client_adapters" / "0"
    stale.mkdir(parents=True)
    check_server_run_dir(cfg, resume=False, overwrite=True)  # h107: the old run's files go
    assert not cfg.run_dir.exists()
    sent = write_run_config(tmp_path / "rc.toml", cfg, resume=False, overwrite=True)
    assert parse_config_args([str(sent)])["overwrite"] is True
    keep_recipe(cfg, resume=False)  # where the adapters are, for `fedllm eval RUN`
    assert load_recipe(cfg.run_dir / "recipe.yaml") == cfg


def test_simulation_size_must_match_the_recipe() -> None:
    cfg = load_recipe(TINY, ["data.num_clients=2"])
    check_simulation_size(2, cfg)
    check_simulation_size(None, cfg)  # not a simulation: nodes may join over time
    with pytest.raises(ConfigError) as err:
        check_simulation_size(3, cfg)
    assert 'num-supernodes=2"' in str(err.value) and "data.num_clients=3" in str(err.value)


def test_fab_of_the_checkout_is_the_code_free_wrapper() -> None:
    """Flower's FAB rules on the checkout's files (what `flwr run .` and `flwr build` apply), with
    a run folder, a venv and code added: only pyproject.toml and README.md go in, and a fedllm
    SuperNode accepts the result."""
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    files = {name: ROOT / name for name in tracked if (ROOT / name).is_file()}
    files |= {
        "runs/tiny/metrics.jsonl": b"{}\n",
        "runs/tiny/recipe.yaml": b"name: tiny\n",
        ".venv/lib/python3.11/site-packages/x.py": b"",
        "notes.md": b"scratch\n",
    }
    fab, _ = build_fab_from_files(files)
    with zipfile.ZipFile(BytesIO(fab)) as z:
        assert sorted(z.namelist()) == [".info/CONTENT", "README.md", "pyproject.toml"]
        shipped = tomli.loads(z.read("pyproject.toml").decode())
    check_fab(fab)  # what `fedllm node` checks before running a run's ClientApp
    assert flatten_dict(shipped["tool"]["flwr"]["app"]["config"]) == declared()
    assert len(fab) < 64 * 1024


# -- one real `flwr run .` ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_superlink_groups(port: int) -> set[int]:
    """Process groups of the local SuperLink `flwr run` started detached on `port` (and of the
    SuperExec it started, which holds the simulation and its Ray workers)."""
    marks = (f"--port {port} ", f"--runtime-api-address 127.0.0.1:{port} ")
    groups = set()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            if any(m in cmd for m in marks) and "flower-super" in cmd:
                groups.add(os.getpgid(int(proc.name)))
        except (OSError, ProcessLookupError):
            continue
    return groups


def stop_groups(groups: set[int], *, grace: float = 10.0) -> None:
    """SIGTERM each process group, then SIGKILL what is left after `grace` (Ray workers)."""
    for group in groups:
        os.killpg(group, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for group in groups:
        try:
            while time.monotonic() < deadline:
                os.killpg(group, 0)  # raises once no process of the group is left
                time.sleep(0.2)
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            continue


@pytest.mark.slow
def test_flwr_run_dot_runs_the_recipe_in_flowers_simulation(tmp_path: Path) -> None:
    home, port = tmp_path / "flwr_home", free_port()
    env = {
        **flwr_env(),  # includes FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
        "FLWR_HOME": str(home),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(port),
        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
    }
    overrides = (
        f"recipe='recipes/tiny.yaml' output_dir='{tmp_path / 'runs'}' name='flwr' "
        "data.num_clients=2 federation.rounds=1 federation.local_steps=2 lora.ranks='[2, 4]' "
        "data.max_examples=200"
    )
    cmd = ["flwr", "run", ".", "--run-config", overrides]
    cmd += ["--federation-config", "num-supernodes=2", "--stream"]
    t0 = time.monotonic()
    try:
        out = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False
        )
        seconds = time.monotonic() - t0
        log = out.stdout + out.stderr
        assert out.returncode == 0, log[-3000:]
        run_id = log.split("Successfully started run ")[1].split()[0]
        listed = subprocess.run(
            ["flwr", "ls", "local", "--run-id", run_id, "--format", "json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        stop_groups(local_superlink_groups(port))
    assert json.loads(listed.stdout)["runs"][0]["status"] == "finished:completed", log[-3000:]
    print(f"flwr run . took {seconds:.0f} s")

    run_dir = tmp_path / "runs" / "flwr"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    clients = [r for r in rows if r["kind"] == "client"]
    assert sorted((r["round"], r["partition"], r["rank"]) for r in clients) == [
        (1, 0, 2),
        (1, 1, 4),
    ]
    assert all(r["status"] == "ok" and r["steps"] == 2 for r in clients)
    assert sorted(r["round"] for r in rows if r["kind"] == "server") == [0, 1]
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    assert recipe["federation"]["rounds"] == 1 and recipe["lora"]["ranks"] == [2, 4]
    assert recipe["model"]["tiny"]["hidden_size"] == 64  # from tiny.yaml, not overridden
    assert (run_dir / "final_adapter" / "adapter_config.json").is_file()
    # what Flower installed of the app: only the wrapper, never runs/, .venv or code
    (app,) = (home / "apps").iterdir()
    assert sorted(p.name for p in app.rglob("*") if p.is_file()) == ["README.md", "pyproject.toml"]


@pytest.mark.parametrize("content", ["aws_access_key_id = AKIAEXAMPLE\n", "a: [unclosed\n"])
def test_a_node_never_sends_back_what_a_recipe_path_on_its_disk_holds(
    tmp_path: Path, content: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The server names the recipe, and a name may be any path on the node: the load error the
    node replies with says only that it did not load (not the file's text, not whether the path
    exists); the node's own log has the reason."""
    import logging

    from flwr.app import Context, RecordDict

    from fedllm.deploy.apps import _recipe

    secret = tmp_path / "credentials"
    secret.write_text(content)
    messages = []
    for path in (secret, tmp_path / "missing.yaml"):
        context = Context(0, 1, {}, RecordDict(), {"recipe": str(path)})
        with caplog.at_level(logging.ERROR, logger="fedllm.client"):
            with pytest.raises(ConfigError) as err:
                _recipe(context)
        messages.append(str(err.value))
        assert err.value.__cause__ is None and err.value.__suppress_context__
    assert (
        messages[0] == messages[1] and "AKIA" not in messages[0] and "unclosed" not in messages[0]
    )
    assert "did not load on this node" in messages[0]
    assert str(secret) in caplog.text or "credentials" in caplog.text  # the node's own log


def test_an_installed_plugin_leaves_the_declared_table_as_it_is(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A plugin's aggregator or feature is not fedllm's: the table fedllm's pyproject declares
    (and `--check` compares) is the same on a machine that has one."""
    from pydantic import BaseModel

    from fedllm.features import registry as features
    from fedllm.features.base import Feature

    before = config_table()
    monkeypatch.setitem(
        aggregator_registry._REGISTRY, "plugin_agg", lambda updates, weights, *, knob=1, **kw: None
    )
    spec = aggregator_registry.ADAPTER_STATE
    monkeypatch.setitem(aggregator_registry._ROUNDS, "plugin_agg", spec)

    class PluginOptions(BaseModel):
        level: int = 1

    plugin = type("PluginFeature", (Feature,), {"name": "plugin_f", "Options": PluginOptions})
    plugin.__module__ = "myfed.feature"
    monkeypatch.setattr(features, "_FEATURES", {**features.discover(), "plugin_f": plugin})
    assert "plugin_agg" in aggregator_registry.available()
    assert config_table() == before
    assert main(["--check"]) == 0
