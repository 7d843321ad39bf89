"""Adapters <-> factors <-> records <-> PEFT folders, on a tiny model built from config."""

from pathlib import Path

import peft.utils.save_and_load as peft_save
import pytest
import torch
from flwr.app import ArrayRecord
from peft import PeftModel

from fedllm.aggregators import Factors
from fedllm.model.adapters import (
    adapter_holding,
    attach_lora,
    from_record,
    read_factors,
    revive_dead,
    save_peft_adapter,
    to_record,
    write_factors,
)
from fedllm.model.loading import load_base_model
from fedllm.model.tiny import build_tiny_model

TEXTS = [f"word {i} means the thing number {i} in a list of {i % 7} things" for i in range(200)]
Q = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny"), texts=TEXTS, vocab_size=300)


def random_factors(shapes: dict, rank: int, scaling: float, seed: int = 0) -> dict[str, Factors]:
    g = torch.Generator().manual_seed(seed)
    return {
        m: Factors(torch.randn(d, rank, generator=g), torch.randn(rank, k, generator=g), scaling)
        for m, (d, k) in shapes.items()
    }


def test_write_then_read_reproduces_the_update_at_another_scaling(tiny_dir: Path) -> None:
    base, _ = load_base_model(tiny_dir)
    model = attach_lora(base, rank=4, alpha=8.0, dropout=0.0, target_modules=["q_proj", "v_proj"])
    shapes = {m: f.shape for m, f in read_factors(model).items()}
    assert Q in shapes and len(shapes) == 4  # 2 layers x (q, v)
    sent = random_factors(shapes, rank=4, scaling=0.5)
    write_factors(model, sent)
    got = read_factors(model)
    for m, f in sent.items():
        assert got[m].scaling == pytest.approx(2.0)  # this adapter's alpha / r
        torch.testing.assert_close(got[m].delta(), f.delta(), rtol=1e-5, atol=1e-5)
    model.unload()


def test_reading_factors_never_asks_the_hub(tiny_dir: Path, monkeypatch) -> None:
    """An adapter whose base is named by hub id (a loaded adapter, a hub base) is read offline:
    peft's embedding check would look the id up on the Hub on every reply."""

    def no_hub(*args, **kwargs):
        raise AssertionError(f"hub lookup {args}")

    monkeypatch.setattr(peft_save, "check_file_exists_on_hf_hub", no_hub)
    base, _ = load_base_model(tiny_dir)
    model = attach_lora(base, rank=2, alpha=4.0, dropout=0.0, target_modules=["q_proj"])
    model.peft_config["default"].base_model_name_or_path = "someone/a-hub-model"
    assert set(read_factors(model)) == {Q, Q.replace("layers.0", "layers.1")}
    model.unload()


def test_write_truncates_a_larger_global_to_the_client_rank(tiny_dir: Path) -> None:
    base, _ = load_base_model(tiny_dir)
    model = attach_lora(base, rank=2, alpha=4.0, dropout=0.0, target_modules=["q_proj"])
    shapes = {m: f.shape for m, f in read_factors(model).items()}
    sent = random_factors(shapes, rank=6, scaling=1.0)
    write_factors(model, sent)
    got = read_factors(model)[Q]
    assert got.rank == 2
    expected = sent[Q].B[:, :2] @ sent[Q].A[:2]
    torch.testing.assert_close(got.delta().float(), expected, rtol=1e-5, atol=1e-5)
    model.unload()


def test_revive_gives_dead_components_fresh_A_rows_and_keeps_the_update() -> None:
    # a rank-2 global zero-padded to rank 4: components 2, 3 have A row and B column zero
    g = torch.Generator().manual_seed(0)
    live = Factors(torch.randn(6, 2, generator=g), torch.randn(2, 5, generator=g), 1.0)
    padded = live.pad(4)
    half = Factors(live.B.clone(), torch.zeros(2, 5), 1.0)  # A zero, B not: not dead, trains
    out, n = revive_dead({Q: padded, "half": half}, generator=torch.Generator().manual_seed(1))
    assert n == 2
    A = out[Q].A
    torch.testing.assert_close(A[:2], live.A)  # live components untouched
    assert (A[2:] != 0).all() and A[2:].abs().max() <= 5**-0.5  # U(±1/√k)
    assert (out[Q].B[:, 2:] == 0).all()
    torch.testing.assert_close(out[Q].delta(), padded.delta())  # ΔW unchanged
    assert out["half"] is half
    again, n = revive_dead({Q: padded}, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(again[Q].A, A)  # seeded
    assert revive_dead(out, generator=torch.Generator())[1] == 0


def test_padded_components_train_only_once_revived(tiny_dir: Path) -> None:
    # a client of rank 4 receiving a rank-2 global: without revival components 2, 3 stay zero
    # through training (each factor's gradient is a product with the other)
    base, tok = load_base_model(tiny_dir)
    model = attach_lora(base, rank=4, alpha=8.0, dropout=0.0, target_modules=["q_proj"])
    shapes = {m: f.shape for m, f in read_factors(model).items()}
    start = {m: f.pad(4) for m, f in random_factors(shapes, rank=2, scaling=2.0).items()}
    ids = tok(TEXTS[:8], return_tensors="pt", padding=True)["input_ids"]

    def trained(factors: dict[str, Factors]) -> Factors:
        write_factors(model, factors)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(3):
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        return read_factors(model)[Q]

    dead = trained(start)
    assert (dead.A[2:] == 0).all() and (dead.B[:, 2:] == 0).all()
    revived, n = revive_dead(start, generator=torch.Generator().manual_seed(0))
    assert n == 2 * len(shapes)
    alive = trained(revived)
    assert (alive.B[:, 2:] != 0).any()
    model.unload()


def test_an_adapter_holding_factors_takes_their_rank_and_scaling_or_leaves_the_base(
    tiny_dir: Path,
) -> None:
    base, _ = load_base_model(tiny_dir)
    probe = attach_lora(base, rank=1, alpha=1.0, dropout=0.0, target_modules=["q_proj"])
    shapes = {m: f.shape for m, f in read_factors(probe).items()}
    probe.unload()
    sent = random_factors(shapes, rank=3, scaling=0.25)
    model = adapter_holding(base, sent, dropout=0.0, target_modules=["q_proj"])
    assert model.peft_config["default"].r == 3
    got = read_factors(model)
    for m, f in sent.items():  # the same rank and scaling: the factors themselves
        assert got[m].scaling == 0.25 and torch.equal(got[m].B, f.B) and torch.equal(got[m].A, f.A)
    model.unload()
    # factors for modules the adapter does not target: refused, and the shared base is left clean
    with pytest.raises(KeyError, match="no LoRA on"):
        adapter_holding(base, sent, dropout=0.0, target_modules=["v_proj"])
    assert not any("lora" in name for name, _ in base.named_modules())


def test_record_round_trip_and_malformed_records() -> None:
    f = {Q: Factors(torch.randn(8, 3), torch.randn(3, 5), 2.0)}
    back = from_record(to_record(f), 2.0)
    torch.testing.assert_close(back[Q].B, f[Q].B)
    torch.testing.assert_close(back[Q].A, f[Q].A)
    with pytest.raises(ValueError, match="no matching"):
        from_record(ArrayRecord({f"{Q}.lora_A": torch.zeros(3, 5)}), 1.0)
    with pytest.raises(ValueError, match="unexpected array"):
        from_record(ArrayRecord({"weights": torch.zeros(3, 5)}), 1.0)


def test_saved_adapter_loads_with_stock_peft_and_applies_the_update(
    tiny_dir: Path, tmp_path: Path
) -> None:
    base, tok = load_base_model(tiny_dir)
    shapes = {
        m: f.shape
        for m, f in read_factors(
            attach_lora(base, rank=3, alpha=3.0, dropout=0.0, target_modules=["q_proj", "v_proj"])
        ).items()
    }
    base = base.unload() if hasattr(base, "unload") else base
    factors = random_factors(shapes, rank=3, scaling=0.1, seed=1)
    factors[Q] = Factors(factors[Q].B[:, :2], factors[Q].A[:2], 0.3)  # a lower rank, other scaling
    folder = save_peft_adapter(
        tmp_path / "adapter", factors, base_model=str(tiny_dir), target_modules=["q_proj", "v_proj"]
    )
    fresh, _ = load_base_model(tiny_dir)
    ids = tok("word 3 means", return_tensors="pt").input_ids
    with torch.no_grad():
        plain = fresh(ids).logits
    loaded = PeftModel.from_pretrained(fresh, str(folder))
    with torch.no_grad():
        adapted = loaded(ids).logits
    assert not torch.allclose(plain, adapted)
    layer = dict(loaded.named_modules())["base_model.model." + Q]
    delta = (
        layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    )
    torch.testing.assert_close(delta.double(), factors[Q].delta(), rtol=1e-5, atol=1e-6)
