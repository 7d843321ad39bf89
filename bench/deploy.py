"""Per-round wall time of Flower's deployment engine against its simulation engine, same recipe.

    python bench/deploy.py [--recipe recipes/tiny.yaml] [key=value ...]

Both sides run `fedllm run` on the recipe with the same overrides: once in simulation (Ray), once
on a loopback SuperLink with TLS and node authentication plus one SuperNode per client (started
here, stopped by process group at the end). Per round both write `seconds` (train + evaluate)
to metrics.jsonl; the ratio of their means is what deployment costs per round. Each SuperNode
has its warm worker (`fedllm.deploy.warm`); `--cold` adds a third side whose nodes run every
message in a fresh `flwr-clientapp` process (`--no-warm-worker`), as before the worker existed.
Writes results/deploy.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedllm.deploy.certs import make_credentials
from fedllm.deploy.federation import (
    register_node,
    superlink_command,
    supernode_command,
    wait_for_port,
    write_connection,
)
from fedllm.deploy.flower_env import flwr_env

RESULTS = Path(__file__).parent / "results" / "deploy.md"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def round_rows(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {
        r["round"]: {
            "seconds": r["seconds"],
            "train": max(
                (
                    c["train_seconds"]
                    for c in rows
                    if c["kind"] == "client" and c["round"] == r["round"] and c["status"] == "ok"
                ),
                default=0.0,
            ),
        }
        for r in rows
        if r["kind"] == "server" and r["round"] > 0
    }


def run(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def node_threads(clients: int) -> int:
    """Torch threads per SuperNode: the machine's cores shared evenly (at least one each)."""
    return max(1, (os.cpu_count() or 1) // clients)


def deployed(
    recipe: str, *, overrides: list[str], root: Path, clients: int, warm: bool = True
) -> float:
    """Run the recipe on a loopback TLS + auth federation; returns total wall seconds.

    The SuperNodes (and their warm workers and ClientApp processes) share this machine's cores,
    so each gets `node_threads` of them (OMP_NUM_THREADS, read by torch at start): all nodes
    train at once, where the simulation trains one client at a time on every core.
    """
    env = {**flwr_env(), "FLWR_HOME": str(root / "flwr_home")}
    node_env = {**env, "OMP_NUM_THREADS": str(node_threads(clients))}
    creds = make_credentials(root / "creds", nodes=clients)
    port = free_port()
    procs = []

    def start(cmd: list[str], log: str, *, env: dict[str, str] = env) -> None:
        out = open(root / log, "w")
        procs.append(
            subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        )

    try:
        start(
            superlink_command(port=port, database=root / "state.db", certs=root / "creds"),
            "superlink.log",
        )
        write_connection(
            root / "flwr_home",
            "bench",
            address=f"127.0.0.1:{port}",
            root_certificates=creds.ca_cert,
        )
        wait_for_port("127.0.0.1", port, timeout=60)
        for i in range(clients):
            register_node(creds.node_public(i), "bench", env=env)
            start(
                [
                    *supernode_command(
                        superlink=f"127.0.0.1:{port}",
                        partition_id=i,
                        port=free_port(),
                        root_certificates=creds.ca_cert,
                        auth_key=creds.node_keys[i],
                    ),
                    *([] if warm else ["--no-warm-worker"]),
                ],
                f"node{i}.log",
                env=node_env,
            )
        cmd = [
            sys.executable,
            "-m",
            "fedllm.cli",
            "run",
            recipe,
            *overrides,
            "--federation",
            "bench",
        ]
        return run(cmd, env)
    finally:
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()


def import_seconds() -> float:
    """What a fresh ClientApp process pays before any work: importing fedllm's client app."""
    code = "import fedllm.deploy.apps"
    return run([sys.executable, "-c", code], dict(os.environ))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/tiny.yaml")
    parser.add_argument("--cold", action="store_true", help="also run nodes without warm workers")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    from fedllm.recipe import load_recipe

    walls, rounds = {}, {}
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="fedllm-bench-deploy-") as tmp:
        root = Path(tmp)
        common = [*args.overrides, f"output_dir={root}"]
        clients = load_recipe(args.recipe, common).data.num_clients
        walls["simulation"] = run(
            [sys.executable, "-m", "fedllm.cli", "run", args.recipe, *common, "name=sim"],
            dict(os.environ),
        )
        rounds["simulation"] = round_rows(root / "sim")
        sides = [("deployment (warm)", True)] + ([("deployment (cold)", False)] * args.cold)
        for label, warm in sides:
            name = "dep" if warm else "cold"
            (root / name).mkdir()
            walls[label] = deployed(
                args.recipe,
                overrides=[*common, f"name={name}"],
                root=root / name,
                clients=clients,
                warm=warm,
            )
            rounds[label] = round_rows(root / name)
        imports = import_seconds()
    load = os.getloadavg()
    threads = node_threads(clients)
    mean = lambda d: sum(v["seconds"] for v in d.values()) / len(d)  # noqa: E731
    sim = rounds["simulation"]
    head = " | ".join(f"{k} s" for k in rounds)
    lines = [
        "# Deployment vs simulation: per-round wall time",
        "",
        f"`python bench/deploy.py --recipe {args.recipe} {'--cold ' * args.cold}"
        f"{' '.join(args.overrides)}` on {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, {clients} clients; deployment = loopback SuperLink with TLS + "
        f"SuperNode auth. Load average at the end: {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}.",
        "",
        f"| round | {head} | " + " | ".join(f"{k} / simulation" for k in list(rounds)[1:]) + " |",
        "|---:|" + "---:|" * (2 * len(rounds) - 1),
    ]
    for rnd in sorted(sim):
        secs = [rounds[k].get(rnd, {"seconds": float("nan")})["seconds"] for k in rounds]
        ratios = [f"{x / secs[0]:.2f}" for x in secs[1:]]
        lines.append(
            f"| {rnd} | " + " | ".join(f"{x:.1f}" for x in secs) + " | " + " | ".join(ratios) + " |"
        )
    lines.append("")
    for label in list(rounds)[1:]:
        lines.append(
            f"**Mean round: {label} / simulation = {mean(rounds[label]) / mean(sim):.2f}×** "
            f"({mean(rounds[label]):.1f} s vs {mean(sim):.1f} s); whole command incl. start-up "
            f"and round 0: {walls[label]:.0f} s vs {walls['simulation']:.0f} s."
        )
    lines += [
        "",
        "Each round is 2 exchanges (train, evaluate) and Flower starts a `flwr-clientapp` process "
        "for every message. With a warm worker that process imports only Flower and the guard "
        "and hands the message to the node's long-lived worker, which keeps torch/transformers/"
        "peft, the base model and the tokenized shard; without one (cold) every message imports "
        f"the ClientApp ({imports:.1f} s measured here for `import fedllm.deploy.apps` alone), "
        "rebuilds the shard and reloads the base. SuperNodes and the ServerApp poll the "
        "SuperLink every 1-3 s.",
        "",
        f"Cores: the simulation trains one client at a time on all {os.cpu_count()} cores; the "
        f"{clients} SuperNodes train at once, each with {threads} torch thread(s) "
        "(OMP_NUM_THREADS), as if each had its share of this machine.",
        "",
        f"Load average before the simulation side: {load_start:.2f}.",
    ]
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
