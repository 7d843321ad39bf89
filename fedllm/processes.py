"""How a fedllm command sets up the processes it runs in: one progress stream (Flower's and Ray's
own logs at WARNING unless --verbose), in the command and in its Ray workers; Ray itself, started
here on this machine or joined on an existing cluster (`simulation.ray_address`); and no
bitsandbytes import unless a quantised base is loaded.

The processes Flower itself starts for fedllm's Flower App (a SuperLink's `flwr-serverapp`, the
simulation of `flwr run .`) get the same console through `app_process` (called by the ServerApp)
and `fedllm.deploy.apps`, which hides bitsandbytes before it imports peft.

Why bitsandbytes is hidden: peft 0.21 imports it whenever it is installed (`peft.helpers` at
`import peft`, and the layer dispatch of every LoRA model), which costs seconds in every process
and, on AVX512-BF16 CPUs, logs bitsandbytes' `Failed to load CPU gemm_4bit_forward from
kernels-community` warning. Only a 4-/8-bit base needs it: `fedllm.model.loading.load_base_model`
calls `expose_bitsandbytes()` before a quantised load (other code that needs bitsandbytes in a
fedllm command does the same; while hidden, `import bitsandbytes` raises ModuleNotFoundError).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from fedllm.recipe import ConfigError

BNB = "bitsandbytes"
FLOWER = "flwr"
FEDLLM = "fedllm"
FEDLLM_FORMAT = "%(levelname)s %(name)s: %(message)s"  # fedllm's own log lines, as main() prints
# Flower's routine notices logged as warnings, shown only with --verbose: its Python API is
# deprecated in favour of `flwr run` (fedllm's to act on, not the user's: `fedllm run` stays the
# front door), and every Ray worker's end-of-run shutdown.
RUN_SIMULATION_NOTICE = "The `run_simulation` function is deprecated"
ACTOR_SHUTDOWN_NOTICE = "Manually terminating"
# transformers 5 deprecates `is_gradient_checkpointing` for `is_activation_checkpointing`; the
# caller is peft 0.21.2 itself (`PeftModel.__init__`, on every LoRA model it builds or loads), not
# fedllm, so nothing for the user to act on: shown only with --verbose.
CHECKPOINTING_NOTICE = "`is_gradient_checkpointing` is deprecated"
# Hugging Face's per-client progress bars (model loading, dataset maps) in Ray workers, which
# would interleave with the server's progress lines: off unless --verbose.
QUIET_WORKER_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
# What peft and transformers remember about bitsandbytes being installed (functools caches).
BNB_CACHES = {
    "peft.import_utils": ("is_bnb_available", "is_bnb_4bit_available"),
    "transformers.utils.import_utils": ("is_bitsandbytes_available",),
}


def hide_bitsandbytes() -> bool:
    """Make `import bitsandbytes` fail and `find_spec` find nothing (Python's `None` entry in
    `sys.modules`), so peft takes its no-bitsandbytes path; True if it was hidden here."""
    if BNB in sys.modules:  # imported already (or hidden): nothing left to save
        return False
    sys.modules[BNB] = None
    return True


def expose_bitsandbytes() -> None:
    """Undo `hide_bitsandbytes`: importable again, and the answers peft and transformers cached
    while it was hidden forgotten, so a quantised base gets bitsandbytes' layers and LoRA."""
    if BNB not in sys.modules or sys.modules[BNB] is not None:
        return
    del sys.modules[BNB]
    for module_name, names in BNB_CACHES.items():
        module = sys.modules.get(module_name)
        for name in names:
            cached = getattr(module, name, None)
            if hasattr(cached, "cache_clear"):
                cached.cache_clear()


class _DropMessage(logging.Filter):
    """Drop the log records whose message contains `text`."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


class _ClientErrorTraces(logging.Filter):
    """Drop Flower's simulation-engine records of a ClientApp's exception (a header, the Ray
    worker's traceback, the engine's own): some 150 lines per failing client each round. fedllm
    says each failure in one line (`exchange`) and keeps the whole report in metrics.jsonl;
    --verbose shows them."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not (
            text.startswith("An exception was raised when processing a message by")
            or ("ClientAppException" in text and ("Traceback" in text or "ray::" in text))
        )


class _WarningsAndStages(logging.Filter):
    """Flower's warnings and errors, and SecAgg+'s own lines (its stage lines, at DEBUG: "[Stage 1]
    Received encrypted key shares from 3 clients."): in a secure round they are the only account
    of who dropped out at which stage."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        if record.module != SECAGG_STAGES_MODULE:
            return False
        if record.levelno < logging.INFO:  # shown at INFO: Flower's console handler is at INFO
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


SECAGG_STAGES_MODULE = "secaggplus_workflow"  # flwr.server.workflow.secure_aggregation
QUIET_FLOWER = _WarningsAndStages()


def set_flower_level(*, verbose: bool) -> None:
    """Flower's warnings plus SecAgg+'s own lines (every line with `verbose`), printed
    once by Flower's own handler rather than again by a root handler a library installed (Opacus
    calls `basicConfig`)."""
    logger = logging.getLogger(FLOWER)
    logger.setLevel(logging.DEBUG)  # quiet, QUIET_FLOWER keeps SecAgg+'s lines of every level
    if verbose:
        logger.removeFilter(QUIET_FLOWER)
    else:
        logger.addFilter(QUIET_FLOWER)  # once: the same filter object is not added twice
    logger.propagate = False


def drop_checkpointing_notice() -> None:
    """Ignore peft's use of transformers' deprecated `is_gradient_checkpointing` in this process
    (only that FutureWarning; see CHECKPOINTING_NOTICE)."""
    warnings.filterwarnings(
        "ignore", message=re.escape(CHECKPOINTING_NOTICE), category=FutureWarning
    )


def own_log() -> None:
    """fedllm's own log lines (INFO and up) printed once, by a handler of fedllm's, not again by
    a root handler a library installed (Opacus calls `basicConfig`)."""
    logger = logging.getLogger(FEDLLM)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(FEDLLM_FORMAT))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def flower_verbose() -> bool:
    """Whether this process was asked for Flower's DEBUG lines (`FLWR_LOG_LEVEL=DEBUG`, which
    `fedllm superlink --verbose` sets for the ServerApp processes it starts)."""
    return os.environ.get("FLWR_LOG_LEVEL", "").strip().upper() == "DEBUG"


def app_process(*, verbose: bool) -> None:
    """Set-up of a process Flower started for one run of fedllm's ServerApp (a SuperLink's
    `flwr-serverapp`, the simulation of `flwr run .`): a console as quiet as `fedllm run`'s.
    Flower's own lines at WARNING (every one with `verbose`) printed once by Flower's handler,
    fedllm's once by fedllm's, peft's checkpointing notice only with `verbose`; fedllm's progress
    lines (stdout) as ever. Not undone: the process ends with the run."""
    set_flower_level(verbose=verbose)
    own_log()
    if not verbose:
        drop_checkpointing_notice()


def client_app_process(*, verbose: bool) -> None:
    """Set-up of a process running fedllm's ClientApp for Flower (a SuperNode's `flwr-clientapp`
    or warm worker, `flwr run .`'s Ray actors): peft's checkpointing notice only with `verbose`.
    Idempotent (once per message is fine); not undone."""
    if not verbose:
        drop_checkpointing_notice()


@contextmanager
def command_process(*, verbose: bool, quiet_flower: bool = True) -> Iterator[None]:
    """While one command runs in this process: bitsandbytes hidden, peft's checkpointing notice
    dropped (unless `verbose`), Flower's own log lines at WARNING (`quiet_flower`; a SuperLink's
    log is Flower's and stays as Flower sets it) or every one of them (`verbose`), and fedllm's
    own lines printed once by its handler (when main() gave it one); all restored afterwards, as
    `main()` may run more than once in a process (tests, notebooks)."""
    logger, own = logging.getLogger(FLOWER), logging.getLogger(FEDLLM)
    saved = (logger.level, logger.propagate, own.propagate)
    quiet_before = QUIET_FLOWER in logger.filters
    if own.handlers:  # not again by a root handler a library installed (Opacus: basicConfig)
        own.propagate = False
    notice, traces = _DropMessage(RUN_SIMULATION_NOTICE), _ClientErrorTraces()
    if verbose or quiet_flower:
        set_flower_level(verbose=verbose)
    if quiet_flower and not verbose:
        logger.addFilter(notice)
        logger.addFilter(traces)
    hidden = hide_bitsandbytes()
    try:
        with warnings.catch_warnings():  # the filters as they were, afterwards
            if not verbose:
                drop_checkpointing_notice()
            yield
    finally:
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        own.propagate = saved[2]
        logger.removeFilter(notice)
        logger.removeFilter(traces)
        if quiet_before:
            logger.addFilter(QUIET_FLOWER)
        else:
            logger.removeFilter(QUIET_FLOWER)
        if hidden:
            expose_bitsandbytes()


def quiet_worker() -> None:
    """Ray worker set-up for a plain run: Flower's logs at WARNING, peft's checkpointing notice
    dropped, bitsandbytes hidden."""
    set_flower_level(verbose=False)
    logging.getLogger(FLOWER).addFilter(_DropMessage(ACTOR_SHUTDOWN_NOTICE))
    drop_checkpointing_notice()
    hide_bitsandbytes()


def verbose_worker() -> None:
    """Ray worker set-up under --verbose: every Flower log line, bitsandbytes hidden."""
    set_flower_level(verbose=True)
    hide_bitsandbytes()


def cluster_cpus() -> list[float]:
    """CPUs of each live node of the Ray cluster this process is connected to."""
    import ray

    return [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]


def check_reachable(address: str, *, where: str, timeout: float = 5.0) -> None:
    """Fail in seconds, naming the key, if nothing listens at a cluster's HOST:PORT: `ray.init`
    would retry for minutes before giving up."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as err:
        raise ConfigError(
            f"{where}: nothing answers at {host}:{port} ({err.strerror or err}); start the "
            "cluster's head there (`ray start --head --port PORT`) or fix the address, or remove "
            "ray_address to start Ray on this machine"
        ) from None


@contextmanager
def simulation_ray(
    *, address: str | None, verbose: bool, num_cpus_per_client: float
) -> Iterator[None]:
    """Ray for one simulation: a new instance on this machine (even if `ray start` left a
    cluster here), or the cluster at `address`.

    Started here, not by Flower (which then uses it, and shuts it down at the end), so that its
    workers run `quiet_worker`/`verbose_worker` before any task: the ClientApps' Flower logs
    follow --verbose as this process's do, and their Hugging Face progress bars are off unless
    --verbose. Like Flower, the workers get this process's PYTHONPATH.
    """
    import ray

    path = os.pathsep.join([*sys.path, *filter(None, [os.environ.get("PYTHONPATH")])])
    where = f"simulation.ray_address={address!r}"
    if address not in (None, "auto"):
        check_reachable(address, where=where)
    try:
        ray.init(
            address=address or "local",  # not a cluster `ray start` left on this machine
            runtime_env={
                "env_vars": {"PYTHONPATH": path, **({} if verbose else QUIET_WORKER_ENV)},
                "worker_process_setup_hook": verbose_worker if verbose else quiet_worker,
            },
            include_dashboard=False,
            logging_level=logging.INFO if verbose else logging.WARNING,
            log_to_driver=True,
        )
    except (ConnectionError, RuntimeError, ValueError) as err:
        if address is None:
            raise
        raise ConfigError(
            f"{where}: cannot join that Ray cluster ({err}); start one with `ray start --head` "
            "and give its address (host:port, or 'auto' on one of its machines), or remove "
            "ray_address to start Ray on this machine"
        ) from err
    try:
        largest = max(cluster_cpus(), default=0.0) if address is not None else None
        if largest is not None and largest < num_cpus_per_client:
            raise ConfigError(
                f"simulation.num_cpus_per_client={num_cpus_per_client:g} but the largest node "
                f"of the Ray cluster at {address} ({where}) has {largest:g} CPUs: no client "
                "fits; lower num_cpus_per_client or start the workers with more --num-cpus"
            )
        yield
    finally:
        if ray.is_initialized():
            ray.shutdown()
