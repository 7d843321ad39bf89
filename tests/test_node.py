"""A deployed node's checks: its data path, an empty shard, a different base model or recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedllm.client.node_config import check_node, local_recipe, node_shard, recipe_from_run_config
from fedllm.deploy.federation import supernode_command, write_run_config
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
    with pytest.raises(ValueError, match=rf"recipe hash mismatch.*{cfg.fingerprint()}.*abc123"):
        check_node(cfg, {"partition-id": 0, "recipe-hash": "abc123"})
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
