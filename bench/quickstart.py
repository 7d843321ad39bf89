"""Wall time and peak memory of the quickstart, against loading the base model alone.

    python bench/quickstart.py [--recipe recipes/quickstart.yaml] [--variants fp32 bf16+grouped]
        [key=value ...]

Runs `fedllm run` in a subprocess per variant and samples the resident memory of its whole process
tree (driver, Ray workers and Ray's own daemons) every 0.2 s. The baseline, measured in the same
run, is a fresh process that loads the base model and runs one forward pass: the least any client
must pay. A variant is a named set of overrides (`VARIANTS`: precision, a shared prompt head,
length grouping); the first is the reference, and every other variant's wall time and final
held-out loss are reported against it (evaluation itself is fp32 in all of them). A `head`
section times one local step of the recipe's model with the output head over every position (how
training ran before issue 15) against only the positions that predict a label (how it runs now),
in fp32 and in the same run.
Writes results/quickstart.md (or `--out`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

RESULTS = Path(__file__).parent / "results" / "quickstart.md"

BASELINE = """
import sys, torch
from fedllm.processes import hide_bitsandbytes; hide_bitsandbytes()  # as fedllm's commands do
from fedllm.recipe import load_recipe
from fedllm.model.base import cached_base_model
cfg = load_recipe(sys.argv[1], sys.argv[2:])
model, tok = cached_base_model(cfg)
with torch.no_grad():
    model(**tok(["Define the word 'cat' (noun)."], return_tensors="pt"))
"""

# One local step, the output head over every position (before) vs only where labels count (now).
HEAD = """
import json, statistics, sys, time, torch
from fedllm.processes import hide_bitsandbytes; hide_bitsandbytes()
from fedllm.client.train import label_nll, token_nll
from fedllm.data import collate
from fedllm.data.shards import load_shard
from fedllm.model.adapters import attach_lora
from fedllm.model.base import cached_base_model
from fedllm.recipe import load_recipe
cfg = load_recipe(sys.argv[1], sys.argv[2:])
base, tok = cached_base_model(cfg)
shard = load_shard(cfg, 0, tok)
torch.manual_seed(0)
model = attach_lora(base, rank=16, alpha=cfg.lora.alpha, dropout=0.0,
                    target_modules=list(cfg.lora.target_modules))
bs = cfg.federation.batch_size
batches = [collate(shard.train[i:i + bs], pad_id=tok.pad_token_id) for i in range(0, 8 * bs, bs)]
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-4)
def every(b):
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    return token_nll(logits, b["labels"]).sum()
def kept(b):
    return label_nll(model, b).sum()
times = {"every position": [], "label positions": []}
for rep in range(3):
    for name, fn in (("every position", every), ("label positions", kept)):
        for b in batches:
            t = time.perf_counter()
            fn(b).backward(); opt.step(); opt.zero_grad()
            if rep:
                times[name].append(time.perf_counter() - t)
print(json.dumps({k: statistics.median(v) for k, v in times.items()}))
"""

# name -> overrides; the first variant named on the command line is the reference.
# "+shared": the prompt head a batch's rows share runs once per batch (federation.share_head);
# "+grouped": batches of similar lengths (federation.group_by_length); "+eager": eager attention
# (model.attention; without it sdpa). "defaults": the recipe as shipped, no overrides.
VARIANTS = {
    f"{precision}{'+shared' * head}{'+grouped' * grouped}{'+eager' * eager}": [
        f"federation.precision={precision}",
        f"federation.share_head={str(head).lower()}",
        f"federation.group_by_length={str(grouped).lower()}",
        f"model.attention={'eager' if eager else 'sdpa'}",
    ]
    for precision in ("fp32", "bf16")
    for head in (False, True)
    for grouped in (False, True)
    for eager in (False, True)
}
VARIANTS["defaults"] = []


def tree_rss(proc: psutil.Process) -> int:
    """Resident bytes of a process and all its descendants (processes may vanish meanwhile)."""
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def watch(cmd: list[str]) -> tuple[float, int]:
    """Run `cmd`; return wall seconds and the peak RSS of its process tree in bytes."""
    start = time.perf_counter()
    child = subprocess.Popen(cmd)
    proc, peak = psutil.Process(child.pid), 0
    while child.poll() is None:
        try:
            peak = max(peak, tree_rss(proc))
        except psutil.Error:
            pass
        time.sleep(0.2)
    if child.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {child.returncode}")
    return time.perf_counter() - start, peak


@dataclass(frozen=True)
class Run:
    """One timed federation: its precision, wall time, peak memory and server rows."""

    variant: str
    seconds: float
    peak: int
    server: list[dict]

    @property
    def label(self) -> str:
        return f"`fedllm run` {self.variant}"

    @property
    def final_loss(self) -> float:
        return self.server[-1]["held_out_loss"]


def federation(recipe: str, *, overrides: list[str], tmp: str, variant: str) -> Run:
    """`fedllm run` of the recipe with the variant's overrides, timed and sampled for memory."""
    name = f"bench-{variant.replace('+', '-')}"
    cmd = [sys.executable, "-m", "fedllm.cli", "run", recipe, *overrides, *VARIANTS[variant]]
    print(f"[bench] {variant}: {' '.join(cmd[3:])}", flush=True)
    seconds, peak = watch([*cmd, f"output_dir={tmp}", f"name={name}", "--overwrite"])
    text = Path(tmp, name, "metrics.jsonl").read_text()
    rows = [json.loads(x) for x in text.split("\n") if x]
    return Run(variant, seconds, peak, [r for r in rows if r.get("kind") == "server"])


def head_step(recipe: str, where: list[str]) -> dict[str, float]:
    """Median seconds of one fp32 local step, head over every position vs label positions."""
    out = subprocess.run(
        [sys.executable, "-c", HEAD, recipe, *where], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(
    args: argparse.Namespace,
    base_s: float,
    base_peak: int,
    runs: list[Run],
    *,
    head: dict[str, float],
    load: tuple[float, float],
) -> str:
    """The results page: the baseline, one row per run, losses, each variant ÷ the first."""
    gib = 1024**3
    lines = [
        "# Quickstart: wall time and peak memory",
        "",
        f"`python bench/quickstart.py --recipe {args.recipe} --variants {' '.join(args.variants)} "
        f"{' '.join(args.overrides)}` on {os.cpu_count()} CPUs, load average {load[0]:.2f} at "
        f"the start and {load[1]:.2f} at the end. Variants: "
        + "; ".join(f"{v} = `{' '.join(VARIANTS[v]) or 'no overrides'}`" for v in args.variants)
        + ".",
        "",
        "| | wall seconds | peak RSS (GiB) | wall ratio | memory ratio |",
        "|---|---|---|---|---|",
        f"| load base + one forward (baseline) | {base_s:.0f} | {base_peak / gib:.2f} "
        "| 1.0 | 1.0 |",
    ]
    for run in runs:
        lines.append(
            f"| {run.label} ({len(run.server) - 1} rounds) | {run.seconds:.0f} | "
            f"{run.peak / gib:.2f} | {run.seconds / base_s:.1f} | {run.peak / base_peak:.1f} |"
        )
    lines.append("")
    for run in runs:
        base_loss, final = run.server[0]["held_out_loss"], run.server[-1]["held_out_loss"]
        lines += [
            f"{run.label}: held-out loss base {base_loss:.4f} → federated adapter {final:.4f} "
            f"(perplexity {math.exp(base_loss):.1f} → {math.exp(final):.1f}); round seconds "
            + ", ".join(f"{r['seconds']:.0f}" for r in run.server[1:])
            + ".",
            "",
        ]
    ref = runs[0]
    for run in runs[1:]:
        delta = 100 * (run.final_loss - ref.final_loss) / ref.final_loss
        lines += [
            f"{run.variant} ÷ {ref.variant}: wall {run.seconds:.0f} s ÷ {ref.seconds:.0f} s = "
            f"**{run.seconds / ref.seconds:.3f}**; final held-out loss {run.final_loss:.4f} vs "
            f"{ref.final_loss:.4f} (**{delta:+.2f}%**).",
            "",
        ]
    if head:
        every, kept = head["every position"], head["label positions"]
        lines += [
            "One fp32 local step of the recipe's model (rank 16, batch of the recipe, median of "
            f"16): output head over every position {every:.3f} s, only at the positions that "
            f"predict a label {kept:.3f} s (**{kept / every:.3f}×**). Every variant above runs "
            "the second; training before issue 15 ran the first.",
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/quickstart.yaml")
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=list(VARIANTS),
        default=["fp32", "bf16+grouped"],
        help="federations to run, the first is the reference",
    )
    parser.add_argument("--no-head", action="store_true", help="skip the one-step head timing")
    parser.add_argument("--out", type=Path, default=RESULTS, help="the results file")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        where = [*args.overrides, f"output_dir={tmp}", "name=bench"]
        base_s, base_peak = watch([sys.executable, "-c", BASELINE, args.recipe, *where])
        head = {} if args.no_head else head_step(args.recipe, where)
        runs = [
            federation(args.recipe, overrides=args.overrides, tmp=tmp, variant=v)
            for v in args.variants
        ]
    load = (load_start, os.getloadavg()[0])
    text = report(args, base_s, base_peak, runs, head=head, load=load)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
