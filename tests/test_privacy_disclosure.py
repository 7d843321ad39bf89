"""Every key that leaves a client, in each mode, against the table in docs/privacy.md ("What leaves
a client"): a federation per mode, a spy on every reply, and nothing sent that the table does not
list for that mode. Also: a private run saves no per-client result."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, Context, Message

from fedllm.client.app import make_client_app
from fedllm.deploy.local_grid import LocalGrid, server_identity
from fedllm.model.packing import unpack
from fedllm.recipe import load_recipe
from fedllm.server.app import run_server
from fedllm.server.metrics import MetricsLog

ROOT = Path(__file__).parents[1]
TABLE_ROW = re.compile(r"^\| (train|evaluate|query) \| ([^|]+?) \|" + r" ([^|]+) \|" * 4)
MODES = ("none", "sample", "client", "secagg")
ARRAYS = {  # the table's wording -> the key a reply carries
    "update (LoRA factors)": "update",
    "kept (pruning map)": "kept",
    "SecAgg+ protocol (keys, shares, status)": "secagg-protocol",
}


def table() -> dict[str, set[tuple[str, str]]]:
    """mode -> {(message, key)} the docs allow to be sent (any cell but '—')."""
    allowed: dict[str, set[tuple[str, str]]] = {m: set() for m in MODES}
    text = (ROOT / "docs" / "privacy.md").read_text()
    for line in text.splitlines():
        if m := TABLE_ROW.match(line):
            message, key, *cells = (x.strip() for x in m.groups())
            for mode, cell in zip(MODES, cells, strict=True):
                if cell != "—":
                    allowed[mode].add((message, ARRAYS.get(key, key)))
    return allowed


class Spy:
    """The ClientApp, recording (message type, key) of everything each reply carries."""

    def __init__(self, app) -> None:
        self.app, self.sent = app, set()

    def __call__(self, msg: Message, context: Context) -> Message:
        out = self.app(msg, context)
        if not out.has_error():
            kind = msg.metadata.message_type
            # packed arrays (fedllm.model.packing) counted as the records they carry; the layout
            # names the same arrays, dtypes and shapes as unpacked Flower arrays would
            for name, record in unpack(out.content).items():
                self.sent |= {(kind, k) for k in keys_of(name, record)}
        return out


def keys_of(name: str, record) -> list[str]:
    """The table's keys a reply record carries. Under SecAgg+ Flower's mod sends the reply as
    FitRes records (its arrays emptied) and the masked update in its own protocol record."""
    if isinstance(record, ArrayRecord):
        return [name] if len(record) else []
    if name == "secaggplus_configs":
        return ["update" if k == "masked_params" else "secagg-protocol" for k in record]
    return {"fitres.num_examples": ["num-examples"], "fitres.status": ["secagg-protocol"]}.get(
        name, list(record)
    )


def test_the_table_lists_every_mode() -> None:
    allowed = table()
    assert all(("train", "update") in allowed[m] for m in MODES)
    assert ("train", "train-loss") not in allowed["sample"] | allowed["client"] | allowed["secagg"]


def test_the_secagg_column_allows_what_a_secagg_client_sends_in_the_clear() -> None:
    """test_secagg checks a SecAgg+ client's clear metrics (its real reply, through Flower's
    SecAgg+ mod) against its CLEAR set; the docs' column must allow every one of them."""
    from test_secagg import CLEAR

    sent = {("train", k) for k in CLEAR | {"update"}}
    assert not sent - table()["secagg"], sent - table()["secagg"]


CLIENT = [
    "privacy.mode=client",
    "privacy.client_noise_multiplier=1.0",
    "aggregator.weighting=uniform",
    "privacy.delta=1e-3",
]
RUNS = {  # a federation per run: (the table's column, its privacy overrides)
    "none": ("none", []),
    "sample": ("sample", ["privacy.mode=sample", "privacy.noise_multiplier=1.0"]),
    "client": ("client", CLIENT),
    "client-noise-at-client": ("client", [*CLIENT, "privacy.noise_at=client"]),
    "secagg": ("secagg", ["privacy.secure_aggregation.enabled=true"]),
    # the keys only some aggregators and features send (a helper's audit found two missing)
    "none-prelort": ("none", ["aggregator.name=prelort"]),
    "none-sdflora": ("none", ["aggregator.name=sdflora"]),
    "sample-pruned": (
        "sample",
        [
            "privacy.mode=sample",
            "privacy.noise_multiplier=1.0",
            "lora.ranks=null",
            "lora.tiers=[{name: a, rank: 4, clients: 2}, {name: b, rank: 4, clients: 1, "
            "pruning: 0.5}]",
            "pruning.importance=magnitude",
        ],
    ),
    # personal tuning's loss goes out only where the run promises no privacy
    "none-tuning": ("none", ["features.personal_tuning.lr=0.001"]),
    "sample-tuning": (
        "sample",
        [
            "privacy.mode=sample",
            "privacy.noise_multiplier=1.0",
            "features.personal_tuning.lr=0.001",
        ],
    ),
}
ONLY = {  # keys a run must send, beyond every run's update: the rows it exists for
    "none-prelort": {("train", "prelort-truncation-mean")},
    "none-sdflora": {("train", "sdflora-local-rank")},
    "sample-pruned": {("train", "kept")},
    "none-tuning": {("evaluate", "tuned-loss")},
}


@pytest.mark.slow
@pytest.mark.parametrize("run", sorted(RUNS))
def test_every_key_a_client_sends_is_in_the_table(
    tmp_path: Path, run: str, capsys: pytest.CaptureFixture[str]
) -> None:
    mode, privacy = RUNS[run]
    overrides = [f"output_dir={tmp_path}", f"name={run}", "data.num_clients=3"]
    overrides += ["data.max_examples=150", "federation.rounds=1", "federation.local_steps=2"]
    cfg = load_recipe(ROOT / "recipes" / "tiny.yaml", [*overrides, *privacy])
    spy = Spy(make_client_app(cfg))
    grid = LocalGrid(spy, cfg.data.num_clients)
    with server_identity(grid.run.run_id):
        run_dir = run_server(grid, cfg)
    unexpected = spy.sent - table()[mode]
    assert not unexpected, f"sent in mode {mode} but not allowed by docs/privacy.md: {unexpected}"
    assert {("train", "update"), ("query", "partition-id"), *ONLY.get(run, ())} <= spy.sent
    rows = MetricsLog(run_dir).read()
    private = mode != "none"
    assert (run_dir / "client_adapters").exists() is not private
    assert any(r["kind"] == "eval" for r in rows) is not private
    if private:
        clients = [r for r in rows if r["kind"] == "client"]
        assert clients and all(r.get("train_loss") is None for r in clients)
        assert not any("dp_update_norm_median" in r for r in rows)
    # the progress lines: per-client held-out losses only where the files have them too
    evals = [x for x in capsys.readouterr().out.splitlines() if " eval: client " in x]
    assert evals and all(("held-out loss" in x) is not private for x in evals), evals


def test_a_failing_client_in_a_private_run_sends_only_its_errors_type(caplog) -> None:
    """Flower sends a failed handler's error text and traceback to the server; a loader's error
    quotes a training row (audit h87). In a private run only the type leaves the client."""
    from types import SimpleNamespace

    from fedllm.client.app import quiet_failure

    row = "rows.jsonl line 7: 'response' is a dict, not text: {'diagnosis': 'secret'}"
    private = SimpleNamespace(privacy=SimpleNamespace(private=True))
    with pytest.raises(RuntimeError) as err, quiet_failure(private, "training"):
        raise ValueError(row)
    said = str(err.value)
    assert "ValueError" in said and "secret" not in said and err.value.__cause__ is None
    assert err.value.__suppress_context__  # the traceback does not chain the original either
    assert "secret" in caplog.text  # the node's own log keeps it
    open_run = SimpleNamespace(privacy=SimpleNamespace(private=False))
    with pytest.raises(ValueError, match="secret"), quiet_failure(open_run, "training"):
        raise ValueError(row)


def test_the_installed_client_app_sends_a_private_runs_errors_as_their_type(monkeypatch) -> None:
    """SuperNodes run `fedllm.deploy.apps:client_app`, not the simulation's app (audit h89):
    its handlers hide a failure's text too, and let a node's refusal by its own rules through."""
    from fedllm.client import app as client
    from fedllm.deploy import apps
    from fedllm.errors import NodeRefusal

    private = load_recipe("recipes/dp.yaml")
    monkeypatch.setattr(apps, "client_app_process", lambda **kw: None)
    monkeypatch.setattr(apps, "_recipe", lambda context: private)
    monkeypatch.setattr(apps, "check_node", lambda cfg, node_config: None)

    def leaky(*args, **kw):
        raise ValueError("row 7: {'diagnosis': 'secret'}")

    monkeypatch.setattr(client, "train", leaky)
    monkeypatch.setattr(client, "evaluate", leaky)
    context = Context(run_id=1, node_id=1, node_config={}, state=None, run_config={})
    for handler in (apps._train, apps._evaluate):
        with pytest.raises(RuntimeError) as err:
            handler(None, context)
        assert "ValueError" in str(err.value) and "secret" not in str(err.value)

    def refuse(cfg, node_config):
        raise NodeRefusal("this node refuses the run (node config max-epsilon=4): ε 8")

    monkeypatch.setattr(apps, "check_node", refuse)
    with pytest.raises(NodeRefusal, match="max-epsilon=4"):
        apps._train(None, context)
