"""Deployment engine on 127.0.0.1: a TLS SuperLink with SuperNode authentication, 3 SuperNodes each
reading its own JSONL file, the tiny recipe for 3 rounds. One scenario, checked by several tests:
the ServerApp is killed after round 1 (that run must exit non-zero), the run is resumed, a
SuperNode is killed during round 2 (the round finishes without it once Flower reports it unavailable
or the round's timeout passes), the node is started again and rejoins for round 3, and the run
finishes. Every process is started in its own session and killed by its process-group id, also on
failure; the scenario bounds its time. Those tests are slow; the last section's checks of
`fedllm superlink` / `fedllm node` arguments start no process and are not."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedllm.cli import main
from fedllm.deploy.certs import make_credentials
from fedllm.deploy.federation import (
    register_node,
    superlink_command,
    supernode_command,
    wait_for_port,
    write_connection,
)
from fedllm.deploy.flower_env import flwr_env
from fedllm.deploy.submit import APP_PYPROJECT

RECIPE = str(Path(__file__).parents[1] / "recipes" / "tiny.yaml")
LIMIT = 900.0  # seconds for the whole scenario on a loaded 2-core machine
SLOW = pytest.mark.slow  # every test that starts a federation; the argument checks are fast


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """All processes below `pid` (children read from /proc)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            kids = [int(c) for c in task.read_text().split()]
            out += kids
            todo += kids
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


# Flower's timings in a test federation: a `sitecustomize` on the PYTHONPATH of its processes.
# Only how soon Flower sees a lost node, a message or a reply changes, not what Flower or fedllm
# then do.
# The per-message `flwr-clientapp` processes and the warm workers run `python -I`, without it.
FLOWER_TIMINGS = '''\
"""Test timings of tests/test_deploy.py's loopback federation (FLOWER_TIMINGS there)."""

import os
import sys

PROGRAM = os.path.basename(sys.argv[0]) if sys.argv else ""
if sys.orig_argv[1:4] == ["-m", "fedllm.deploy.federation", "superlink"]:
    PROGRAM = "flower-superlink"  # fedllm's guard runs Flower's SuperLink in this process


def replace(module, name, old, new):
    if getattr(module, name, None) != old:
        raise RuntimeError(
            f"tests/test_deploy.py FLOWER_TIMINGS: {module.__name__}.{name} is not {old!r} "
            "in this Flower; update the shim"
        )
    setattr(module, name, new)


def fast_poll(module):
    """`module`'s `time`, with every sleep at most 0.5 s (how often it polls)."""
    import time
    import types

    class FastPoll(types.ModuleType):
        def __getattr__(self, name):
            return getattr(time, name)

        @staticmethod
        def sleep(seconds):
            time.sleep(min(seconds, 0.5))

    replace(module, "time", time, FastPoll("time"))


if PROGRAM == "flower-supernode":
    # a SuperNode declares a 10 s heartbeat (the SuperLink's minimum) instead of 30 s and sends
    # one every ~4 s: a killed node's messages fail 2 x 10 s after its last one, not 2 x 30 s;
    # an idle SuperNode asks for messages every 0.5 s instead of 3 s
    import flwr.supercore.heartbeat
    import flwr.supernode.fleet_http_connection
    import flwr.supernode.start_client_internal

    replace(flwr.supercore.heartbeat, "HEARTBEAT_DEFAULT_INTERVAL", 30, 10)
    replace(flwr.supernode.fleet_http_connection, "HEARTBEAT_DEFAULT_INTERVAL", 30, 10)
    fast_poll(flwr.supernode.start_client_internal)
elif PROGRAM == "flower-superlink":
    # a running task (the ServerApp) whose heartbeats stop fails after 2/3 x 2 x 30 s = 20 s,
    # not 60 s: a killed ServerApp's run ends (and the nodes drop its messages) sooner. Its claim
    # (30 s to start) is unchanged.
    import flwr.supercore.corestate.sql_corestate

    replace(flwr.supercore.corestate.sql_corestate, "HEARTBEAT_PATIENCE", 2, 2 / 3)
elif PROGRAM == "flwr-serverapp":
    # the ServerApp sends a heartbeat every ~4 s instead of ~20 s (its 20 s TTL above), and
    # Grid.send_and_receive (each stage of Flower's SecAgg+ workflow) polls for replies every
    # 0.5 s instead of 3 s
    import flwr.supercore.heartbeat
    import flwr.superlink.grid.http_grid

    replace(flwr.supercore.heartbeat, "HEARTBEAT_DEFAULT_INTERVAL", 30, 10)
    fast_poll(flwr.superlink.grid.http_grid)
'''


class Federation:
    """Processes of one loopback federation; `stop()` kills each started process group."""

    def __init__(self, root: Path) -> None:
        self.root, self.procs, self.logs = root, [], {}
        shim = root / "flower_timings"
        shim.mkdir()
        (shim / "sitecustomize.py").write_text(FLOWER_TIMINGS)
        path = os.pathsep.join(filter(None, [str(shim), os.environ.get("PYTHONPATH")]))
        self.env = {
            **flwr_env(),
            "FLWR_HOME": str(root / "flwr_home"),
            "PYTHONPATH": path,
            "FLWR_DISABLE_UPDATE_CHECK": "1",  # no call to api.flower.ai from each CLI process
            # a SuperExec starts a pending ClientApp or ServerApp within 0.2 s, not 1 s (Flower's
            # own setting)
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2",
        }
        self.deadline = time.monotonic() + LIMIT
        self.link: subprocess.Popen | None = None  # the SuperLink, once secure_link started it

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "w")
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )
        self.procs.append((proc, log))
        return proc

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text()

    def wait_for(self, name: str, *texts: str) -> str:
        """Wait until any of `texts` is in the log of `name`; returns the one seen."""
        while not (seen := [t for t in texts if t in self.log(name)]):
            assert time.monotonic() < self.deadline, f"timed out waiting for {texts!r} in {name}"
            time.sleep(0.5)
        return seen[0]

    def wait_nodes_idle(self, run_id: str, names: list[str], *, quiet: float = 8.0) -> None:
        """Wait until each SuperNode in `names` has sent a reply for every message of run
        `run_id` it received, and its log has been still for `quiet` s (> a node's 3 s poll).

        A run must not stop while a SuperNode pulls one of its messages: Flower 1.41's SuperNode
        then keeps the message, runs a ClientApp for it and stays one reply behind for good
        (`start_client_internal._pull_and_store_message`; docs/deployment.md, Failures)."""
        still = {name: "" for name in names}
        since = time.monotonic()
        while True:
            logs = {name: self.log(name) for name in names}
            if logs != still:
                still, since = logs, time.monotonic()
            elif all(_answered(text, run_id) for text in logs.values()):
                if time.monotonic() - since >= quiet:
                    return
            assert time.monotonic() < self.deadline, f"run {run_id}: nodes never went idle"
            time.sleep(0.5)

    def wait_exit(self, proc: subprocess.Popen) -> int:
        return proc.wait(timeout=max(1.0, self.deadline - time.monotonic()))

    @staticmethod
    def kill(proc: subprocess.Popen) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()

    def secure_link(self, files: list[Path]) -> list[list[str]]:
        """Start a TLS SuperLink, make connection "loop" point at it and register one
        authenticated SuperNode per data file; returns the SuperNodes' commands (not started)."""
        self.start_link(len(files))
        return self.register_nodes(files)

    def start_link(self, nodes: int) -> None:
        """`secure_link`'s first half: credentials for `nodes` SuperNodes, the TLS SuperLink and
        connection "loop", once it answers (a run submitted from now on reaches it)."""
        self.creds = make_credentials(self.root / "creds", nodes=nodes)
        self.port = free_port()
        self.link = self.start(
            "superlink",
            superlink_command(
                port=self.port, database=self.root / "state.db", certs=self.root / "creds"
            ),
        )
        write_connection(
            self.root / "flwr_home",
            "loop",
            address=f"127.0.0.1:{self.port}",
            root_certificates=self.creds.ca_cert,
        )
        wait_for_port("127.0.0.1", self.port, timeout=60)

    def register_nodes(self, files: list[Path]) -> list[list[str]]:
        """`secure_link`'s second half: register one authenticated SuperNode per data file with
        the started SuperLink; returns their commands (not started)."""
        creds, cmds = self.creds, []
        for i, path in enumerate(files):
            register_node(creds.node_public(i), "loop", env=self.env)
            cmd = supernode_command(
                superlink=f"127.0.0.1:{self.port}",
                partition_id=i,
                port=free_port(),
                data_path=str(path),
                root_certificates=creds.ca_cert,
                auth_key=creds.node_keys[i],
            )
            cmds.append(cmd)
        return cmds

    def stop(self) -> None:
        for proc, log in reversed(self.procs):
            self.kill(proc)
            log.close()


def _answered(node_log: str, run_id: str) -> bool:
    """Whether a SuperNode's log shows as many replies as messages received for `run_id`; a
    message it dropped because the run had already ended (the SuperLink marks a run whose
    ServerApp was killed as failed once its heartbeat stops) counts as answered: the node keeps
    nothing of it and is not one reply behind."""
    run, received, sent = None, 0, 0
    for line in node_log.splitlines():
        if m := re.search(r"\[RUN (\d+)", line):
            run = m.group(1)
        elif run == run_id and "Receiving:" in line:
            received += 1
        elif run == run_id and ("Sending:" in line or "Ignoring message" in line):
            sent += 1
    return received == sent


def write_orgs(folder: Path, n: int, *, words_each: int) -> tuple[Path, list[Path]]:
    """`n` organisations' private JSONL files and their union (for the tiny tokenizer)."""
    folder.mkdir()
    words = ["apple", "river", "stone", "cloud", "garden", "window", "candle", "bridge", "forest"]
    union, files = [], []
    for org in range(n):
        rows = [
            {"prompt": f"Define {w}{i} for org {org}.", "response": f"{w}{i} is a thing of {w}s."}
            for i in range(14)
            for w in words[words_each * org : words_each * (org + 1)]
        ]
        files.append(folder / f"org{org}.jsonl")
        files[-1].write_text("".join(json.dumps(r) + "\n" for r in rows))
        union += rows
    (folder / "all.jsonl").write_text("".join(json.dumps(r) + "\n" for r in union))
    return folder / "all.jsonl", files


def fedllm_run(fed: Federation, name: str, args: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "fedllm.cli", "run", RECIPE, *args, "--federation", "loop"]
    return fed.start(name, cmd)


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    union, files = write_orgs(root / "data", 3, words_each=3)
    fed = Federation(root)
    args = [
        f"output_dir={root / 'runs'}",
        "name=dep",
        f"data.source={union}",
        "data.partitioner=iid",
        "data.max_examples=null",
        "federation.rounds=3",
        "federation.local_steps=3",
        "federation.round_timeout=120",
        "federation.node_grace=90",  # the restarted node rejoins before round 3 samples
    ]
    try:
        fed.start_link(len(files))
        # 1) kill the ServerApp once round 1 is checkpointed; that run must fail (exit != 0).
        # Started before the nodes register: its recipe preparation overlaps theirs, and its
        # ServerApp waits for all 3 nodes before round 0.
        first = fedllm_run(fed, "run1", args)
        node_cmds = fed.register_nodes(files)
        nodes = [fed.start(f"node{i}", cmd) for i, cmd in enumerate(node_cmds)]
        fed.wait_for("run1", "round 1/3: 3/3 clients ok")
        run_dir = root / "runs" / "dep"
        shutil.copy(run_dir / "checkpoint.pt", root / "after_round1.pt")
        apps = [p for p in descendants(fed.link.pid) if "flwr-serverapp" in cmdline(p)]
        assert apps, "no flwr-serverapp process under the SuperLink"
        for pid in apps:
            os.kill(pid, signal.SIGKILL)
        run_id = (run_dir / "flwr_run_id").read_text().strip()
        rows_before = (run_dir / "metrics.jsonl").read_text().splitlines()  # no writer is left
        # round 2's messages may be out already: let the nodes answer them before the run stops
        fed.wait_nodes_idle(run_id, [f"node{i}" for i in range(len(nodes))])
        # 2) resume; kill SuperNode 2 while round 2 trains. The resumed run's start-up (recipe,
        # checkpoint) overlaps the first run's stop: the first run is over either way (its
        # ServerApp is dead), `flwr stop` only ends its record and its `fedllm run`.
        second = fedllm_run(fed, "run2", [*args, "--resume"])
        subprocess.run(
            ["flwr", "stop", run_id, "loop"],
            env=fed.env,
            timeout=120,
            capture_output=True,
            check=False,
        )
        first_rc = fed.wait_exit(first)
        fed.wait_for("run2", "round 2/3: training")  # printed once the round has sampled 3
        fed.kill(nodes[2])  # at once: a node polls, starts a ClientApp and trains in < 2 s here
        # 3) once round 2's training gave up on it, the organisation restarts its SuperNode
        fed.wait_for("run2", "did not reply within", "round 2/3 train: client 3/3")
        fed.start("node2-rejoined", node_cmds[2])
        second_rc = fed.wait_exit(second)
        yield {
            "root": root,
            "run_dir": run_dir,
            "first_rc": first_rc,
            "second_rc": second_rc,
            "rows_before": rows_before,
            "log": fed.log("run2"),
            "files": files,
            "ckpt1": root / "after_round1.pt",
        }
    finally:
        fed.stop()


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@SLOW
def test_killed_serverapp_run_exits_nonzero_and_resumed_run_succeeds(scenario) -> None:
    assert scenario["first_rc"] != 0
    assert scenario["second_rc"] == 0, scenario["log"][-3000:]
    assert "resuming dep after round 1 of 3" in scenario["log"]


@SLOW
def test_round_2_finishes_without_the_killed_node_and_says_so(scenario) -> None:
    r = rows(scenario["run_dir"])
    server = {x["round"]: x for x in r if x["kind"] == "server"}
    assert set(server) == {0, 1, 2, 3}
    assert server[1]["clients_ok"] == 3
    assert server[2]["clients_ok"] == 2 and server[2]["clients_sampled"] == 3
    ok2 = {
        x["partition"]
        for x in r
        if x["kind"] == "client" and x["round"] == 2 and x["status"] == "ok"
    }
    assert ok2 == {0, 1}
    log = scenario["log"]  # Flower's heartbeat fails the message, or the round's timeout ends it
    killed = r"node \S+ failed: .*Node Unavailable|1 of 3 clients did not reply"
    said = re.search(rf"round 2: ({killed})", log)
    assert said, log[-3000:]


@SLOW
def test_restarted_node_rejoins_in_round_3(scenario) -> None:
    r = rows(scenario["run_dir"])
    server = {x["round"]: x for x in r if x["kind"] == "server"}
    assert server[3]["clients_ok"] == 3, scenario["log"][-3000:]
    ok3 = {
        x["partition"]
        for x in r
        if x["kind"] == "client" and x["round"] == 3 and x["status"] == "ok"
    }
    assert ok3 == {0, 1, 2}


@SLOW
def test_resumed_round_2_starts_from_round_1_state(scenario) -> None:
    """The resumed ServerApp starts round 2 from exactly the global factors checkpointed after
    round 1 (their digest is logged at the round start), not from the initial ones; the rows of
    rounds 0 and 1 are kept as they were."""
    from fedllm.aggregators import Factors
    from fedllm.model.adapters import factors_digest

    r = rows(scenario["run_dir"])
    before = [json.loads(x) for x in scenario["rows_before"]]
    assert {x["round"] for x in before} == {0, 1} and r[: len(before)] == before
    state = torch.load(scenario["ckpt1"], weights_only=False)
    assert state["round"] == 1
    saved = {m: Factors(b, a, s) for m, (b, a, s) in state["strategy"]["global"].items()}
    log = scenario["log"]
    assert f"round 2/3: training 3 clients from global {factors_digest(saved)}" in log
    first_run = (scenario["root"] / "run1.log").read_text()
    round1 = first_run.split("round 1/3: training 3 clients from global ")[1][:12]
    assert round1 != factors_digest(saved), "round 1 must have changed the global factors"


@SLOW
def test_global_adapter_loads_with_stock_peft(scenario) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedllm.model.card import resolve_adapter_base

    adapter = scenario["run_dir"] / "final_adapter"
    base_dir = resolve_adapter_base(adapter)  # the portable name 'tiny' -> the run's tiny base
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    ids = AutoTokenizer.from_pretrained(base_dir)("Define apple1.", return_tensors="pt").input_ids
    with torch.no_grad():
        before = base(ids).logits
        after = PeftModel.from_pretrained(base, str(adapter))(ids).logits
    assert torch.isfinite(after).all() and not torch.allclose(before, after)


# -- security: who may submit, and what a SuperNode runs (no training; seconds, not minutes) -------


def outside_address() -> str | None:
    """An IPv4 address of this machine other than loopback (None if it has none)."""
    found = set()
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the routed interface
            found.add(s.getsockname()[0])
    except OSError:
        pass
    try:
        found |= {a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)}
    except OSError:
        pass
    return next((a for a in sorted(found) if not a.startswith("127.")), None)


def flwr_ls(fed: Federation, connection: str) -> dict:
    out = subprocess.run(
        ["flwr", "ls", connection, "--format", "json"],
        capture_output=True,
        text=True,
        env=fed.env,
        timeout=120,
        check=False,
    )
    return json.loads(out.stdout)


@SLOW
def test_the_control_api_answers_only_loopback_and_the_operator_address(tmp_path) -> None:
    ip = outside_address()
    if ip is None:
        pytest.skip("this machine has no non-loopback IPv4 address to attack from")
    fed = Federation(tmp_path)
    try:
        creds = make_credentials(tmp_path / "creds", nodes=1, hosts=["127.0.0.1", ip])
        port, operator = free_port(), free_port()
        cmd = superlink_command(
            port=port,
            database=tmp_path / "state.db",
            host="0.0.0.0",
            certs=tmp_path / "creds",
            operator_address=f"{ip}:{operator}",
        )
        fed.start("superlink", cmd)
        home = tmp_path / "flwr_home"
        for name, address in (
            ("loop", f"127.0.0.1:{port}"),
            ("outside", f"{ip}:{port}"),
            ("operator", f"{ip}:{operator}"),
        ):
            write_connection(home, name, address=address, root_certificates=creds.ca_cert)
        wait_for_port("127.0.0.1", port, timeout=60)
        wait_for_port(ip, operator, timeout=60)
        assert flwr_ls(fed, "loop")["success"] is True
        assert flwr_ls(fed, "operator")["success"] is True
        refused = flwr_ls(fed, "outside")
        assert refused["success"] is False
        assert "Control and Runtime APIs only on loopback" in refused["error-message"]
        # the same outsider cannot register a node key or start a run either
        out = subprocess.run(
            ["flwr", "supernode", "register", str(creds.node_public(0)), "outside"],
            capture_output=True,
            text=True,
            env=fed.env,
            timeout=120,
            check=False,
        )
        assert "only on loopback" in out.stdout + out.stderr
        assert '/v1/control/register-node HTTP/1.1" 403' in fed.log("superlink")
    finally:
        fed.stop()


FOREIGN_SERVER = """
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

server_app = ServerApp()
client_app = ClientApp()


@server_app.main()
def _serve(grid: Grid, context: Context) -> None:
    import time

    while not (nodes := list(grid.get_node_ids())):
        time.sleep(0.5)
    train = [
        Message(RecordDict({"c": ConfigRecord({"x": 1})}), dst_node_id=n, message_type="train")
        for n in nodes
    ]
    for reply in grid.send_and_receive(train, timeout=90):
        print("REPLY", reply.error.reason if reply.has_error() else "ran", flush=True)


@client_app.train()
def _train(msg: Message, context: Context) -> Message:
    from pathlib import Path

    Path(str(context.run_config["marker"])).write_text("the FAB's code ran on the node")
    return Message(RecordDict({"c": ConfigRecord({"ok": 1})}), reply_to=msg)
"""


@SLOW
def test_a_supernode_runs_only_the_installed_fedllm_not_code_a_run_brings(tmp_path) -> None:
    """A run whose app carries its own ClientApp (here: code that writes a file next to the
    node's data) is refused by fedllm's SuperNode; the code never runs."""
    data = tmp_path / "org0.jsonl"
    data.write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n")
    marker = tmp_path / "ran-on-the-node"
    app = tmp_path / "foreign_app"
    (app / "foreign").mkdir(parents=True)
    (app / "foreign" / "__init__.py").write_text("")
    (app / "foreign" / "apps.py").write_text(FOREIGN_SERVER)
    (app / "README.md").write_text("not fedllm\n")
    pyproject = APP_PYPROJECT.format(version="1.0.0").replace("fedllm.deploy.apps", "foreign.apps")
    pyproject = pyproject.replace("fedllm", "foreign")
    pyproject = pyproject.replace('recipe = ""', f"marker = {json.dumps(str(marker))}")
    (app / "pyproject.toml").write_text(pyproject)
    fed = Federation(tmp_path)
    try:
        (node,) = fed.secure_link([data])
        fed.start("node0", node)
        out = subprocess.run(
            ["flwr", "run", str(app), "loop", "--stream"],
            capture_output=True,
            text=True,
            env=fed.env,
            timeout=300,
            check=False,
        )
        assert "REPLY" in out.stdout, out.stdout + out.stderr
        assert "this node runs only its installed fedllm" in out.stdout
        assert "REPLY ran" not in out.stdout and not marker.exists()
    finally:
        fed.stop()


# -- bad arguments of `fedllm superlink` / `fedllm node`: named before any process starts ---------


@pytest.fixture(scope="module")
def creds(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("creds")
    make_credentials(folder, nodes=1)
    return folder


@pytest.fixture
def started(monkeypatch) -> list[list[str]]:
    """What `fedllm superlink` / `fedllm node` would have started (nothing starts in these
    tests: without the checks the SuperNode would replace the test process). The SuperLink's
    flags are parsed and its TLS files checked as when it starts: only serving is left out."""
    import fedllm.deploy.cli as deploy_cli
    from fedllm.deploy import guard

    calls: list[list[str]] = []
    monkeypatch.setattr(os, "environ", dict(os.environ))  # the SuperLink sets Flower's env
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(guard, "_serve", lambda config, operator: calls.append([config.host]))
    monkeypatch.setattr(deploy_cli.os, "execvpe", lambda file, argv, env: calls.append(argv))
    return calls


def superlink_argv(creds: Path, ca: str, cert: str, key: str) -> list[str]:
    """`fedllm superlink` with three TLS files of the folder `creds`, by name."""
    return tls_argv(creds / ca, creds / cert, creds / key)


@pytest.mark.parametrize(
    ("files", "message"),
    [
        (
            ("ca.crt", "server.key", "server.pem"),
            "--ssl-certfile {creds}/server.key: expected a PEM certificate (a file starting "
            "-----BEGIN CERTIFICATE-----); it holds a private key: are --ssl-certfile and "
            "--ssl-keyfile swapped?",
        ),
        (
            ("ca.crt", "server.pem", "server.pem"),
            "--ssl-keyfile {creds}/server.pem: expected a PEM private key",
        ),
        (
            ("ca.crt", "server.pem", "ca.key"),
            "--ssl-keyfile {creds}/ca.key is not the private key of --ssl-certfile "
            "{creds}/server.pem",
        ),
        (("nope.crt", "server.pem", "server.key"), "--ssl-ca-certfile {creds}/nope.crt: no such"),
        (
            ("ca.key", "server.pem", "server.key"),
            "--ssl-ca-certfile {creds}/ca.key: expected a PEM certificate",
        ),
    ],
    ids=["swapped", "cert-as-key", "other-key", "missing-ca", "key-as-ca"],
)
def test_superlink_tls_files_that_cannot_work_are_named_before_it_starts(
    creds: Path, started: list, capsys, files: tuple[str, str, str], message: str
) -> None:
    """h111: a swapped certificate and key printed "SuperLink on ..." and then a traceback
    (`ssl.SSLError: [SSL] PEM lib`); a missing file gave Flower's message naming the flag only."""
    assert main([*superlink_argv(creds, *files), "--database", "s.db"]) == 2
    out = capsys.readouterr()
    assert message.format(creds=creds) in out.err and "Traceback" not in out.err
    assert not started and "SuperLink on" not in out.out
    assert main([*superlink_argv(creds, "ca.crt", "server.pem", "server.key")]) == 0
    assert len(started) == 1  # the test's own credentials pass


def tls_argv(ca: Path, cert: Path, key: Path) -> list[str]:
    """`fedllm superlink` with these three TLS files, each from anywhere."""
    files = {"--ssl-ca-certfile": ca, "--ssl-certfile": cert, "--ssl-keyfile": key}
    return ["superlink", *(a for flag, path in files.items() for a in (flag, str(path)))]


def _issue(subject: str, key, *, by: tuple | None, ca: bool, days: int = 30):
    """A certificate for `key` named `subject`, signed by `by` = (issuer cert, issuer key)
    (self-signed if None), valid for `days` from 5 minutes ago (or `-days` until 5 ago)."""
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    if days < 0:
        now, days = now + dt.timedelta(days=days), -days
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, subject)])
    issuer_cert, issuer_key = by or (None, key)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_cert.subject if issuer_cert else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(issuer_key, hashes.SHA256())
    )


def test_a_server_certificate_the_ca_did_not_issue_or_out_of_date_is_named(
    creds: Path, started: list, capsys, tmp_path: Path
) -> None:
    """A SuperLink started with a certificate its CA did not sign (another `fedllm certs`
    folder's) or an expired one ran, and every SuperNode failed its TLS handshake."""
    other = make_credentials(tmp_path / "other", nodes=0).ca_cert.parent
    assert main(tls_argv(other / "ca.crt", creds / "server.pem", creds / "server.key")) == 2
    err = capsys.readouterr().err
    assert f"--ssl-certfile {creds}/server.pem" in err and "was not issued by" in err
    assert "the same name, another key" in err  # both folders' CAs are "fedllm test CA"
    assert f"--ssl-ca-certfile {other}/ca.crt" in err and not started
    # an expired server certificate, signed by the right CA
    ca_cert = x509.load_pem_x509_certificate((creds / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((creds / "ca.key").read_bytes(), password=None)
    key = serialization.load_pem_private_key((creds / "server.key").read_bytes(), password=None)
    old = _issue("127.0.0.1", key, by=(ca_cert, ca_key), ca=False, days=-1)
    (tmp_path / "old.pem").write_bytes(old.public_bytes(serialization.Encoding.PEM))
    assert main(tls_argv(creds / "ca.crt", tmp_path / "old.pem", creds / "server.key")) == 2
    assert f"--ssl-certfile {tmp_path}/old.pem: valid " in capsys.readouterr().err
    assert not started
    with pytest.raises(ValueError, match="days must be >= 1"):
        make_credentials(tmp_path / "none", days=0)


def test_the_low_level_superlink_runner_checks_its_tls_files_too(
    creds: Path, monkeypatch, tmp_path: Path
) -> None:
    """`python -m fedllm.deploy.federation superlink` (tests, benches, any flower-superlink flag)
    refuses the CA/certificate mismatch `fedllm superlink` refuses, before anything serves."""
    from fedllm.deploy import guard

    monkeypatch.setattr(os, "environ", dict(os.environ))  # serve_superlink sets Flower's env
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(uvicorn.Server, "run", lambda self: pytest.fail("the SuperLink served"))
    other = make_credentials(tmp_path / "other", nodes=0).ca_cert
    flags = tls_argv(other, creds / "server.pem", creds / "server.key")[1:]  # no "superlink"
    flags += ["--database", ":memory:"]
    with pytest.raises(ValueError, match="was not issued by --ssl-ca-certfile"):
        guard.serve_superlink(flags)


def test_a_server_certificate_chained_through_an_intermediate_passes(
    started: list, tmp_path: Path
) -> None:
    """The CA check walks intermediates in the certificate file (a real PKI's layout), and
    refuses the leaf alone."""
    root_key, mid_key, leaf_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    root = _issue("root", root_key, by=None, ca=True)
    mid = _issue("intermediate", mid_key, by=(root, root_key), ca=True)
    leaf = _issue("127.0.0.1", leaf_key, by=(mid, mid_key), ca=False)
    pem = serialization.Encoding.PEM
    (tmp_path / "ca.crt").write_bytes(root.public_bytes(pem))
    (tmp_path / "chain.pem").write_bytes(leaf.public_bytes(pem) + mid.public_bytes(pem))
    (tmp_path / "leaf.pem").write_bytes(leaf.public_bytes(pem))
    key = leaf_key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (tmp_path / "server.key").write_bytes(key)
    assert main(superlink_argv(tmp_path, "ca.crt", "chain.pem", "server.key")) == 0
    assert len(started) == 1
    assert main(superlink_argv(tmp_path, "ca.crt", "leaf.pem", "server.key")) == 2
    assert len(started) == 1


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--root-certificates", "nope/ca.crt", "--auth-key", "nope/node0"],
            "--root-certificates nope/ca.crt: no such file",
        ),
        (["--auth-key", "nope/node0"], "--auth-key nope/node0: no such file"),
        (
            ["--auth-key", "{creds}/node-0.pub"],
            "--auth-key {creds}/node-0.pub: not an unencrypted OpenSSH ECDSA private key",
        ),
        (["--root-certificates", "{creds}/ca.key"], "expected a PEM certificate"),
        (["--superlink", "localhost"], "--superlink 'localhost': give the SuperLink's HOST:PORT"),
        (["--superlink", "::1:9093"], "--superlink '::1:9093': give the SuperLink's HOST:PORT"),
    ],
    ids=["missing-ca", "missing-key", "public-key", "key-as-ca", "no-port", "bare-ipv6"],
)
def test_a_node_with_unusable_arguments_is_refused_before_anything_starts(
    creds: Path, started: list, capsys, flags: list[str], message: str
) -> None:
    """h111: missing credentials reached Flower only once the SuperNode ran; --superlink without
    a port was taken; the --data-path check came after the SuperNode's command was built."""
    good = {
        "--superlink": "127.0.0.1:9093",
        "--root-certificates": f"{creds}/ca.crt",
        "--auth-key": f"{creds}/node-0",
    }
    given = {**good, **dict(zip(flags[::2], flags[1::2], strict=True))}
    argv = ["node", "--partition-id", "0", *(a for kv in given.items() for a in kv)]
    assert main([a.format(creds=creds) for a in argv]) == 2
    out = capsys.readouterr()
    assert message.format(creds=creds) in out.err and "Traceback" not in out.err
    assert not started and out.out == ""  # not even the SuperNode's command line
    argv = ["node", "--partition-id", "0", *(a for kv in good.items() for a in kv)]
    assert main(argv) == 1 and started[0][:4] == [
        sys.executable,
        "-m",
        "fedllm.deploy.federation",
        "supernode",
    ]


def test_a_missing_data_path_is_the_only_thing_an_insecure_node_says(started, capsys) -> None:
    """h111: the --data-path check came after the SuperNode's command was built (and its insecure
    warning printed): every argument is checked first."""
    argv = ["node", "--superlink", "127.0.0.1:9093", "--partition-id", "0", "--insecure"]
    assert main([*argv, "--data-path", "nope.jsonl"]) == 2
    out = capsys.readouterr()
    assert out.err == "fedllm: error: --data-path nope.jsonl: no such file or folder\n"
    assert not started and out.out == ""
