"""Deployment mode: submit a recipe to a running SuperLink and start SuperNodes, secured by default.

`fedllm run RECIPE --federation CONN` writes a Flower app folder (a pyproject naming
`fedllm.deploy.apps:server_app`/`client_app`) into the run directory, sends the resolved recipe as
run
config, streams the logs through `flwr run --stream`, and then asks the SuperLink for the run's
final status, because `flwr run --stream` exits 0 even when the run failed.

The processes fedllm starts are guarded (docs/security.md):
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

import hashlib
import importlib
import io
import ipaddress
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import tomllib

from fedllm.recipe import RunConfig

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

# what fedllm's app declares; a SuperNode runs a run's ClientApp only when its FAB says exactly this
APP_COMPONENTS: dict[str, str] = {
    "serverapp": "fedllm.deploy.apps:server_app",
    "clientapp": "fedllm.deploy.apps:client_app",
}
# the files of fedllm's FAB (`flwr run` adds .info/CONTENT; Flower removes it when installing)
APP_FILES = frozenset({"pyproject.toml", "README.md", ".info/CONTENT"})
MAX_PYPROJECT_BYTES = 64 * 1024
# the SuperLink paths anyone may reach: the Fleet API of SuperNodes, and health
PUBLIC_PATHS = ("/v1/fleet/",)
PUBLIC_EXACT = frozenset({"/health"})
# Flower's other task processes; a fedllm SuperNode refuses to start any of them
OTHER_TASK_COMMANDS = (
    "flwr-agentapp",
    "flwr-connector",
    "flwr-model",
    "flwr-serverapp",
    "flwr-simulation",
)


def flwr_env() -> dict[str, str]:
    """Environment for `flwr`/`flower-*` subprocesses: no run-time dependency installation, and
    this interpreter's scripts folder first on PATH so an unactivated venv finds Flower's CLIs."""
    scripts = str(Path(sys.executable).parent)
    path = os.pathsep.join([scripts, os.environ.get("PATH", "")])
    return {**os.environ, "PATH": path, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}


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
    import yaml

    text = yaml.safe_dump(cfg.model_dump(mode="json", exclude_defaults=True), sort_keys=False)
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

OPERATOR_ONLY = (
    "this SuperLink answers its Control and Runtime APIs only on loopback or its operator "
    "address (fedllm superlink --operator-address); SuperNodes use /v1/fleet/"
)


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    addr = ipaddress.ip_address(host.strip("[]").split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def is_loopback(host: str) -> bool:
    """Whether `host` (an IP literal, or 'localhost') is this machine's loopback interface."""
    if host == "localhost":
        return True
    try:
        return _ip(host).is_loopback
    except ValueError:
        return False


def parse_operator_address(address: str) -> tuple[str, int]:
    """HOST:PORT of an operator-only listener: a specific IP address (not 0.0.0.0 or ::)."""
    host, sep, port = address.rpartition(":")
    try:
        ip = _ip(host)
        number = int(port)
    except ValueError:
        ip, number = None, 0
    if not sep or ip is None or ip.is_unspecified or not 0 < number < 65536:
        raise ValueError(
            f"--operator-address {address!r}: give a specific IP address and port of an "
            "interface only the operator reaches, e.g. 127.0.0.1:9095 or 10.8.0.1:9095 "
            "(not 0.0.0.0 or ::, which would open the Control API on every interface)"
        )
    return str(ip), number


class OperatorOnly:
    """ASGI wrapper of Flower's SuperLink app: the Fleet API and health for anyone; the Control
    and Runtime APIs (submit/stop runs, register nodes, the ServerApp's API) only for loopback
    clients or connections to an operator listener."""

    def __init__(self, app: Callable[..., Any], *, operator: Iterable[tuple[str, int]] = ()):
        self.app = app
        self.operator = {(_ip(host), int(port)) for host, port in operator}

    def allows(self, scope: Mapping[str, Any]) -> bool:
        """Whether this request may reach Flower's app."""
        path = str(scope.get("path", ""))
        if path in PUBLIC_EXACT or path.startswith(PUBLIC_PATHS):
            return True
        client, server = scope.get("client"), scope.get("server")
        if client and is_loopback(str(client[0])):
            return True
        if server and server[1] is not None:
            try:
                return (_ip(str(server[0])), int(server[1])) in self.operator
            except ValueError:
                return False
        return False

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] not in ("http", "websocket") or self.allows(scope):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = json.dumps({"detail": OPERATOR_ONLY}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": 403, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _take_option(argv: Sequence[str], flag: str) -> tuple[list[str], list[str]]:
    """(values of `flag` in argv, the other arguments); `--flag V` and `--flag=V` both count."""
    values, rest, it = [], [], iter(argv)
    for arg in it:
        if arg == flag:
            value = next(it, None)
            if value is None:
                raise ValueError(f"{flag} needs a value")
            values.append(value)
        elif arg.startswith(flag + "="):
            values.append(arg.split("=", 1)[1])
        else:
            rest.append(arg)
    return values, rest


def _listen(host: str, port: int) -> socket.socket:
    """A bound TCP socket for uvicorn to serve on (it listens when the server starts)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as err:
        sock.close()
        raise SystemExit(f"[fedllm] cannot listen on {host}:{port}: {err}") from None
    return sock


def serve_superlink(argv: Sequence[str]) -> None:
    """Run Flower's SuperLink (flower-superlink's flags, plus `--operator-address HOST:PORT`)
    with `OperatorOnly` in front of its HTTP app; blocks until the SuperLink stops."""
    import dataclasses

    import uvicorn
    from flwr.supercore.http_logging import get_uvicorn_log_config
    from flwr.supercore.logger import console_handler
    from flwr.superlink.main import create_app

    flower = importlib.import_module("flwr.superlink.cli.flower_superlink")  # the package's
    # attribute of that name is the `flower_superlink` function, not the module

    addresses, flower_args = _take_option(argv, "--operator-address")
    operator = [parse_operator_address(a) for a in addresses]
    for legacy in ("FLWR_INTERNAL_GRPC_CONTROL_API", "FLWR_INTERNAL_GRPC_FLEET_API"):
        if os.environ.pop(legacy, None) is not None:  # gRPC servers outside the guard
            print(f"[fedllm] ignoring {legacy}: this SuperLink serves HTTP only", file=sys.stderr)
    os.environ.update(flwr_env())  # the SuperExec and ServerApps it starts: no installs, our PATH
    sys.argv = ["flower-superlink", *flower_args]
    config = flower._parse_superlink_lifespan_config()
    listeners = [(config.host, config.port)]
    wildcard = config.host in ("0.0.0.0", "::", "[::]")
    if not wildcard and not is_loopback(config.host):
        # Flower's ServerApp runner connects to host:port; keep it on loopback, inside the guard
        listeners.append(("127.0.0.1", config.port))
        config = dataclasses.replace(config, host="127.0.0.1")
    listeners += operator
    app = OperatorOnly(create_app(config, flower.SuperLinkLifespan), operator=operator)
    server = uvicorn.Server(
        uvicorn.Config(
            app=app,
            host=config.host,
            port=config.port,
            reload=False,
            access_log=True,
            log_config=get_uvicorn_log_config(console_handler.level),
            ssl_keyfile=config.ssl_keyfile,
            ssl_certfile=config.ssl_certfile,
            workers=1,
            proxy_headers=False,  # the client address is the socket's peer, never a header
        )
    )
    sockets = [_listen(host, port) for host, port in listeners]
    where = ", ".join(f"{h}:{p}" for h, p in listeners)
    print(f"[fedllm] SuperLink on {where}; Control and Runtime APIs: loopback", flush=True)
    if operator:
        print(f"[fedllm] operator-only: {', '.join(f'{h}:{p}' for h, p in operator)}", flush=True)
    server.run(sockets=sockets)


# -- SuperNode: only the installed fedllm runs ---------------------------------------------------


def check_app(names: Iterable[str], pyproject: bytes | None, *, where: str) -> None:
    """Refuse an app that is not fedllm's own wrapper: any file besides `APP_FILES` (code), or
    components other than `APP_COMPONENTS`."""
    names = set(names)
    extra = sorted(names - APP_FILES)
    if extra:
        more = f" and {len(extra) - 5} more" if len(extra) > 5 else ""
        raise ValueError(
            f"{where} holds {', '.join(extra[:5])}{more}: this node runs only its installed "
            f"fedllm, whose app carries no code (valid files: {', '.join(sorted(APP_FILES))}); "
            "submit runs with `fedllm run RECIPE --federation CONN`"
        )
    try:
        declared = tomllib.loads((pyproject or b"").decode())["tool"]["flwr"]["app"]
        components = declared["components"]
    except (KeyError, TypeError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        components = None
    if components != APP_COMPONENTS:
        raise ValueError(
            f"{where} declares components {components}; this node runs only fedllm's own "
            f"{APP_COMPONENTS} (submit runs with `fedllm run RECIPE --federation CONN`)"
        )


def check_fab(content: bytes) -> None:
    """Refuse a run's FAB unless it is fedllm's own app (`check_app`); reads only its file names
    and its small pyproject.toml, never extracts it."""
    where = f"the run's app (FAB sha256 {hashlib.sha256(content).hexdigest()[:12]})"
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as fab:
            names = [i.filename for i in fab.infolist() if not i.is_dir()]
            if set(names) - APP_FILES:  # refuse on the names alone, before reading anything
                check_app(names, None, where=where)
            pyproject = None
            if "pyproject.toml" in names:
                info = fab.getinfo("pyproject.toml")
                if info.file_size > MAX_PYPROJECT_BYTES:
                    raise ValueError(f"{where}: its pyproject.toml is {info.file_size} bytes")
                pyproject = fab.read(info)
    except zipfile.BadZipFile as err:
        raise ValueError(f"{where} is not a FAB (a zip file): {err}") from None
    check_app(names, pyproject, where=where)


def check_app_dir(folder: Path) -> None:
    """`check_app` on an installed app folder (what Flower puts on a ClientApp's sys.path)."""
    names = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir()]
    pyproject = folder / "pyproject.toml"
    data = pyproject.read_bytes()[:MAX_PYPROJECT_BYTES] if pyproject.is_file() else None
    check_app(names, data, where=f"the run's app in {folder}")


def flwr_home() -> Path:
    """Flower's home folder ($FLWR_HOME, default ~/.flwr), as Flower computes it."""
    home = os.environ.get("FLWR_HOME")
    return Path(home) if home else Path.home() / ".flwr"


def guard_bin(home: Path | None = None) -> Path:
    """A folder of Flower task commands for a fedllm SuperNode's PATH: `flwr-clientapp` runs the
    installed fedllm (`run_guarded_clientapp`); every other app process refuses to start."""
    tag = hashlib.sha256(sys.executable.encode()).hexdigest()[:10]
    folder = (home or flwr_home()) / "fedllm-node" / f"bin-{tag}"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    python = shlex.quote(sys.executable)
    scripts = {
        "flwr-clientapp": f'exec {python} -I -m fedllm.deploy.federation clientapp "$@"\n',
        **{
            name: (
                f'echo "fedllm node: refusing to start {name}: this SuperNode runs only '
                "fedllm's installed ClientApp\" >&2\nexit 1\n"
            )
            for name in OTHER_TASK_COMMANDS
        },
    }
    for name, body in scripts.items():
        tmp = folder / f".{name}.{os.getpid()}"
        tmp.write_text("#!/bin/sh\n" + body)
        tmp.chmod(0o700)
        os.replace(tmp, folder / name)
    return folder


def exec_supernode(argv: Sequence[str]) -> None:
    """Replace this process by Flower's `flower-supernode ARGV`, with `guard_bin` first on PATH so
    that its task processes are fedllm's (subprocess isolation, nothing installed at run time)."""
    for arg in argv:
        flag = arg.split("=", 1)[0]
        if flag in ("--isolation", "--allow-runtime-dependency-installation"):
            raise SystemExit(
                f"[fedllm] {flag} is not allowed for a fedllm SuperNode: it starts its own "
                "ClientApp processes (subprocess isolation) and installs nothing at run time"
            )
    env = flwr_env()
    env["PATH"] = os.pathsep.join([str(guard_bin()), env["PATH"]])
    os.execvpe("flower-supernode", ["flower-supernode", *argv], env)


def guard_clientapp_runtime(runtime: Any, client_app: Any) -> None:
    """Make Flower's ClientApp process (`flwr.supernode.runtime.run_clientapp`) check the run's
    FAB (`check_fab`) instead of installing it, and run `client_app` instead of loading the
    FAB's: no file of the FAB is written, imported or executed."""

    def install_from_fab(fab_file: bytes | Path, *args: Any, **kwargs: Any) -> None:
        check_fab(fab_file if isinstance(fab_file, bytes) else Path(fab_file).read_bytes())

    def get_load_client_app_fn(*args: Any, **kwargs: Any) -> Callable[[str, str, str], Any]:
        return lambda fab_id, fab_version, fab_hash: client_app

    runtime.install_from_fab = install_from_fab
    runtime.get_load_client_app_fn = get_load_client_app_fn


def run_guarded_clientapp(argv: Sequence[str]) -> None:
    """`flwr-clientapp ARGV` as Flower runs it, but for the installed fedllm only."""
    import flwr.supernode.runtime.run_clientapp as runtime
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    from fedllm.deploy.apps import client_app  # imported before any FAB could be on sys.path

    guard_clientapp_runtime(runtime, client_app)
    sys.argv = ["flwr-clientapp", *(a for a in argv if not a.startswith("--allow-runtime"))]
    flwr_clientapp()


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
    roles[args[0]](args[1:])
    return 0


def wait_for_port(host: str, port: int, *, timeout: float) -> None:
    """Block until something accepts TCP connections on host:port (a starting SuperLink)."""
    import socket
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
