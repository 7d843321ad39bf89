"""CLI polish: one progress stream (Flower's own logs at WARNING unless --verbose), no bitsandbytes
import unless a quantised base is loaded, `fedllm node` on a free local port (or a clear error
naming the taken one), and `simulation.ray_address` checked before Ray is asked."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from fedllm.cli import main, parse
from fedllm.deploy.federation import node_port
from fedllm.deploy.flower_env import flwr_env
from fedllm.processes import (
    CHECKPOINTING_NOTICE,
    RUN_SIMULATION_NOTICE,
    app_process,
    check_reachable,
    client_app_process,
    command_process,
    flower_verbose,
)
from fedllm.recipe import ConfigError, load_recipe

TINY = str(Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml")


def python(code: str, tmp_path: Path) -> dict:
    """Run `code` in a fresh interpreter (what it imports stays there); its last stdout line is
    JSON. Returns that, with the process's stderr under "stderr"."""
    script = tmp_path / "probe.py"
    script.write_text(textwrap.dedent(code))
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=600, check=False
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "stderr": out.stderr}


# -- one progress stream --------------------------------------------------------------------


def test_verbose_is_a_run_flag_that_mixes_with_overrides() -> None:
    args = parse(["run", TINY, "name=x", "--verbose", "federation.rounds=1"])
    assert args.verbose is True and args.overrides == ["name=x", "federation.rounds=1"]
    assert parse(["run", TINY]).verbose is False
    assert parse(["node", "--superlink", "h:1", "--partition-id", "0", "-v"]).verbose is True


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append(f"{record.levelname} {record.getMessage()}")


def deprecated_notice() -> None:
    """Flower's notice, as `flwr.simulation.run_simulation` logs it on every call."""
    from flwr.common.logger import warn_deprecated_feature

    warn_deprecated_feature(f"{RUN_SIMULATION_NOTICE} and will be removed in a future version")


def test_flower_logs_at_warning_once_unless_verbose_and_restored_after() -> None:
    flwr, root = logging.getLogger("flwr"), logging.getLogger()
    before = (flwr.level, flwr.propagate)
    own, other = Records(), Records()  # Flower's handler; a root handler another library added
    flwr.addHandler(own)
    root.addHandler(other)
    try:
        with command_process(verbose=False):
            flwr.debug("backend_config: {}")
            flwr.info("Starting Flower ServerApp")
            deprecated_notice()  # as run_simulation logs it
            flwr.warning("a client ran out of memory")
        assert own.seen == ["WARNING a client ran out of memory"]
        assert other.seen == [], "printed once, by Flower's own handler"
        assert (flwr.level, flwr.propagate) == before
        own.seen.clear()
        with command_process(verbose=True):
            flwr.debug("backend_config: {}")
            deprecated_notice()
        assert len(own.seen) == 2 and own.seen[0] == "DEBUG backend_config: {}"
        own.seen.clear()
        with command_process(verbose=False, quiet_flower=False):  # a SuperLink's own log
            flwr.info("Starting Flower SuperLink")
        assert own.seen == ["INFO Starting Flower SuperLink"]
        assert (flwr.level, flwr.propagate) == before
    finally:
        flwr.removeHandler(own)
        root.removeHandler(other)


def test_flower_subprocesses_log_debug_only_with_verbose() -> None:
    assert flwr_env(verbose=True)["FLWR_LOG_LEVEL"] == "DEBUG"
    assert flwr_env().get("FLWR_LOG_LEVEL") == os.environ.get("FLWR_LOG_LEVEL")


# -- no bitsandbytes unless quantisation ------------------------------------------------------


def test_a_command_runs_without_bitsandbytes_and_restores_it(tmp_path: Path) -> None:
    got = python(
        f"""
        import json, sys
        from fedllm.cli import main
        rc = main(["validate", {TINY!r}])
        during = sys.modules.get("bitsandbytes", "absent")
        peft = "peft" in sys.modules
        import importlib.util
        after = importlib.util.find_spec("bitsandbytes") is not None
        print(json.dumps({{"rc": rc, "bnb": during, "peft": peft, "after": after}}))
        """,
        tmp_path,
    )
    assert got["rc"] == 0 and got["peft"] is True, "the recipe checks import peft"
    assert got["bnb"] == "absent", "peft imported, bitsandbytes not"
    assert "gemm_4bit_forward" not in got["stderr"]
    assert got["after"] is True, "importable again once the command returned"


def test_a_quantised_base_still_gets_bitsandbytes_lora_after_the_hide(tmp_path: Path) -> None:
    """In one process: peft imported and a plain LoRA built while bitsandbytes was hidden (peft
    caches 'not installed'); then a 4-bit base loads and gets bitsandbytes' LoRA layers."""
    pytest.importorskip("bitsandbytes")
    got = python(
        f"""
        import json, sys
        from pathlib import Path
        from fedllm.processes import hide_bitsandbytes
        assert hide_bitsandbytes()
        import peft
        from fedllm.model import loading as fm
        from fedllm.model.tiny import build_tiny_model
        texts = ["a tiny model trained on a tiny text about rivers and stones"] * 20
        folder = build_tiny_model(Path({str(tmp_path / "tiny")!r}), texts=texts)
        lora = peft.LoraConfig(r=2, target_modules=["q_proj"])
        plain = peft.get_peft_model(fm.load_base_model(folder)[0], lora)
        hidden = sys.modules.get("bitsandbytes", "absent")
        quant = peft.get_peft_model(fm.load_base_model(folder, quantization="4bit")[0], lora)
        kinds = sorted({{type(m).__module__ for m in quant.modules() if hasattr(m, "lora_A")}})
        print(json.dumps({{"hidden": hidden, "kinds": kinds}}))
        """,
        tmp_path,
    )
    assert got["hidden"] is None, "hidden while only the plain base was used"
    assert got["kinds"] == ["peft.tuners.lora.bnb"], got


def test_the_flower_app_module_hides_bitsandbytes_before_peft(tmp_path: Path) -> None:
    """What Flower's processes import for the app (flwr-serverapp, `flwr run .`'s simulation):
    peft in, bitsandbytes not, and no kernels warning."""
    got = python(
        """
        import json, sys
        import fedllm.deploy.apps
        bnb = sys.modules.get("bitsandbytes", "absent")
        print(json.dumps({"bnb": bnb, "peft": "peft" in sys.modules}))
        """,
        tmp_path,
    )
    assert got["peft"] is True and got["bnb"] is None, got
    assert "gemm_4bit_forward" not in got["stderr"]


# -- a deployed ServerApp's console, peft's checkpointing notice ----------------------------


@pytest.fixture
def clean_logs():
    """Flower's and fedllm's loggers and the warning filters as they were, after the test."""
    flwr, own = logging.getLogger("flwr"), logging.getLogger("fedllm")
    saved = [
        (lg, lg.level, lg.propagate, list(lg.handlers), list(lg.filters)) for lg in (flwr, own)
    ]
    for handler in list(own.handlers):  # main() of an earlier test may have given it one
        own.removeHandler(handler)
    with warnings.catch_warnings():
        yield flwr, own
    for lg, level, propagate, handlers, filters in saved:
        lg.setLevel(level)
        lg.propagate = propagate
        lg.handlers[:], lg.filters[:] = handlers, filters


@pytest.mark.parametrize("verbose", [False, True])
def test_a_serverapp_process_logs_like_fedllm_run(
    verbose: bool, clean_logs, capsys: pytest.CaptureFixture[str]
) -> None:
    flwr, _ = clean_logs
    flower, root = Records(), Records()  # Flower's handler; Opacus' basicConfig one on the root
    flwr.addHandler(flower)
    logging.getLogger().addHandler(root)
    try:
        app_process(verbose=verbose)
        flwr.debug("ServerApp finished running.")
        flwr.warning("a node failed")
        logging.getLogger("fedllm.server.strategy").warning("round 2: node 1 failed")
        logging.getLogger("fedllm.server.strategy").debug("not shown")
    finally:
        logging.getLogger().removeHandler(root)
    debug = ["DEBUG ServerApp finished running."] if verbose else []
    assert flower.seen == [*debug, "WARNING a node failed"]
    assert root.seen == [], "printed once, by Flower's and fedllm's own handlers"
    assert capsys.readouterr().err.splitlines() == [
        "WARNING fedllm.server.strategy: round 2: node 1 failed"
    ]


def test_flower_verbose_follows_flwr_log_level(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLWR_LOG_LEVEL", "debug")
    assert flower_verbose() is True
    monkeypatch.setenv("FLWR_LOG_LEVEL", "INFO")
    assert flower_verbose() is False
    monkeypatch.delenv("FLWR_LOG_LEVEL")
    assert flower_verbose() is False


def test_a_command_prints_fedllm_lines_once_and_restores_propagation(clean_logs) -> None:
    _, own = clean_logs
    mine, root = Records(), Records()  # main()'s handler; a library's root handler
    own.addHandler(mine)
    logging.getLogger().addHandler(root)
    try:
        with command_process(verbose=False):
            logging.getLogger("fedllm.server.app").warning("resuming")
    finally:
        logging.getLogger().removeHandler(root)
    assert mine.seen == ["WARNING resuming"] and root.seen == []
    assert own.propagate is True


def peft_notices() -> int:
    """How many of peft's checkpointing notices one real wrap of a tiny Llama shows, under the
    filters in force (peft 0.21.2 reads transformers 5's deprecated `is_gradient_checkpointing`
    whenever it wraps a model)."""
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    with warnings.catch_warnings(record=True) as seen:
        get_peft_model(LlamaForCausalLM(config), LoraConfig(r=1, target_modules=["q_proj"]))
    return sum(CHECKPOINTING_NOTICE in str(w.message) for w in seen)


def test_peft_checkpointing_notice_only_with_verbose_and_only_inside_a_command() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        before = peft_notices()
        with command_process(verbose=False):
            quiet = peft_notices()
        with command_process(verbose=True):
            loud = peft_notices()
        after = peft_notices()
    assert (before, quiet, loud, after) == (1, 0, 1, 1)


@pytest.mark.parametrize(("verbose", "shown"), [(False, 0), (True, 1)])
def test_a_client_app_process_drops_the_notice_unless_verbose(verbose: bool, shown: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        filters = len(warnings.filters)
        for _ in range(3):  # once per message
            client_app_process(verbose=verbose)
        assert len(warnings.filters) == filters + (not verbose), "one filter, however many calls"
        assert peft_notices() == shown


# -- fedllm node: a free local port --------------------------------------------------------


def test_node_takes_a_free_port_unless_given_one() -> None:
    port = node_port(None)
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # it was free
    assert node_port(port) == port


def test_a_taken_node_port_is_named_with_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ValueError, match=f"--port {port}: 127.0.0.1:{port} is already taken"):
            node_port(port)
        argv = ["node", "--superlink", "127.0.0.1:9093", "--partition-id", "0", "--insecure"]
        assert main([*argv, "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"--port {port}" in err and "leave --port out to take a free one" in err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--partition-id", "-1"], "--partition-id -1: a partition id is 0 or more"),
        (["--partition-id", "0", "--rank", "0"], "--rank 0: a LoRA rank is 1 or more"),
    ],
)
def test_a_node_with_an_impossible_identity_is_refused_before_it_starts(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["node", "--superlink", "127.0.0.1:9093", "--insecure", *flags]) == 2
    assert message in capsys.readouterr().err


# -- simulation.ray_address -----------------------------------------------------------------


@pytest.mark.parametrize("address", ["127.0.0.1:6379", "auto", "ray://head.example.org:10001"])
def test_ray_address_accepts_cluster_addresses(address: str) -> None:
    cfg = load_recipe(TINY, [f"simulation.ray_address={address}"])
    assert cfg.simulation.ray_address == address
    assert load_recipe(TINY, []).simulation.ray_address is None


@pytest.mark.parametrize("address", ["head", "ray://head", "head:0", "head:port"])
def test_a_bad_ray_address_names_the_key_and_the_valid_forms(address: str) -> None:
    with pytest.raises(ConfigError, match=r"simulation\.ray_address: .*'HOST:PORT'"):
        load_recipe(TINY, [f"simulation.ray_address={address}"])


def test_an_address_nobody_answers_fails_in_seconds_naming_the_key() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nothing listens there
    start = time.monotonic()
    with pytest.raises(ConfigError, match=rf"simulation.ray_address='127.0.0.1:{port}'.*ray start"):
        check_reachable(f"127.0.0.1:{port}", where=f"simulation.ray_address='127.0.0.1:{port}'")
    assert time.monotonic() - start < 10, "ray.init would retry for minutes"


def test_quiet_flower_keeps_warnings_and_secagg_stage_lines_only() -> None:
    from fedllm.processes import QUIET_FLOWER, SECAGG_STAGES_MODULE, set_flower_level

    logger = logging.getLogger("flwr")
    saved = (logger.level, logger.propagate, list(logger.filters))
    seen: list[str] = []
    handler = logging.Handler()
    kept: list[logging.LogRecord] = []
    handler.emit = lambda r: (seen.append(r.getMessage()), kept.append(r))  # type: ignore[method-assign]
    logger.addHandler(handler)

    def record(level: int, module: str, msg: str) -> logging.LogRecord:
        return logging.makeLogRecord(
            {"name": "flwr", "levelno": level, "levelname": "X", "module": module, "msg": msg}
        )

    try:
        set_flower_level(verbose=False)
        set_flower_level(verbose=False)
        assert logger.filters.count(QUIET_FLOWER) == 1 and logger.isEnabledFor(logging.DEBUG)
        for r in (
            record(logging.INFO, "grid", "Start flwr-serverapp"),
            record(logging.DEBUG, SECAGG_STAGES_MODULE, "[Stage 1] Received key shares from 3"),
            record(logging.DEBUG, "grid", "pulled 3 messages"),
            record(logging.WARNING, "grid", "a node failed"),
        ):
            logger.handle(r)
        assert seen == ["[Stage 1] Received key shares from 3", "a node failed"]
        assert [r.levelno for r in kept] == [logging.INFO, logging.WARNING]  # stage lines at INFO
        set_flower_level(verbose=True)  # every line again
        assert QUIET_FLOWER not in logger.filters
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        logger.filters[:] = saved[2]


def test_flowers_client_error_traces_are_dropped_unless_verbose() -> None:
    """The simulation engine logs a failing ClientApp's exception three times (a header, the Ray
    worker's traceback, its own): ~150 lines a client a round; fedllm's one line says it."""
    flwr = logging.getLogger("flwr")
    own = Records()
    flwr.addHandler(own)
    trace = "ray::ClientAppActor.run() ...\nflwr.clientapp.client_app.ClientAppException: \n"
    engine = "Traceback (most recent call last):\n  File vce_api.py\nClientAppException: x"
    try:
        for verbose, kept in ((False, 1), (True, 4)):
            own.seen.clear()
            with command_process(verbose=verbose):
                flwr.error("An exception was raised when processing a message by RayBackend")
                flwr.error(trace)
                flwr.error(engine)
                flwr.error("the SuperLink is unreachable")  # any other error stays
            assert len(own.seen) == kept, own.seen
            assert own.seen[-1] == "ERROR the SuperLink is unreachable"
    finally:
        flwr.removeHandler(own)
