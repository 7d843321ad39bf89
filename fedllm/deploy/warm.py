"""A warm worker beside a SuperNode: imports, the base model and the tokenised shard survive
across messages and rounds.

Flower starts one `flwr-clientapp` process per message (its token is per launch), and each used
to import torch/transformers/peft, rebuild the shard and reload the base before its first step.
`fedllm node` now also starts `python -m fedllm.deploy.warm FOLDER` and names FOLDER in the node
config (`warm-worker`). The per-message process runs `client_entry`, which imports only Flower
and this module and hands the message and its context to the worker over a Unix socket in FOLDER;
the worker runs the installed ClientApp (`fedllm.deploy.apps.client_app`, mods and node guard
included) and returns the reply and the context state, which the per-message process pushes to
the SuperNode as before. Flower's message path, TLS, node authentication, node loss and resume
are unchanged: only the work inside one ClientApp call moved.

Reachable only by its own node: FOLDER is 0700 and owned by the node's user, and every request
carries the 32-byte secret in FOLDER/secret (0600), compared in constant time. Another local
user cannot connect; a process of the same user can (as it could read the node's keys).
If the worker is not running, the message runs in the per-message process as before. A worker
removes FOLDER when its node exits; a SIGKILLed one cannot, so the next `fedllm node` on the
machine removes the folders of dead workers (`sweep_stale`, by the pid each one writes).
"""

from __future__ import annotations

import hmac
import importlib
import os
import secrets
import shutil
import socket
import stat
import struct
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from flwr.app import Context, Message
from flwr.common.serde import (
    context_from_proto,
    context_to_proto,
    message_from_proto,
    message_to_proto,
    recorddict_from_proto,
    recorddict_to_proto,
)
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict
from flwr.supercore.task_identity import TaskIdentity

NODE_KEY = "warm-worker"
SOCKET, SECRET, PID = "worker.sock", "secret", "pid"
PREFIX = "fedllm-worker-"  # the folders `fedllm node` makes in the temporary directory
APP_REF = "fedllm.deploy.apps:client_app"
_LEN = struct.Struct("!Q")


# -- framing ------------------------------------------------------------------------------------


def _send(sock: socket.socket, *frames: bytes) -> None:
    sock.sendall(b"".join(_LEN.pack(len(f)) + f for f in frames))


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise ConnectionError("warm worker connection closed mid-frame")
        buf += chunk
    return bytes(buf)


def _recv(sock: socket.socket, count: int) -> list[bytes]:
    return [_recv_exact(sock, _LEN.unpack(_recv_exact(sock, _LEN.size))[0]) for _ in range(count)]


# -- the folder ---------------------------------------------------------------------------------


def check_folder(folder: Path) -> None:
    """Refuse a worker folder another user could reach or replace (not ours, or group/world
    accessible)."""
    st = folder.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise PermissionError(
            f"warm worker folder {folder} must be a directory owned by this user with mode 0700"
        )


def make_folder(folder: Path) -> bytes:
    """Create FOLDER (0700) with a fresh secret (0600); return the secret."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    folder.chmod(0o700)
    check_folder(folder)
    secret = secrets.token_bytes(32)
    path = folder / SECRET
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secret)
    (folder / PID).write_text(str(os.getpid()))  # lets `sweep_stale` tell a dead worker's folder
    return secret


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process holds the pid now
        return True
    return True


def sweep_stale(tmp: Path, *, min_age: float = 60.0) -> list[Path]:
    """Remove this user's worker folders in `tmp` whose worker is dead (a SIGKILLed node's
    worker cannot clean up after itself): its pid file names no live process, or it has none
    and is older than `min_age` seconds (a worker that died starting). Returns what it removed."""
    removed = []
    for folder in sorted(tmp.glob(f"{PREFIX}*")):
        try:
            check_folder(folder)
            pid_file = folder / PID
            if pid_file.exists():
                stale = not _alive(int(pid_file.read_text()))
            else:
                stale = time.time() - folder.lstat().st_mtime > min_age
        except (OSError, ValueError):  # not ours, not a folder, half-written: leave it
            continue
        if stale:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


# -- the worker ---------------------------------------------------------------------------------


def _load(ref: str) -> Callable[[Message, Context], Message]:
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def handle(
    app: Callable[[Message, Context], Message], *, identity: bytes, message: bytes, context: bytes
) -> list[bytes]:
    """One request: run `app` on the decoded message and context; the reply and the new state.

    The worker takes the identity (task, run, node) of the per-message process it serves, as
    Flower's own code in the app (replies, mods) reads it from `TaskIdentity`."""
    task_id, run_id, node_id = (int(x) for x in identity.decode().split(","))
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = task_id, run_id, node_id
    msg = message_from_proto(ProtoMessage.FromString(message))
    ctx = context_from_proto(ProtoContext.FromString(context))
    try:
        reply = app(msg, ctx)
    except Exception as err:  # the per-message process raises it as the ClientApp's error
        return [b"error", f"{type(err).__name__}: {err}".encode()]
    state = recorddict_to_proto(ctx.state).SerializeToString()
    return [b"ok", message_to_proto(reply).SerializeToString(), state]


def _exit_with_parent(parent: int, folder: Path) -> None:
    """The worker lives as long as the SuperNode that started it (node loss takes both)."""
    while os.getppid() == parent:
        time.sleep(1.0)
    shutil.rmtree(folder, ignore_errors=True)
    os._exit(0)


def listen(folder: Path) -> tuple[socket.socket, bytes]:
    """A fresh secret and a listening socket FOLDER/worker.sock (0600)."""
    secret = make_folder(folder)
    path = folder / SOCKET
    path.unlink(missing_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    path.chmod(0o600)
    server.listen(8)
    return server, secret


def shared_threads(tmp: Path, *, cores: int) -> int:
    """Torch threads for a warm worker: `cores` split between the live workers in `tmp` (the
    nodes this machine runs), at least 1. Each with every core, OpenMP threads of several nodes
    spin waiting on each other: three tiny-model nodes on 2 cores took ~500 ms a step at 2
    threads each, ~26 ms at 1 (stop 47; beside a 2-thread benchmark)."""
    live = 0
    for folder in tmp.glob(f"{PREFIX}*"):
        try:
            live += _alive(int((folder / PID).read_text()))
        except (OSError, ValueError):  # another user's, half-written or gone: not counted
            continue
    return max(1, cores // max(1, live))


def serve_forever(
    server: socket.socket,
    secret: bytes,
    *,
    app: Callable[[Message, Context], Message],
    before: Callable[[], None] = lambda: None,
) -> None:
    """One ClientApp call per connection, in order (a node trains one message at a time);
    `before` runs ahead of each call."""
    while True:
        conn, _ = server.accept()
        with conn:
            try:
                token, identity, message, context = _recv(conn, 4)
            except (ConnectionError, struct.error):
                continue
            try:  # a caller killed mid-request must not take the worker down with it
                if not hmac.compare_digest(token, secret):
                    _send(conn, b"error", b"PermissionError: wrong warm worker secret")
                    continue
                before()
                _send(conn, *handle(app, identity=identity, message=message, context=context))
            except OSError:
                continue


def serve(folder: Path, *, app_ref: str = APP_REF, parent: int | None = None) -> None:
    """The worker process: import the ClientApp once, then serve FOLDER until the parent exits."""
    server, secret = listen(folder)
    from fedllm.processes import hide_bitsandbytes  # heavy (the recipe): the worker's side only

    hide_bitsandbytes()  # peft imports it when installed; a quantised base exposes it again
    app = _load(app_ref)  # the heavy imports, once
    import torch  # loaded by the app above

    affinity = getattr(os, "sched_getaffinity", None)  # Linux; elsewhere every core counts
    cores = len(affinity(0)) if affinity else os.cpu_count() or 1

    def share_cores() -> None:  # the nodes on this machine change as they start and stop
        torch.set_num_threads(shared_threads(folder.parent, cores=cores))

    if parent is not None:
        threading.Thread(target=_exit_with_parent, args=(parent, folder), daemon=True).start()
    print(f"[fedllm] warm worker ready on {folder / SOCKET}", flush=True)
    explicit = "OMP_NUM_THREADS" in os.environ  # the node's operator named the count
    serve_forever(server, secret, app=app, before=(lambda: None) if explicit else share_cores)


# -- the per-message side -----------------------------------------------------------------------


def forward(folder: Path, message: Message, *, context: Context) -> Message | None:
    """Run `message` in the worker of FOLDER; None when no worker listens there (run it here),
    the folder gone included (a worker that died, its folder swept by `sweep_stale`)."""
    if not folder.exists():
        return None
    check_folder(folder)
    try:
        secret = (folder / SECRET).read_bytes()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(folder / SOCKET))
    except (FileNotFoundError, ConnectionRefusedError):
        return None
    with sock:
        ids = (TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id)
        _send(
            sock,
            secret,
            ",".join(str(i) for i in ids).encode(),
            message_to_proto(message).SerializeToString(),
            context_to_proto(context).SerializeToString(),
        )
        (status,) = _recv(sock, 1)
        if status != b"ok":
            raise RuntimeError(f"warm worker: {_recv(sock, 1)[0].decode()}")
        reply, state = _recv(sock, 2)
    context.state = recorddict_from_proto(ProtoRecordDict.FromString(state))
    return message_from_proto(ProtoMessage.FromString(reply))


def client_entry(message: Message, context: Context) -> Message:
    """The ClientApp a fedllm SuperNode's per-message process runs: the warm worker if the node
    has one, else the installed ClientApp in this process."""
    folder = context.node_config.get(NODE_KEY)
    if folder:
        reply = forward(Path(str(folder)), message, context=context)
        if reply is not None:
            return reply
        print(f"[fedllm] no warm worker in {folder}; running this message here", file=sys.stderr)
    return _load(APP_REF)(message, context)


def main(argv: list[str] | None = None) -> int:
    """`python -m fedllm.deploy.warm FOLDER [--parent PID]`."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0].startswith("-"):
        print("usage: python -m fedllm.deploy.warm FOLDER [--parent PID]", file=sys.stderr)
        return 2
    parent = int(args[args.index("--parent") + 1]) if "--parent" in args else None
    serve(Path(args[0]), parent=parent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
