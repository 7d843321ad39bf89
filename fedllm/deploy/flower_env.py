"""Where Flower's command-line tools and their home folder are, for every process fedllm starts."""

from __future__ import annotations

import os
import sys
from pathlib import Path


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
