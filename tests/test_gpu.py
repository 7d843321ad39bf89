"""The GPU path: a `gpu`-marked smoke test (base, LoRA, plain and bf16 steps, evaluation, DP-SGD,
a 4-bit base with peft's k-bit preparation, one federation round) and a tiny benchmark, run where
CUDA exists and skipped here; plus `simulation.num_gpus_per_client` refused on a machine without
the GPUs it asks for (runs everywhere)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from fedllm.cli import main
from fedllm.preflight import check_gpus
from fedllm.recipe import ConfigError, load_recipe

ROOT = Path(__file__).parents[1]
RECIPE = str(ROOT / "recipes" / "tiny.yaml")
CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device on this machine")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from fedllm.data.shards import load_shard
    from fedllm.model.base import cached_base_model

    out = tmp_path_factory.mktemp("gpu")
    cfg = load_recipe(RECIPE, [f"output_dir={out}", "data.max_examples=300"])
    base, tok = cached_base_model(cfg)
    return cfg, base, tok, load_shard(cfg, 0, tokenizer=tok)


def lora_on(base):
    from fedllm.model.adapters import attach_lora

    torch.manual_seed(0)
    return attach_lora(base, rank=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])


# ---------------------------------------------------------------- everywhere


def test_gpus_per_client_beyond_this_machine_are_refused() -> None:
    check_gpus(0.0)
    have = torch.cuda.device_count()
    check_gpus(min(0.5, have) or 0.0)
    with pytest.raises(ConfigError, match=r"simulation\.num_gpus_per_client=.*CUDA device"):
        check_gpus(have + 1)


@pytest.mark.skipif(CUDA, reason="checks the refusal on a machine without CUDA")
def test_fedllm_run_refuses_gpus_without_cuda(tmp_path, capsys) -> None:
    code = main(
        [
            "run",
            RECIPE,
            f"output_dir={tmp_path}",
            "data.max_examples=120",
            "simulation.num_gpus_per_client=1",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "simulation.num_gpus_per_client=1.0 but this machine has 0 CUDA device(s)" in err


# ---------------------------------------------------------------- where CUDA exists


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.gpu
@requires_cuda
def test_train_and_evaluate_on_the_gpu(tiny, precision) -> None:
    from fedllm.client.train import evaluate_nll, train_local

    _, base, tok, shard = tiny
    assert next(base.parameters()).device.type == "cuda"  # loaded onto the compute device
    model = lora_on(base)
    try:
        assert all(p.device.type == "cuda" for p in model.parameters() if p.requires_grad)
        kw = dict(batch_size=8, pad_id=tok.pad_token_id, precision=precision)
        result = train_local(model, shard.train, steps=8, lr=5e-3, **kw)
        assert result.loss_last < result.loss_first
        nll, tokens = evaluate_nll(model, shard.held_out, **kw)
        assert tokens > 0 and 0 < nll / tokens < 20
    finally:
        model.unload()


@pytest.mark.gpu
@requires_cuda
def test_dp_sgd_on_the_gpu(tiny) -> None:
    from fedllm.privacy.dpsgd import train_dp
    from fedllm.privacy.plan import SamplePlan

    _, base, tok, shard = tiny
    model = lora_on(base)
    plan = SamplePlan(noise_multiplier=1.0, sample_rate=0.1, max_grad_norm=1.0, steps_per_round=3)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    try:
        out = train_dp(model, shard.train, plan=plan, steps=3, pad_id=tok.pad_token_id, seed=1)
        moved = [
            float((p - before[n]).abs().max()) for n, p in model.named_parameters() if n in before
        ]
    finally:
        model.unload()
    assert out.train.steps == 3 and all(m > 0 for m in moved)  # noise reaches every parameter


@pytest.mark.gpu
@requires_cuda
def test_4bit_base_on_the_gpu_trains(tiny) -> None:
    bnb = pytest.importorskip("bitsandbytes")
    from fedllm.client.train import train_local
    from fedllm.model.base import prepare_base_model
    from fedllm.model.loading import load_base_model

    cfg, _, tok, shard = tiny
    base, _ = load_base_model(prepare_base_model(cfg), quantization="4bit")
    layers = [m for m in base.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.weight.device.type == "cuda" for m in layers)
    model = lora_on(base)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    train_local(model, shard.train, steps=2, batch_size=8, pad_id=tok.pad_token_id, lr=1e-2)
    moved = {
        n: float((p - before[n]).abs().max()) for n, p in model.named_parameters() if n in before
    }
    assert all(v > 0 for n, v in moved.items() if "lora_A" in n), moved


@pytest.mark.gpu
@pytest.mark.slow
@requires_cuda
def test_one_federation_round_on_the_gpu(tmp_path) -> None:
    """The ClientApp's whole round on CUDA (replies leave on the CPU), bf16, FedProx, 2 clients."""
    from fedllm.deploy.local_grid import run_local

    cfg = load_recipe(
        RECIPE,
        [
            f"output_dir={tmp_path}",
            "data.num_clients=2",
            "data.max_examples=160",
            "lora.ranks=[2,4]",
            "federation.rounds=1",
            "federation.local_steps=3",
            "federation.precision=bf16",
            "features.fedprox.mu=0.01",
        ],
    )
    run_dir, _ = run_local(cfg)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    clients = [r for r in rows if r["kind"] == "client"]
    assert len(clients) == 2 and all(r["status"] == "ok" for r in clients)


@pytest.mark.gpu
@requires_cuda
def test_gpu_benchmark_runs_at_tiny_size(tmp_path, monkeypatch) -> None:
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench" / "gpu.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_gpu", bench)  # its dataclass resolves its module
    spec.loader.exec_module(bench)
    out = tmp_path / "gpu.md"
    text = bench.run(
        [
            "--recipe",
            RECIPE,
            "--steps",
            "3",
            "--out",
            str(out),
            f"output_dir={tmp_path}",
            "data.max_examples=200",
        ]
    )
    assert out.read_text() == text
    assert "| fp32 (baseline) |" in text and "| bf16 autocast |" in text
