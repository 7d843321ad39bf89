"""Round cost with 100 against 10,000 clients, 20 of them taking part per round.

    python bench/scale.py [--small 100] [--large 10000] [--engine local|simulation] [key=value ...]

Both federations run the tiny recipe for one round with the same work: 20 clients train
(`federation.clients_per_round`) and a panel of 20 evaluates (`federation.evaluate_clients`), every
client holding `--per-client` WordNet nouns (IID), so 10,000 clients need 80,000 of the 82,115
nouns. Each size runs in a fresh process whose whole process tree is sampled for resident memory.
The local engine runs the real ServerApp loop, strategy and ClientApp on an in-process grid
(`fedllm.deploy.local_grid`: Flower's serialisation, no Ray); `--engine simulation` runs
`fedllm run` (Flower's simulation engine, whose SuperLink polls every node for messages).
Round 0 evaluates the base (and pays each process's first load of the base and the data); round 1
trains and evaluates: its ratio is the one that must stay <= 1.5 (`--repeat N` alternates the
sides N times and keeps the fastest round 1 of each). Writes results/scale.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results" / "scale.md"
NOUNS = 82_115  # WordNet 3.0 noun synsets with a gloss (data.pos=[noun])


def overrides(clients: int, args: argparse.Namespace, out: Path) -> list[str]:
    """The recipe overrides of one side: only the number of clients (and examples) differs."""
    return [
        f"output_dir={out}",
        f"name=scale-{clients}",
        f"data.num_clients={clients}",
        f"data.max_examples={clients * args.per_client}",
        "data.partitioner=iid",
        "federation.rounds=1",
        f"federation.clients_per_round={args.per_round}",
        f"federation.evaluate_clients={args.per_round}",
        *args.overrides,
    ]


def case(clients: int, args: argparse.Namespace, out: Path) -> None:
    """One federation in this process (local engine); prints its timings as one JSON line."""
    from fedllm.deploy.local_grid import run_local
    from fedllm.launch import absolute_paths
    from fedllm.recipe import load_recipe

    start = time.perf_counter()
    cfg = absolute_paths(load_recipe(args.recipe, overrides(clients, args, out)))
    run_dir, _ = run_local(cfg)
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"wall": wall, "self_peak": peak, "run_dir": str(run_dir)}), flush=True)


def tree_rss(proc: psutil.Process) -> int:
    """Resident bytes of a process and all its descendants (processes may vanish meanwhile)."""
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def watch(cmd: list[str], log: Path) -> tuple[float, int]:
    """Run `cmd` (output to `log`); wall seconds and the peak RSS of its process tree."""
    start = time.perf_counter()
    with log.open("w") as sink:
        child = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, cwd=ROOT)
        proc, peak = psutil.Process(child.pid), 0
        while child.poll() is None:
            try:
                peak = max(peak, tree_rss(proc))
            except psutil.Error:
                pass
            time.sleep(0.2)
    if child.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-20:])
        raise SystemExit(f"{' '.join(cmd)} failed ({child.returncode}); end of {log}:\n{tail}")
    return time.perf_counter() - start, peak


def measure(clients: int, args: argparse.Namespace, out: Path) -> dict:
    """Run one size in a fresh process tree; its round seconds, wall time and peak memory."""
    if args.engine == "local":
        cmd = [sys.executable, __file__, "--case", str(clients), *flags(args)]
    else:
        over = overrides(clients, args, out)
        cmd = [sys.executable, "-m", "fedllm.cli", "run", args.recipe, *over, "--overwrite"]
    wall, peak = watch(cmd, out / f"scale-{clients}.log")
    rows = [
        json.loads(line)
        for line in (out / f"scale-{clients}" / "metrics.jsonl").read_text().splitlines()
    ]
    server = {r["round"]: r for r in rows if r.get("kind") == "server"}
    trained = [r for r in rows if r.get("kind") == "client" and r.get("status") == "ok"]
    evaluated = [r for r in rows if r.get("kind") == "eval" and r["round"] == 1]
    return {
        "clients": clients,
        "round0": server[0]["seconds"],
        "round1": server[1]["seconds"],
        "train1": server[1]["train_seconds"],
        "trained": len(trained),
        "evaluated": len(evaluated),
        "wall": wall,
        "peak": peak,
        "loss": server[1].get("held_out_loss"),
    }


def best(results: list[dict]) -> dict:
    """Of repeated runs of one side, the one with the fastest round 1 (the least disturbed)."""
    return min(results, key=lambda r: r["round1"])


def flags(args: argparse.Namespace) -> list[str]:
    """The options a `--case` child needs to build the same recipe."""
    return [
        "--recipe",
        args.recipe,
        "--per-round",
        str(args.per_round),
        "--per-client",
        str(args.per_client),
        "--workdir",
        str(args.workdir),
        *args.overrides,
    ]


def report(small: dict, large: dict, args: argparse.Namespace, loads: tuple[float, float]) -> str:
    """The Markdown result: both sides of every ratio, the command and the load average."""
    gib = 1024**3

    def row(name: str, key: str, fmt: str, scale: float = 1.0) -> str:
        a, b = small[key] / scale, large[key] / scale
        return f"| {name} | {a:{fmt}} | {b:{fmt}} | {b / a:.2f} |"

    command = (
        f"python bench/scale.py --small {args.small} --large {args.large} --engine {args.engine}"
        f" --repeat {args.repeat}" + "".join(f" {o}" for o in args.overrides)
    )
    return "\n".join(
        [
            "# Round cost against the number of clients",
            "",
            f"Command: `{command}`. Recipe `{args.recipe}` for one round: "
            f"{args.per_round} clients train and {args.per_round} evaluate per round, "
            f"{args.per_client} WordNet nouns per client (IID); engine `{args.engine}`; the run "
            f"with the fastest round 1 of {args.repeat} per side, alternated. "
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average "
            f"{loads[0]:.2f} before and {loads[1]:.2f} after.",
            "",
            f"| | {args.small} clients | {args.large} clients | ratio |",
            "|---|---:|---:|---:|",
            row("round 1 (train + evaluate), s", "round1", ".2f"),
            row("round 1 training, s", "train1", ".2f"),
            row("round 0 (evaluate the base; first loads), s", "round0", ".2f"),
            row("whole run (start-up, data, tiny model build included), s", "wall", ".1f"),
            row("peak RSS of the process tree, GiB", "peak", ".2f", gib),
            f"| clients trained / evaluated in round 1 | {small['trained']} / "
            f"{small['evaluated']} | {large['trained']} / {large['evaluated']} | |",
            "",
            f"Target: round 1 with {args.large} clients <= 1.5x the round with {args.small} "
            f"(measured {large['round1'] / small['round1']:.2f}x).",
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "tiny.yaml"))
    parser.add_argument("--small", type=int, default=100)
    parser.add_argument("--large", type=int, default=10_000)
    parser.add_argument("--per-round", type=int, default=20)
    parser.add_argument("--per-client", type=int, default=8)
    parser.add_argument("--engine", choices=["local", "simulation"], default="local")
    parser.add_argument("--repeat", type=int, default=1, help="runs per side (best is kept)")
    parser.add_argument("--out", type=Path, default=None, help="where to write the result")
    parser.add_argument("--case", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="recipe key=value overrides")
    args = parser.parse_args()
    if args.case is not None:  # a child: one federation in this process
        case(args.case, args, args.workdir)
        return
    for n in (args.small, args.large):
        if n * args.per_client > NOUNS and not any(
            o.startswith("data.pos") for o in args.overrides
        ):
            raise SystemExit(
                f"{n} clients x {args.per_client} examples = {n * args.per_client} > {NOUNS} "
                "WordNet nouns: lower --per-client or add data.pos=[noun,verb,adj,adv] (117,659)"
            )
    before = os.getloadavg()[0]
    runs: dict[int, list[dict]] = {args.small: [], args.large: []}
    with tempfile.TemporaryDirectory() as tmp:
        args.workdir = Path(tmp)
        for _ in range(args.repeat):  # alternated, so both sides meet the same machine
            for n in runs:
                runs[n].append(measure(n, args, args.workdir))
    small, large = (best(runs[n]) for n in (args.small, args.large))
    text = report(small, large, args, (before, os.getloadavg()[0]))
    print(text)
    out = args.out or RESULTS
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


if __name__ == "__main__":
    main()
