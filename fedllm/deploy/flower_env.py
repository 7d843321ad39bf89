"""Where Flower's command-line tools and their home folder are, for every process fedllm starts."""

from __future__ import annotations

import os
import sys
import tomllib
from pathlib import Path

from fedllm.suggest import did_you_mean


def flwr_env(*, verbose: bool = False) -> dict[str, str]:
    """Environment for `flwr`/`flower-*` subprocesses: no run-time dependency installation, and
    this interpreter's scripts folder first on PATH so an unactivated venv finds Flower's CLIs;
    with `verbose`, Flower's DEBUG log lines (`FLWR_LOG_LEVEL`) in them and their children."""
    scripts = str(Path(sys.executable).parent)
    path = os.pathsep.join([scripts, os.environ.get("PATH", "")])
    env = {**os.environ, "PATH": path, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    return {**env, "FLWR_LOG_LEVEL": "DEBUG"} if verbose else env


def flwr_home() -> Path:
    """Flower's home folder ($FLWR_HOME, default ~/.flwr), as Flower computes it."""
    home = os.environ.get("FLWR_HOME")
    return Path(home) if home else Path.home() / ".flwr"


def check_connection(connection: str, *, home: Path | None = None) -> None:
    """ValueError unless `$FLWR_HOME/config.toml` names the SuperLink `connection`: checked
    before the run folder is built and the model prepared, not after (what `flwr run` reads)."""
    path = (home or flwr_home()) / "config.toml"
    try:
        text = path.read_text()
    except FileNotFoundError:  # `flwr` writes its default file (`local`, `supergrid`) on first use
        from flwr.cli.constant import DEFAULT_FLOWER_CONFIG_TOML as text
    try:
        known = sorted(tomllib.loads(text).get("superlink", {}))
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"--federation: {path} is not valid TOML ({err})") from None
    known = [name for name in known if name != "default"]
    if connection not in known:
        listed = ", ".join(known) if known else "none"
        raise ValueError(
            f"--federation {connection!r}: no such SuperLink connection in {path}"
            f"{did_you_mean(connection, known)}; known: {listed}; docs/deployment.md shows "
            "how to add one"
        )
