"""End to end through Flower's real simulation engine (Ray): a tiny model built from config, a
locally trained tokenizer, 3 clients of ranks 2/4/8, 2 rounds; then resume to a third round."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedllm.cli import main
from fedllm.model.card import resolve_adapter_base
from fedllm.server.checkpoint import load_checkpoint, save_checkpoint

RECIPE = str(Path(__file__).parents[1] / "recipes" / "tiny.yaml")
pytestmark = pytest.mark.slow


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    code = main(["run", RECIPE, f"output_dir={out}", "name=it", "federation.rounds=2"])
    assert code == 0
    return out / "it"


def test_run_writes_metrics_for_every_round_and_client(run_dir: Path) -> None:
    r = rows(run_dir)
    clients = [x for x in r if x["kind"] == "client"]
    assert sorted({(x["round"], x["partition"]) for x in clients}) == [
        (rnd, p) for rnd in (1, 2) for p in range(3)
    ]
    assert {x["rank"] for x in clients} == {2, 4, 8}
    assert all(x["status"] == "ok" and x["bytes_sent"] > 0 for x in clients)
    # a rank-2 client uploads a quarter of what a rank-8 client does
    by_rank = {x["rank"]: x["bytes_sent"] for x in clients if x["round"] == 1}
    assert by_rank[8] > 3 * by_rank[2]
    server = {x["round"]: x for x in r if x["kind"] == "server"}
    assert set(server) == {0, 1, 2}
    assert server[2]["held_out_loss"] < server[0]["held_out_loss"]
    for name in ("recipe.yaml", "held_out_loss.png", "final_eval.json", "final_eval.md"):
        assert (run_dir / name).is_file(), name


def test_final_adapter_loads_with_stock_peft(run_dir: Path) -> None:
    config = json.loads((run_dir / "final_adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny", "a portable name, not a cache path"
    base_dir = resolve_adapter_base(run_dir / "final_adapter")
    assert base_dir == run_dir / "tiny_base", "the name resolves to the run's tiny base"
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    tok = AutoTokenizer.from_pretrained(base_dir)
    ids = tok("Define the word 'dog' (noun).", return_tensors="pt").input_ids
    with torch.no_grad():
        before = base(ids).logits
    model = PeftModel.from_pretrained(base, str(run_dir / "final_adapter"))
    with torch.no_grad():
        after = model(ids).logits
    assert torch.isfinite(after).all()
    assert not torch.allclose(before, after), "the federated adapter must change the model"
    # the exact svd aggregate keeps rank 2 + 4 + 8 = 14
    assert config["r"] == 14


def test_resume_continues_from_the_last_finished_round(run_dir: Path) -> None:
    before = rows(run_dir)
    state = load_checkpoint(run_dir)
    assert state is not None and state["round"] == 2
    out, name = run_dir.parent, run_dir.name
    code = main(
        ["run", RECIPE, f"output_dir={out}", f"name={name}", "federation.rounds=3", "--resume"]
    )
    assert code == 0
    after = rows(run_dir)
    assert after[: len(before)] == before, "finished rounds are kept as they were"
    new = after[len(before) :]
    assert {x["round"] for x in new} == {3}, "only round 3 ran; round 0 (base) was not redone"
    assert load_checkpoint(run_dir)["round"] == 3
    # Round 3 started from round 2's global adapter, not from scratch: its first local step is
    # already better than round 1's first step (which started from the base model).
    first = {
        (x["round"], x["partition"]): x["train_loss_first"] for x in after if x["kind"] == "client"
    }
    mean = {rnd: sum(first[(rnd, p)] for p in range(3)) / 3 for rnd in (1, 3)}
    assert mean[3] < mean[1] - 0.03, mean


def test_a_run_stopped_during_round_1_keeps_its_base_round(run_dir: Path) -> None:
    """A crash after round 0's checkpoint resumes at round 1: round 0's rows are kept, not
    evaluated again (nor wiped with the metrics file)."""
    stopped = run_dir.parent / "stopped"
    shutil.copytree(run_dir, stopped)
    base = [x for x in rows(stopped) if x["round"] == 0]
    state = load_checkpoint(stopped)
    pending = {"round": 1, "partitions": [0, 1, 2], "sampled": 3}  # clients asked, no reply
    (stopped / "checkpoint.prev.pt").unlink()
    save_checkpoint(stopped, {**state, "round": 0, "pending": pending})
    (stopped / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in base))
    args = ["run", RECIPE, f"output_dir={run_dir.parent}", "name=stopped", "federation.rounds=1"]
    assert main([*args, "--resume"]) == 0
    after = rows(stopped)
    assert after[: len(base)] == base, "round 0's rows are kept as they were"
    assert {x["round"] for x in after[len(base) :]} == {1}, "round 0 was not redone"


def test_existing_run_is_not_overwritten_without_asking(run_dir: Path, capsys) -> None:
    code = main(["run", RECIPE, f"output_dir={run_dir.parent}", f"name={run_dir.name}"])
    assert code == 2
    assert "--resume" in capsys.readouterr().err


def test_a_resumed_simulation_trains_and_evaluates_the_clients_the_whole_run_would(
    tmp_path: Path,
) -> None:
    """Flower's simulation gives a resumed run's nodes new ids: sampled over ids, a resume
    trained and evaluated other clients than the uninterrupted run. Seated by the partitions
    the nodes claim (fedllm.server.seats), round 3 asks the same clients either way."""
    sampled = ["federation.clients_per_round=2", "federation.evaluate_clients=2"]
    args = ["run", RECIPE, f"output_dir={tmp_path}", *sampled]
    assert main([*args, "name=whole", "federation.rounds=3"]) == 0
    assert main([*args, "name=cut", "federation.rounds=2"]) == 0
    assert main([*args, "name=cut", "federation.rounds=3", "--resume"]) == 0

    def asked(name: str) -> dict[tuple[str, int], list[int]]:
        out: dict[tuple[str, int], list[int]] = {}
        for x in rows(tmp_path / name):
            if x["kind"] in ("client", "eval"):
                out.setdefault((x["kind"], x["round"]), []).append(x["partition"])
        return {key: sorted(parts) for key, parts in out.items()}

    whole, cut = asked("whole"), asked("cut")
    assert len(whole[("client", 3)]) == 2 and len(whole[("eval", 3)]) == 2
    assert cut == whole
