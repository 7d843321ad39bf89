"""Deployment mode's processes: a SuperLink and SuperNodes, secured by default, and the
commands that start them (`fedllm superlink`, `fedllm node`; submitting a run is
`fedllm.deploy.submit`).

The processes fedllm starts are guarded (`fedllm.deploy.guard`, docs/security.md):
- SuperLink (`superlink_command`, `fedllm superlink`): Flower's own SuperLink, but its Control API
  (submit, stop, register nodes) and Runtime API (the ServerApp's) answer only loopback clients
  and an operator-only address given explicitly; the Fleet API (SuperNodes) stays public.
  Flower 1.41 serves all three on one HTTP port and its `--control-api-address` flag no longer
  moves the Control API, so the guard sits in front of Flower's app.
- SuperNode (`supernode_command`, `fedllm node`): Flower's own SuperNode, whose task processes
  are fedllm's: `flwr-clientapp` checks the run's app (FAB) is fedllm's own wrapper (no code,
  fedllm's components) and runs the installed `fedllm.deploy.apps:client_app`, never code from
  the FAB; every other kind of app process is refused.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from fedllm.deploy.flower_env import flwr_env
from fedllm.deploy.guard import (
    exec_supernode,
    parse_operator_address,
    run_guarded_clientapp,
    serve_superlink,
)
from fedllm.processes import hide_bitsandbytes

INSECURE_WARNING = (
    "WARNING: insecure mode: traffic is unencrypted and the SuperLink cannot tell real nodes "
    "from impostors; use it only on a trusted loopback for debugging"
)


def write_connection(
    flwr_home: Path,
    name: str,
    *,
    address: str,
    root_certificates: Path | None = None,
    insecure: bool = False,
) -> Path:
    """Add a `[superlink.<name>]` connection to `$FLWR_HOME/config.toml` (what `flwr` reads)."""
    if (root_certificates is None) == (not insecure):
        raise ValueError("give root_certificates (TLS) or insecure=True, not both/neither")
    if insecure:
        print(INSECURE_WARNING, file=sys.stderr)
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    text = path.read_text() if path.exists() else '[superlink]\ndefault = "' + name + '"\n'
    security = (
        "insecure = true\n"
        if insecure
        else f"root-certificates = {json.dumps(str(Path(root_certificates).resolve()))}\n"
    )
    text += f'\n[superlink.{name}]\naddress = "{address}"\n{security}'
    path.write_text(text)
    return path


def superlink_args(
    *,
    port: int,
    database: Path,
    host: str = "127.0.0.1",
    tls: tuple[Path, Path, Path] | None = None,
    insecure: bool = False,
    operator_address: str | None = None,
) -> list[str]:
    """Arguments of `serve_superlink`: flower-superlink's, TLS from `tls` (CA certificate, server
    certificate, server key) with node auth, and an optional operator-only address."""
    args = ["--host", host, "--port", str(port), "--database", str(database)]
    args.append("--disable-runtime-dependency-installation")
    if operator_address is not None:
        parse_operator_address(operator_address)  # fail here rather than in the started process
        args += ["--operator-address", operator_address]
    if insecure:
        print(INSECURE_WARNING, file=sys.stderr)
        return [*args, "--insecure"]
    if tls is None:
        raise ValueError("a SuperLink needs TLS certificates (certs=DIR) or insecure=True")
    ca, cert, key = tls
    return [
        *args,
        "--ssl-ca-certfile",
        str(ca),
        "--ssl-certfile",
        str(cert),
        "--ssl-keyfile",
        str(key),
        "--enable-supernode-auth",
    ]


def superlink_command(
    *,
    port: int,
    database: Path,
    host: str = "127.0.0.1",
    certs: Path | None = None,
    insecure: bool = False,
    operator_address: str | None = None,
) -> list[str]:
    """Flower's SuperLink behind fedllm's guard (`serve_superlink`): TLS from `certs` (ca.crt,
    server.pem, server.key) and node auth; Control/Runtime APIs for loopback (+ the operator)."""
    tls = None if certs is None else (certs / "ca.crt", certs / "server.pem", certs / "server.key")
    args = superlink_args(
        port=port,
        database=database,
        host=host,
        tls=tls,
        insecure=insecure,
        operator_address=operator_address,
    )
    return [sys.executable, "-m", "fedllm.deploy.federation", "superlink", *args]


def supernode_command(
    *,
    superlink: str,
    partition_id: int,
    port: int,
    data_path: str | None = None,
    rank: int | None = None,
    model: str | None = None,
    recipe_hash: str | None = None,
    require_secagg: bool = False,
    max_epsilon: float | None = None,
    min_noise: float | None = None,
    personal_dir: str | None = None,
    device: Mapping[str, float] | None = None,
    root_certificates: Path | None = None,
    auth_key: Path | None = None,
    insecure: bool = False,
) -> list[str]:
    """Flower's SuperNode for one organisation, with its node config (partition, data, rank,
    privacy minimums), whose task processes run only the installed fedllm (`exec_supernode`)."""
    node = {
        "partition-id": partition_id,
        "data-path": data_path,
        "rank": rank,
        "model": model,
        "recipe-hash": recipe_hash,
        "require-secagg": True if require_secagg else None,
        "max-epsilon": max_epsilon,
        "min-noise": min_noise,
        "personal-dir": personal_dir,
        **(device or {}),  # threads, slowdown, memory-mb (None: unset, left out below)
    }
    pairs = [f"{k}={json.dumps(v)}" for k, v in node.items() if v is not None]
    cmd = [
        sys.executable,
        "-m",
        "fedllm.deploy.federation",
        "supernode",
        "--superlink",
        superlink,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--node-config",
        " ".join(pairs),
    ]
    if insecure:
        print(INSECURE_WARNING, file=sys.stderr)
        return [*cmd, "--insecure"]
    if root_certificates is None or auth_key is None:
        raise ValueError(
            "a SuperNode needs --root-certificates (the CA that signed the SuperLink's "
            "certificate) and --auth-key (its registered ECDSA private key), or --insecure"
        )
    return [
        *cmd,
        "--root-certificates",
        str(root_certificates),
        "--auth-supernode-private-key",
        str(auth_key),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m fedllm.deploy.federation {superlink|supernode|clientapp} FLOWER-ARGS...`."""
    args = list(sys.argv[1:] if argv is None else argv)
    roles = {
        "superlink": serve_superlink,
        "supernode": exec_supernode,
        "clientapp": run_guarded_clientapp,
    }
    if not args or args[0] not in roles:
        print(f"usage: python -m fedllm.deploy.federation {{{'|'.join(roles)}}} ARGS...")
        return 2
    if args[0] == "clientapp":  # a fresh process per task: no bitsandbytes unless 4/8-bit
        hide_bitsandbytes()
    roles[args[0]](args[1:])
    return 0


def node_port(port: int | None, *, host: str = "127.0.0.1") -> int:
    """The local port of a SuperNode's app API (Flower's Runtime HTTP API): `port` if nothing
    listens there, else a clear error; without `port`, a free one, so that several SuperNodes
    can share a machine (Flower's fixed default, 9094, lets only the first start)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will bind
        try:
            probe.bind((host, port or 0))
        except OSError as err:
            raise ValueError(
                f"--port {port}: {host}:{port} is already taken ({err.strerror}), e.g. by "
                "another SuperNode on this machine; give a free port with --port, or leave "
                "--port out to take a free one"
            ) from None
        return probe.getsockname()[1]


def wait_for_port(host: str, port: int, *, timeout: float) -> None:
    """Block until something accepts TCP connections on host:port (a starting SuperLink)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"nothing listens on {host}:{port} after {timeout:.0f}s"
                ) from None
            time.sleep(0.25)


def register_node(public_key: Path, connection: str, *, env: dict[str, str] | None = None) -> str:
    """Register a SuperNode's public key with the SuperLink (`flwr supernode register`)."""
    out = subprocess.run(
        ["flwr", "supernode", "register", str(public_key), connection],
        capture_output=True,
        text=True,
        env=env or flwr_env(),
        timeout=120,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"registering {public_key} failed: {out.stdout}{out.stderr}")
    return out.stdout


if __name__ == "__main__":
    sys.exit(main())
