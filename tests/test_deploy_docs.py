"""docs/deployment.md's trial on one machine, run as written: the ```bash block under "A trial on
one machine" runs as one shell script (`bash -e`) in a fresh folder, as a user pastes it: `fedllm
certs`, a TLS SuperLink, a connection, 3 registered organisations' `fedllm node`s on one machine
(each on its own free port), and `fedllm run tiny --federation trial`.

Two edits only, both said here: the run line gets size overrides (data this test builds, 1 round
of 2 steps), and if port 9093 is taken on this machine another free port replaces it."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
from pathlib import Path

import pytest
from test_deploy import descendants, free_port, write_orgs

from fedllm.deploy.flower_env import flwr_env

DOC = Path(__file__).resolve().parents[1] / "docs" / "deployment.md"
HEADING = "## A trial on one machine"
RUN_LINE = "fedllm run tiny --federation trial output_dir=trial/runs"
LIMIT = 900.0  # seconds for the whole trial on a loaded 2-core machine


def trial_script() -> str:
    """The first ```bash block after the trial's heading."""
    after = DOC.read_text().split(HEADING, 1)[1]
    return after.split("```bash\n", 1)[1].split("\n```", 1)[0] + "\n"


def port_taken(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def test_the_trial_block_is_the_three_organisation_trial_this_file_runs() -> None:
    script = trial_script()
    assert "fedllm certs trial/creds --nodes 3" in script
    assert "for i in 0 1 2; do" in script and "fedllm node --superlink 127.0.0.1:9093" in script
    assert "--port" not in script.split("fedllm node", 1)[1], "nodes find their own free port"
    assert script.count(RUN_LINE) == 1


def stop_all(proc: subprocess.Popen, folder: Path) -> None:
    """Kill the script, what it started (its process group, and anything still running with the
    trial's folder as working directory, e.g. a process in its own session)."""
    pids = set(descendants(proc.pid))
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and Path(os.readlink(entry / "cwd")) == folder:
                pids.add(int(entry.name))
        except OSError:
            continue
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid in pids - {os.getpid()}:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    proc.wait()


@pytest.mark.slow
def test_the_one_machine_trial_runs_as_written(tmp_path: Path) -> None:
    union, _ = write_orgs(tmp_path / "data", 3, words_each=2)
    small = (
        f" data.source={union} data.partitioner=iid data.max_examples=null"
        " federation.rounds=1 federation.local_steps=2 federation.round_timeout=300"
    )
    script = trial_script().replace(RUN_LINE, RUN_LINE + small)
    if port_taken(9093):
        script = script.replace("9093", str(free_port()))
    here = tmp_path / "here"
    here.mkdir()
    env = {k: v for k, v in flwr_env().items() if k not in ("FLWR_HOME", "RAY_ADDRESS")}
    with open(tmp_path / "trial.log", "w") as log:
        proc = subprocess.Popen(
            ["bash", "-e", "-c", script],
            cwd=here,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            rc = proc.wait(timeout=LIMIT)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            stop_all(proc, here)
    trial = here / "trial"
    logs = {p.name: p.read_text() for p in [tmp_path / "trial.log", *trial.glob("*.log")]}
    tail = "\n".join(f"--- {name}\n{text[-2500:]}" for name, text in logs.items())
    assert rc == 0, tail
    assert "finished:completed" in logs["trial.log"], tail
    run_dir = trial / "runs" / "tiny"
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ok = {r["partition"] for r in rows if r["kind"] == "client" and r.get("status") == "ok"}
    assert ok == {0, 1, 2}, "all three organisations trained"
    assert (run_dir / "final_adapter" / "adapter_config.json").is_file()
    nodes = [logs[f"node-{i}.log"] for i in range(3)]
    ports = {int(m) for text in nodes for m in re.findall(r"app API: 127\.0\.0\.1:(\d+)", text)}
    assert len(ports) == 3, "each SuperNode on its own free port"
    assert not any("failed to start" in text for text in nodes), tail
