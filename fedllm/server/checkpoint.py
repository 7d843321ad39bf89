"""Round checkpoints: written atomically after every finished round, read back by `--resume`."""

from __future__ import annotations

import os
import random
from pathlib import Path

import torch

CHECKPOINT = "checkpoint.pt"


def save_checkpoint(run_dir: Path, state: dict) -> Path:
    """Write `state` and RNG states to run_dir/checkpoint.pt atomically (never half a file)."""
    path = run_dir / CHECKPOINT
    tmp = path.with_suffix(".pt.tmp")
    payload = {**state, "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}}
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(run_dir: Path) -> dict | None:
    """The last finished round's state, restoring the RNG states; None if there is none."""
    path = run_dir / CHECKPOINT
    if not path.is_file():
        return None
    state = torch.load(path, weights_only=False)
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    return state
