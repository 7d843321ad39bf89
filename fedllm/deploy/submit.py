"""`fedllm run RECIPE --federation CONN`: submit a recipe to a running SuperLink.

Writes a Flower app folder (a pyproject naming `fedllm.deploy.apps:server_app`/`client_app`)
into the run directory, sends the resolved recipe as run config, streams the logs through
`flwr run --stream`, and then asks the SuperLink for the run's final status, because
`flwr run --stream` exits 0 even when the run failed.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

from fedllm.deploy.flower_env import flwr_env
from fedllm.recipe import RunConfig, dump_yaml

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
overwrite = false
"""


def write_app(folder: Path) -> Path:
    """The Flower app folder `flwr run` builds a FAB from."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(APP_PYPROJECT.format(version=version("fedllm")))
    (folder / "README.md").write_text("fedllm deployment app; see docs/deployment.md\n")
    return folder


def write_run_config(path: Path, cfg: RunConfig, *, resume: bool, overwrite: bool = False) -> Path:
    """Run-config overrides as TOML; a JSON string literal is also a valid TOML basic string.

    Only non-default values are sent (the receiver re-applies the defaults), which keeps the
    text short and independent of how optional sections dump their defaults.
    """

    text = dump_yaml(cfg.model_dump(mode="json", exclude_defaults=True))
    flags = f"resume = {str(resume).lower()}\noverwrite = {str(overwrite).lower()}\n"
    path.write_text(f"recipe = {json.dumps(text)}\n{flags}")
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


def submit(cfg: RunConfig, connection: str, *, resume: bool, overwrite: bool = False) -> int:
    """Run `cfg` on the SuperLink `connection`; 0 only if the run finished as completed."""
    run_dir = cfg.run_dir
    app = write_app(run_dir / "flwr_app")
    overrides = write_run_config(
        run_dir / "run_config.toml", cfg, resume=resume, overwrite=overwrite
    )
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
