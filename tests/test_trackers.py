"""Experiment trackers fed by the one metrics writer: each sink leaves something a person can open
(TensorBoard event files, an MLflow store, a W&B offline run), with step = round; nothing is
imported unless the recipe asks; a missing package names the pip extra."""

from __future__ import annotations

import importlib.util
import json
import logging
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from fedllm.cli import main
from fedllm.recipe import load_recipe
from fedllm.server.metrics import MetricsLog
from fedllm.server.trackers import IDS, open_trackers, scalars_by_round

RECIPE = Path(__file__).parents[1] / "recipes" / "tiny.yaml"

ROWS = {  # what a 2-round run of 2 clients writes, round by round (one write per round)
    0: [
        {"kind": "eval", "round": 0, "partition": 0, "held_out_loss": 5.0},
        {"kind": "eval", "round": 0, "partition": 1, "held_out_loss": 6.0},
        {"kind": "server", "round": 0, "phase": "evaluate", "held_out_loss": 5.5},
    ],
    1: [
        {
            "kind": "client",
            "round": 1,
            "partition": 0,
            "status": "ok",
            "train_loss": 4.0,
            "rank": 2,
        },
        {
            "kind": "client",
            "round": 1,
            "partition": 1,
            "status": "ok",
            "train_loss": 4.5,
            "rank": 4,
        },
        {
            "kind": "server",
            "round": 1,
            "phase": "round",
            "held_out_loss": 4.75,
            "clients_ok": 2,
            "private": False,
        },
    ],
    2: [
        {"kind": "server", "round": 2, "phase": "round", "held_out_loss": 4.25, "clients_ok": 2},
        {"kind": "stop", "round": 2, "reason": "budget"},
    ],
}
SERVER_LOSS = [(0, 5.5), (1, 4.75), (2, 4.25)]


def config(tmp_path: Path, trackers: str):
    return load_recipe(RECIPE, [f"output_dir={tmp_path}", "name=t", f"output.trackers={trackers}"])


def write_run(cfg) -> MetricsLog:
    log = MetricsLog(cfg.run_dir, sinks=open_trackers(cfg))
    for rnd in sorted(ROWS):
        log.write(ROWS[rnd])
    log.close()
    return log


def test_rows_become_scalars_per_round_by_hand() -> None:
    rows = [row for rnd in sorted(ROWS) for row in ROWS[rnd]]
    assert scalars_by_round(rows) == {
        0: {
            "client_0/held_out_loss": 5.0,
            "client_1/held_out_loss": 6.0,
            "server/held_out_loss": 5.5,
        },
        1: {
            "client_0/train_loss": 4.0,
            "client_0/rank": 2.0,
            "client_1/train_loss": 4.5,
            "client_1/rank": 4.0,
            "server/held_out_loss": 4.75,
            "server/clients_ok": 2.0,
        },
        2: {"server/held_out_loss": 4.25, "server/clients_ok": 2.0},
    }  # text (status, phase), flags (private), round/partition and 'stop' rows are left out


def test_no_trackers_imports_none_of_their_packages(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from fedllm.recipe import load_recipe\n"
        "from fedllm.server.metrics import MetricsLog\n"
        "from fedllm.server.trackers import open_trackers\n"
        f"cfg = load_recipe({str(RECIPE)!r}, ['output_dir={tmp_path}'])\n"
        "cfg.run_dir.mkdir(parents=True)\n"
        "log = MetricsLog(cfg.run_dir, sinks=open_trackers(cfg))\n"
        "log.write([{'kind': 'server', 'round': 0, 'held_out_loss': 1.0}]); log.close()\n"
        "print(sorted(m for m in ('tensorboard', 'mlflow', 'wandb') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_a_missing_tracker_package_is_an_error_naming_the_extra(tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(  # as on a machine without mlflow: find_spec answers None
        "fedllm.server.trackers.importlib.util.find_spec",
        lambda name, *a: None if name == "mlflow" else real(name, *a),
    )
    args = ["prepare", str(RECIPE), f"output_dir={tmp_path}", "output.trackers=[mlflow]"]
    args.append("data.max_examples=60")  # a quick tiny base: the check comes after it
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "output.trackers: mlflow needs the package 'mlflow-skinny'" in err
    assert "pip install -e '.[trackers]'" in err


def test_tensorboard_event_files_hold_every_round(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = config(tmp_path, "[tensorboard]")
    write_run(cfg)
    events = EventAccumulator(str(cfg.run_dir / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("server/held_out_loss")] == SERVER_LOSS
    assert [(e.step, e.value) for e in events.Scalars("client_1/train_loss")] == [(1, 4.5)]
    assert [(e.step, e.value) for e in events.Scalars("client_0/held_out_loss")] == [(0, 5.0)]


def test_a_half_written_ids_file_is_a_fresh_start_not_a_failed_resume(tmp_path: Path) -> None:
    from fedllm.server.trackers import load_ids

    path = tmp_path / IDS
    assert load_ids(path) == {}
    path.write_text('{"mlflow": "ab')  # a crash mid-write (it is written atomically now)
    assert load_ids(path) == {}
    path.write_text('["not", "a", "table"]')
    assert load_ids(path) == {}
    path.write_text('{"mlflow": "abc"}')
    assert load_ids(path) == {"mlflow": "abc"}


def test_mlflow_store_holds_the_metric_per_round_and_a_resume_continues_the_run(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    cfg = config(tmp_path, "{mlflow: {experiment: sums}}")
    write_run(cfg)
    run_id = json.loads((cfg.run_dir / IDS).read_text())["mlflow"]
    client = MlflowClient(tracking_uri=f"sqlite:///{cfg.run_dir / 'mlflow.db'}")
    history = client.get_metric_history(run_id, "server/held_out_loss")
    assert [(m.step, m.value) for m in history] == SERVER_LOSS
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "t"
    assert run.data.params["aggregator.name"] == "svd"
    assert run.data.tags["fedllm.recipe_fingerprint"] == cfg.fingerprint()
    assert client.get_experiment(run.info.experiment_id).name == "sums"
    # --resume opens the trackers again: the same MLflow run gets the next round
    log = MetricsLog(cfg.run_dir, sinks=open_trackers(cfg))
    log.write([{"kind": "server", "round": 3, "held_out_loss": 4.0}])
    log.close()
    history = client.get_metric_history(run_id, "server/held_out_loss")
    assert [(m.step, m.value) for m in history] == [*SERVER_LOSS, (3, 4.0)]


def wandb_records(path: Path) -> list:
    """The protobuf records of a W&B offline run file (a LevelDB-style log: a 7-byte header,
    then 32 KiB blocks of chunks with a 7-byte crc/length/type header each)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: one record is complete
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_wandb_offline_run_holds_every_round(tmp_path: Path) -> None:
    pytest.importorskip("wandb")
    cfg = config(tmp_path, "[wandb]")
    write_run(cfg)
    runs = list((cfg.run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, "one offline run, to upload later with `wandb sync`"
    history = {}
    for record in wandb_records(runs[0]):
        if record.WhichOneof("record_type") == "history":
            items = {
                i.key or "/".join(i.nested_key): json.loads(i.value_json)
                for i in record.history.item
            }
            history[items["_step"]] = items
    assert sorted(history) == [0, 1, 2]
    assert [(s, history[s]["server/held_out_loss"]) for s in sorted(history)] == SERVER_LOSS
    assert history[1]["client_1/train_loss"] == 4.5
    assert json.loads((cfg.run_dir / IDS).read_text())["wandb"] in runs[0].name


class Broken:
    """A tracker that fails on every write (a dead tracking server, a full disk)."""

    name = "broken"

    def __init__(self) -> None:
        self.closed = False

    def log(self, scalars: dict[str, float], step: int) -> None:
        raise ConnectionError("tracking server unreachable")

    def close(self) -> None:
        self.closed = True


def test_a_failing_tracker_is_dropped_with_a_warning_and_metrics_jsonl_keeps_every_row(
    tmp_path: Path, caplog
) -> None:
    broken = Broken()
    log = MetricsLog(tmp_path, sinks=[broken])
    with caplog.at_level(logging.WARNING):
        for rnd in sorted(ROWS):
            log.write(ROWS[rnd])
    assert log.read() == [row for rnd in sorted(ROWS) for row in ROWS[rnd]]
    warnings = [r.getMessage() for r in caplog.records if "tracker broken failed" in r.getMessage()]
    assert len(warnings) == 1 and "tracking server unreachable" in warnings[0]
    assert log.sinks == []


class Recording:
    """A sink that keeps every (step, scalars) it is given."""

    name = "recording"

    def __init__(self) -> None:
        self.logged: list[tuple[int, dict[str, float]]] = []

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.logged.append((step, scalars))

    def close(self) -> None:
        pass


def test_a_checkpointed_round_the_trackers_missed_is_sent_once_on_resume(tmp_path: Path) -> None:
    """A round's rows reach the trackers after its checkpoint: a crash between the two leaves a
    round the resumed run will not repeat. `trackers.json` keeps the last round sent, and the
    resume's catch-up sends the missing ones (once), never an earlier or a later one."""
    first = Recording()
    log = MetricsLog(tmp_path, sinks=[first])
    log.write(ROWS[0])
    log.write(ROWS[1], publish=False)  # round 1 checkpointed, then the crash
    assert [step for step, _ in first.logged] == [0]
    assert json.loads((tmp_path / IDS).read_text())["published_round"] == 0
    again = Recording()
    resumed = MetricsLog(tmp_path, sinks=[again])
    assert resumed.catch_up(1) == [1]
    assert again.logged == [(1, scalars_by_round(ROWS[1])[1])]
    assert resumed.catch_up(1) == []  # sent: a second resume sends nothing
    assert MetricsLog(tmp_path).catch_up(1) == []  # no trackers: nothing to catch up
    assert json.loads((tmp_path / IDS).read_text())["published_round"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("crash", ["before its checkpoint", "before its publish"])
def test_a_round_a_crash_cuts_reaches_the_trackers_once_after_the_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash: str
) -> None:
    """A crash in round 1 after its rows are on disk, before its checkpoint (the resumed run
    trains round 1 again) or after it, before the trackers got the round (the resume sends it):
    either way the trackers get each round once, with the values metrics.jsonl keeps."""
    from fedllm.deploy.local_grid import run_local
    from fedllm.server import app

    sink = Recording()
    monkeypatch.setattr(app, "open_trackers", lambda cfg: [sink])
    cfg = load_recipe(
        RECIPE,
        [
            f"output_dir={tmp_path}",
            "name=crash",
            "federation.rounds=2",
            "data.num_clients=2",
            "data.max_examples=120",
            "federation.local_steps=2",
        ],
    )
    real_save, real_keep = app.Run.save, app.keep_best

    def save_but_round_1(self, server_round: int, **kw) -> None:
        if server_round == 1 and kw.get("pending") is None:
            raise RuntimeError("the machine went down")
        real_save(self, server_round, **kw)

    def keep_but_round_1(cfg, strategy, *, metrics, server_round):
        if server_round == 1:  # after the checkpoint, before the trackers get the round
            raise RuntimeError("the machine went down")
        return real_keep(cfg, strategy, metrics=metrics, server_round=server_round)

    if crash == "before its checkpoint":
        monkeypatch.setattr(app.Run, "save", save_but_round_1)
    else:
        monkeypatch.setattr(app, "keep_best", keep_but_round_1)
    with pytest.raises(RuntimeError, match="went down"):
        run_local(cfg)
    assert [step for step, _ in sink.logged] == [0]
    monkeypatch.setattr(app.Run, "save", real_save)
    monkeypatch.setattr(app, "keep_best", real_keep)
    run_dir, _ = run_local(cfg, resume=True)
    steps = [step for step, _ in sink.logged]
    assert sorted(steps) == [0, 1, 2], steps
    kept = {r["round"]: r for r in MetricsLog(run_dir).read() if r["kind"] == "server"}
    logged = dict(sink.logged)
    assert logged[1]["server/held_out_loss"] == kept[1]["held_out_loss"]


def test_a_run_from_before_the_published_mark_resends_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run whose trackers.json predates `published_round` (TensorBoard alone: `{}`) had every
    round sent already; its first resume must not send them again (audit h89). A new run
    starts its mark at -1."""
    from fedllm.server import trackers

    monkeypatch.setattr(trackers, "check_trackers", lambda cfg: None)
    monkeypatch.setattr(trackers, "TensorBoardSink", lambda cfg, options: Recording())
    cfg = config(tmp_path, "[tensorboard]")
    cfg.run_dir.mkdir(parents=True)
    (cfg.run_dir / IDS).write_text("{}")
    log = MetricsLog(cfg.run_dir, sinks=open_trackers(cfg))
    log.write(ROWS[0], publish=False)
    assert log.catch_up(0) == [] and json.loads((cfg.run_dir / IDS).read_text()) == {}
    new = config(tmp_path / "new", "[tensorboard]")
    open_trackers(new)
    assert json.loads((new.run_dir / IDS).read_text()) == {"published_round": -1}
