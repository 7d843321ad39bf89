"""The guards around Flower's processes (docs/security.md):
- SuperLink (`serve_superlink`): Flower's own SuperLink app behind `OperatorOnly`, so its Control
  API (submit, stop, register nodes) and Runtime API (the ServerApp's) answer only loopback and an
  explicit operator address, while the Fleet API (SuperNodes) stays public. Flower 1.41 serves
  all three on one HTTP port and its `--control-api-address` no longer moves the Control API.
- SuperNode (`exec_supernode`, `guard_bin`): Flower's own SuperNode whose task processes are
  fedllm's: `flwr-clientapp` checks the run's app is fedllm's wrapper and runs the installed
  `fedllm.deploy.apps:client_app` (`run_guarded_clientapp`); every other app process is refused.
  Beside it runs the node's warm worker (`fedllm.deploy.warm`), which keeps the ClientApp's imports,
  base model and shard across messages; `--no-warm-worker` runs each message in its own process.
"""

from __future__ import annotations

import hashlib
import importlib
import ipaddress
import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fedllm.deploy import warm
from fedllm.deploy.app_check import check_fab
from fedllm.deploy.arguments import check_server_tls
from fedllm.deploy.flower_env import flwr_env, flwr_home

# the SuperLink paths anyone may reach: the Fleet API of SuperNodes, and health
FLOWER_SUPERLINK = "flwr.superlink.cli.flower_superlink"  # the module: the package's attribute
# of that name is the `flower_superlink` function
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
    config, operator = superlink_config(argv)
    _serve(config, operator)


def superlink_config(argv: Sequence[str]) -> tuple[Any, list[tuple[str, int]]]:
    """Flower's SuperLink config from its flags and the operator addresses, its TLS files
    checked; sets the environment the SuperExec and the ServerApps it starts inherit."""
    flower = importlib.import_module(FLOWER_SUPERLINK)
    addresses, flower_args = _take_option(argv, "--operator-address")
    operator = [parse_operator_address(a) for a in addresses]
    for legacy in ("FLWR_INTERNAL_GRPC_CONTROL_API", "FLWR_INTERNAL_GRPC_FLEET_API"):
        if os.environ.pop(legacy, None) is not None:  # gRPC servers outside the guard
            print(f"[fedllm] ignoring {legacy}: this SuperLink serves HTTP only", file=sys.stderr)
    os.environ.update(flwr_env())  # the SuperExec and ServerApps it starts: no installs, our PATH
    tls = [
        _take_option(flower_args, f"--ssl-{f}")[0] for f in ("ca-certfile", "certfile", "keyfile")
    ]
    if all(tls):  # before Flower reads them (it names a missing file's flag only) and before
        # serving (else uvicorn fails after "SuperLink on ...": `ssl.SSLError: PEM lib`)
        check_server_tls(ca=Path(tls[0][-1]), cert=Path(tls[1][-1]), key=Path(tls[2][-1]))
    sys.argv = ["flower-superlink", *flower_args]
    return flower._parse_superlink_lifespan_config(), operator


def _serve(config: Any, operator: list[tuple[str, int]]) -> None:
    """Serve a checked SuperLink config behind `OperatorOnly`; blocks until it stops."""
    import dataclasses

    import uvicorn
    from flwr.supercore.http_logging import get_uvicorn_log_config
    from flwr.supercore.logger import console_handler
    from flwr.superlink.main import create_app

    flower = importlib.import_module(FLOWER_SUPERLINK)
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


def guard_bin(home: Path | None = None) -> Path:
    """A folder of Flower task commands for a fedllm SuperNode's PATH: `flwr-clientapp` runs the
    installed fedllm (`run_guarded_clientapp`); every other app process refuses to start."""
    tag = hashlib.sha256(sys.executable.encode()).hexdigest()[:10]
    folder = (home or flwr_home()) / "fedllm-node" / f"bin-{tag}"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    python = shlex.quote(sys.executable)
    scripts = {
        # fedllm.deploy.guard imports only Flower: a message's process stays light
        "flwr-clientapp": f'exec {python} -I -m fedllm.deploy.guard clientapp "$@"\n',
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
    argv = list(argv)
    cold = "--no-warm-worker" in argv
    argv = [a for a in argv if a != "--no-warm-worker"]
    env = flwr_env()
    env["PATH"] = os.pathsep.join([str(guard_bin()), env["PATH"]])
    if not cold:
        argv = with_node_config(argv, {warm.NODE_KEY: str(start_warm_worker(env))})
    os.execvpe("flower-supernode", ["flower-supernode", *argv], env)


def start_warm_worker(env: Mapping[str, str]) -> Path:
    """Start this node's warm worker (`fedllm.deploy.warm`) as a child of the process about to
    become the SuperNode (exec keeps the PID, so the worker exits with the SuperNode)."""
    warm.sweep_stale(Path(tempfile.gettempdir()))  # folders of killed nodes' workers
    folder = Path(tempfile.mkdtemp(prefix=warm.PREFIX))  # 0700, short enough for AF_UNIX
    cmd = [sys.executable, "-I", "-m", "fedllm.deploy.warm", str(folder), "--parent"]
    subprocess.Popen([*cmd, str(os.getpid())], env=dict(env), stdin=subprocess.DEVNULL)
    return folder


def with_node_config(argv: Sequence[str], extra: Mapping[str, str]) -> list[str]:
    """`argv` with `extra` keys added to its `--node-config` (Flower's `k=v k=v`, JSON values)."""
    pairs = " ".join(f"{k}={json.dumps(v)}" for k, v in extra.items())
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--node-config" and i + 1 < len(out):
            out[i + 1] = f"{out[i + 1]} {pairs}".strip()
            return out
        if arg.startswith("--node-config="):
            out[i] = f"{arg} {pairs}"
            return out
    return [*out, "--node-config", pairs]


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

    # imported before any FAB could be on sys.path; the heavy ClientApp is imported here only if
    # the node has no warm worker (`fedllm.deploy.warm`)
    from fedllm.deploy.warm import client_entry

    guard_clientapp_runtime(runtime, client_entry)
    sys.argv = ["flwr-clientapp", *(a for a in argv if not a.startswith("--allow-runtime"))]
    flwr_clientapp()


if __name__ == "__main__":  # `python -m fedllm.deploy.guard clientapp FLOWER-ARGS...`
    if sys.argv[1:2] != ["clientapp"]:
        sys.exit("usage: python -m fedllm.deploy.guard clientapp FLOWER-ARGS...")
    run_guarded_clientapp(sys.argv[2:])
