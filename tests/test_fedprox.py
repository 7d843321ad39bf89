"""FedProx: the proximal term on a tiny peft model against hand-computed values, its gradient,
the recipe checks, and (slow) a federation where a huge μ keeps the global near its start."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from flwr.app import ConfigRecord, RecordDict
from peft import LoraConfig, get_peft_model
from pydantic import ValidationError

from fedllm.aggregators import RoundSpec
from fedllm.features.fedprox import FedProx, live_lora, proximal_penalty
from fedllm.features.registry import feature_class
from fedllm.features.types import ClientPlan, ClientRound
from fedllm.recipe import ConfigError, RunConfig, load_recipe, parse_overrides

TINY = Path(__file__).parents[1] / "recipes" / "tiny.yaml"


def recipe(*overrides: str) -> RunConfig:
    """tiny.yaml with overrides, validated by the schema only (no feature checks)."""
    return RunConfig.model_validate(merged(yaml.safe_load(TINY.read_text()), overrides))


def merged(tree: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """The recipe tree with `section.key=value` overrides merged one section deep."""
    out = dict(tree)
    for key, value in parse_overrides(list(overrides)).items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = {**out[key], **value} if both else value
    return out


class TwoLayers(torch.nn.Module):
    """q: 3 → 2 and v: 2 → 3, adapted at rank 2 (A of q is 2×3, B of q 2×2; A of v 2×2, B 3×2)."""

    def __init__(self) -> None:
        super().__init__()
        self.q = torch.nn.Linear(3, 2, bias=False)
        self.v = torch.nn.Linear(2, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.v(self.q(x))


def tiny_peft() -> torch.nn.Module:
    """The two layers under a rank-2 LoRA: every A all ones, every B zero (a known start)."""
    torch.manual_seed(0)
    model = get_peft_model(TwoLayers(), LoraConfig(r=2, lora_alpha=4, target_modules=["q", "v"]))
    with torch.no_grad():
        for B, A in live_lora(model).values():
            B.zero_()
            A.fill_(1.0)
    return model


def client_round(cfg: RunConfig) -> ClientRound:
    return ClientRound(
        cfg=cfg,
        partition=0,
        server_round=1,
        spec=RoundSpec(),
        config=ConfigRecord({}),
        node_config={},
        state=RecordDict(),
        seed=0,
        plan=ClientPlan(partition=0, rank=2),
    )


def term(mu: float, model: torch.nn.Module):
    cfg = recipe(f"features.fedprox.mu={mu}")
    (reg,) = FedProx(cfg).regularizers(model, client_round(cfg))
    return reg


def pairs(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {m.split(".")[-1]: p for m, p in live_lora(model).items()}


def test_finds_the_live_factors_of_the_active_adapter() -> None:
    model = tiny_peft()
    found = pairs(model)
    assert {m: (B.shape, A.shape) for m, (B, A) in found.items()} == {
        "q": ((2, 2), (2, 3)),
        "v": ((3, 2), (2, 2)),
    }
    assert all(B.requires_grad and A.requires_grad for B, A in found.values())


def test_zero_at_the_start_with_zero_gradient() -> None:
    model = tiny_peft()
    reg = term(0.5, model)
    value = reg()
    assert value.item() == 0.0
    value.backward()
    assert all(not B.grad.any() and not A.grad.any() for B, A in pairs(model).values())


def test_penalty_matches_a_hand_computed_value() -> None:
    model = tiny_peft()
    reg = term(0.5, model)  # the start is snapshotted now: B = 0, A = 1
    with torch.no_grad():  # a "trained" adapter: q's B moves by [[1, 2], [0, 0]], v's A by one 3
        pairs(model)["q"][0].copy_(torch.tensor([[1.0, 2.0], [0.0, 0.0]]))
        pairs(model)["v"][1][0, 1] += 3.0
    # μ/2·(‖ΔB_q‖² + ‖ΔA_v‖²) = 0.5/2·((1 + 4) + 9) = 3.5
    assert reg().item() == pytest.approx(3.5)
    assert term(2.0, model)().item() == 0.0  # a new round snapshots the trained adapter


def test_gradient_pulls_back_to_the_start() -> None:
    model = tiny_peft()
    mu, lr = 0.5, 0.1
    reg = term(mu, model)
    moved = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    B = pairs(model)["q"][0]
    with torch.no_grad():
        B.copy_(moved)
    reg().backward()
    torch.testing.assert_close(B.grad, mu * moved)  # ∇_B μ/2‖B − B₀‖² = μ(B − B₀), B₀ = 0
    with torch.no_grad():
        B -= lr * B.grad
    torch.testing.assert_close(B.detach(), (1 - lr * mu) * moved)  # a step towards B₀
    assert reg().item() < mu / 2 * 5


def test_frozen_a_has_no_term_and_no_gradient() -> None:
    model = tiny_peft()
    for _, A in pairs(model).values():
        A.requires_grad_(False)
    reg = term(1.0, model)
    with torch.no_grad():
        pairs(model)["v"][0].fill_(1.0)  # B of v: 3×2 ones
    value = reg()
    value.backward()
    assert value.item() == pytest.approx(3.0)  # 1/2·6
    assert all(A.grad is None for _, A in pairs(model).values())


def test_penalty_sums_low_precision_factors_in_float32() -> None:
    zeros = torch.zeros(7, 143, dtype=torch.bfloat16)
    live = {"m": (zeros + 1, zeros[:, :3].T)}  # 1001 unit differences: not a bfloat16 number
    start = {"m": (zeros, zeros[:, :3].T)}
    value = proximal_penalty(live, start, mu=2.0)
    assert value.dtype == torch.float32 and value.item() == 1001.0


def test_a_model_without_lora_is_refused() -> None:
    cfg = recipe("features.fedprox.mu=0.1")
    with pytest.raises(ValueError, match=r"features\.fedprox"):
        FedProx(cfg).regularizers(TwoLayers(), client_round(cfg))


# -- recipe ------------------------------------------------------------------------------------


def test_options_default_and_validation() -> None:
    assert FedProx(recipe("features.fedprox={}")).options.mu == 0.01
    for bad in ("0", "-1", ".inf"):
        with pytest.raises(ValidationError, match=r"mu"):
            FedProx(recipe(f"features.fedprox.mu={bad}"))
    with pytest.raises(ValidationError, match=r"lam"):
        FedProx(recipe("features.fedprox.lam=0.1"))


def test_refused_with_dp_sgd() -> None:
    dp = ("privacy.mode=sample", "privacy.noise_multiplier=1.0")
    with pytest.raises(ValueError, match=r"features\.fedprox.*privacy\.mode='sample'"):
        FedProx.check(recipe("features.fedprox.mu=0.1", *dp))
    FedProx.check(recipe(*dp))  # off: no refusal


def test_refused_with_a_merging_aggregator() -> None:
    with pytest.raises(ValueError, match=r"features\.fedprox.*'flora'"):
        FedProx.check(recipe("features.fedprox.mu=0.1", "aggregator.name=flora"))
    for name in ("svd", "fedit", "ffa", "fedsa"):  # adapter state (or its own B): accepted
        FedProx.check(recipe("features.fedprox.mu=0.1", f"aggregator.name={name}"))


def test_recipe_loading_runs_the_checks() -> None:
    assert feature_class("fedprox") is FedProx
    with pytest.raises(ConfigError, match=r"features\.fedprox\.mu"):
        load_recipe(TINY, ["features.fedprox.mu=0"])
    with pytest.raises(ConfigError, match=r"features\.fedprox"):
        load_recipe(TINY, ["features.fedprox.mu=0.1", "aggregator.name=flora"])
    assert load_recipe(TINY, ["features.fedprox.mu=0.1"]).features == {"fedprox": {"mu": 0.1}}


# -- end to end --------------------------------------------------------------------------------


def global_norm(tmp_path: Path, name: str, *overrides: str) -> float:
    """‖ΔW‖_F summed over modules of the global after one round (the start is ΔW = 0)."""
    from fedllm.deploy.local_grid import run_local
    from fedllm.server.checkpoint import load_checkpoint
    from fedllm.server.metrics import MetricsLog

    cfg = load_recipe(
        TINY,
        [
            f"output_dir={tmp_path}",
            f"name={name}",
            "data.num_clients=2",
            "data.max_examples=160",
            "lora.ranks=[2,4]",
            "federation.rounds=1",
            *overrides,
        ],
    )
    run_dir, _ = run_local(cfg)
    rows = MetricsLog(run_dir).read()
    assert sum(r["kind"] == "client" and r["status"] == "ok" for r in rows) == 2
    state = load_checkpoint(run_dir)["strategy"]["global"]
    deltas = [s * (b.double() @ a.double()) for b, a, s in state.values()]
    return float(sum(torch.linalg.matrix_norm(d) for d in deltas))


@pytest.mark.slow
def test_a_huge_mu_keeps_the_clients_at_the_global(tmp_path: Path) -> None:
    free = global_norm(tmp_path, "plain")
    held = global_norm(tmp_path, "prox", "features.fedprox.mu=1000.0")
    assert free > 0 and held < 0.1 * free, (free, held)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:  # a shared 2-core machine: avoid oversubscription
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
