"""The warm worker's protocol: a message and its context go over the node's Unix socket to a
long-lived process and come back as the same reply and state the in-process call would give."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedllm.deploy import warm


@pytest.fixture(autouse=True)
def task_identity():
    """What Flower sets in a per-message ClientApp process (task, run, node)."""
    before = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 11, 3, 7
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = before


def counting_app(msg: Message, context: Context) -> Message:
    """Doubles the array it receives and counts its calls in the node's state."""
    if "fail" in msg.content.config_records:
        raise ValueError("asked to fail")
    calls = int(context.state["count"]["calls"]) + 1 if "count" in context.state else 1
    context.state["count"] = ConfigRecord({"calls": calls})
    array = msg.content["global"]["w"].numpy()
    return Message(RecordDict({"update": ArrayRecord({"w": Array(array * 2)})}), reply_to=msg)


def _message(**extra: RecordDict) -> Message:
    content = RecordDict(
        {"global": ArrayRecord({"w": Array(np.arange(6.0).reshape(2, 3))}), **extra}
    )
    msg = Message(content, dst_node_id=7, message_type="train")
    msg.metadata.__dict__["_message_id"] = msg.object_id  # as the SuperLink sets it
    return msg


def _context(folder: Path | None) -> Context:
    node_config = {"partition-id": 1, **({warm.NODE_KEY: str(folder)} if folder else {})}
    return Context(run_id=3, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


@pytest.fixture
def worker(tmp_path: Path) -> Path:
    folder = tmp_path / "worker"
    server, secret = warm.listen(folder)
    threading.Thread(
        target=warm.serve_forever,
        args=(server, secret),
        kwargs={"app": counting_app},
        daemon=True,
    ).start()
    return folder


def test_forward_returns_the_reply_and_the_state(worker: Path) -> None:
    msg, context = _message(), _context(worker)
    reply = warm.forward(worker, msg, context=context)
    assert reply is not None
    np.testing.assert_array_equal(
        reply.content["update"]["w"].numpy(), np.arange(6.0).reshape(2, 3) * 2
    )
    assert reply.metadata.reply_to_message_id == msg.object_id
    assert context.state["count"]["calls"] == 1
    # the state round-trips: the next message sees the first call
    warm.forward(worker, _message(), context=context)
    assert context.state["count"]["calls"] == 2


def test_app_errors_reach_the_caller(worker: Path) -> None:
    with pytest.raises(RuntimeError, match="ValueError: asked to fail"):
        warm.forward(worker, _message(fail=ConfigRecord({"x": 1})), context=_context(worker))


def test_a_wrong_secret_is_refused(worker: Path) -> None:
    (worker / warm.SECRET).write_bytes(b"x" * 32)
    with pytest.raises(RuntimeError, match="wrong warm worker secret"):
        warm.forward(worker, _message(), context=_context(worker))


def test_no_worker_means_run_here(tmp_path: Path) -> None:
    folder = tmp_path / "idle"
    warm.make_folder(folder)  # a folder and secret, but nothing listens
    assert warm.forward(folder, _message(), context=_context(folder)) is None


def test_a_folder_others_can_reach_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "open"
    warm.make_folder(folder)
    folder.chmod(0o755)
    with pytest.raises(PermissionError, match="mode 0700"):
        warm.forward(folder, _message(), context=_context(folder))
    assert (folder / warm.SECRET).stat().st_mode & 0o077 == 0


def test_the_per_message_process_imports_no_torch() -> None:
    """What a message's process imports before handing off: Flower and the guard, not torch."""
    import subprocess
    import sys

    code = (
        "import sys, fedllm.deploy.guard as g; print(sorted({'torch', 'peft'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_worker_folder_joins_the_node_config() -> None:
    from fedllm.deploy.guard import with_node_config

    argv = ["--superlink", "h:1", "--node-config", 'partition-id=1 model="tiny"', "--insecure"]
    assert with_node_config(argv, {"warm-worker": "/tmp/w"}) == [
        "--superlink",
        "h:1",
        "--node-config",
        'partition-id=1 model="tiny" warm-worker="/tmp/w"',
        "--insecure",
    ]
    assert with_node_config(["--insecure"], {"warm-worker": "/tmp/w"}) == [
        "--insecure",
        "--node-config",
        'warm-worker="/tmp/w"',
    ]


def test_the_supernode_gets_a_worker_unless_told_not_to(monkeypatch, tmp_path: Path) -> None:
    from fedllm.deploy import guard

    started, execs = [], []
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    monkeypatch.setattr(guard, "start_warm_worker", lambda env: started.append(1) or tmp_path)
    monkeypatch.setattr(guard.os, "execvpe", lambda f, argv, env: execs.append(argv))
    guard.exec_supernode(["--insecure", "--node-config", "partition-id=0"])
    guard.exec_supernode(["--insecure", "--node-config", "partition-id=0", "--no-warm-worker"])
    assert started == [1]
    assert execs[0][-1] == f'partition-id=0 warm-worker="{tmp_path}"'
    assert execs[1] == ["flower-supernode", "--insecure", "--node-config", "partition-id=0"]


def test_a_dead_workers_folder_is_swept_and_a_live_ones_kept(tmp_path: Path) -> None:
    """A SIGKILLed node's worker leaves its folder (secret, socket); the next `fedllm node`
    removes it, never a live worker's, a young folder whose worker is starting, or others'."""
    import os
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folders = {}
    for name, pid in (("dead", dead.pid), ("live", os.getpid()), ("young", None), ("old", None)):
        folder = tmp_path / f"{warm.PREFIX}{name}"
        warm.make_folder(folder)
        (folder / warm.PID).unlink()
        if pid is not None:
            (folder / warm.PID).write_text(str(pid))
        folders[name] = folder
    os.utime(folders["old"], (0, 0))  # no pid file and long ago: died while starting
    loose = tmp_path / f"{warm.PREFIX}group-readable"
    loose.mkdir(mode=0o750)
    loose.chmod(0o750)
    os.utime(loose, (0, 0))
    assert warm.sweep_stale(tmp_path) == [folders["dead"], folders["old"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [folders["live"].name, folders["young"].name, loose.name]
    )
    assert (folders["live"] / warm.SECRET).exists()


def test_a_worker_writes_its_pid_beside_its_secret(worker: Path) -> None:
    import os

    assert (worker / warm.PID).read_text() == str(os.getpid())  # the test's thread is the worker


def test_a_swept_folder_means_run_here(tmp_path: Path) -> None:
    """A node whose worker died and whose folder was swept runs its messages itself."""
    assert warm.forward(tmp_path / "gone", _message(), context=_context(tmp_path / "gone")) is None


def test_the_machines_cores_are_split_between_its_live_workers(tmp_path: Path) -> None:
    """Three nodes on 2 cores at 2 torch threads each spun OpenMP threads against each other
    (~20x slower steps); each live worker gets its share, at least 1, a dead one none."""
    import os
    import subprocess
    import sys

    assert warm.shared_threads(tmp_path, cores=8) == 8  # no worker yet: the first takes all
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for name, pid in (("a", os.getpid()), ("b", os.getppid()), ("dead", dead.pid), ("new", None)):
        folder = tmp_path / f"{warm.PREFIX}{name}"
        warm.make_folder(folder)
        (folder / warm.PID).unlink()
        if pid is not None:
            (folder / warm.PID).write_text(str(pid))
    assert warm.shared_threads(tmp_path, cores=8) == 4  # 2 live; the dead and pid-less not
    assert warm.shared_threads(tmp_path, cores=7) == 3
    assert warm.shared_threads(tmp_path, cores=1) == 1


def test_each_call_runs_after_the_workers_before_hook(tmp_path: Path) -> None:
    calls: list[str] = []

    def app(msg: Message, context: Context) -> Message:
        calls.append("app")
        return counting_app(msg, context)

    folder = tmp_path / "worker"
    server, secret = warm.listen(folder)
    threading.Thread(
        target=warm.serve_forever,
        args=(server, secret),
        kwargs={"app": app, "before": lambda: calls.append("before")},
        daemon=True,
    ).start()
    for _ in range(2):
        assert warm.forward(folder, _message(), context=_context(folder)) is not None
    assert calls == ["before", "app", "before", "app"]
