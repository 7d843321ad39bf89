"""Deployment mode: submit a recipe to a running SuperLink and start SuperNodes, secured by default.

`fedllm run RECIPE --federation CONN` writes a Flower app folder (a pyproject naming
`fedllm.deploy.apps:server_app`/`client_app`) into the run directory, sends the resolved recipe as
run
config, streams the logs through `flwr run --stream`, and then asks the SuperLink for the run's
final status, because `flwr run --stream` exits 0 even when the run failed.

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
import re
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from fedllm.deploy.flower_env import flwr_env
from fedllm.deploy.guard import (
    exec_supernode,
    parse_operator_address,
    run_guarded_clientapp,
    serve_superlink,
)
from fedllm.processes import hide_bitsandbytes
from fedllm.recipe import RunConfig, dump_yaml

INSECURE_WARNING = (
    "WARNING: insecure mode: traffic is unencrypted and the SuperLink cannot tell real nodes "
    "from impostors; use it only on a trusted loopback for debugging"
)

APP_PYPROJECT = """\
# Written by `fedllm run --federation`: the Flower app wrapping fedllm's module-level apps.
# fedllm must be installed on the SuperLink and every SuperNode (no run-time installation).
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedllm-app"
version = "{version}"
description = "fedllm federated LoRA fine-tuning (recipe sent as run config)"
license = "Apache-2.0"
dependencies = ["fedllm"]

[tool.flwr.app]
publisher = "fedllm"

[tool.flwr.app.components]
serverapp = "fedllm.deploy.apps:server_app"
clientapp = "fedllm.deploy.apps:client_app"

[tool.flwr.app.config]
recipe = ""
resume = false
"""


def write_app(folder: Path) -> Path:
    """The Flower app folder `flwr run` builds a FAB from."""
    from importlib.metadata import version

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(APP_PYPROJECT.format(version=version("fedllm")))
    (folder / "README.md").write_text("fedllm deployment app; see docs/deployment.md\n")
    return folder


def write_run_config(path: Path, cfg: RunConfig, *, resume: bool) -> Path:
    """Run-config overrides as TOML; a JSON string literal is also a valid TOML basic string.

    Only non-default values are sent (the receiver re-applies the defaults), which keeps the
    text short and independent of how optional sections dump their defaults.
    """

    text = dump_yaml(cfg.model_dump(mode="json", exclude_defaults=True))
    path.write_text(f"recipe = {json.dumps(text)}\nresume = {str(resume).lower()}\n")
    return path


def run_status(connection: str, run_id: int) -> dict:
    """The SuperLink's record of one run (`flwr ls --format json`), e.g. status finished:failed."""
    out = subprocess.run(
        ["flwr", "ls", connection, "--run-id", str(run_id), "--format", "json"],
        capture_output=True,
        text=True,
        env=flwr_env(),
        timeout=120,
        check=False,
    )
    try:
        runs = json.loads(out.stdout).get("runs", [])
    except json.JSONDecodeError:
        runs = []
    if not runs:
        raise RuntimeError(f"`flwr ls` did not report run {run_id}: {out.stdout}{out.stderr}")
    return runs[0]


def submit(cfg: RunConfig, connection: str, *, resume: bool) -> int:
    """Run `cfg` on the SuperLink `connection`; 0 only if the run finished as completed."""
    run_dir = cfg.run_dir
    app = write_app(run_dir / "flwr_app")
    overrides = write_run_config(run_dir / "run_config.toml", cfg, resume=resume)
    cmd = ["flwr", "run", str(app), connection, "--run-config", str(overrides), "--stream"]
    print(f"[fedllm] submitting to {connection}: {' '.join(cmd)}", flush=True)
    run_id = None
    with subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=flwr_env()
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            found = re.search(r"Successfully started run (\d+)", line)
            if found and run_id is None:
                run_id = int(found.group(1))
                (run_dir / "flwr_run_id").write_text(f"{run_id}\n")
    if run_id is None:
        print(f"[fedllm] the SuperLink at {connection} did not start the run", file=sys.stderr)
        return 1
    status = run_status(connection, run_id)
    if status.get("status") != "finished:completed":
        print(
            f"[fedllm] run {run_id} ended as {status.get('status')!r}: "
            f"{status.get('status-details') or 'see the log above'}",
            file=sys.stderr,
        )
        return 1
    print(f"[fedllm] run {run_id} finished:completed", flush=True)
    return 0


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


# -- SuperLink: Control and Runtime APIs for the operator only ----------------------------------


# -- SuperNode: only the installed fedllm runs ---------------------------------------------------


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
    import time

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
