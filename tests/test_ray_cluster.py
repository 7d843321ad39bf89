"""`simulation.ray_address`: `fedllm run` joins an existing Ray cluster started on loopback (a head
with no CPU for tasks and one worker node with 1 CPU, so every client must run on the worker that
joined), as a user types it; the run finishes, and the cluster's workers follow fedllm's quiet
set-up (no Flower DEBUG lines, no bitsandbytes import).

The cluster keeps its files in its own short temporary folder, so no other Ray user on this
machine finds it (`ray.init()` without an address joins the cluster `ray start` last wrote to
/tmp/ray), and its processes are stopped by their ids (not `ray stop`, which stops every Ray
process of this user)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

RECIPE = str(Path(__file__).parents[1] / "recipes" / "tiny.yaml")
RAY = str(Path(sys.executable).parent / "ray")
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(1.0)


def alive_nodes(address: str, env: dict[str, str]) -> int:
    """Live nodes of the cluster at `address` (its status, read through the Ray CLI)."""
    out = subprocess.run(
        [RAY, "status", "--address", address],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    active = out.stdout.split("Active:")[-1].split("Pending:")[0]
    return sum(1 for line in active.splitlines() if "node_" in line)


def stop(proc: subprocess.Popen) -> None:
    """Stop one `ray start --block` (its node's processes go with it), by its process group."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    """A Ray head (0 CPUs) and one worker node (1 CPU) on 127.0.0.1; yields the address."""
    logs = tmp_path_factory.mktemp("ray-logs")
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths
    port = free_port()
    address = f"127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    common = ["--block", "--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
    procs = []
    try:
        for name, args in (
            ("head", ["--head", "--port", str(port), "--num-cpus", "0", "--temp-dir", str(temp)]),
            ("worker", ["--address", address, "--num-cpus", "1"]),
        ):
            log = open(logs / f"{name}.log", "w")
            procs.append(
                subprocess.Popen(
                    [RAY, "start", *args, *common],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                )
            )
            if name == "head":
                wait_for(lambda: _listening(port), timeout=120, what="the Ray head")
        wait_for(lambda: alive_nodes(address, env) == 2, timeout=120, what="the worker node")
        yield address
    finally:
        for proc in reversed(procs):
            stop(proc)
        shutil.rmtree(temp, ignore_errors=True)


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


def test_a_run_joins_an_existing_ray_cluster(cluster: str, tmp_path: Path) -> None:
    data = tmp_path / "rows.jsonl"
    words = ["apple", "river", "stone", "cloud", "garden", "window"]
    data.write_text(
        "".join(
            json.dumps({"prompt": f"Define {w}{i}.", "response": f"{w}{i} is a kind of {w}."})
            + "\n"
            for i in range(12)
            for w in words
        )
    )
    cmd = [
        sys.executable,
        "-m",
        "fedllm.cli",
        "run",
        RECIPE,
        f"output_dir={tmp_path / 'runs'}",
        "name=cluster",
        f"data.source={data}",
        "data.partitioner=iid",
        "data.num_clients=2",
        "lora.ranks=[2, 4]",
        "federation.rounds=1",
        "federation.local_steps=2",
        f"simulation.ray_address={cluster}",
        "simulation.num_cpus_per_client=1",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    stream = out.stdout + out.stderr
    assert out.returncode == 0, stream[-4000:]
    run_dir = tmp_path / "runs" / "cluster"
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    trained = {r["partition"] for r in rows if r["kind"] == "client" and r["status"] == "ok"}
    assert trained == {0, 1}, "both clients trained, on the worker node (the head has no CPU)"
    assert (run_dir / "final_adapter" / "adapter_config.json").is_file()
    # the cluster's workers ran fedllm's set-up hook: Flower at WARNING, no bitsandbytes
    assert "DEBUG" not in stream and "gemm_4bit_forward" not in stream, stream[-4000:]


def test_more_cpus_per_client_than_any_node_is_refused_naming_the_keys(cluster: str) -> None:
    from fedllm.processes import simulation_ray
    from fedllm.recipe import ConfigError

    with pytest.raises(ConfigError, match=r"num_cpus_per_client=2 .* largest node .* 1 CPUs"):
        with simulation_ray(address=cluster, verbose=False, num_cpus_per_client=2.0):
            pass
