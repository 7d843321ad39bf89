"""`fedllm superlink` (the operator's guarded SuperLink), `fedllm node` (one organisation's guarded
SuperNode) and `fedllm certs` (test credentials)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fedllm.client.node_config import DEVICE_KEYS
from fedllm.deploy.arguments import (
    check_node_credentials,
    check_superlink_address,
)
from fedllm.deploy.federation import node_port, superlink_args, supernode_command
from fedllm.deploy.flower_env import flwr_env
from fedllm.deploy.guard import serve_superlink


def check_node_args(args: argparse.Namespace) -> None:
    """Refuse a `fedllm node` argument that cannot work, naming the flag, before anything starts:
    Flower checks its own only once the SuperNode (and its warm worker) run."""
    if args.partition_id < 0:
        raise ValueError(f"--partition-id {args.partition_id}: a partition id is 0 or more")
    if args.rank is not None and args.rank < 1:
        raise ValueError(f"--rank {args.rank}: a LoRA rank is 1 or more")
    check_superlink_address(args.superlink)
    if args.data_path and not Path(args.data_path).expanduser().exists():
        raise FileNotFoundError(f"--data-path {args.data_path}: no such file or folder")
    if not args.insecure:
        check_node_credentials(args.root_certificates, args.auth_key)


def cmd_node(args: argparse.Namespace) -> int:
    """Replace this process by the guarded `flower-supernode` (`exec_supernode` execs again), so
    its PID is the SuperNode's; every argument is checked first (`check_node_args`)."""
    check_node_args(args)
    port = node_port(args.port)
    cmd = supernode_command(
        superlink=args.superlink,
        partition_id=args.partition_id,
        port=port,
        data_path=absolute(args.data_path),
        rank=args.rank,
        model=args.model,
        recipe_hash=args.recipe_hash,
        require_secagg=args.require_secagg,
        max_epsilon=args.max_epsilon,
        min_noise=args.min_noise,
        personal_dir=absolute(args.personal_dir),
        device={key: getattr(args, key.replace("-", "_")) for key in DEVICE_KEYS},
        root_certificates=args.root_certificates,
        auth_key=args.auth_key,
        insecure=args.insecure,
    )
    if args.no_warm_worker:  # every message in its own process (see fedllm.deploy.warm)
        cmd.append("--no-warm-worker")
    if args.port is None:
        print(f"[fedllm] this SuperNode's app API: 127.0.0.1:{port} (free; --port to choose)")
    print(f"[fedllm] {' '.join(cmd)}", flush=True)
    os.execvpe(cmd[0], cmd, flwr_env(verbose=args.verbose))
    return 1  # not reached


def absolute(path: str | None) -> str | None:
    """A node's folder or file as the absolute path its node config carries (None: unset)."""
    return str(Path(path).expanduser().resolve()) if path else None


def cmd_superlink(args: argparse.Namespace) -> int:
    """Run Flower's SuperLink with its Control/Runtime APIs for the operator only; blocks."""
    tls = (args.ssl_ca_certfile, args.ssl_certfile, args.ssl_keyfile)
    if not args.insecure and None in tls:
        raise ValueError(
            "a SuperLink needs --ssl-ca-certfile, --ssl-certfile and --ssl-keyfile "
            "(or --insecure, on a trusted loopback only)"
        )
    if args.verbose:  # this process's Flower log, and the ServerApp processes it starts
        from flwr.common.logger import update_console_handler

        os.environ.update(flwr_env(verbose=True))
        update_console_handler(level="DEBUG", timestamps=True)
    serve_superlink(
        superlink_args(
            port=args.port,
            database=args.database,
            host=args.host,
            tls=None if args.insecure else tls,
            insecure=args.insecure,
            operator_address=args.operator_address,
        )
    )
    return 0


def cmd_certs(args: argparse.Namespace) -> int:
    """`fedllm certs`: write test credentials into the folder and print which file is which."""
    from fedllm.deploy.certs import make_credentials

    creds = make_credentials(
        args.folder, nodes=args.nodes, hosts=args.host or None, force=args.force
    )
    print(f"CA certificate:      {creds.ca_cert}")
    print(f"SuperLink cert/key:  {creds.server_cert}, {creds.server_key}")
    for i, key in enumerate(creds.node_keys):
        print(f"SuperNode {i} keys:    {key} (private), {creds.node_public(i)} (register this)")
    print(
        "test credentials only: each organisation should create and keep its own key",
        file=sys.stderr,
    )
    return 0


def add_deploy_commands(sub: argparse._SubParsersAction) -> None:
    """`fedllm node`, `fedllm superlink` and `fedllm certs`."""
    _add_node(sub)
    _add_superlink(sub)
    _add_certs(sub)


def _add_node(sub: argparse._SubParsersAction) -> None:
    node = sub.add_parser("node", help="start a SuperNode for one organisation (deployment mode)")
    node.add_argument("--superlink", required=True, metavar="HOST:PORT")
    node.add_argument("--partition-id", type=int, required=True, help="this node's partition id")
    node.add_argument("--data-path", help="a local data file/folder: this node's whole dataset")
    node.add_argument("--rank", type=int, help="LoRA rank of this node (default: the recipe's)")
    node.add_argument("--model", help="refuse runs whose recipe uses another base model")
    node.add_argument("--recipe-hash", help="refuse runs of any other recipe fingerprint")
    node.add_argument(
        "--require-secagg",
        action="store_true",
        help="train only in runs with privacy.secure_aggregation.enabled",
    )
    node.add_argument(
        "--max-epsilon",
        type=float,
        help="train only under DP with target ε / budget ≤ this, and never past it by this "
        "node's own ε ledger",
    )
    node.add_argument(
        "--min-noise",
        type=float,
        help="train only with a DP-SGD σ, or client-level noise on one update as the server "
        "sees it (z, or z/√m with noise_at: client), of at least this",
    )
    node.add_argument(
        "--personal-dir",
        help="this organisation's own folder for what its client keeps between rounds and "
        "never sends (personal adapters, node state): the only place state outside a private "
        "run's guarantee is kept (default: the run directory's clients/<p>/, or nowhere then)",
    )
    node.add_argument(
        "--port",
        type=int,
        help="local port of the node's app API (Flower's Runtime HTTP API on 127.0.0.1; default: "
        "a free one, so several nodes can share a machine)",
    )
    emulate = node.add_argument_group(
        "device emulation", "over this node's entry in the recipe's `devices` (docs/constrained.md)"
    )
    emulate.add_argument("--threads", type=int, help="torch threads while training")
    emulate.add_argument("--slowdown", type=float, help="local steps take this many times longer")
    emulate.add_argument("--memory-mb", type=float, help="refuse plans estimated above this")
    node.add_argument("--root-certificates", type=Path, help="CA certificate (TLS)")
    node.add_argument("--auth-key", type=Path, help="this node's registered ECDSA private key")
    node.add_argument("--insecure", action="store_true", help="no TLS, no auth (debug only)")
    node.add_argument("-v", "--verbose", action="store_true", help="Flower's DEBUG log lines too")
    node.add_argument(
        "--no-warm-worker",
        action="store_true",
        help="no warm worker: each message imports the ClientApp and loads the base again",
    )
    node.set_defaults(fn=cmd_node, flower_service=True)  # its output is Flower's own log


def _add_superlink(sub: argparse._SubParsersAction) -> None:
    link = sub.add_parser(
        "superlink",
        help="start the SuperLink (deployment mode): Flower's, with its Control API for the "
        "operator only",
    )
    link.add_argument("--host", default="0.0.0.0", help="address SuperNodes connect to")
    link.add_argument("--port", type=int, default=9093)
    link.add_argument("--database", type=Path, default=Path("state.db"), help="runs and nodes")
    link.add_argument("--ssl-ca-certfile", type=Path, help="CA certificate (TLS)")
    link.add_argument("--ssl-certfile", type=Path, help="the SuperLink's TLS certificate")
    link.add_argument("--ssl-keyfile", type=Path, help="the SuperLink's TLS private key")
    link.add_argument(
        "--operator-address",
        metavar="IP:PORT",
        help="also answer the Control API on this operator-only address (e.g. a VPN or "
        "management interface); without it, only on loopback",
    )
    link.add_argument("--insecure", action="store_true", help="no TLS, no auth (debug only)")
    link.add_argument("-v", "--verbose", action="store_true", help="Flower's DEBUG log lines too")
    link.set_defaults(fn=cmd_superlink, flower_service=True)  # its output is Flower's own log


def _add_certs(sub: argparse._SubParsersAction) -> None:
    certs = sub.add_parser("certs", help="create a test CA, SuperLink certificate and node keys")
    certs.add_argument("folder")
    certs.add_argument("--nodes", type=int, default=3, help="node key pairs to make (default 3)")
    certs.add_argument("--host", action="append", help="SuperLink host name/IP (repeatable)")
    certs.add_argument(
        "--force", action="store_true", help="replace credentials already in the folder"
    )
    certs.set_defaults(fn=cmd_certs)
