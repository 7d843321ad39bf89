"""A deployed node's checks: its data path, an empty shard, a different base model or recipe."""

from __future__ import annotations

import inspect
import io
import json
import sys
from pathlib import Path

import pytest
from flwr.common.config import parse_config_args

from fedllm.cli import main
from fedllm.client.node_config import (
    check_app_source,
    check_node,
    local_recipe,
    node_shard,
    recipe_from_run_config,
)
from fedllm.deploy.app_check import check_fab
from fedllm.deploy.federation import superlink_command, supernode_command
from fedllm.deploy.guard import OperatorOnly, guard_bin, guard_clientapp_runtime
from fedllm.deploy.submit import write_app, write_run_config
from fedllm.launch import absolute_paths
from fedllm.recipe import load_recipe

RECIPE = Path(__file__).parents[1] / "recipes" / "tiny.yaml"


@pytest.fixture
def cfg():
    return load_recipe(RECIPE, ["federation.rounds=1"])


def test_recipe_round_trips_through_the_run_config(cfg, tmp_path) -> None:
    import tomllib

    path = write_run_config(tmp_path / "rc.toml", cfg, resume=True)
    run_config = tomllib.loads(path.read_text())
    assert run_config["resume"] is True
    again = recipe_from_run_config(run_config)
    assert again == cfg and again.fingerprint() == cfg.fingerprint()


def test_missing_run_config_recipe_says_how_to_submit() -> None:
    with pytest.raises(ValueError, match="fedllm run RECIPE --federation"):
        recipe_from_run_config({"resume": False})


def test_other_base_model_is_refused_naming_both(cfg) -> None:
    with pytest.raises(ValueError, match=r"base model mismatch.*'tiny'.*'smollm2-135m'"):
        check_node(cfg, {"partition-id": 0, "model": "smollm2-135m"})
    check_node(cfg, {"partition-id": 0, "model": "tiny"})  # the same model passes


def test_other_recipe_hash_is_refused_naming_both(cfg) -> None:
    other = "ab" * 32
    with pytest.raises(ValueError, match=rf"recipe hash mismatch.*{cfg.recipe_hash()}.*{other}"):
        check_node(cfg, {"partition-id": 0, "recipe-hash": other})
    check_node(cfg, {"partition-id": 0, "recipe-hash": cfg.recipe_hash()})


def test_a_short_recipe_hash_pin_is_refused(cfg) -> None:
    """12 hex digits are 48 bits, and `seed` is free: a submitter could search seeds for a
    weaker recipe with the same fingerprint (audit h90 matched 20 bits in 1.4 s on a CPU). A
    node pins the whole hash; the old short pin is refused, naming the fix."""
    assert len(cfg.recipe_hash()) == 64 and len(cfg.fingerprint()) == 12
    with pytest.raises(ValueError, match="give the whole 64-digit hash"):
        check_node(cfg, {"partition-id": 0, "recipe-hash": cfg.fingerprint()})


def test_unknown_node_config_key_is_named(cfg) -> None:
    with pytest.raises(ValueError, match=r"\['data_path'\].*data-path"):
        check_node(cfg, {"partition-id": 0, "data_path": "/x"})


def test_missing_data_path_names_the_key(cfg, tmp_path) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match=r"data-path=.*nope\.jsonl.*no such file"):
        node_shard(cfg, {"partition-id": 1, "data-path": str(missing)}, tokenizer=None)


def test_data_path_is_a_one_client_federation_of_its_own(cfg, tmp_path) -> None:
    path = tmp_path / "org.jsonl"
    path.write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n")
    local, part = local_recipe(cfg, {"partition-id": 2, "data-path": str(path)})
    assert part == 0 and local.data.num_clients == 1 and local.data.source == str(path)
    assert local_recipe(cfg, {"partition-id": 2}) == (cfg, 2)


def test_empty_data_file_is_reported_by_name(cfg, tmp_path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(ValueError, match=r"data-path=.*empty\.jsonl.*the file is empty"):
        node_shard(cfg, {"partition-id": 0, "data-path": str(path)}, tokenizer=None)


def test_supernode_needs_tls_and_key_unless_insecure(capsys) -> None:
    with pytest.raises(ValueError, match="--root-certificates"):
        supernode_command(superlink="127.0.0.1:1", partition_id=0, port=2)
    cmd = supernode_command(superlink="127.0.0.1:1", partition_id=0, port=2, insecure=True)
    assert "--insecure" in cmd and "WARNING: insecure" in capsys.readouterr().err
    cmd = supernode_command(
        superlink="h:1",
        partition_id=3,
        port=2,
        rank=4,
        data_path="/d.jsonl",
        root_certificates=Path("ca.crt"),
        auth_key=Path("k"),
    )
    assert cmd[cmd.index("--node-config") + 1] == 'partition-id=3 data-path="/d.jsonl" rank=4'
    assert "--auth-supernode-private-key" in cmd and "--insecure" not in cmd


# -- what a node pins, and which app it runs -------------------------------------------------------


def test_a_pinned_recipe_hash_covers_secagg_and_the_budget(cfg) -> None:
    """A node pinning the fingerprint of a SecAgg+ DP recipe refuses the same recipe without
    SecAgg+, with a larger ε budget, or without DP."""
    agreed = cfg.model_copy(
        update={
            "aggregator": cfg.aggregator.model_copy(update={"name": "ffa"}),
            "privacy": cfg.privacy.model_validate(
                {
                    "mode": "sample",
                    "noise_multiplier": 1.0,
                    "epsilon_budget": 4.0,
                    "secure_aggregation": {"enabled": True},
                }
            ),
        }
    )
    node = {"partition-id": 0, "recipe-hash": agreed.recipe_hash()}
    check_node(agreed, node)
    p, secagg = agreed.privacy, agreed.privacy.secure_aggregation
    weaker = [
        p.model_copy(update={"secure_aggregation": secagg.model_copy(update={"enabled": False})}),
        p.model_copy(update={"epsilon_budget": 40.0}),
        p.model_copy(update={"secure_aggregation": secagg.model_copy(update={"num_shares": 3})}),
        type(p)(),
    ]
    for privacy in weaker:
        with pytest.raises(ValueError, match="recipe hash mismatch"):
            check_node(agreed.model_copy(update={"privacy": privacy}), node)


def test_the_pinned_hash_covers_what_sets_epsilon_not_where_the_server_writes(cfg) -> None:
    """h106: the pin covered model, LoRA, data, seed and privacy only, so a pinned node under
    client-level DP trained 300 rounds at 40 clients per round (planned ε 8.1 → 1739) under
    the hash it agreed to. Every setting but the server's own (name, output_dir, simulation,
    output) is pinned now; the fingerprint a resume keeps is unchanged by them."""
    node = {"partition-id": 0, "recipe-hash": cfg.recipe_hash()}
    fed, agg = cfg.federation, cfg.aggregator
    changed = [
        {"federation": fed.model_copy(update={"rounds": fed.rounds * 100})},
        {"federation": fed.model_copy(update={"local_steps": fed.local_steps + 1})},
        {"aggregator": agg.model_copy(update={"weighting": "uniform"})},
        {"features": {"personal_adapter": {}}},
    ]
    for update in changed:
        other = cfg.model_copy(update=update)
        assert other.fingerprint() == cfg.fingerprint()
        with pytest.raises(ValueError, match="recipe hash mismatch"):
            check_node(other, node)
    server_only = {"name": "elsewhere", "output_dir": "/srv/runs"}
    check_node(cfg.model_copy(update=server_only), node)


def test_node_privacy_keys_are_node_config_keys(cfg) -> None:
    rules = {"require-secagg": True, "max-epsilon": 8, "min-noise": 1}
    with pytest.raises(ValueError, match="this node refuses the run"):  # known keys, a weak recipe
        check_node(cfg, {"partition-id": 0, **rules})
    cmd = supernode_command(
        superlink="h:1",
        partition_id=0,
        port=2,
        require_secagg=True,
        max_epsilon=8.0,
        min_noise=0.5,
        personal_dir="/srv/org1",
        insecure=True,
    )
    pairs = cmd[cmd.index("--node-config") + 1]
    assert pairs == (
        'partition-id=0 require-secagg=true max-epsilon=8.0 min-noise=0.5 personal-dir="/srv/org1"'
    )


def test_started_superlinks_and_supernodes_go_through_fedllm_guards() -> None:
    link = superlink_command(port=9093, database=Path("s.db"), host="0.0.0.0", certs=Path("c"))
    node = supernode_command(
        superlink="h:1", partition_id=0, port=2, root_certificates=Path("ca"), auth_key=Path("k")
    )
    for cmd, role in ((link, "superlink"), (node, "supernode")):
        assert cmd[:4] == [sys.executable, "-m", "fedllm.deploy.federation", role]
        assert not any(a.startswith(("flower-", "--isolation", "--allow-runtime")) for a in cmd)
    assert "--disable-runtime-dependency-installation" in link and "--enable-supernode-auth" in link
    with pytest.raises(ValueError, match=r"0\.0\.0\.0:9095.*specific IP address"):
        superlink_command(
            port=1, database=Path("s"), insecure=True, operator_address="0.0.0.0:9095"
        )
    cmd = superlink_command(
        port=1, database=Path("s"), insecure=True, operator_address="10.8.0.1:9095"
    )
    assert cmd[cmd.index("--operator-address") + 1] == "10.8.0.1:9095"


def call(app, path: str, *, client: str, server: tuple[str, int] = ("192.0.2.2", 9093)) -> int:
    """The HTTP status of one request through an ASGI app, from `client` to `server`."""
    import asyncio

    scope = {"type": "http", "path": path, "method": "POST", "headers": []}
    scope |= {"client": (client, 40000), "server": server}
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return next(m["status"] for m in sent if m["type"] == "http.response.start")


async def flower(scope, receive, send) -> None:
    """Stands for Flower's SuperLink app: answers 200 to anything that reaches it."""
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b""})


def test_control_and_runtime_apis_answer_only_loopback_and_the_operator() -> None:
    app = OperatorOnly(flower, operator=[("10.8.0.1", 9095)])
    for path in ("/v1/control/start-run", "/v1/control/register-node", "/v1/runtime/push-messages"):
        assert call(app, path, client="203.0.113.9") == 403
        assert call(app, path, client="::ffff:203.0.113.9") == 403
        assert call(app, "/docs", client="203.0.113.9") == 403
        assert call(app, path, client="127.0.0.1") == 200
        assert call(app, path, client="::1") == 200
        # the operator listener, and only it
        assert call(app, path, client="10.8.0.7", server=("10.8.0.1", 9095)) == 200
        assert call(app, path, client="10.8.0.7", server=("10.8.0.1", 9093)) == 403
    for path in ("/v1/fleet/pull-messages", "/v1/fleet/get-fab", "/health"):
        assert call(app, path, client="203.0.113.9") == 200


def fab(files: dict[str, str]) -> bytes:
    """A FAB as Flower builds it from a folder holding `files`."""
    import tempfile

    from flwr.cli.build import build_fab_from_disk

    with tempfile.TemporaryDirectory() as tmp:
        for name, text in files.items():
            (Path(tmp) / name).parent.mkdir(parents=True, exist_ok=True)
            (Path(tmp) / name).write_text(text)
        return build_fab_from_disk(Path(tmp))


def fedllm_fab(tmp_path: Path) -> bytes:
    from flwr.cli.build import build_fab_from_disk

    return build_fab_from_disk(write_app(tmp_path / "app"))


def foreign_fabs(tmp_path: Path) -> dict[str, bytes]:
    """Apps a node must not run: code in the FAB, another ClientApp, fedllm's name over code."""
    ours = (write_app(tmp_path / "ours") / "pyproject.toml").read_text()
    other = ours.replace("fedllm.deploy.apps:client_app", "evil.apps:client_app")
    return {
        "code": fab({"pyproject.toml": other, "evil/apps.py": "client_app = None\n"}),
        "other components, no code": fab({"pyproject.toml": other}),
        "fedllm's components over code": fab(
            {"pyproject.toml": ours, "fedllm/deploy/apps.py": "client_app = None\n"}
        ),
    }


def test_only_fedllms_own_app_passes_the_fab_check(tmp_path) -> None:
    check_fab(fedllm_fab(tmp_path))
    for content in foreign_fabs(tmp_path).values():
        with pytest.raises(ValueError, match=r"this node runs only .*fedllm"):
            check_fab(content)
    with pytest.raises(ValueError, match="not a FAB"):
        check_fab(b"not a zip")


def test_the_guarded_clientapp_process_runs_the_installed_fedllm(tmp_path, monkeypatch) -> None:
    import flwr.supernode.runtime.run_clientapp as runtime

    from fedllm.deploy import apps

    monkeypatch.setattr(runtime, "install_from_fab", runtime.install_from_fab)  # restored after
    monkeypatch.setattr(runtime, "get_load_client_app_fn", runtime.get_load_client_app_fn)
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "home"))
    guard_clientapp_runtime(runtime, apps.client_app)
    runtime.install_from_fab(fedllm_fab(tmp_path), skip_prompt=True)
    assert not (tmp_path / "home").exists()  # nothing of the FAB was written
    load = runtime.get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
    assert load("evil/evil-app", "1.0.0", "0" * 64) is apps.client_app
    for content in foreign_fabs(tmp_path).values():
        with pytest.raises(ValueError, match="this node runs only"):
            runtime.install_from_fab(content, skip_prompt=True)


def test_a_fedllm_node_starts_no_other_app_process(tmp_path) -> None:
    import subprocess

    folder = guard_bin(tmp_path)
    text = (folder / "flwr-clientapp").read_text()
    assert "-m fedllm.deploy.guard clientapp" in text and sys.executable in text
    for name in ("flwr-serverapp", "flwr-agentapp", "flwr-simulation"):
        out = subprocess.run([folder / name], capture_output=True, text=True, check=False)
        assert out.returncode == 1 and "runs only fedllm's installed ClientApp" in out.stderr
    assert guard_bin(tmp_path) == folder  # written in place, no new folder per start


def test_the_client_app_refuses_a_foreign_app_flower_put_on_its_path(tmp_path, monkeypatch) -> None:
    import zipfile

    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    apps = tmp_path / "apps"
    ours, theirs = apps / "fedllm.fedllm-app.0.1.abc", apps / "evil.evil-app.1.0.def"
    zipfile.ZipFile(io.BytesIO(fedllm_fab(tmp_path))).extractall(ours)
    zipfile.ZipFile(io.BytesIO(foreign_fabs(tmp_path)["code"])).extractall(theirs)
    check_app_source([str(ours), "/somewhere/else"])
    with pytest.raises(
        ValueError, match=r"evil/apps\.py: this node runs only its installed fedllm"
    ):
        check_app_source([str(theirs)])


def test_node_flags_personal_dir_and_device_reach_the_node_config(tmp_path, monkeypatch) -> None:
    """`fedllm node --personal-dir` is how an organisation keeps what its client must not leave
    in the run directory (docs/security.md): the absolute folder, as Flower parses the config;
    the device flags are the node config keys of an emulated device (docs/constrained.md)."""
    started: list[list[str]] = []
    monkeypatch.setattr("os.execvpe", lambda path, cmd, env: started.append(cmd))
    monkeypatch.chdir(tmp_path)
    argv = ["node", "--superlink", "127.0.0.1:9093", "--partition-id", "1", "--insecure"]
    assert main([*argv, "--personal-dir", "org1"]) == 1  # exec replaced: "not reached"
    device = ["--threads", "1", "--slowdown", "2.5", "--memory-mb", "900"]
    assert main([*argv, *device]) == 1
    first, second = (parse_config_args([c[c.index("--node-config") + 1]]) for c in started)
    assert first == {"partition-id": 1, "personal-dir": str(tmp_path / "org1")}
    assert second == {"partition-id": 1, "threads": 1, "slowdown": 2.5, "memory-mb": 900.0}


def test_validate_prints_the_hash_a_node_pins(tmp_path, capsys) -> None:
    """`fedllm validate` prints the recipe-hash the submitted run carries (data paths resolved
    as `fedllm run` resolves them), and a node pinning it accepts that run."""
    data = tmp_path / "mine.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n' * 40)
    overrides = [f"data.source={data}", f"output_dir={tmp_path}"]
    assert main(["validate", "--config-only", "recipes/tiny.yaml", *overrides]) == 0
    printed = capsys.readouterr().out.split("recipe-hash ")[1].split()[0]
    submitted = absolute_paths(load_recipe("recipes/tiny.yaml", overrides))
    check_node(submitted, {"partition-id": 0, "recipe-hash": printed})
    with pytest.raises(ValueError, match="fedllm validate RECIPE"):
        check_node(submitted, {"partition-id": 0, "recipe-hash": "0" * 12})


def test_superlink_needs_certificates_unless_insecure(capsys) -> None:
    """`fedllm superlink` refuses to start without its TLS files (docs/security.md)."""
    assert main(["superlink", "--ssl-certfile", "server.pem"]) == 2
    err = capsys.readouterr().err
    assert "needs --ssl-ca-certfile, --ssl-certfile and --ssl-keyfile" in err
    assert "--insecure" in err


def test_a_nodes_privacy_rules_hold_for_every_message_not_only_training(cfg) -> None:
    """h106: the rules were checked when training began, so a node with require-secagg or
    max-epsilon still evaluated (and answered queries for) a recipe without them, sending its
    held-out loss and any data error's text in the clear. `check_node`, which every handler
    runs first (train, evaluate, query), refuses it."""
    from fedllm.deploy import apps

    assert not cfg.privacy.secure_aggregation.enabled and cfg.privacy.mode == "none"
    for rule in ({"require-secagg": True}, {"max-epsilon": 8}):
        with pytest.raises(ValueError, match="this node refuses the run"):
            check_node(cfg, {"partition-id": 0, **rule})
    for handler in (apps._train, apps._evaluate, apps._introduce):
        assert "check_node(cfg, context.node_config)" in inspect.getsource(handler)
